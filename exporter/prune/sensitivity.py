"""What pruning costs, measured in torch before anything is exported.

Bits per byte (total NLL in bits / UTF-8 bytes of the texts) compares models whose tokenizers
segment differently (vocabulary pruning); KL vs the unpruned model (same tokenizer) is the finer
signal for structured pruning. The sensitivity sweep prunes one layer at a time at a few ratios and
measures both, which tells a user which layers can lose what.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtime.errors import KoedgeError

LOGITS_BUDGET = 1 << 25  # floats of logits per forward batch (128 MB)


@dataclass
class EvalSet:
    """Token ids per text (bos first when the model has one) and the texts' UTF-8 byte count."""

    ids: list[list[int]]
    n_bytes: int

    @classmethod
    def from_texts(cls, tokenizer_file: Path, texts: list[str], bos: int | None) -> "EvalSet":
        from tokenizers import Tokenizer

        if not texts:
            raise KoedgeError("no evaluation texts")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        prefix = [bos] if bos is not None else []
        ids = [prefix + e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        return cls(ids, sum(len(t.encode("utf-8")) for t in texts))

    def batches(self, vocab_size: int, pad_id: int = 0) -> list[dict]:
        """Right-padded batches, longest first, sized so the logits stay under LOGITS_BUDGET."""
        import torch

        order = sorted(range(len(self.ids)), key=lambda i: -len(self.ids[i]))
        out, current = [], []
        for index in order:
            longest = len(self.ids[current[0]]) if current else len(self.ids[index])
            if current and (len(current) + 1) * longest * vocab_size > LOGITS_BUDGET:
                out.append(current)
                current = []
            current.append(index)
        if current:
            out.append(current)
        batches = []
        for group in out:
            width = max(len(self.ids[i]) for i in group)
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
                mask[row, : len(self.ids[i])] = 1
            batches.append({"input_ids": input_ids, "attention_mask": mask})
        return batches


class Scorer:
    """Bits per byte of a model on an EvalSet, and KL against the first model it scored.

    The first scoring also records every decoder layer's inputs, so a model that differs from the
    reference only from layer i on can be re-scored from layer i (`start_layer`): the sensitivity
    sweep then skips the unchanged lower layers.
    """

    def __init__(self, evalset: EvalSet, vocab_size: int, keep_reference: bool = True, record_layers: bool = False):
        self.evalset = evalset
        self.batches = evalset.batches(vocab_size)
        self.keep_reference = keep_reference
        self.record_layers = record_layers
        self.reference: list | None = None
        self.layer_inputs: list[list[tuple]] = []  # per batch, per layer: (args, kwargs)

    def _record(self, model, batch: dict):
        from exporter.prune.structured import decoder_layers

        calls: list[tuple] = []
        hooks = [layer.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)),
                                                 with_kwargs=True) for layer in decoder_layers(model)]
        try:
            logits = model(**batch, use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()
        self.layer_inputs.append(calls)
        return logits

    def _replay(self, model, index: int, start_layer: int):
        """Logits from layer `start_layer` on, fed with the recorded inputs of the reference run."""
        import torch

        from exporter.prune.structured import _layers_owner

        owner = _layers_owner(model)
        calls = self.layer_inputs[index]
        hidden = calls[start_layer][0][0]
        for layer, (args, kwargs) in zip(owner.layers[start_layer:], calls[start_layer:]):
            out = layer(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        norm = getattr(owner, "norm", None) or getattr(owner, "final_layer_norm", None)
        logits = model.get_output_embeddings()(norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def score(self, model, start_layer: int = 0) -> dict:
        import torch

        record = self.record_layers and not self.layer_inputs
        nll, kl, positions = 0.0, 0.0, 0
        references = []
        with torch.no_grad():
            for index, batch in enumerate(self.batches):
                if record:
                    logits = self._record(model, batch)
                elif start_layer > 0:
                    logits = self._replay(model, index, start_layer)
                else:
                    logits = model(**batch, use_cache=False).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                targets = batch["input_ids"][:, 1:]
                valid = batch["attention_mask"][:, 1:].bool()
                nll -= float(logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[valid].sum())
                flat = logp[valid]
                positions += flat.shape[0]
                if self.reference is not None:
                    ref = self.reference[index].float()
                    kl += float((ref.exp() * (ref - flat)).sum())
                elif self.keep_reference:
                    references.append(flat.half())
        compared = self.reference is not None
        if not compared and self.keep_reference:
            self.reference = references
        bits = nll / math.log(2)
        return {"bits_per_byte": bits / self.evalset.n_bytes,
                "kl": kl / max(positions, 1) if compared else (0.0 if self.keep_reference else None),
                "tokens": positions, "bytes": self.evalset.n_bytes}


# --- the sweep ---------------------------------------------------------------------------------------

@dataclass
class SensitivityConfig:
    ffn_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    head_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    drop_layer: bool = True
    score: str = "weight"


def _row(layer: int, kind: str, ratio: float, base: dict, result: dict, removed: int) -> dict:
    return {"layer": layer, "kind": kind, "ratio": ratio, "params_removed": removed,
            "bits_per_byte": round(result["bits_per_byte"], 5),
            "delta_bpb_pct": round(100 * (result["bits_per_byte"] / base["bits_per_byte"] - 1), 3),
            "kl": round(result["kl"], 5)}


def sensitivity(model, scorer: Scorer, config: SensitivityConfig, calib_batches: list,
                progress: Callable[[str], None] = lambda message: None) -> tuple[dict, list[dict]]:
    """Prune one layer at a time (on a copy of that layer) and score; the model is left unchanged."""
    from exporter.prune.structured import (attention_parts, decoder_layers, ffn_scores, head_scores,
                                           prune_ffn, prune_heads, _head_slots)

    base = scorer.score(model)
    layers = decoder_layers(model)
    try:
        replay = scorer.score(model, start_layer=1) if len(layers) > 1 and scorer.layer_inputs else None
    except (IndexError, TypeError):  # a layer called in a way the replay does not reproduce
        replay = None
    fast = replay is not None and abs(replay["bits_per_byte"] - base["bits_per_byte"]) <= 1e-5 * base["bits_per_byte"]
    if replay is not None and not fast:
        progress("replaying recorded layer inputs does not reproduce the model; scoring full passes")
    ffn = ffn_scores(model, config.score, calib_batches)
    try:
        heads = head_scores(model, config.score, calib_batches)
    except KoedgeError:
        heads = None
    rows = []
    total = len(layers) * (len(config.ffn_ratios) + (len(config.head_ratios) if heads else 0) + config.drop_layer)
    done = 0

    def run(index: int, kind: str, ratio: float, edit) -> None:
        nonlocal done
        original = layers[index]
        trial = copy.deepcopy(original)
        params = sum(p.numel() for p in trial.parameters())
        edit(trial)
        layers[index] = trial
        try:
            result = scorer.score(model, start_layer=index if fast else 0)
        finally:
            layers[index] = original
        removed = params if kind == "layer" else params - sum(p.numel() for p in trial.parameters())
        rows.append(_row(index, kind, ratio, base, result, removed))
        done += 1
        progress(f"sensitivity {done}/{total}: layer {index} {kind} {ratio:g} -> "
                 f"{rows[-1]['delta_bpb_pct']:+.2f}% bpb, KL {rows[-1]['kl']:.4f}")

    for index in range(len(layers)):
        width = len(ffn[index])
        order = sorted(range(width), key=lambda c: -float(ffn[index][c]))
        for ratio in config.ffn_ratios:
            keep = order[: max(1, width - int(round(width * ratio)))]
            run(index, "ffn", ratio, lambda layer, keep=keep: prune_ffn(layer, keep))
        if heads:
            parts = attention_parts(layers[index])
            slots = _head_slots(heads[index], parts.group, parts.kv_heads)
            for ratio in config.head_ratios:
                drop = min(len(slots), int(round(parts.group * ratio)))
                if drop == 0:
                    continue
                gone = {h for _, hs in slots[:drop] for h in hs}
                keep = [h for h in range(parts.heads) if h not in gone]
                run(index, "heads", ratio, lambda layer, keep=keep: prune_heads(layer, keep))
        if config.drop_layer:
            run(index, "layer", 1.0, _skip_layer)
    return base, rows


def _skip_layer(layer) -> None:
    """Make a decoder layer the identity on the residual stream: zero its two output projections
    (a Gemma-style post-norm of a zero branch is zero too), which is what dropping it computes."""
    import torch

    from exporter.prune.structured import ffn_parts

    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    outputs = [ffn_parts(layer).output]
    outputs.append(getattr(attn, "o_proj", None) or getattr(attn, "dense", None))
    if any(o is None for o in outputs):
        raise KoedgeError(f"cannot find the output projections of {type(layer).__name__}")
    with torch.no_grad():
        for linear in outputs:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


# --- reports -----------------------------------------------------------------------------------------

def write_reports(folder: Path, base: dict, rows: list[dict], meta: dict, threshold_pct: float) -> dict[str, str]:
    """sensitivity.csv, sensitivity.md, sensitivity.png and a suggested plan in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sensitivity.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "sensitivity.md").write_text(markdown_table(base, rows, meta), encoding="utf-8")
    plan = suggest_plan(rows, threshold_pct)
    (folder / "plan-suggested.json").write_text(json.dumps(plan, indent=2), encoding="utf-8")
    files = {"csv": "sensitivity.csv", "table": "sensitivity.md", "plan": "plan-suggested.json"}
    if plot(folder / "sensitivity.png", rows, meta):
        files["plot"] = "sensitivity.png"
    return files


def markdown_table(base: dict, rows: list[dict], meta: dict) -> str:
    kinds = sorted({(r["kind"], r["ratio"]) for r in rows}, key=lambda kr: ("ffn", "heads", "layer").index(kr[0]) * 10 + kr[1])
    header = ["layer"] + ["whole layer" if k == "layer" else f"{k} {r:g}" for k, r in kinds]
    vocab = f" (vocabulary {meta['vocab_size']:,})" if meta.get("vocab_size") else ""
    lines = [f"# Sensitivity: {meta.get('model', '')}{vocab}", "",
             f"Unpruned: {base['bits_per_byte']:.4f} bits/byte on {base['tokens']} tokens "
             f"({base['bytes']} bytes). Cells: Δ bits/byte % (KL vs unpruned). Score: {meta.get('score')}.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    by = {(r["layer"], r["kind"], r["ratio"]): r for r in rows}
    for layer in sorted({r["layer"] for r in rows}):
        cells = [str(layer)]
        for kind, ratio in kinds:
            r = by.get((layer, kind, ratio))
            cells.append(f"{r['delta_bpb_pct']:+.2f} ({r['kl']:.3f})" if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def suggest_plan(rows: list[dict], threshold_pct: float) -> dict:
    """Per layer, the largest ratio whose one-at-a-time cost stays under the threshold (costs add up
    only roughly: re-measure the combined plan)."""
    plan: dict = {"ffn": {}, "heads": {}, "drop_layers": [],
                  "note": f"largest per-layer ratio with Δ bits/byte <= {threshold_pct}% alone; combined cost differs"}
    for r in sorted(rows, key=lambda r: r["ratio"]):
        if r["delta_bpb_pct"] > threshold_pct:
            continue
        if r["kind"] == "layer":
            plan["drop_layers"].append(r["layer"])
        else:
            plan[r["kind"]][str(r["layer"])] = r["ratio"]
    return plan


def plot(path: Path, rows: list[dict], meta: dict) -> bool:
    """Δ bits/byte per layer, one line per (kind, ratio); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = sorted({r["kind"] for r in rows}, key=("ffn", "heads", "layer").index)
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for ratio in sorted({r["ratio"] for r in rows if r["kind"] == kind}):
            points = sorted((r["layer"], r["delta_bpb_pct"]) for r in rows if r["kind"] == kind and r["ratio"] == ratio)
            label = "whole layer" if kind == "layer" else f"{ratio:.0%} removed"
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.set_yscale("symlog", linthresh=0.1)
        axis.set_title({"ffn": "FFN channels", "heads": "attention heads", "layer": "layer dropped"}[kind])
        axis.set_xlabel("layer")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel("Δ bits per byte (%)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"One-layer-at-a-time pruning cost: {meta.get('model', '')}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True

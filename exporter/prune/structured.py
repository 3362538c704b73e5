"""Structured pruning: remove FFN channels, attention heads and whole layers, so ONNX shapes shrink.

Units and their scores:
- FFN channel c of a layer: row c of gate/up, column c of down. Weight score: L2 norm of those
  weights. Activation score: RMS of channel c at the input of down on calibration text times the
  L2 norm of column c of down (how much the channel can move the residual stream).
- Attention head: its rows of q and columns of o. K/V heads are kept: every layer keeps the same KV
  layout (the runtime's KV cache contract), and grouped-query attention needs the same number of
  query heads per KV head, so a layer drops the same number of heads from every group ("slot" j
  removes the j-th weakest head of each group) and keeps at least one per group.
- Layers: dropped whole (config layer_types and each attention's layer_idx follow).

Scope: "local" removes the ratio from every layer; "global" pools the units of all layers and
removes the weakest ratio of them (layer sizes then differ). Iterative pruning reaches the ratio in
`steps` rounds, re-scoring (activations re-collected) between rounds. A plan (JSON) gives ratios
per layer and overrides both.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from runtime.errors import KoedgeError

FFN_NAMES = (("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"), ("dense_h_to_4h", "dense_4h_to_h"),
             ("fc1", "fc2"))
SCORES = ("weight", "activation")
SCOPES = ("local", "global")


@dataclass
class StructuredConfig:
    ffn_ratio: float = 0.0  # share of FFN channels removed
    head_ratio: float = 0.0  # share of query heads removed (rounded to whole heads per KV group)
    drop_layers: list[int] = field(default_factory=list)
    scope: str = "local"
    score: str = "weight"
    steps: int = 1  # >1: iterative, re-scoring between rounds
    multiple_of: int = 8  # FFN sizes kept a multiple of this (kernel friendly)
    plan: dict | None = None  # {"ffn": {"3": 0.5}, "heads": {"5": 0.25}, "drop_layers": [7]}
    calib_texts: int = 128

    def check(self, num_layers: int) -> None:
        for name in ("ffn_ratio", "head_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise KoedgeError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.scope not in SCOPES:
            raise KoedgeError(f"unknown scope '{self.scope}' (choose from {', '.join(SCOPES)})")
        if self.score not in SCORES:
            raise KoedgeError(f"unknown score '{self.score}' (choose from {', '.join(SCORES)})")
        if self.steps < 1:
            raise KoedgeError(f"--steps must be at least 1, got {self.steps}")
        if self.multiple_of < 1:
            raise KoedgeError(f"--multiple-of must be at least 1, got {self.multiple_of}")
        plan = self.plan or {}
        for kind in ("ffn", "heads"):
            for layer, ratio in (plan.get(kind) or {}).items():
                if not str(layer).isdigit() or int(layer) >= num_layers:
                    raise KoedgeError(f"plan: layer {layer} does not exist (model has {num_layers})")
                if not 0.0 <= float(ratio) < 1.0:
                    raise KoedgeError(f"plan: {kind} ratio for layer {layer} must be in [0, 1), got {ratio}")
        drops = set(self.drop_layers) | set(plan.get("drop_layers") or [])
        if any(not 0 <= i < num_layers for i in drops):
            raise KoedgeError(f"layer to drop out of range 0..{num_layers - 1}: {sorted(drops)}")
        if len(drops) >= num_layers:
            raise KoedgeError("cannot drop every layer")

    @property
    def active(self) -> bool:
        return bool(self.ffn_ratio or self.head_ratio or self.drop_layers or self.plan)


# --- finding the parts ---------------------------------------------------------------------------

def _layers_owner(model):
    """The module holding the decoder's `layers` list (base_model is the model itself for some classes)."""
    import torch

    for owner in (model.base_model, getattr(model, "model", None), getattr(model, "gpt_neox", None)):
        if owner is not None and isinstance(getattr(owner, "layers", None), torch.nn.ModuleList):
            return owner
    raise KoedgeError(f"cannot find the decoder layers of {type(model).__name__}")


def decoder_layers(model):
    return _layers_owner(model).layers


@dataclass
class FfnParts:
    inputs: list  # Linear layers whose output rows are channels (gate, up)
    output: object  # Linear whose input columns are channels (down)


def ffn_parts(layer) -> FfnParts:
    mlp = getattr(layer, "mlp", None)
    for names in FFN_NAMES:
        if mlp is not None and all(hasattr(mlp, name) for name in names):
            return FfnParts([getattr(mlp, n) for n in names[:-1]], getattr(mlp, names[-1]))
    raise KoedgeError(f"cannot find the feed-forward projections in {type(layer).__name__}")


@dataclass
class AttentionParts:
    module: object
    q: object
    o: object
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def attention_parts(layer) -> AttentionParts:
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "o_proj")):
        raise KoedgeError(f"head pruning needs separate q/k/v/o projections; {type(layer).__name__} fuses them")
    head_dim = attn.head_dim
    return AttentionParts(attn, attn.q_proj, attn.o_proj, attn.q_proj.out_features // head_dim,
                          attn.k_proj.out_features // head_dim, head_dim)


# --- surgery -------------------------------------------------------------------------------------

def _slice_linear(linear, index, dim: int) -> None:
    """Keep rows (dim 0: outputs) or columns (dim 1: inputs) `index` of a Linear, in place."""
    import torch

    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, index).clone())
        if dim == 0 and linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias[index].clone())
    if dim == 0:
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def prune_ffn(layer, keep: list[int]) -> None:
    import torch

    parts = ffn_parts(layer)
    index = torch.tensor(sorted(keep), dtype=torch.long)
    for linear in parts.inputs:
        _slice_linear(linear, index, 0)
    _slice_linear(parts.output, index, 1)
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = len(index)


def prune_heads(layer, keep: list[int]) -> None:
    """Keep query heads `keep`; the same number must remain in every KV group."""
    import torch

    parts = attention_parts(layer)
    per_group = [sum(1 for h in keep if h // parts.group == g) for g in range(parts.kv_heads)]
    if len(set(per_group)) != 1 or per_group[0] == 0:
        raise KoedgeError(f"heads {sorted(keep)} leave unequal or empty KV groups {per_group}")
    rows = torch.tensor([h * parts.head_dim + d for h in sorted(keep) for d in range(parts.head_dim)])
    _slice_linear(parts.q, rows, 0)
    _slice_linear(parts.o, rows, 1)
    parts.module.num_key_value_groups = per_group[0]
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(parts.module, name, None), int):
            setattr(parts.module, name, len(keep))


def drop_layers(model, indices: list[int]) -> None:
    """Remove whole decoder layers and renumber the rest (KV cache slots, layer types)."""
    import torch

    owner = _layers_owner(model)
    keep = [i for i in range(len(owner.layers)) if i not in set(indices)]
    owner.layers = torch.nn.ModuleList([owner.layers[i] for i in keep])
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    for new, layer in enumerate(owner.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new


def layer_shapes(model) -> list[dict]:
    """Per layer: FFN width and query heads (what differs from the config after pruning)."""
    shapes = []
    for layer in decoder_layers(model):
        entry = {"intermediate_size": ffn_parts(layer).output.in_features}
        try:
            parts = attention_parts(layer)
            entry.update(heads=parts.heads, kv_heads=parts.kv_heads)
        except KoedgeError:
            pass
        shapes.append(entry)
    return shapes


# --- scores --------------------------------------------------------------------------------------

class InputEnergy:
    """Sum of squares per input feature of chosen Linear layers, gathered with forward pre-hooks."""

    def __init__(self, linears: dict[str, object]):
        self.sums: dict[str, object] = {}
        self.count = 0
        self.handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def collect_energy(model, batches: list, linears: dict[str, object]) -> dict[str, object]:
    """Mean square of each input feature of `linears` over calibration batches (padding included)."""
    import torch

    energy = InputEnergy(linears)
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        energy.close()
    tokens = sum(int(b["attention_mask"].numel()) for b in batches)
    return {name: value / tokens for name, value in energy.sums.items()}


def ffn_scores(model, score: str, batches: list) -> list:
    """Per layer, a score per FFN channel (higher = keep)."""
    layers = decoder_layers(model)
    energy = {}
    if score == "activation":
        energy = collect_energy(model, batches, {str(i): ffn_parts(layer).output for i, layer in enumerate(layers)})
    out = []
    for i, layer in enumerate(layers):
        parts = ffn_parts(layer)
        down = parts.output.weight.detach().float()
        if score == "activation":
            out.append(energy[str(i)].sqrt() * down.norm(dim=0))
        else:
            total = (down * down).sum(0)
            for linear in parts.inputs:
                w = linear.weight.detach().float()
                total = total + (w * w).sum(1)
            out.append(total.sqrt())
    return out


def head_scores(model, score: str, batches: list) -> list:
    """Per layer, a score per query head (higher = keep)."""
    layers = decoder_layers(model)
    energy = {}
    if score == "activation":
        energy = collect_energy(model, batches, {str(i): attention_parts(layer).o for i, layer in enumerate(layers)})
    out = []
    for i, layer in enumerate(layers):
        parts = attention_parts(layer)
        o = parts.o.weight.detach().float().reshape(parts.o.out_features, parts.heads, parts.head_dim)
        if score == "activation":
            rms = energy[str(i)].reshape(parts.heads, parts.head_dim).sum(1).sqrt()
            out.append(rms * o.pow(2).sum((0, 2)).sqrt())
        else:
            q = parts.q.weight.detach().float().reshape(parts.heads, parts.head_dim, -1)
            out.append((q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt())
    return out


def _head_slots(scores, group: int, kv_heads: int) -> list[tuple[float, list[int]]]:
    """Removal slots of a layer, cheapest first: slot j removes the j-th weakest head of every group."""
    order = [sorted(range(g * group, (g + 1) * group), key=lambda h: float(scores[h])) for g in range(kv_heads)]
    return [(sum(float(scores[o[j]]) for o in order) / kv_heads, [o[j] for o in order]) for j in range(group - 1)]


def _ffn_keep_count(width: int, ratio: float, multiple: int) -> int:
    keep = max(1, width - int(round(width * ratio)))
    return min(width, max(multiple, int(math.ceil(keep / multiple)) * multiple)) if width >= multiple else keep


# --- choosing and applying -----------------------------------------------------------------------

def _ffn_targets(scores: list, original: list[int], ratio_for, config: StructuredConfig, progress_ratio: float,
                 scope: str) -> list[int]:
    """How many FFN channels each layer keeps after this round."""
    if scope == "local":
        return [_ffn_keep_count(width, ratio_for(i) * progress_ratio, config.multiple_of)
                for i, width in enumerate(original)]
    already = sum(original) - sum(len(layer_scores) for layer_scores in scores)
    budget = max(0, int(round(sum(original) * config.ffn_ratio * progress_ratio)) - already)
    pooled = sorted((float(s), i) for i, layer_scores in enumerate(scores) for s in layer_scores)
    removed = [original[i] - len(layer_scores) for i, layer_scores in enumerate(scores)]
    for _, i in pooled[:budget]:
        removed[i] += 1
    return [_ffn_keep_count(width, removed[i] / width, config.multiple_of) for i, width in enumerate(original)]


def _prune_ffn_round(model, config: StructuredConfig, original: list[int], fraction: float, batches: list) -> None:
    plan_ffn = {int(k): float(v) for k, v in ((config.plan or {}).get("ffn") or {}).items()}
    ratio_for = (lambda i: plan_ffn.get(i, 0.0)) if config.plan else (lambda i: config.ffn_ratio)
    scope = "local" if config.plan else config.scope
    scores = ffn_scores(model, config.score, batches)
    targets = _ffn_targets(scores, original, ratio_for, config, fraction, scope)
    for layer, layer_scores, keep in zip(decoder_layers(model), scores, targets):
        if keep < len(layer_scores):
            order = sorted(range(len(layer_scores)), key=lambda c: -float(layer_scores[c]))
            prune_ffn(layer, order[:keep])


def _prune_heads_round(model, config: StructuredConfig, original: list[AttentionParts], fraction: float,
                       batches: list) -> None:
    plan_heads = {int(k): float(v) for k, v in ((config.plan or {}).get("heads") or {}).items()}
    scores = head_scores(model, config.score, batches)
    layers = decoder_layers(model)
    current = [attention_parts(layer) for layer in layers]
    slots = [_head_slots(s, p.group, p.kv_heads) for s, p in zip(scores, current)]
    # target query heads per group after this round, measured against the original heads per group
    if config.plan or config.scope == "local":
        ratio_for = (lambda i: plan_heads.get(i, 0.0)) if config.plan else (lambda i: config.head_ratio)
        targets = [max(1, p.group - int(round(p.group * ratio_for(i) * fraction))) for i, p in enumerate(original)]
    else:
        budget = int(round(sum(p.group for p in original) * config.head_ratio * fraction))  # heads per group
        already = sum(o.group - c.group for o, c in zip(original, current))
        pooled = sorted((cost, i, j) for i, layer_slots in enumerate(slots) for j, (cost, _) in enumerate(layer_slots))
        removed = [0] * len(layers)
        for _, i, _ in pooled[: max(0, budget - already)]:
            removed[i] += 1
        targets = [c.group - r for c, r in zip(current, removed)]
    for layer, parts, layer_slots, target in zip(layers, current, slots, targets):
        drop = max(0, parts.group - target)
        if drop:
            gone = {h for _, heads in layer_slots[:drop] for h in heads}
            prune_heads(layer, [h for h in range(parts.heads) if h not in gone])


def apply_structured(model, config: StructuredConfig, batches: list,
                     progress: Callable[[str], None] = lambda message: None) -> dict:
    """Prune `model` in place; returns what was done (for the manifest)."""
    layers = decoder_layers(model)
    config.check(len(layers))
    before = sum(p.numel() for p in model.parameters())
    plan = config.plan or {}
    wants_ffn = config.ffn_ratio > 0 or bool(plan.get("ffn"))
    wants_heads = config.head_ratio > 0 or bool(plan.get("heads"))
    original_ffn = [ffn_parts(layer).output.in_features for layer in layers]
    original_heads = [attention_parts(layer) for layer in layers] if wants_heads else []
    if wants_heads and all(p.group == 1 for p in original_heads):
        raise KoedgeError("head pruning keeps every KV head, and this model has one query head per KV head")
    for step in range(1, config.steps + 1):
        fraction = step / config.steps
        if wants_heads:
            _prune_heads_round(model, config, original_heads, fraction, batches)
        if wants_ffn:
            _prune_ffn_round(model, config, original_ffn, fraction, batches)
        progress(f"structured pruning round {step}/{config.steps} done")
    drops = sorted(set(config.drop_layers) | set(plan.get("drop_layers") or []))
    if drops:
        drop_layers(model, drops)
    after = sum(p.numel() for p in model.parameters())
    return {"config": {k: v for k, v in asdict(config).items() if k != "plan"}, "plan": config.plan,
            "dropped_layers": drops, "layer_shapes": layer_shapes(model),
            "parameters_before": before, "parameters_after": after}


def read_plan(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KoedgeError(f"plan file not found: {path}")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KoedgeError(f"plan {path} is not valid JSON: {err.msg}") from err
    unknown = set(plan) - {"ffn", "heads", "drop_layers", "note"}
    if not isinstance(plan, dict) or unknown:
        raise KoedgeError(f"plan {path} has unknown keys {sorted(unknown)} (use ffn, heads, drop_layers)")
    return plan


# --- checkpoints with per-layer shapes -------------------------------------------------------------

SHAPES_KEY = "koedge_layer_shapes"


def record_shapes(model) -> bool:
    """Put the layer shapes into the config. Uniform FFN widths with untouched heads fit the standard
    config (plain transformers loads it); anything else is written to `koedge_layer_shapes`, which
    `load_pruned` (through exporter.export.convert.load_torch_model) understands. True if shapes were needed."""
    config = model.config
    shapes = layer_shapes(model)
    widths = {s["intermediate_size"] for s in shapes}
    heads_untouched = all(s.get("heads", config.num_attention_heads) == config.num_attention_heads for s in shapes)
    if len(widths) == 1 and heads_untouched:
        config.intermediate_size = widths.pop()
        if hasattr(config, SHAPES_KEY):
            delattr(config, SHAPES_KEY)
        return False
    setattr(config, SHAPES_KEY, shapes)
    return True


def load_pruned(path: Path, config, dtype):
    """A checkpoint whose layers differ in shape: build from config, shrink each layer, load the weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    shapes = getattr(config, SHAPES_KEY)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    layers = decoder_layers(model)
    if len(shapes) != len(layers):
        raise KoedgeError(f"{path}: {len(shapes)} layer shapes for {len(layers)} layers")
    for layer, shape in zip(layers, shapes):
        width = shape["intermediate_size"]
        if ffn_parts(layer).output.in_features != width:
            prune_ffn(layer, list(range(width)))
        if "heads" in shape:
            parts = attention_parts(layer)
            per_group = shape["heads"] // parts.kv_heads
            if per_group != parts.group:
                prune_heads(layer, [g * parts.group + j for g in range(parts.kv_heads) for j in range(per_group)])
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise KoedgeError(f"{path} has no .safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    missing = [name for name in missing if not (tied and name.endswith(".weight") and
                                                model.get_parameter(name) is head.weight)]
    if missing or unexpected:
        raise KoedgeError(f"{path}: weights do not match the recorded shapes "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()

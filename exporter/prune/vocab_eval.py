"""Bits per byte of vocabulary-pruned variants, computed from the unpruned model in one pass.

A vocabulary-pruned model is the unpruned one with fewer embedding / LM-head rows: on the same token
ids its hidden states are the same, and its distribution is the unpruned logits restricted to the kept
rows and renormalised. So one forward pass of the unpruned model scores it and every candidate
vocabulary; only texts the pruned tokenizer segments differently (they used a dropped token) need a
second pass, on the pruned ids mapped back to their original rows. This makes comparing vocabularies on
held-out formal and informal text cheap enough for a 2-core machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import KoedgeError

TOKEN_CHUNK = 256  # positions per LM-head product (256 x 262,144 floats = 256 MB)


@dataclass
class Variant:
    """A candidate vocabulary: the kept original ids (new id order) and its rewritten tokenizer.json."""

    kept: list[int]
    tokenizer_file: Path


def _body(model):
    """The decoder stack without the LM head (`get_decoder` for most architectures, else the base model)."""
    decoder = model.get_decoder()
    return model.base_model if decoder is model else decoder


def _hidden(model, ids: list[int]):
    """Final hidden states (after the last norm) of one sequence."""
    import torch

    with torch.no_grad():
        return _body(model)(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]


def _nll(model, hidden, targets: list[int], rows) -> float:
    """Summed next-token NLL (nats) of `targets` given `hidden`, the LM head cut to `rows` (None: all)."""
    import torch

    head = model.get_output_embeddings()
    weight = head.weight if rows is None else head.weight[rows]
    bias = None if head.bias is None else (head.bias if rows is None else head.bias[rows])
    cap = getattr(model.config, "final_logit_softcapping", None)
    total = 0.0
    target = torch.tensor(targets)
    with torch.no_grad():
        for start in range(0, len(targets), TOKEN_CHUNK):
            logits = hidden[start:start + TOKEN_CHUNK] @ weight.T
            if bias is not None:
                logits = logits + bias
            if cap:
                logits = torch.tanh(logits / cap) * cap
            logp = torch.log_softmax(logits.float(), dim=-1)
            total -= float(logp.gather(-1, target[start:start + TOKEN_CHUNK, None]).sum())
    return total


def variant_costs(model, tokenizer_file: Path, texts: list[str], variants: dict[str, Variant],
                  bos: int | None) -> dict:
    """{"original": {...}, name: {...}}: bits per byte, tokens and the change against the original model for
    each variant, plus how many texts its tokenizer segments differently."""
    import torch
    from tokenizers import Tokenizer

    if not texts:
        raise KoedgeError("no texts to score the vocabularies on")
    prefix = [bos] if bos is not None else []
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    original = [prefix + e.ids for e in Tokenizer.from_file(str(tokenizer_file)).encode_batch(texts, add_special_tokens=False)]
    nll = {"original": 0.0, **{name: 0.0 for name in variants}}
    tokens = dict.fromkeys(nll, 0)
    changed = dict.fromkeys(variants, 0)
    pruned = {name: [e.ids for e in Tokenizer.from_file(str(v.tokenizer_file)).encode_batch(
        texts, add_special_tokens=False)] for name, v in variants.items()}
    maps = {name: {old: new for new, old in enumerate(v.kept)} for name, v in variants.items()}
    rows = {name: torch.tensor(v.kept) for name, v in variants.items()}
    for index, ids in enumerate(original):
        if len(ids) < 2:
            continue
        hidden = _hidden(model, ids)[:-1]
        nll["original"] += _nll(model, hidden, ids[1:], None)
        tokens["original"] += len(ids) - 1
        for name, variant in variants.items():
            new_ids = [maps[name][bos] for bos in prefix] + pruned[name][index]
            as_original = [variant.kept[i] for i in new_ids]
            if as_original == ids:
                own_hidden = hidden
            else:
                changed[name] += 1
                own_hidden = _hidden(model, as_original)[:-1]
            nll[name] += _nll(model, own_hidden, new_ids[1:], rows[name])
            tokens[name] += len(new_ids) - 1
    base = nll["original"] / math.log(2) / n_bytes
    out = {"original": {"bits_per_byte": base, "tokens": tokens["original"], "bytes": n_bytes, "texts": len(texts)}}
    for name in variants:
        bpb = nll[name] / math.log(2) / n_bytes
        out[name] = {"bits_per_byte": bpb, "delta_bpb_pct": round(100 * (bpb / base - 1), 3),
                     "tokens": tokens[name], "texts_resegmented": changed[name]}
    return out

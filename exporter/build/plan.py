"""`koedge plan`: will it fit? Weights + KV cache + activations per precision, from the config alone.

The arithmetic, before any work: weights = parameters × bytes per weight (INT8/INT4 include their
block scales; quantized weights add part of the copy onnxruntime pre-packs at load, a tied embedding all of it), KV cache
= one buffer (the fused export writes it in place): 2 × layers × kv_heads × head_dim × tokens × bytes per element, activations =
the logits of one prefill chunk plus a few hidden-size buffers, and a fixed runtime overhead measured for
onnxruntime on this machine (libraries, arena-free session, tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import KoedgeError
from runtime.memory import PREPACKED_SHARE, runtime_overhead
from runtime.memory import parse_size  # noqa: F401  (re-exported for the CLI)

GIB = 1024**3
# bytes per weight: INT8 per-channel ≈ 1 byte + a scale per row; INT4 block 32 with an fp16 scale and a
# 4-bit zero point per block = (32 × 4 + 16 + 4) / 32 bits.
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + 4 / 640, "int4": (32 * 4 + 16 + 4) / 32 / 8}
KV_BYTES = {"fp32": 4, "fp16": 2, "int8": 4, "int4": 4}  # quantized bundles keep an FP32 KV cache
PREFILL_CHUNK = 512  # tokens whose logits exist at once during prefill


@dataclass
class ModelShape:
    name: str
    architecture: str
    parameters: int
    embedding_parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    tied: bool


def shape_from_config(name: str, config: dict) -> ModelShape:
    """Parameter count from a transformers config.json, per architecture family."""
    text = config.get("text_config", config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    inter, vocab = text["intermediate_size"], text["vocab_size"]
    arch = text.get("model_type", "unknown")
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", arch.startswith("gemma"))))
    attention = hidden * head_dim * (heads * 2 + kv_heads * 2)
    mlp = hidden * inter * (2 if arch in ("gpt_neox", "gpt2", "gpt_neo") else 3)
    norms = hidden * (4 if arch in ("gpt_neox", "gemma3_text", "gemma2") else 2) + (2 * head_dim if arch in ("gemma3_text", "qwen3", "exaone4") else 0)  # + QK-norm
    biases = {"gpt_neox": 5 * hidden + inter, "qwen2": heads * head_dim + 2 * kv_heads * head_dim}.get(arch, 0)
    final_norm = hidden * (2 if arch == "gpt_neox" else 1)
    embedding = vocab * hidden * (1 if tied else 2)
    return ModelShape(name, arch, layers * (attention + mlp + norms + biases) + embedding + final_norm, embedding,
                      layers, kv_heads, head_dim, hidden, vocab, tied)


@dataclass
class PlanRow:
    precision: str
    weights: int
    kv_cache: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead


def plan(shape: ModelShape, context: int) -> list[PlanRow]:
    rows = []
    for precision, per_weight in WEIGHT_BYTES.items():
        kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * context * KV_BYTES[precision]
        logits = min(context, PREFILL_CHUNK) * shape.vocab * 4
        hidden_buffers = 8 * min(context, PREFILL_CHUNK) * shape.hidden * 4
        weights = int(shape.parameters * per_weight)
        if precision in ("int8", "int4"):  # onnxruntime's pre-packed copy (runtime.memory.predict_budget)
            tied = int(shape.embedding_parameters * per_weight) if shape.tied else 0
            weights += tied + int(PREPACKED_SHARE * (weights - tied))
        rows.append(PlanRow(precision, weights, kv, logits + hidden_buffers, runtime_overhead(shape.vocab)))
    return rows


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise KoedgeError(f"{folder} has no config.json")
    return json.loads(path.read_text())


def format_plan(shape: ModelShape, rows: list[PlanRow], cap: int, context: int) -> str:
    def gib(value: int) -> str:
        return f"{value / GIB:6.2f}"

    lines = [f"{shape.name}: {shape.architecture}, {shape.parameters / 1e9:.2f}B parameters "
             f"({shape.embedding_parameters / 1e6:.0f}M in embeddings{', tied' if shape.tied else ''}), "
             f"{shape.layers} layers, {shape.kv_heads} KV heads × {shape.head_dim}, context {context}",
             f"memory cap {cap / GIB:.2f} GiB",
             "",
             "| precision | weights GiB | KV cache GiB | activations GiB | runtime GiB | total GiB | fits |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        verdict = "yes" if row.total <= cap else f"no (+{(row.total - cap) / GIB:.2f})"
        lines.append(f"| {row.precision} | {gib(row.weights)} | {gib(row.kv_cache)} | {gib(row.activations)} "
                     f"| {gib(row.overhead)} | {gib(row.total)} | {verdict} |")
    return "\n".join(lines)

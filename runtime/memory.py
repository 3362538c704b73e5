"""Memory sizes and measurements: parse "3GiB", read a process's VmRSS/VmHWM, predict a budget.

Linux only for the /proc readings (they return None elsewhere); no third-party imports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from runtime.bundle import Manifest
from runtime.errors import KoedgeError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MIB = 2**20


def parse_size(text: str) -> int:
    """Bytes in "3GiB", "3GB", "2500MB", "3g", "1.5 GiB" (plain numbers are bytes)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise KoedgeError(f"cannot read the size '{text}' (examples: 3GiB, 3GB, 2500MB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int | float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f} MiB"


# glibc mallopt parameter and its 64-bit ceiling of the dynamic threshold
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * MIB


@contextmanager
def prefill_heap(threshold: int = 64 * 2**10) -> Iterator[None]:
    """While a prefill runs, let glibc serve every allocation over `threshold` with its own mmap.

    A prefill's temporaries (attention scores, FFN activations: MiBs each, per layer and chunk) are
    freed and asked again in slightly other sizes; on glibc's heap they fragment, and the heap is not
    given back. Measured on the polyglot-ko-1.3b shape twin INT4 at 512 prompt tokens: peak RSS
    2,664 MiB with the default allocator, 1,561 MiB with this (docs/memory.md). Afterwards the
    threshold is set to glibc's ceiling (decode steps allocate little, and heap reuse is faster than
    fresh pages) and the freed heap is trimmed. Process-wide, so a no-op unless the C library is glibc.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        release_heap()


def release_heap() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile... of a process in bytes (empty when /proc is not there)."""
    values = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0]) * 1024
    return values


def peak_rss(pid: int | str = "self") -> int | None:
    """VmHWM: the most resident memory the process has had (weights mapped from disk included)."""
    return proc_status(pid).get("VmHWM")


def current_rss(pid: int | str = "self") -> int | None:
    return proc_status(pid).get("VmRSS")


# A prefill call returns logits for all its positions; with a 262k vocabulary 512 positions are
# 512 MiB. Running the prompt in pieces whose logits stay under this costs no time (measured on
# gemma-3-270m: 64-token pieces 27.2 s vs 28.1 s in one call for 512 tokens) and cuts the peak.
LOGITS_BUDGET = 64 * MIB


# With last-position logits (the exporter's logits_to_keep input) a call's biggest tensors are its
# attention scores, [heads, rows, context]: pieces of this many tokens keep them small at any context.
ATTENTION_CHUNK = 512


def prefill_chunk_for(manifest: Manifest, requested: int | str | None = "auto") -> int | None:
    """Tokens per prefill call; "auto": ATTENTION_CHUNK when the graph returns only the last logits,
    else pieces whose logits stay under LOGITS_BUDGET; 0 or None = one call."""
    if requested == "auto":
        if manifest.io.logits_to_keep:
            return ATTENTION_CHUNK if ATTENTION_CHUNK < manifest.model.max_positions else None
        rows = LOGITS_BUDGET // (manifest.model.vocab_size * 4)
        return max(16, rows) if rows < manifest.model.max_positions else None
    if isinstance(requested, str):
        raise KoedgeError(f"prefill chunk must be a number of tokens or 'auto', not '{requested}'")
    return requested or None


# Resident besides weights, KV and activations: Python + onnxruntime + tokenizers before loading (62 MiB,
# `koedge validate`'s "runtime base"), plus what grows with the vocabulary (the decode-only tokenizer,
# the logits buffers, the session's vocabulary-sized tensors). Fitted on gemma-3-270m fused bundles at
# 512 + 256 tokens, 2026-12-04: FP32 (262k tokens) 1,268 MiB measured, Korean-pruned 8-bit (32k) 318.
RUNTIME_BASE = 62 * MIB
RUNTIME_PER_TOKEN = 508  # bytes per vocabulary entry


def runtime_overhead(vocab_size: int) -> int:
    return RUNTIME_BASE + RUNTIME_PER_TOKEN * vocab_size


# Quantized weights (MatMulNBits): onnxruntime pre-packs them into an anonymous copy at load. Most of the
# mapped file is then not touched again, except a tied embedding: the Gather keeps reading its rows from
# the file while the LM head reads the packed copy, so it is resident twice. Fitted on fused bundles at
# 512 + 256 tokens, 2026-12-04 (docs/memory.md): gemma-3-270m 8-bit, 4-bit, Korean-pruned 8-bit, and the
# polyglot-ko shape twin 4-bit (untied) all within 5%.
PREPACKED_SHARE = 0.2


def tied_quantized_embedding_bytes(manifest: Manifest) -> int:
    """Bytes of a quantized embedding shared with the LM head that stay resident besides the head's pre-packed
    copy (0 when untied or left in float): the whole table, or a split table's hot rows (phone-int4: predicted
    565 MiB with the whole table counted, 486 measured; docs/memory.md)."""
    if not any(record.results.get("tied_embedding_shared") for record in manifest.passes if record.name == "export"):
        return 0
    gguf = next((record for record in manifest.passes if record.name == "gguf-exact"), None)
    if gguf is not None and gguf.results.get("tied_shared"):
        if gguf.results.get("tied_table_bytes"):  # GGUF-exact: the table keeps the GGUF's own blocks
            return int(gguf.results["tied_table_bytes"])
        bits, block = 8, 32  # recorded before tied_table_bytes existed: gemma's table is Q8_0
    else:
        quantize = next((record for record in manifest.passes if record.name == "quantize-int4"), None)
        if quantize is not None and quantize.results.get("tied_gather_bytes"):  # a split table (hot rows): Korean
            return int(quantize.results["tied_gather_bytes"])  # text gathers the hot rows, not the 4-bit ones
        if quantize is not None and quantize.results.get("tied_table_bytes"):  # recorded since hot rows exist
            return int(quantize.results["tied_table_bytes"])
        bits = {"int4": 4, "int8": 8}.get((quantize.config if quantize else {}).get("embedding"))
        if not bits:
            return 0
        block = quantize.config.get("embedding_block_size") or quantize.config.get("block_size") or 32
    return int(manifest.model.vocab_size * manifest.model.hidden_size * (bits / 8 + 2.5 / block))


@dataclass
class Budget:
    """What a run should need: weights + KV cache + the biggest activations + pre-packed copy + runtime."""

    weights: int
    kv_cache: int
    activations: int
    prepacked: int = 0
    runtime: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.prepacked + self.runtime


def kv_cache_bytes(manifest: Manifest, tokens: int) -> int:
    """2 (key, value) x layers x kv_heads x head_dim x tokens x bytes per element."""
    info = manifest.model
    element = 2 if manifest.io.kv_dtype == "float16" else 4
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * tokens * element


def kv_buffer_positions(manifest: Manifest, prompt_tokens: int, new_tokens: int) -> int:
    """Positions of the in-place buffer: runtime.generate reserves prompt + new tokens at once (at least the
    manifest's `io.kv_buffer_length`), never more than the model's context."""
    wanted = max(prompt_tokens + new_tokens, manifest.io.kv_buffer_length or 0)
    return min(wanted, manifest.model.max_positions)


def predict_budget(manifest: Manifest, prompt_tokens: int, new_tokens: int,
                   prefill_chunk: int | str | None = "auto") -> Budget:
    """Budget for one prefill of `prompt_tokens` (in pieces of `prefill_chunk`) then `new_tokens` decode steps.

    Graphs without the exporter's logits_to_keep input return logits for every position of a call, so
    a prefill's logits ([rows, vocab] float32) dominate activations for big vocabularies: measured on gemma-3-270m
    the transient peak is about 1.3x their size (docs/memory.md). Hidden states ([rows, hidden] a
    dozen times) and attention scores ([heads, rows, context]) come next. The KV cache is held twice
    at a step boundary (past in, present out) unless the graph takes one buffer for both (fused export);
    then it is the preallocated buffer, which grows by doubling. Quantized weights add their pre-packed copy.
    """
    info = manifest.model
    rows = min(prompt_tokens, prefill_chunk_for(manifest, prefill_chunk) or prompt_tokens)
    logits = int(1.3 * (1 if manifest.io.logits_to_keep else rows) * info.vocab_size * 4)
    hidden = rows * info.hidden_size * 4 * 16
    attention = rows * prompt_tokens * info.num_attention_heads * 4 * 2
    positions = kv_buffer_positions(manifest, prompt_tokens, new_tokens)
    if manifest.io.kv_shared_buffer:  # in place: one buffer is past and present
        kv = kv_cache_bytes(manifest, positions)
    else:
        kv = 2 * kv_cache_bytes(manifest, prompt_tokens + new_tokens)
    weights = manifest.weight_bytes() - untouched_rotary_bytes(manifest, positions)
    prepacked = 0
    if _quantized(manifest):
        tied = tied_quantized_embedding_bytes(manifest)
        prepacked = tied + int(PREPACKED_SHARE * max(weights - tied, 0))
    return Budget(weights=weights, kv_cache=kv, activations=logits + hidden + attention, prepacked=prepacked,
                  runtime=runtime_overhead(info.vocab_size))


def untouched_rotary_bytes(manifest: Manifest, positions: int) -> int:
    """A fused graph's rotary tables hold a row per supported position; a run reads (and maps in) only the rows
    of its own positions, so the rest of the tables never becomes resident."""
    export = next((record for record in manifest.passes if record.name == "export"), None)
    tables = int((export.results if export else {}).get("rotary_table_bytes") or 0)
    return int(tables * max(0.0, 1 - positions / max(manifest.model.max_positions, 1)))


def _quantized(manifest: Manifest) -> bool:
    """Bundles written before `quantized_weights` existed say it through their pass names."""
    return manifest.quantized_weights or any(record.name.startswith("quantize") for record in manifest.passes)

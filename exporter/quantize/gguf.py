"""GGUF-exact weights: the FP32 export of a GGUF model with each quantized tensor put back in its own blocks.

A graph edit after the ordinary export, so it composes with other rewrites: every MatMul weight (and the
embedding table) whose values equal, row for row, the dequantization of a GGUF tensor is replaced by that
tensor's blocks in onnxruntime's form — MatMulNBits for MatMuls, one GatherBlockQuantized + MatMulNBits
pair over a single tensor for a tied embedding / LM head. Rows are matched by value, not by name, so
row permutations (transformers un-permutes Llama's q/k heads) and pruned vocabularies (a subset of the
embedding's rows) match too; a weight that matches nothing stays FP32.

Forms (exporter/quantize/gguf_blocks.py gives codes, scales, zero point, min per block):
- 4-bit codes (Q4_0, Q4_1, Q4_K): MatMulNBits bits 4. Types with a min (Q4_1, Q4_K) use a uint8 zero
  point and subtract (X·P)·M, P summing X over each block, M the mins: a float zero point would be exact
  too but ~30x slower per decode step on CPU (docs/quantization.md).
- 5-8-bit codes (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0): MatMulNBits bits 8 with accuracy_level 4 (int8 activations,
  MLAS's fast path), or with float activations (accuracy_level 0) as two 4-bit planes, high and low nibble:
  onnxruntime's 8-bit kernel without int8 activations is ~50x slower than either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from exporter.quantize.gguf_blocks import Codes, decode, read_quantized
from exporter.quantize.int4 import (ONNX_FILE, GraphWriter, Packed, Table, WeightReader, _from_codes, _save,
                                    find_table, fuse_kernels, is_quantized)
from runtime.errors import KoedgeError

FINGERPRINT_ROWS = 8192


@dataclass
class GgufConfig:
    """Defaults measured on gemma-3-270m and SmolLM2 (docs/quantization.md): int8 activations for the 8-bit
    forms (as fast as the 8-bit phone recipe), float activations for the 4-bit ones (exact, still fast)."""

    gguf: str = ""  # the .gguf file the FP32 bundle was dequantized from
    # MatMulNBits compute of the 5-8-bit codes: 4 int8 activations (MLAS's fast path; costs a little KL),
    # 0 float activations (exact to fp32 rounding; the codes split into two 4-bit planes)
    accuracy_level: int = 4
    accuracy_level_4bit: int = 0  # the same for 4-bit codes (Q4_0, Q4_1, Q4_K): float activations are fast there
    fuse: bool = True  # one MatMulNBits per input and form, residual Add + RMSNorm as one node (as Int4Config)

    def check(self) -> None:
        if not self.gguf:
            raise KoedgeError("the GGUF-exact pass needs the .gguf file the bundle was exported from")
        for level in (self.accuracy_level, self.accuracy_level_4bit):
            if level not in (0, 4):
                raise KoedgeError(f"GGUF-exact accuracy level {level}: choose 4 (int8 activations) "
                                  f"or 0 (float activations)")

    def level(self, codes: Codes) -> int:
        return self.accuracy_level if codes.bits == 8 else self.accuracy_level_4bit


# --- matching rows ------------------------------------------------------------------------------------------------

def _mixers(cols: int) -> np.ndarray:
    return np.random.default_rng(cols).integers(1, 2 ** 63, cols, dtype=np.uint64) | np.uint64(1)


def fingerprint(rows: np.ndarray) -> np.ndarray:
    """A uint64 per row from its float32 bits (integer arithmetic: equal rows give equal fingerprints)."""
    mixers = _mixers(rows.shape[1])
    out = np.empty(rows.shape[0], np.uint64)
    for start in range(0, rows.shape[0], FINGERPRINT_ROWS):
        part = np.ascontiguousarray(rows[start:start + FINGERPRINT_ROWS], np.float32).view(np.uint32)
        out[start:start + FINGERPRINT_ROWS] = (part.astype(np.uint64) * mixers).sum(axis=1)
    return out


class RowIndex:
    """Every GGUF tensor's rows, decoded to codes once and fingerprinted for lookup by value."""

    def __init__(self, gguf: Path, progress: Callable[[str], None]):
        self.codes: dict[str, Codes] = {}
        self.sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        tensors = read_quantized(gguf)
        progress(f"reading {len(tensors)} quantized tensors of {gguf.name}")
        for tensor in tensors:
            codes = decode(tensor.raw, tensor.qtype)
            prints = np.concatenate([fingerprint(codes.rows(slice(s, s + FINGERPRINT_ROWS)).dequantize())
                                     for s in range(0, codes.codes.shape[0], FINGERPRINT_ROWS)])
            order = np.argsort(prints, kind="stable")
            self.codes[tensor.name], self.sorted[tensor.name] = codes, (prints[order], order)

    def match(self, rows: np.ndarray) -> tuple[str, Codes] | None:
        """The GGUF tensor (and its codes, rows reordered) whose dequantized rows equal `rows` exactly."""
        prints = fingerprint(rows)
        for name, codes in self.codes.items():
            if codes.codes.shape[1] != rows.shape[1] or codes.codes.shape[0] < rows.shape[0]:
                continue
            keys, order = self.sorted[name]
            where = np.minimum(np.searchsorted(keys, prints), len(keys) - 1)
            if not np.array_equal(keys[where], prints):
                continue
            picked = codes.rows(order[where])
            if np.array_equal(picked.dequantize(), np.asarray(rows, np.float32)):
                return name, picked
        return None


# --- ONNX forms ---------------------------------------------------------------------------------------------------

def planes(codes: Codes, accuracy_level: int) -> list[Packed]:
    """The MatMulNBits tensors for codes [N, K]: one, or two 4-bit planes for 8-bit codes with float activations.

    Two planes: s*(c - z) = 16s*(c>>4 - z//16) + s*(c&15 - z%16), each plane exact, summed once.
    """
    n, k = codes.codes.shape
    blocks = k // codes.block

    def packed(values: np.ndarray, scales: np.ndarray, zero: int, bits: int) -> Packed:
        return _from_codes(values, scales, np.full((n, blocks), zero, np.uint8), bits, codes.block, k, np.float32)

    if codes.bits == 4 or accuracy_level == 4:
        return [packed(codes.codes, codes.scales, codes.zero_point, codes.bits)]
    return [packed(codes.codes >> 4, codes.scales * np.float32(16), codes.zero_point // 16, 4),
            packed(codes.codes & 15, codes.scales, codes.zero_point % 16, 4)]


class Edit:
    """Builds the replacement nodes on a GraphWriter; block-sum matrices are shared per (K, block)."""

    def __init__(self, writer: GraphWriter, accuracy_level: int):
        self.writer, self.accuracy_level = writer, accuracy_level
        self.block_sums: dict[tuple[int, int], str] = {}

    def block_sum(self, k: int, block: int, transposed: bool = False) -> str:
        """P [K, K/block] with P[i, j] = 1 where i is in block j (Pᵀ spreads a value over its block)."""
        key = (k, block * (-1 if transposed else 1))
        if key not in self.block_sums:
            p = np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32))
            name = f"gguf_block_sum_{k}_{block}" + ("_T" if transposed else "")
            self.block_sums[key] = self.writer.add(name, p.T.copy() if transposed else p)
        return self.block_sums[key]

    def add_planes(self, prefix: str, parts: list[Packed]) -> list[list[str]]:
        return [self.writer.add_packed(f"{prefix}_p{i}" if len(parts) > 1 else prefix, part)
                for i, part in enumerate(parts)]

    def matmul(self, node_name: str, activation: str, output: str, parts: list[Packed], names: list[list[str]],
               n: int, mins: np.ndarray | None, block: int, level: int | None = None) -> list[onnx.NodeProto]:
        """output = Σ MatMulNBits(activation, part) - (activation·P)·mins  (mins: [K/block, N])."""
        level = self.accuracy_level if level is None else level
        nodes, terms = [], []
        for i, (part, part_names) in enumerate(zip(parts, names)):
            term = output if len(parts) == 1 and mins is None else f"{output}_gguf{i}"
            attrs = dict(K=part.k, N=n, bits=part.bits, block_size=part.block_size)
            if level:
                attrs["accuracy_level"] = level
            nodes.append(helper.make_node("MatMulNBits", [activation, *part_names], [term], name=f"{node_name}_Q{i}",
                                          domain="com.microsoft", **attrs))
            terms.append(term)
        if mins is not None:
            sums, correction = f"{output}_block_sums", f"{output}_min_term"
            nodes.append(helper.make_node("MatMul", [activation, self.block_sum(parts[0].k, block)], [sums],
                                          name=f"{node_name}_block_sums"))
            nodes.append(helper.make_node("MatMul", [sums, self.writer.add(f"{node_name}_mins", mins)], [correction],
                                          name=f"{node_name}_min_term"))
        return nodes + self._combine(node_name, terms, correction if mins is not None else None, output)

    def gather(self, prefix: str, ids: str, output: str, parts: list[Packed], names: list[list[str]],
               mins: np.ndarray | None, block: int) -> list[onnx.NodeProto]:
        """output = Σ GatherBlockQuantized(part, ids) - Gather(mins, ids)·Pᵀ, over the MatMulNBits tensors."""
        nodes, terms = [], []
        for i, (part, part_names) in enumerate(zip(parts, names)):
            vocab, blocks = part.data.shape[:2]
            shape3 = self.writer.add(f"{prefix}_p{i}_shape3", np.array([vocab, blocks, 1], np.int64))
            scales3 = f"{part_names[1]}_3d"
            nodes.append(helper.make_node("Reshape", [part_names[1], shape3], [scales3], name=f"{prefix}_p{i}_scales3"))
            zp = self._unpacked_zero_points(part, vocab, blocks)
            term = output if len(parts) == 1 and mins is None else f"{output}_gguf{i}"
            gathered = f"{term}_blocks"
            nodes.append(helper.make_node(
                "GatherBlockQuantized", [part_names[0], ids, scales3, self.writer.add(f"{prefix}_p{i}_zp3", zp)],
                [gathered], name=f"{prefix}_gather{i}", domain="com.microsoft", gather_axis=0, quantize_axis=2,
                block_size=part.block_size, bits=part.bits))
            flat = self.writer.add(f"{prefix}_p{i}_flat", np.array([0, 0, part.k], np.int64))
            nodes.append(helper.make_node("Reshape", [gathered, flat], [term], name=f"{prefix}_p{i}_flat"))
            terms.append(term)
        if mins is not None:
            picked, correction = f"{output}_mins", f"{output}_min_term"
            nodes.append(helper.make_node("Gather", [self.writer.add(f"{prefix}_row_mins", mins), ids], [picked],
                                          name=f"{prefix}_gather_mins"))
            nodes.append(helper.make_node("MatMul", [picked, self.block_sum(parts[0].k, block, transposed=True)],
                                          [correction], name=f"{prefix}_min_term"))
        return nodes + self._combine(prefix, terms, correction if mins is not None else None, output)

    @staticmethod
    def _unpacked_zero_points(part: Packed, vocab: int, blocks: int) -> np.ndarray:
        """GatherBlockQuantized wants one uint8 zero point per block, [V, blocks, 1] (MatMulNBits packs 4-bit pairs)."""
        zp = part.zero_points
        if part.bits == 4:
            unpacked = np.empty((vocab, zp.shape[1] * 2), np.uint8)
            unpacked[:, 0::2], unpacked[:, 1::2] = zp & 0x0F, zp >> 4
            zp = unpacked[:, :blocks]
        return np.ascontiguousarray(zp.reshape(vocab, blocks, 1))

    @staticmethod
    def _combine(prefix: str, terms: list[str], correction: str | None, output: str) -> list[onnx.NodeProto]:
        nodes, total = [], terms[0]
        for i, term in enumerate(terms[1:], 1):
            name = output if i == len(terms) - 1 and correction is None else f"{output}_sum{i}"
            nodes.append(helper.make_node("Add", [total, term], [name], name=f"{prefix}_add{i}"))
            total = name
        if correction is not None:
            nodes.append(helper.make_node("Sub", [total, correction], [output], name=f"{prefix}_sub_mins"))
        return nodes


# --- the pass -----------------------------------------------------------------------------------------------------

def _replace_table(edit: Edit, index: RowIndex, reader: WeightReader, table: Table, stats: dict,
                   config: GgufConfig) -> set[str]:
    """The embedding (and a tied LM head reading it): one set of quantized tensors for both. Returns handled nodes."""
    found = index.match(np.asarray(reader.array(table.weight)))
    if found is None:
        return set()
    name, codes = found
    vocab, hidden = codes.codes.shape
    parts = planes(codes, config.level(codes))
    names = edit.add_planes(table.weight, parts)
    row_mins = None if codes.mins is None else np.ascontiguousarray(codes.mins)
    edit.writer.swap(table.gather, edit.gather(table.weight, table.gather.input[1], table.gather.output[0], parts,
                                               names, row_mins, codes.block), dropped=table.weight)
    handled = {table.gather.name}
    if table.tied:
        head = table.lm_head
        mins = None if row_mins is None else np.ascontiguousarray(row_mins.T)
        edit.writer.swap(head, edit.matmul(head.name or "lm_head", head.input[0], head.output[0], parts, names, vocab,
                                           mins, codes.block, config.level(codes)))
        if table.transpose is not None:
            edit.writer.swap(table.transpose, [])
        handled.add(head.name)
        # resident twice at run time (file rows for the Gather, packed copy for the head): runtime/memory.py
        stats["tied_table_bytes"] = sum(part.nbytes for part in parts) + (0 if row_mins is None else row_mins.nbytes)
    _count(stats, name, codes, parts, reader.shape(table.weight))
    return handled


def _count(stats: dict, name: str, codes: Codes, parts: list[Packed], shape: tuple[int, ...]) -> None:
    stats["matched"][codes.qtype] = stats["matched"].get(codes.qtype, 0) + 1
    stats["tensors"].append(name)
    stats["float_bytes"] += int(np.prod(shape)) * 4
    stats["quant_bytes"] += sum(part.nbytes for part in parts) + (0 if codes.mins is None else codes.mins.nbytes)


def gguf_exact(src: str | Path, dst: str | Path, config: GgufConfig, progress: Callable[[str], None] = print) -> dict:
    """Write dst/model.onnx (+ data): src's FP32 graph with every weight found in the GGUF in its exact form."""
    config.check()
    src, dst, started = Path(src), Path(dst), time.perf_counter()
    model = onnx.load(str(src / ONNX_FILE), load_external_data=False)
    if op := is_quantized(model):
        raise KoedgeError(f"{src} is already quantized (it has {op} nodes); start from its FP32 export")
    index = RowIndex(Path(config.gguf), progress)
    reader = WeightReader(model, src)
    table = find_table(model, reader)
    # Found before the writer indexes the graph: it keys nodes by the identity of these same objects.
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in reader
               and len(reader.shape(node.input[1])) == 2]
    writer = GraphWriter(model, config)
    edit = Edit(writer, config.accuracy_level)
    stats = {"matched": {}, "tensors": [], "float_bytes": 0, "quant_bytes": 0}
    handled = _replace_table(edit, index, reader, table, stats, config) if table else set()
    matmuls = [node for node in matmuls if not (table and table.tied and node is table.lm_head and handled)]
    progress(f"matching {len(matmuls)} MatMul weights against the GGUF's blocks")
    unmatched = []
    for node in matmuls:
        weight = np.asarray(reader.array(node.input[1]))  # [K, N]
        found = index.match(weight.T)
        if found is None:
            unmatched.append(node.name)
            continue
        name, codes = found
        parts = planes(codes, config.level(codes))
        names = edit.add_planes(node.input[1], parts)
        mins = None if codes.mins is None else np.ascontiguousarray(codes.mins.T)
        writer.swap(node, edit.matmul(node.name, node.input[0], node.output[0], parts, names, weight.shape[1], mins,
                                      codes.block, config.level(codes)), dropped=node.input[1])
        _count(stats, name, codes, parts, weight.shape)
    if not stats["tensors"]:
        raise KoedgeError(f"no weight of {src} equals a quantized tensor of {Path(config.gguf).name}: "
                          f"was the bundle exported from this GGUF?")
    writer.apply()
    fused = fuse_kernels(model, config.fuse)
    _save(model, src, dst)
    onnx.checker.check_model(str(dst / ONNX_FILE))
    left = sorted(set(index.codes) - set(stats["tensors"]))
    return {"gguf": Path(config.gguf).name, "types": stats["matched"], "tensors_exact": len(stats["tensors"]),
            "gguf_tensors_unused": left, "matmuls_float": unmatched, "table_exact": bool(handled),
            "tied_shared": bool(table and table.tied and len(handled) == 2),
            "tied_table_bytes": stats.get("tied_table_bytes", 0),
            **fused,
            "weight_bytes_before": stats["float_bytes"], "weight_bytes_after": stats["quant_bytes"],
            "quantize_seconds": round(time.perf_counter() - started, 1)}

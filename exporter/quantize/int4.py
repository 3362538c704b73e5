"""INT4 weight-only quantization: MatMulNBits for the MatMuls, GatherBlockQuantized for the embedding.

The block quantizers are onnxruntime's own (`onnxruntime.quantization.matmul_nbits_quantizer` and the
neural-compressor code it ships: RTN, HQQ, GPTQ, k-quant). What they do not do is done here:
- a tied embedding and LM head share ONE quantized tensor. MatMulNBits stores B as [N, K/block, blob],
  row-major over N; for the LM head N is the vocabulary, so the bytes are the embedding table [V, H]
  quantized along H. GatherBlockQuantized reads that same 3-D tensor (quantize_axis=2), so the bundle
  holds the big matrix once;
- mixed precision: chosen MatMuls (and the embedding/LM head) at 8 bits, the rest at 4;
- a 4-bit table keeps its hot rows at 8 bits: the tokens Korean text actually uses (measured on the
  calibration split). Every row is stored at 4 bits and the hot ones again at 8: the LM head writes the hot
  logits over the 4-bit ones, the embedding gathers a hot token's row from the 8-bit rows;
- weights are read one at a time from the memory-mapped external data, so peak memory stays near
  the output size, and GPTQ's Hessians are gathered in groups that fit a memory budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.quantize.packing import pack_matmuls
from exporter.quantize.residual_norm import fuse_residual_norms
from runtime.errors import KoedgeError

ALGOS = ("rtn", "hqq", "gptq", "k_quant", "best")  # best: rtn or k_quant per MatMul, by measured error
BLOCK_SIZES = (32, 64, 128)
TABLE_PRECISIONS = ("int4", "int8", "fp32")
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CHUNK_ROWS = 16384  # output channels quantized at once: bounds the quantizers' temporaries
# Block of the 4-bit rows of a split table (the rows Korean text rarely reads) unless embedding_block_size says:
# gemma-3-270m 242.9 MB, KL 0.0105 at 128 vs 264.2 MB, KL 0.0099 at 32 (8 passages; docs/quantization.md).
COLD_BLOCK = 128


@dataclass
class Int4Config:
    """Defaults measured on gemma-3-270m (docs/quantization.md): GPTQ 4-bit embedding/LM head, 8-bit MatMuls.
    A size budget puts MatMuls at 4 bits except the most sensitive ones (exporter/quantize/mixed.py)."""

    algo: str = "gptq"  # rtn | hqq | gptq | k_quant: the quantizer of the 4-bit weights
    block_size: int = 32  # weights per scale, along K
    symmetric: bool = False  # no zero points (rtn, gptq only)
    # MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations. 4 is MLAS's only fast
    # CPU path for 8-bit blocks: gemma-3-270m all-8-bit decodes at 40 tok/s with it, 0.8 without.
    accuracy_level: int = 4
    embedding: str = "int4"  # int4 | int8 | fp32: the embedding table and the LM head (shared when tied)
    embedding_block_size: int | None = None  # None: block_size, or COLD_BLOCK for the 4-bit rows of a split table
    # A 4-bit table keeps this many rows at 8 bits: the tokens most frequent in the Korean calibration split
    # (only tokens seen there). gemma-3-270m --int4: PPL +12.8% -> +1.1%, KL 0.147 -> 0.010 with its 6,874
    # Korean rows at 8 bits (docs/quantization.md).
    hot_rows: int = 8192
    hot_block_size: int | None = None  # block of those 8-bit rows; None: block_size
    blocks: dict[str, int] = field(default_factory=dict)  # MatMul name fragment -> its block size (else block_size)
    int8: list[str] = field(default_factory=lambda: ["/"])  # MatMul name fragments kept at 8 bits; "/": all
    calib_source: str = "ko"  # gptq: Korean calibration texts (split "calib") or a .txt/.jsonl file
    # gptq: 128 x 512 tokens, measured on gemma-3-270m's default (the 4-bit table, 1 MatMul input; 44 s):
    # 64-passage KL 0.147 vs 0.157 with 32 x 256. GPTQ on every MatMul of a 1.3B model should pass
    # 32 x 256 (14 min on the shape twin; this default would gather 8x the activations).
    calib_samples: int = 128
    calib_max_length: int = 512
    gptq_percdamp: float = 0.01
    gptq_actorder: bool = True
    # gptq: float32 Hessians gathered per calibration pass; each pass's MatMuls are quantized and its
    # Hessians freed before the next. The polyglot-ko-1.3b shape twin needs 7.6 GB of them in all.
    hessian_budget_mb: int = 4000
    # The bundle's size in MB: every MatMul at 4 bits, then the most sensitive (measured on Korean calibration
    # activations) at 8 bits while it fits. Replaces `int8`.
    size_budget_mb: float | None = None
    sensitivity_samples: int = 16  # calibration sequences (256 tokens) for the sensitivity / best-algo measurement
    # q/k/v and gate/up (MatMuls of one input at one width) as one MatMulNBits and a Split, and each residual
    # Add with the RMSNorm after it as one SkipSimplifiedLayerNormalization: fewer kernel calls per token
    # (exporter/quantize/packing.py, residual_norm.py), the same numbers
    fuse: bool = True

    @property
    def hot_block(self) -> int:
        """The block of the table's 8-bit rows."""
        return self.hot_block_size or self.block_size

    def check(self) -> None:
        if self.algo not in ALGOS:
            raise KoedgeError(f"unknown INT4 algorithm '{self.algo}' (choose from {', '.join(ALGOS)})")
        if self.block_size not in BLOCK_SIZES:
            raise KoedgeError(f"block size {self.block_size} is not supported (choose from "
                              f"{', '.join(map(str, BLOCK_SIZES))})")
        if any(block not in BLOCK_SIZES for block in self.blocks.values()):
            raise KoedgeError(f"block sizes {self.blocks}: each must be one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.hot_block_size not in (None, *BLOCK_SIZES):
            raise KoedgeError(f"hot-row block size {self.hot_block_size} is not supported (choose from "
                              f"{', '.join(map(str, BLOCK_SIZES))})")
        if self.embedding_block_size not in (None, 16, *BLOCK_SIZES):
            raise KoedgeError(f"embedding block size {self.embedding_block_size} is not supported (choose from "
                              f"16, {', '.join(map(str, BLOCK_SIZES))})")
        if self.embedding not in TABLE_PRECISIONS:
            raise KoedgeError(f"unknown embedding precision '{self.embedding}' (int4, int8 or fp32)")
        if self.symmetric and self.algo in ("hqq", "k_quant"):
            raise KoedgeError(f"{self.algo} fits a zero point per block; --symmetric works with rtn or gptq")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise KoedgeError(f"accuracy level {self.accuracy_level} is not one of 0-4")
        if self.hot_rows < 0:
            raise KoedgeError(f"hot rows must be 0 or more, not {self.hot_rows}")
        if self.size_budget_mb is not None and self.size_budget_mb <= 0:
            raise KoedgeError(f"size budget {self.size_budget_mb} MB must be positive")
        if self.algo == "gptq" and self.calib_samples < 1:
            raise KoedgeError("gptq needs at least 1 calibration sample")


@dataclass
class Packed:
    """A [K, N] weight in MatMulNBits layout."""

    data: np.ndarray  # uint8 [N, n_blocks, block * bits / 8]
    scales: np.ndarray  # float [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)], float [N, n_blocks] (hqq), or None
    bits: int
    block_size: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


# --- block quantizers (onnxruntime's) --------------------------------------------------------------------

def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] integer codes 0..2^bits-1 -> uint8, low nibble first (MatMulNBits' order)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _padded_t(w: np.ndarray, block: int) -> np.ndarray:
    """w [K, N] -> w.T [N, K padded to a multiple of block] as float32."""
    k = w.shape[0]
    pad = (-k) % block
    wt = np.ascontiguousarray(np.asarray(w, dtype=np.float32).T)
    return np.pad(wt, ((0, 0), (0, pad))) if pad else wt


def _from_codes(codes: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, block: int,
                k: int, dtype) -> Packed:
    """codes [N, Kp] ints, scales/zp [N, n_blocks] -> Packed."""
    n, kp = codes.shape
    blocks = kp // block
    data = _pack_codes(codes, bits).reshape(n, blocks, block * bits // 8)
    zero_points = None
    if zp is not None:
        zero_points = zp.astype(dtype) if zp.dtype.kind == "f" else _pack_codes(zp, bits)
    return Packed(data, scales.reshape(n, blocks).astype(dtype), zero_points, bits, block, k)


def _rtn(w: np.ndarray, bits: int, block: int, symmetric: bool) -> Packed:
    """Round to nearest with onnxruntime's C++ block quantizer (min/max per block)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                                                        bits=bits))
    packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(w, dtype=np.float32))
    return Packed(packed, scales, None if symmetric else zero_points, bits, block, w.shape[0])


def _k_quant(w: np.ndarray, bits: int, block: int) -> Packed:
    """llama.cpp's k-quant search (weighted least squares over scale and min) per block."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    wt = _padded_t(w, block)
    with np.errstate(divide="ignore", invalid="ignore"):  # constant blocks: the search skips them
        codes, scale, zp = quant_tensor_k_quant_cpu(wt, bits, block)
    n = wt.shape[0]
    return _from_codes(codes.reshape(n, -1), scale.reshape(n, -1), zp.reshape(n, -1), bits, block, w.shape[0],
                       np.float32)


def _hqq(w: np.ndarray, bits: int, block: int) -> Packed:
    """Half-quadratic quantization: optimised float zero point per block."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=bits))
    codes, scales, zero = quantizer.quantize_internal(torch.from_numpy(_padded_t(w, block)), bits=bits,
                                                      group_size=block)
    # HQQ dequantizes as (q - zero) * scale, like MatMulNBits with float zero points.
    return _from_codes(codes.numpy(), scales.numpy(), zero.numpy().astype(np.float32), bits, block, w.shape[0],
                       np.float32)


def _grid(rows: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min/max scale and zero point per column of a block of rows (zero always representable)."""
    maxq = 2 ** bits - 1
    if symmetric:
        return np.maximum(np.abs(rows).max(axis=0), 1e-12) * 2 / maxq, np.full(rows.shape[1], 2.0 ** (bits - 1))
    low, high = np.minimum(rows.min(axis=0), 0), np.maximum(rows.max(axis=0), 0)
    scale = np.maximum(high - low, 1e-12) / maxq
    return scale, np.clip(np.round(-low / scale), 0, maxq)


def _upper_inverse_factor(h: np.ndarray) -> np.ndarray:
    """U with H^-1 = U^T U (U upper), in float32 as GPTQ's reference does: through torch's LAPACK,
    Cholesky, Cholesky inverse, Cholesky (4/3 n^3, ~10 s at n = 8192 on 2 cores; numpy's float64
    inverse took 4x that)."""
    import torch

    factor = torch.linalg.cholesky(torch.from_numpy(h))
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).numpy()


def _gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block: int, symmetric: bool, config: Int4Config) -> Packed:
    """GPTQ: quantize input channels in order, pushing each one's error onto the rest through the
    inverse Hessian of the layer input (Frantar et al., 2022), with a min/max grid per block.

    Written out here because onnxruntime's neural-compressor port reads the lower triangle of an
    upper Cholesky factor for its [K, N] layout, so it applies no error feedback (its output error
    equals plain rounding; tests/test_quantize_int4.py checks ours beats it). With act-order the
    channels go by decreasing Hessian diagonal and each block keeps the grid of its original
    (contiguous) rows, since MatMulNBits blocks are contiguous along K.
    """
    k, n = w.shape
    maxq = 2 ** bits - 1
    padded = (k + block - 1) // block * block
    weights = np.zeros((padded, n), np.float32)
    weights[:k] = w
    h = np.zeros((padded, padded), np.float32)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    weights[dead] = 0
    h[np.diag_indices_from(h)] += config.gptq_percdamp * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if config.gptq_actorder else np.arange(padded)
    groups = padded // block
    scales, zeros = np.zeros((groups, n), np.float32), np.zeros((groups, n), np.float32)
    if config.gptq_actorder:
        for g in range(groups):
            scales[g], zeros[g] = _grid(weights[g * block:(g + 1) * block], bits, symmetric)
    weights, h = weights[order], h[np.ix_(order, order)]
    hinv = _upper_inverse_factor(h)
    codes = np.zeros((padded, n), np.uint8)
    step = max(block, 128 // block * block)
    for i1 in range(0, padded, step):
        i2 = min(i1 + step, padded)
        part = weights[i1:i2].copy()
        errors = np.zeros_like(part)
        for i in range(i2 - i1):
            row, group = order[i1 + i], order[i1 + i] // block
            if not config.gptq_actorder and row % block == 0:  # grid from the weights as updated so far
                scales[group], zeros[group] = _grid(part[i:i + block], bits, symmetric)
            scale, zero = scales[group], zeros[group]
            q = np.clip(np.round(part[i] / scale) + zero, 0, maxq)
            codes[row] = q
            error = (part[i] - (q - zero) * scale) / hinv[i1 + i, i1 + i]
            part[i:] -= np.outer(hinv[i1 + i, i1 + i:i2], error)
            errors[i] = error
        weights[i2:] -= hinv[i1:i2, i2:].T @ errors
    return _from_codes(codes.T, scales.T, None if symmetric else zeros.T.astype(np.uint8), bits, block, k,
                       np.float32)


def quantize_weight(w: np.ndarray, bits: int, config: Int4Config, algo: str | None = None,
                    hessian: np.ndarray | None = None, block: int | None = None) -> Packed:
    """Quantize w [K, N] to `bits` with blocks along K, a chunk of output channels at a time."""
    algo = algo or config.algo
    block, symmetric = block or config.block_size, config.symmetric and algo in ("rtn", "gptq")
    parts = []
    for start in range(0, w.shape[1], CHUNK_ROWS):
        chunk = np.asarray(w[:, start:start + CHUNK_ROWS], dtype=np.float32)
        if algo == "rtn":
            parts.append(_rtn(chunk, bits, block, symmetric))
        elif algo == "k_quant":
            parts.append(_k_quant(chunk, bits, block))
        elif algo == "hqq":
            parts.append(_hqq(chunk, bits, block))
        elif algo == "gptq":
            if hessian is None:
                raise KoedgeError("gptq needs calibration activations for every MatMul")
            parts.append(_gptq(chunk, hessian, bits, block, symmetric, config))
        else:
            raise KoedgeError(f"unknown INT4 algorithm '{algo}'")
    if len(parts) == 1:
        return parts[0]
    zero = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
    return Packed(np.concatenate([p.data for p in parts]), np.concatenate([p.scales for p in parts]), zero,
                  bits, block, w.shape[0])


def dequantize(packed: Packed) -> np.ndarray:
    """The [K, N] weight MatMulNBits computes with (for checks and tests)."""
    n, blocks, blob = packed.data.shape
    raw = packed.data.reshape(n, -1)
    if packed.bits == 4:
        codes = np.empty((n, raw.shape[1] * 2), np.float32)
        codes[:, 0::2], codes[:, 1::2] = raw & 0x0F, raw >> 4
    else:
        codes = raw.astype(np.float32)
    if packed.zero_points is None:
        zp = np.full((n, blocks), 2 ** (packed.bits - 1), np.float32)
    elif packed.zero_points.dtype.kind == "f":
        zp = packed.zero_points.astype(np.float32)
    elif packed.bits == 4:
        zp = np.empty((n, packed.zero_points.shape[1] * 2), np.float32)
        zp[:, 0::2], zp[:, 1::2] = packed.zero_points & 0x0F, packed.zero_points >> 4
        zp = zp[:, :blocks]
    else:
        zp = packed.zero_points.astype(np.float32)
    values = (codes.reshape(n, blocks, -1) - zp[..., None]) * packed.scales.astype(np.float32)[..., None]
    return values.reshape(n, -1)[:, :packed.k].T


# --- the graph ----------------------------------------------------------------------------------------------

class WeightReader:
    """Initializers by name, external ones memory-mapped from the data file (no full load)."""

    def __init__(self, model: onnx.ModelProto, folder: Path):
        self.folder = folder
        self.tensors = {tensor.name: tensor for tensor in model.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].dims)

    def array(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {entry.key: entry.value for entry in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.memmap(self.folder / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                         shape=tuple(tensor.dims))


@dataclass
class Table:
    """The embedding Gather and, when present, the LM head that reads the same matrix."""

    gather: onnx.NodeProto
    weight: str  # [V, H]
    lm_head: onnx.NodeProto | None = None  # FusedMatMul(x, E, transB=1) when tied, else MatMul(x, W [H, V])
    lm_weight: str | None = None
    transpose: onnx.NodeProto | None = None  # Transpose(E) feeding a MatMul LM head (Optimum's tied form)

    @property
    def tied(self) -> bool:
        return self.lm_head is not None and self.lm_weight == self.weight


def find_table(model: onnx.ModelProto, reader: WeightReader) -> Table | None:
    gathers = [node for node in model.graph.node if node.op_type == "Gather" and node.input[0] in reader
               and len(reader.shape(node.input[0])) == 2]
    if not gathers:
        return None
    gather = max(gathers, key=lambda node: np.prod(reader.shape(node.input[0])))
    vocab, hidden = reader.shape(gather.input[0])
    table = Table(gather, gather.input[0])
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        if node.op_type == "FusedMatMul" and node.input[1] == table.weight:
            table.lm_head, table.lm_weight = node, node.input[1]
        elif node.op_type == "MatMul" and node.input[1] in reader and reader.shape(node.input[1]) == (hidden, vocab):
            table.lm_head, table.lm_weight = node, node.input[1]
        elif node.op_type == "MatMul" and node.input[1] in producers:
            source = producers[node.input[1]]
            perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), [1, 0])
            if source.op_type == "Transpose" and source.input[0] == table.weight and perm == [1, 0]:
                table.lm_head, table.lm_weight, table.transpose = node, table.weight, source
    return table


def is_quantized(model: onnx.ModelProto) -> str | None:
    """The first quantized op found, or None for a float graph."""
    quantized = {"MatMulNBits", "GatherBlockQuantized", "QuantizeLinear", "DequantizeLinear", "MatMulInteger",
                 "DynamicQuantizeLinear", "QLinearMatMul"}
    return next((node.op_type for node in model.graph.node if node.op_type in quantized), None)


class GraphWriter:
    """Collects the node replacements and new initializers, then rewrites the graph once."""

    def __init__(self, model: onnx.ModelProto, config: Int4Config):
        self.model, self.config = model, config
        self.replace: dict[int, list[onnx.NodeProto]] = {}
        self.initializers: list[onnx.TensorProto] = []
        self.dropped: set[str] = set()
        self.index = {id(node): i for i, node in enumerate(model.graph.node)}

    def add(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def add_packed(self, prefix: str, packed: Packed) -> list[str]:
        names = [self.add(f"{prefix}_Q{packed.bits}", packed.data), self.add(f"{prefix}_scales", packed.scales)]
        if packed.zero_points is not None:
            names.append(self.add(f"{prefix}_zp", packed.zero_points))
        return names

    def matmul_nbits(self, outputs: list[str], activation: str, names: list[str], packed: Packed, n: int,
                     name: str) -> onnx.NodeProto:
        attrs = dict(K=packed.k, N=n, bits=packed.bits, block_size=packed.block_size)
        if self.config.accuracy_level:
            attrs["accuracy_level"] = self.config.accuracy_level
        return helper.make_node("MatMulNBits", [activation, *names], outputs, name=name,
                                domain="com.microsoft", **attrs)

    def swap(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto], dropped: str | None = None) -> None:
        self.replace[self.index[id(node)]] = new_nodes
        if dropped:
            self.dropped.add(dropped)

    def apply(self) -> None:
        graph = self.model.graph
        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(self.replace.get(i, [node]))
        still_used = {name for node in nodes for name in node.input}
        keep = [t for t in graph.initializer if not (t.name in self.dropped and t.name not in still_used)]
        graph.ClearField("node")
        graph.node.extend(nodes)
        graph.ClearField("initializer")
        graph.initializer.extend(keep + self.initializers)
        if not any(opset.domain == "com.microsoft" for opset in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _matmul_targets(model: onnx.ModelProto, reader: WeightReader, table: Table | None) -> list[onnx.NodeProto]:
    lm_head = table.lm_head if table else None
    return [node for node in model.graph.node if node.op_type == "MatMul" and node is not lm_head
            and node.input[1] in reader and len(reader.shape(node.input[1])) == 2]


def _bits_for(node: onnx.NodeProto, config: Int4Config) -> int:
    return 8 if any(fragment in node.name for fragment in config.int8) else 4


def _block_for(node: onnx.NodeProto, config: Int4Config) -> int:
    return next((block for fragment, block in config.blocks.items() if fragment in node.name), config.block_size)


def _shared_table(writer: GraphWriter, table: Table, packed: Packed, vocab: int, hidden: int) -> None:
    """Tied: MatMulNBits (LM head) and GatherBlockQuantized (embedding) read one quantized tensor."""
    names = writer.add_packed(table.weight, packed)
    head = table.lm_head
    writer.swap(head, [writer.matmul_nbits(list(head.output), head.input[0], names, packed, vocab, head.name + "_Q")])
    _drop_transpose(writer, table)
    _gather(writer, table, packed, names, vocab, hidden)


def _drop_transpose(writer: GraphWriter, table: Table) -> None:
    """Optimum's tied head reads Transpose(E); once the head reads the quantized table it has no other reader."""
    if table.transpose is not None and not any(table.transpose.output[0] in node.input
                                               for node in writer.model.graph.node if node is not table.lm_head):
        writer.swap(table.transpose, [])


def _gather(writer: GraphWriter, table: Table, packed: Packed, names: list[str], vocab: int, hidden: int) -> None:
    """GatherBlockQuantized over the MatMulNBits-layout tensor [V, blocks, blob] (quantize_axis=2)."""
    nodes = _gather_rows(writer, table.weight, packed, names, table.gather.input[1], table.gather.output[0], vocab,
                         hidden)
    writer.swap(table.gather, nodes, dropped=table.weight)


def _gather_rows(writer: GraphWriter, prefix: str, packed: Packed, names: list[str], indices: str, output: str,
                 rows: int, hidden: int) -> list[onnx.NodeProto]:
    """Nodes gathering rows `indices` of a MatMulNBits-layout tensor [rows, blocks, blob] into `output` [..., hidden]."""
    (data, scales), blocks = names[:2], packed.data.shape[1]
    # GatherBlockQuantized wants scales (and zero points) of the data's rank: [V, blocks, 1].
    shape3 = writer.add(f"{prefix}_shape3", np.array([rows, blocks, 1], np.int64))
    nodes = [helper.make_node("Reshape", [scales, shape3], [f"{scales}_3d"], name=f"{prefix}_scales_3d")]
    gather_inputs = [data, indices, f"{scales}_3d"]
    if packed.zero_points is not None:
        if packed.bits == 8:
            nodes.append(helper.make_node("Reshape", [names[2], shape3], [f"{names[2]}_3d"], name=f"{prefix}_zp_3d"))
            gather_inputs.append(f"{names[2]}_3d")
        else:  # 4-bit zero points are packed in pairs along the blocks; the gather needs one per byte
            zp = np.empty((rows, packed.zero_points.shape[1] * 2), np.uint8)
            zp[:, 0::2], zp[:, 1::2] = packed.zero_points & 0x0F, packed.zero_points >> 4
            gather_inputs.append(writer.add(f"{prefix}_zp_gather", zp[:, :blocks].reshape(rows, blocks, 1)))
    gathered = f"{output}_blocks"
    nodes.append(helper.make_node("GatherBlockQuantized", gather_inputs, [gathered], name=f"{prefix}_gather_Q",
                                  domain="com.microsoft", gather_axis=0, quantize_axis=2,
                                  block_size=packed.block_size, bits=packed.bits))
    padded = blocks * packed.block_size
    flat = writer.add(f"{prefix}_flat", np.array([0, 0, padded], np.int64))
    if padded == hidden:
        nodes.append(helper.make_node("Reshape", [gathered, flat], [output], name=f"{prefix}_flat"))
    else:  # K padded up to whole blocks: cut the padding off again
        nodes.append(helper.make_node("Reshape", [gathered, flat], [f"{gathered}_flat"], name=f"{prefix}_flat"))
        starts, ends = writer.add(f"{prefix}_starts", np.array([0], np.int64)), writer.add(
            f"{prefix}_ends", np.array([hidden], np.int64))
        axes = writer.add(f"{prefix}_axes", np.array([-1], np.int64))
        nodes.append(helper.make_node("Slice", [f"{gathered}_flat", starts, ends, axes], [output],
                                      name=f"{prefix}_unpad"))
    return nodes


@dataclass
class SplitTable:
    """A [V, H] table as two MatMulNBits-layout tensors: every row at 4 bits, and the `hot` rows again at 8.

    The LM head computes all logits from the 4-bit rows and overwrites the hot ones (ScatterElements of a few
    thousand values); reordering two halves' logits into token order instead cost a Gather over the whole
    vocabulary, 1.1 ms of gemma-3-270m's 15 ms decode step (262k logits). The hot rows' 4-bit copies cost
    ~0.5 byte each per weight (gemma-3-270m: +2.4 MB); the embedding reads a token's row from the half that
    holds it at 8 bits if any.
    """

    hot: np.ndarray  # token ids, ascending
    hot_packed: Packed  # the hot rows, 8 bits
    all_packed: Packed  # every row, 4 bits
    position: np.ndarray  # int32 [V]: token id -> its row in hot_packed, -1 if not hot

    @property
    def nbytes(self) -> int:
        return self.hot_packed.nbytes + self.all_packed.nbytes + self.position.nbytes


def split_table(matrix: np.ndarray, hot: np.ndarray, config: Int4Config, algo: str, hessian: np.ndarray | None,
                block: int) -> SplitTable:
    vocab = matrix.shape[0]
    position = np.full(vocab, -1, np.int32)
    position[hot] = np.arange(len(hot))
    # the hot rows take hot_block_size (else the MatMuls' block); `block` (the table's) applies to the 4-bit rows
    hot_packed = quantize_weight(np.asarray(matrix[hot], np.float32).T, 8, config, algo="rtn", block=config.hot_block)
    all_packed = quantize_weight(np.asarray(matrix, np.float32).T, 4, config, algo=algo, hessian=hessian, block=block)
    return SplitTable(hot, hot_packed, all_packed, position)


def _split_names(writer: GraphWriter, prefix: str, split: SplitTable) -> tuple[list[str], list[str], str]:
    return (writer.add_packed(f"{prefix}_hot", split.hot_packed), writer.add_packed(f"{prefix}_all", split.all_packed),
            writer.add(f"{prefix}_position", split.position))


def _split_head(writer: GraphWriter, head: onnx.NodeProto, prefix: str, split: SplitTable,
                names: tuple[list[str], list[str], str]) -> list[onnx.NodeProto]:
    """Every logit from the 4-bit rows, then the hot tokens' logits from the 8-bit rows written over them."""
    hot_names, all_names, _ = names
    out = head.output[0]
    nodes = [writer.matmul_nbits([f"{out}_all"], head.input[0], all_names, split.all_packed,
                                 split.all_packed.data.shape[0], f"{head.name}_all_Q"),
             writer.matmul_nbits([f"{out}_hot"], head.input[0], hot_names, split.hot_packed,
                                 split.hot_packed.data.shape[0], f"{head.name}_hot_Q")]
    hot_ids = writer.add(f"{prefix}_hot_ids", split.hot.astype(np.int64))
    nodes += [  # ScatterElements wants indices shaped like the updates: [batch, positions, hot]
        helper.make_node("Shape", [f"{out}_hot"], [f"{out}_hot_shape"], name=f"{prefix}_hot_shape"),
        helper.make_node("Expand", [hot_ids, f"{out}_hot_shape"], [f"{out}_hot_ids"], name=f"{prefix}_hot_ids"),
        helper.make_node("ScatterElements", [f"{out}_all", f"{out}_hot_ids", f"{out}_hot"], list(head.output),
                         name=f"{prefix}_logits_hot", axis=-1),
    ]
    return nodes


def _split_gather(writer: GraphWriter, table: Table, prefix: str, split: SplitTable,
                  names: tuple[list[str], list[str], str], hidden: int) -> None:
    """Each token's row at 8 bits if it is hot, else at 4: both gathered (the hot index clamped), then Where."""
    hot_names, all_names, position = names
    ids, output, n_hot = table.gather.input[1], table.gather.output[0], len(split.hot)
    zero = writer.add(f"{prefix}_zero", np.array(0, np.int32))
    minus_one = writer.add(f"{prefix}_minus_one", np.array([-1], np.int64))
    nodes = [
        helper.make_node("Gather", [position, ids], [f"{prefix}_pos"], name=f"{prefix}_pos", axis=0),
        helper.make_node("GreaterOrEqual", [f"{prefix}_pos", zero], [f"{prefix}_is_hot"], name=f"{prefix}_is_hot"),
        helper.make_node("Max", [f"{prefix}_pos", zero], [f"{prefix}_hot_index"], name=f"{prefix}_hot_index"),
        *_gather_rows(writer, f"{prefix}_hot", split.hot_packed, hot_names, f"{prefix}_hot_index",
                      f"{output}_hot", n_hot, hidden),
        *_gather_rows(writer, f"{prefix}_all", split.all_packed, all_names, ids, f"{output}_all",
                      split.all_packed.data.shape[0], hidden),
        helper.make_node("Unsqueeze", [f"{prefix}_is_hot", minus_one], [f"{prefix}_is_hot_3d"],
                         name=f"{prefix}_is_hot_3d"),
        helper.make_node("Where", [f"{prefix}_is_hot_3d", f"{output}_hot", f"{output}_all"], [output],
                         name=f"{prefix}_rows"),
    ]
    writer.swap(table.gather, nodes, dropped=table.weight)


def _table_algo(config: Int4Config) -> str:
    if config.embedding == "int8":  # like the 8-bit MatMuls: round to nearest is near lossless
        return "rtn"
    # GatherBlockQuantized takes integer zero points only, so HQQ's float zero points cannot be shared.
    return "k_quant" if config.algo in ("hqq", "best") else config.algo


# --- GPTQ calibration -----------------------------------------------------------------------------------------

def _hessian_groups(src: Path, dims: dict[str, int], config: Int4Config,
                    progress: Callable[[str], None]) -> Iterator[dict[str, np.ndarray]]:
    """X^T X of each MatMul input over Korean calibration prefills (FP32 source bundle), a group at a time.

    Groups fill `hessian_budget_mb` in graph order, so each calibration pass runs the graph only up to its
    last input (see _probe_session). float32 sums through torch's GEMM: 4x faster than numpy's float64.
    """
    import torch

    from exporter.quantize.calibration import CalibrationConfig, KVCacheReader, build_sequences
    from runtime.model import CausalLM

    groups, group, used = [], [], 0
    for name in dims:
        size = dims[name] ** 2 * 4
        if group and used + size > config.hessian_budget_mb * 1e6:
            groups.append(group)
            group, used = [], 0
        group.append(name)
        used += size
    groups.append(group)
    reference = CausalLM(src)
    # Prefills only: a weight's Hessian needs the distribution of its inputs, which decode steps share.
    calibration = CalibrationConfig(source=config.calib_source, samples=config.calib_samples, holdout=0,
                                    max_length=config.calib_max_length, min_length=min(64, config.calib_max_length),
                                    decode_steps=0)
    sequences, _ = build_sequences(reference, calibration)
    for number, group in enumerate(groups, 1):
        session = _probe_session(src, group)
        progress(f"gptq: calibration pass {number}/{len(groups)} over {len(sequences)} Korean sequences "
                 f"({len(group)} MatMul inputs)")
        sums = {name: torch.zeros((dims[name], dims[name])) for name in group}
        reader = KVCacheReader(reference, sequences)  # prefill feeds only: the reference never runs
        while (feeds := reader.get_next()) is not None:
            for name, value in zip(group, session.run(group, feeds)):
                x = torch.from_numpy(np.ascontiguousarray(value.reshape(-1, value.shape[-1]), np.float32))
                sums[name].addmm_(x.T, x)
        del session, reader
        yield {name: total.numpy() for name, total in sums.items()}
        del sums


def _probe_session(src: Path, outputs: list[str]):
    """The source graph with `outputs` added, loaded from bytes; weights still come from src's data file."""
    import onnxruntime as ort

    from runtime.session import SessionConfig, session_options

    probe = onnx.load(str(src / ONNX_FILE), load_external_data=False)
    # Only what the outputs need: the LM head (the costliest node of a prefill) drops out when unused.
    needed, kept = set(outputs), []
    for node in reversed(probe.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    probe.graph.ClearField("node")
    probe.graph.node.extend(reversed(kept))
    probe.graph.ClearField("output")
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    # Graph inputs stay (the feeds name them all), so their defaults stay too: an optional input such as
    # logits_to_keep is an initializer of the same name, and without it the input would become required.
    used = needed | {name for node in kept for name in node.input} | {item.name for item in probe.graph.input}
    initializers = [tensor for tensor in probe.graph.initializer if tensor.name in used]
    probe.graph.ClearField("initializer")
    probe.graph.initializer.extend(initializers)
    options = session_options(SessionConfig())
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.resolve()))
    return ort.InferenceSession(probe.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


# --- the pass -------------------------------------------------------------------------------------------------

def quantize_int4(src: str | Path, dst: str | Path, config: Int4Config,
                  progress: Callable[[str], None] = print, plan: dict[str, tuple[int, str]] | None = None) -> dict:
    """Write dst/model.onnx (+ model.onnx.data): src's graph with weight-only quantized MatMuls and embedding.

    `plan` (exporter/quantize/mixed.py): MatMul name -> (bits, 4-bit quantizer); else config.int8 and config.algo.
    Returns what the manifest records: the mix of precisions, bytes before and after, and the table sharing.
    """
    from tqdm import tqdm

    config.check()
    src, dst = Path(src), Path(dst)
    started = time.perf_counter()
    model = onnx.load(str(src / ONNX_FILE), load_external_data=False)
    if op := is_quantized(model):
        raise KoedgeError(f"{src} is already quantized (it has {op} nodes); quantize its FP32 bundle instead")
    reader = WeightReader(model, src)
    table = find_table(model, reader)
    targets = _matmul_targets(model, reader, table)
    if not targets:
        raise KoedgeError(f"{src} has no MatMul with a constant 2-D weight to quantize")
    writer = GraphWriter(model, config)
    mix = {"int4": [], "int8": []}
    sizes = {"float": 0, "quant": 0}
    progress(f"quantizing {len(targets)} MatMuls with {config.algo} (block {config.block_size}"
             f"{''.join(f', {fragment} {block}' for fragment, block in config.blocks.items())}"
             f"{', symmetric' if config.symmetric else ''})")
    bar = tqdm(total=len(targets), desc="MatMulNBits", unit="matmul", leave=False)

    def bits_of(node: onnx.NodeProto) -> int:
        return plan[node.name][0] if plan and node.name in plan else _bits_for(node, config)

    def quantize_node(node: onnx.NodeProto, hessian: np.ndarray | None = None) -> None:
        weight = node.input[1]
        w = reader.array(weight)
        bits = bits_of(node)
        algo = plan[node.name][1] if plan and node.name in plan and hessian is None else None
        # 8-bit round to nearest is already near lossless: the slow searches go to the 4-bit weights
        packed = quantize_weight(w, bits, config, algo="rtn" if bits == 8 else algo, hessian=hessian,
                                 block=_block_for(node, config))
        names = writer.add_packed(weight, packed)
        writer.swap(node, [writer.matmul_nbits(list(node.output), node.input[0], names, packed, w.shape[1], node.name + "_Q")],
                    dropped=weight)
        mix[f"int{bits}"].append(node.name)
        sizes["float"] += w.nbytes
        sizes["quant"] += packed.nbytes
        bar.update()

    pending = list(targets)
    head_hessian: dict[str, np.ndarray] = {}
    if config.algo == "gptq":
        dims = {node.input[0]: reader.shape(node.input[1])[0] for node in targets if bits_of(node) == 4}
        head_input = table.lm_head.input[0] if table and table.lm_head is not None else None
        if head_input and config.embedding == "int4":
            dims[head_input] = reader.shape(table.weight)[1]
        for hessians in (_hessian_groups(src, dims, config, progress) if dims else ()):
            for node in [node for node in pending if node.input[0] in hessians and bits_of(node) == 4]:
                quantize_node(node, hessians[node.input[0]])
                pending.remove(node)
            if head_input in hessians:
                head_hessian[head_input] = hessians[head_input]
            del hessians  # this pass's Hessians go before the next pass gathers its own
    for node in pending:
        quantize_node(node)
    bar.close()
    float_bytes, quant_bytes = sizes["float"], sizes["quant"]
    table_result = _quantize_table(writer, reader, table, config, head_hessian, progress, src)
    float_bytes += table_result.pop("float_bytes", 0)
    quant_bytes += table_result.pop("quant_bytes", 0)
    writer.apply()
    fused = fuse_kernels(model, config.fuse)
    _save(model, src, dst)
    onnx.checker.check_model(str(dst / ONNX_FILE))
    return {
        "matmuls_int4": len(mix["int4"]), "matmuls_int8": len(mix["int8"]), "int8_matmuls": mix["int8"],
        **fused, **table_result,
        "weight_bytes_before": int(float_bytes), "weight_bytes_after": int(quant_bytes),
        "quantize_seconds": round(time.perf_counter() - started, 1),
    }


def hot_tokens(src: Path, config: Int4Config, vocab: int) -> np.ndarray:
    """Ids (ascending) of the `config.hot_rows` tokens most frequent in the calibration split, seen ones only,
    plus the special and chat-format tokens every prompt starts with."""
    from tokenizers import Tokenizer

    from runtime.bundle import read_manifest
    from runtime.data import load_texts

    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    ids: list[int] = []
    try:
        texts = load_texts(config.calib_source, split="calib")
    except KoedgeError as err:
        raise KoedgeError(f"{err} (the 4-bit table's Korean rows are chosen on calibration text: give "
                          f"--calib-source FILE, or --hot-rows 0)") from err
    for start in range(0, len(texts), 4096):
        for encoding in tokenizer.encode_batch(texts[start:start + 4096], add_special_tokens=False):
            ids.extend(encoding.ids)
    counts = np.bincount(np.asarray(ids, np.int64), minlength=vocab)[:vocab]
    tokens = read_manifest(src).tokens
    always = {tokens.bos_token_id, tokens.pad_token_id, *tokens.eos_token_ids} - {None}
    for value in (tokens.chat_format or {}).values():  # the turn markers' text, and end-of-turn ids
        always.update(tokenizer.encode(value, add_special_tokens=False).ids if isinstance(value, str) else value)
    always = {token for token in always if 0 <= token < vocab}
    seen = [int(token) for token in np.argsort(-counts, kind="stable") if counts[token] > 0 and token not in always]
    return np.array(sorted(always | set(seen[:max(config.hot_rows - len(always), 0)])), np.int64)


def _quantize_table(writer: GraphWriter, reader: WeightReader, table: Table | None, config: Int4Config,
                    hessians: dict[str, np.ndarray], progress: Callable[[str], None], src: Path) -> dict:
    if table is None or config.embedding == "fp32":
        return {"embedding": "fp32" if table else "none", "tied_shared": False}
    bits = 8 if config.embedding == "int8" else 4
    algo = _table_algo(config)
    vocab, hidden = reader.shape(table.weight)
    hessian = hessians.get(table.lm_head.input[0]) if table.lm_head is not None else None
    hot = hot_tokens(src, config, vocab) if bits == 4 and config.hot_rows else np.zeros(0, np.int64)
    if len(hot) == vocab:  # a small vocabulary Korean text uses whole: no 4-bit rows left
        bits, algo, hot = 8, "rtn", np.zeros(0, np.int64)
    progress(f"quantizing the {vocab:,} x {hidden} embedding to int{bits} with {algo}"
             f"{f', its {len(hot):,} Korean rows at 8 bits' if len(hot) else ''}"
             f"{' (shared with the tied LM head)' if table.tied else ''}")
    embedding = reader.array(table.weight)
    block = config.embedding_block_size or (COLD_BLOCK if len(hot) else config.block_size)
    result = {"embedding": f"int{bits}", "embedding_algo": algo, "embedding_block_size": block,
              "tied_shared": table.tied, "hot_rows": len(hot), "float_bytes": embedding.nbytes}
    if len(hot):
        split = split_table(embedding, hot, config, algo, hessian, block)
        names = _split_names(writer, table.weight, split)
        _split_gather(writer, table, table.weight, split, names, hidden)
        result["quant_bytes"] = split.nbytes
        if table.tied:
            writer.swap(table.lm_head, _split_head(writer, table.lm_head, table.weight, split, names))
            _drop_transpose(writer, table)
            # the head reads its pre-packed copy; the gather reads from the file mostly the hot rows
            resident = split.hot_packed.nbytes + split.position.nbytes
            return {**result, "tied_table_bytes": split.nbytes, "tied_gather_bytes": resident}
    else:
        packed = quantize_weight(embedding.T, bits, config, algo=algo, hessian=hessian, block=block)
        result["quant_bytes"] = packed.nbytes
        if table.tied:
            _shared_table(writer, table, packed, vocab, hidden)
            return {**result, "tied_table_bytes": packed.nbytes}
        _gather(writer, table, packed, writer.add_packed(table.weight, packed), vocab, hidden)
    if table.lm_head is not None:
        head = reader.array(table.lm_weight)
        if len(hot):
            head_split = split_table(np.asarray(head).T, hot, config, algo, hessian, block)
            head_nodes = _split_head(writer, table.lm_head, table.lm_weight, head_split,
                                     _split_names(writer, table.lm_weight, head_split))
            result["quant_bytes"] += head_split.nbytes
        else:
            head_packed = quantize_weight(head, bits, config, algo=algo, hessian=hessian, block=block)
            head_nodes = [writer.matmul_nbits(list(table.lm_head.output), table.lm_head.input[0],
                                              writer.add_packed(table.lm_weight, head_packed), head_packed,
                                              head.shape[1], table.lm_head.name + "_Q")]
            result["quant_bytes"] += head_packed.nbytes
        writer.swap(table.lm_head, head_nodes, dropped=table.lm_weight)
        result["float_bytes"] += head.nbytes
    return result


def fuse_kernels(model: onnx.ModelProto, enabled: bool) -> dict:
    """The quantized graph's fusions (packed MatMulNBits, residual Add + RMSNorm), counted for the manifest."""
    return {"matmuls_packed": pack_matmuls(model) if enabled else 0,
            "residual_norms_fused": fuse_residual_norms(model) if enabled else 0}


def _save(model: onnx.ModelProto, src: Path, dst: Path) -> None:
    """Pull the remaining float initializers in from src's data file and write dst with external data."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(src))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    onnx.save_model(model, str(dst / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    (dst / DATA_FILE).chmod(0o644)

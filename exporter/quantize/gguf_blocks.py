"""GGUF quantized blocks as integer codes with a scale, zero point and min per block.

Every type here dequantizes as `scale * (code - zero_point) - min` with one scale (and min) per block of
`block` weights along a row, which is MatMulNBits' form (plus a correction term for the mins, see
exporter/quantize/gguf.py). The codes are read by running gguf's own dequantization on a copy of the
blocks whose scales are set to 1 and mins to 0, so the bit layouts are gguf-py's, not re-derived here;
the scales and mins are read from the block headers. tests/test_gguf.py checks every type against
`gguf.quants.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import KoedgeError

FP16_ONE = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
K_SCALES_ONE = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.uint8)  # Q4_K/Q5_K packed: every sc 1, m 0


@dataclass
class Codes:
    """One GGUF tensor [rows, cols]: value = scales * (codes - zero_point) - mins, per block along cols."""

    codes: np.ndarray  # uint8 [rows, cols], 0 .. 2^bits - 1
    scales: np.ndarray  # float32 [rows, cols // block]
    zero_point: int
    mins: np.ndarray | None  # float32 [rows, cols // block], subtracted; None: no min
    bits: int  # 4 or 8: the MatMulNBits width that holds the codes (5- and 6-bit codes go in 8)
    block: int
    qtype: str

    def rows(self, index: np.ndarray) -> "Codes":
        mins = None if self.mins is None else self.mins[index]
        return Codes(self.codes[index], self.scales[index], self.zero_point, mins, self.bits, self.block, self.qtype)

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        scales = np.repeat(self.scales, self.block, axis=1)
        values = scales * (self.codes.astype(np.float32) - np.float32(self.zero_point))
        if self.mins is not None:
            values = values - np.repeat(self.mins, self.block, axis=1)
        return values.reshape(rows, cols)


# type name: (weights per block, bytes per block, bits of the MatMulNBits form, zero point, scale block)
SUPPORTED = {"Q4_0": (32, 18, 4, 8, 32), "Q4_1": (32, 20, 4, 0, 32), "Q5_0": (32, 22, 8, 16, 32),
             "Q5_1": (32, 24, 8, 0, 32), "Q8_0": (32, 34, 8, 128, 32), "Q4_K": (256, 144, 4, 0, 32),
             "Q5_K": (256, 176, 8, 0, 32), "Q6_K": (256, 210, 8, 32, 16)}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of every block, as float32 [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _codes_by_dequantizing(blocks: np.ndarray, qtype, rows: int, patches: dict[int, np.ndarray]) -> np.ndarray:
    """gguf's dequantization of the blocks with the header bytes at each offset replaced (scale 1, min 0)."""
    from gguf.quants import dequantize

    patched = blocks.copy()
    for start, value in patches.items():
        patched[:, start:start + len(value)] = value
    return dequantize(patched.reshape(rows, -1), qtype)


def decode(raw: np.ndarray, qtype) -> Codes:
    """raw: a GGUF tensor's bytes as uint8 [rows, bytes per row] (GGUFReader's `data`); qtype: GGMLQuantizationType."""
    name = qtype.name
    if name not in SUPPORTED:
        raise KoedgeError(f"GGUF type {name} has no exact MatMulNBits form here")
    per_block, size, bits, zero, scale_block = SUPPORTED[name]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    zero_f16 = np.zeros(2, np.uint8)
    if name == "Q8_0":
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).reshape(rows, -1)
        scales, mins = _f16(blocks, 0), None
    elif name in ("Q4_0", "Q5_0"):
        codes = _codes_by_dequantizing(blocks, qtype, rows, {0: FP16_ONE}) + zero
        scales, mins = _f16(blocks, 0), None
    elif name in ("Q4_1", "Q5_1"):
        codes = _codes_by_dequantizing(blocks, qtype, rows, {0: FP16_ONE, 2: zero_f16})
        scales, mins = _f16(blocks, 0), -_f16(blocks, 2)  # value = d * q + m
    elif name in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K

        codes = _codes_by_dequantizing(blocks, qtype, rows, {0: FP16_ONE, 2: zero_f16, 4: K_SCALES_ONE})
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        scales = _f16(blocks, 0) * sc.astype(np.float32)
        mins = _f16(blocks, 2) * m.astype(np.float32)
    else:  # Q6_K: ql 128, qh 64, int8 scales 16, fp16 d
        codes = _codes_by_dequantizing(blocks, qtype, rows, {192: np.ones(16, np.uint8), 208: FP16_ONE}) + zero
        scales = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
        mins = None
    per_row = codes.size // rows // scale_block
    return Codes(np.asarray(codes).reshape(rows, -1).astype(np.uint8), scales.reshape(rows, per_row),
                 zero, None if mins is None else mins.reshape(rows, per_row), bits, scale_block, name)


@dataclass
class GgufTensor:
    name: str
    qtype: object  # GGMLQuantizationType
    shape: tuple[int, int]  # numpy order: [rows, cols]
    raw: np.ndarray  # uint8 [rows, bytes per row], memory-mapped

    def dequantize(self) -> np.ndarray:
        from gguf.quants import dequantize

        return dequantize(self.raw, self.qtype).reshape(self.shape)


def read_quantized(path: str | Path) -> list[GgufTensor]:
    """The 2-D quantized tensors of a .gguf file with a type in SUPPORTED (others stay float in the export)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise KoedgeError(f"no GGUF file at {path}")
    try:
        reader = GGUFReader(path)
        tensors = []
        for tensor in reader.tensors:
            if tensor.tensor_type.name not in SUPPORTED or len(tensor.shape) != 2:
                continue
            cols, rows = (int(n) for n in tensor.shape)
            tensors.append(GgufTensor(tensor.name, tensor.tensor_type, (rows, cols), tensor.data))
    except (ValueError, KeyError, IndexError, OSError, AssertionError) as err:
        raise KoedgeError(f"{path} is not a readable GGUF file ({type(err).__name__}: {str(err)[:120]})") from err
    return tensors

"""Mixed 4/8-bit MatMuls under a size budget, chosen from measured sensitivity on Korean calibration text.

A MatMul's sensitivity is the output error its 4-bit weights add on real activations, relative to 8 bits:
sum_k E[x_k^2] * sum_n (W - Q(W))_kn^2, with E[x_k^2] measured on Korean calibration prefills. MatMuls
go to 8 bits in order of error removed per byte added until the bundle would exceed the budget. The
same measurement picks, per 4-bit MatMul, the quantizer with the smallest error (`algo = "best"`:
round to nearest or llama.cpp's k-quant search; HQQ's float zero points run ~30x slower on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from runtime.errors import KoedgeError

CANDIDATES = ("rtn", "k_quant")


def packed_bytes(k: int, n: int, bits: int, block: int) -> int:
    """MatMulNBits bytes of a [K, N] weight: codes, fp32 scales, uint8 zero points (4-bit ones packed in pairs)."""
    blocks = -(-k // block)
    zero_points = -(-blocks // 2) if bits == 4 else blocks
    return n * (blocks * block * bits // 8 + 4 * blocks + zero_points)


def input_moments(src: Path, inputs: list[str], calib_source: str, samples: int,
                  progress: Callable[[str], None]) -> dict[str, np.ndarray]:
    """E[x_k^2] per input channel of each MatMul input, over Korean calibration prefills (FP32 source)."""
    from exporter.quantize.calibration import CalibrationConfig, KVCacheReader, build_sequences
    from exporter.quantize.int4 import _probe_session
    from runtime.model import CausalLM

    reference = CausalLM(src)
    calibration = CalibrationConfig(source=calib_source, samples=samples, holdout=0, max_length=256,
                                    min_length=64, decode_steps=0)
    sequences, _ = build_sequences(reference, calibration)
    progress(f"sensitivity: activations of {len(inputs)} MatMul inputs over {len(sequences)} Korean sequences")
    session = _probe_session(src, inputs)
    sums: dict[str, np.ndarray] = {}
    rows = 0
    reader = KVCacheReader(reference, sequences)
    while (feeds := reader.get_next()) is not None:
        for name, value in zip(inputs, session.run(inputs, feeds)):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(axis=0)
        rows += value.reshape(-1, value.shape[-1]).shape[0]
    return {name: total / max(rows, 1) for name, total in sums.items()}


def weighted_error(w: np.ndarray, approx: np.ndarray, moments: np.ndarray) -> float:
    """sum_k E[x_k^2] * sum_n (w - approx)_kn^2: the expected squared output error, summed over outputs."""
    return float(moments @ ((np.asarray(w, np.float32) - approx) ** 2).sum(axis=1))


def choose_int8(candidates: list[tuple[str, float, int]], available: int) -> set[str]:
    """candidates: (name, error removed by 8 bits, bytes added by 8 bits). Greedy by error per byte."""
    chosen, used = set(), 0
    for name, gain, extra in sorted(candidates, key=lambda item: -item[1] / max(item[2], 1)):
        if gain > 0 and used + extra <= available:
            chosen.add(name)
            used += extra
    return chosen


def fixed_bytes(src: Path, model: onnx.ModelProto, quantized: set[str], table_bytes: int) -> int:
    """What the bundle holds besides the MatMul weights: other files, float initializers, the table, the graph."""
    from onnx import helper

    others = sum(p.stat().st_size for p in src.iterdir() if p.is_file()
                 and p.name not in ("model.onnx", "model.onnx.data", "report.json", "report.md"))
    floats = sum(int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                 for t in model.graph.initializer if t.name not in quantized)
    return others + floats + table_bytes + (src / "model.onnx").stat().st_size


def check_budget(budget_mb: float, floor: int) -> int:
    available = int(budget_mb * 1e6) - floor
    if available < 0:
        raise KoedgeError(f"size budget {budget_mb:,.0f} MB is below the smallest bundle this recipe makes "
                          f"({floor / 1e6:,.0f} MB with every MatMul at 4 bits); raise it or use a 4-bit table")
    return available


def plan_bits(src: Path, config, progress: Callable[[str], None]) -> dict[str, tuple[int, str]]:
    """MatMul name -> (bits, 4-bit quantizer), from the budget (or config.int8) and the measured errors."""
    from exporter.quantize.int4 import (COLD_BLOCK, ONNX_FILE, WeightReader, _bits_for, _block_for, _matmul_targets,
                                        dequantize, find_table, quantize_weight)

    model = onnx.load(str(src / ONNX_FILE), load_external_data=False)
    reader = WeightReader(model, src)
    table = find_table(model, reader)
    targets = _matmul_targets(model, reader, table)
    available = None
    if config.size_budget_mb:  # checked before the (minutes long) measurement
        table_bytes = 0
        quantized = {node.input[1] for node in targets}
        if table is not None:
            vocab, hidden = reader.shape(table.weight)
            bits = {"int4": 4, "int8": 8}.get(config.embedding)
            split = bits == 4 and config.hot_rows > 0
            block = config.embedding_block_size or (COLD_BLOCK if split else config.block_size)
            one = packed_bytes(hidden, vocab, bits, block) if bits else vocab * hidden * 4
            if split:  # every row at 4 bits, at most this many again at 8 (their own block), and their positions
                hot = min(config.hot_rows, vocab)
                one += packed_bytes(hidden, hot, 8, config.hot_block) + 8 * hot + 4 * vocab
            table_bytes = one * (1 if table.tied or table.lm_head is None else 2)
            quantized |= {table.weight, table.lm_weight}
        # + what grows besides the weights: new nodes and the manifest's record of the mix
        floor = fixed_bytes(src, model, quantized, table_bytes) + 4096 + 400 * len(targets) + sum(
            packed_bytes(*reader.shape(node.input[1]), 4, _block_for(node, config)) for node in targets)
        available = check_budget(config.size_budget_mb, floor)
    moments = input_moments(src, sorted({node.input[0] for node in targets}), config.calib_source,
                            config.sensitivity_samples, progress)
    algos = CANDIDATES if config.algo == "best" else ("rtn" if config.algo == "gptq" else config.algo,)
    candidates, choice = [], {}
    progress(f"sensitivity: 4- vs 8-bit output error of {len(targets)} MatMuls ({', '.join(algos)})")
    for node in targets:
        w = np.asarray(reader.array(node.input[1]), np.float32)
        moment = moments[node.input[0]]
        block = _block_for(node, config)
        errors = {algo: weighted_error(w, dequantize(quantize_weight(w, 4, config, algo=algo, block=block)), moment)
                  for algo in algos}
        best = min(errors, key=errors.get)
        error8 = weighted_error(w, dequantize(quantize_weight(w, 8, config, algo="rtn", block=block)), moment)
        k, n = w.shape
        candidates.append((node.name, errors[best] - error8, packed_bytes(k, n, 8, block) - packed_bytes(k, n, 4, block)))
        choice[node.name] = best if config.algo == "best" else config.algo
    if available is not None:
        int8 = choose_int8(candidates, available)
        progress(f"size budget {config.size_budget_mb:g} MB: {len(int8)} of {len(targets)} MatMuls at 8 bits")
    else:
        int8 = {node.name for node in targets if _bits_for(node, config) == 8}
    return {name: (8 if name in int8 else 4, choice[name]) for name in choice}

"""onnxruntime session setup chosen for low peak memory on a phone-sized budget.

Measured on gemma-3-270m FP32 (docs/memory.md): the default session holds the weights twice
while it is created (pre-packing copies every MatMul weight, the arena keeps freed blocks).
Loading from a path with external data, disabling pre-packing and the CPU arena keeps the peak
near the weight bytes at no measured cost in decode speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from runtime.errors import KoedgeError


@dataclass
class SessionConfig:
    threads: int = 0  # 0: onnxruntime's default (all physical cores)
    optimization: str = "all"  # disable | basic | extended | all
    low_memory: bool = True  # no pre-packing, no CPU arena, no memory pattern
    mmap_external_data: bool = True


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if config.optimization not in _LEVELS:
        raise KoedgeError(f"unknown optimization level '{config.optimization}' ({', '.join(_LEVELS)})")
    options.graph_optimization_level = _LEVELS[config.optimization]
    if config.threads:
        options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if config.low_memory:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.disable_prepacking", "1")
    if config.mmap_external_data:
        options.add_session_config_entry("session.use_mmap_for_external_initializers", "1")
    return options


def create_session(model_path: str | Path, config: SessionConfig | None = None) -> ort.InferenceSession:
    """Load from a path (never bytes: that is one more copy of the model in memory)."""
    config = config or SessionConfig()
    try:
        return ort.InferenceSession(str(model_path), sess_options=session_options(config),
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for corrupt files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KoedgeError(f"onnxruntime cannot load {model_path}: {first_line[:300]}") from err

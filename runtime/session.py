"""onnxruntime session setup chosen for low peak memory on a phone-sized budget.

Creating a session is where the peak usually is: onnxruntime can hold the model twice while it
builds the session (its issue #23775), bytes passed in add one more copy (#21992), and pre-packing
copies MatMul weights. We load from a path with external data memory-mapped; the defaults below
are the lowest-peak settings measured on gemma-3-270m FP32 that cost no decode speed
(table and method in docs/memory.md).
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
    cpu_arena: bool = False  # the arena keeps freed blocks (prefill activations) for reuse
    mem_pattern: bool = False  # pre-plans activation buffers per input shape; shapes change every step
    # Pre-packed FP32 MatMul weights are a second (anonymous) copy of the weights; quantized kernels
    # (MatMulNBits) without pre-packing re-expand their weights every call (gemma: 0.2 vs 4.2 tok/s).
    # None: off for float bundles, on for quantized ones (decided by CausalLM from the manifest).
    prepacking: bool | None = None
    spinning: bool = True  # idle worker threads spin: lower latency, but burns CPU others could use

    @classmethod
    def onnxruntime_defaults(cls, threads: int = 0) -> "SessionConfig":
        """What a plain `InferenceSession(path)` does: the reference point of docs/memory.md."""
        return cls(threads=threads, cpu_arena=True, mem_pattern=True, prepacking=True)


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
    options.enable_cpu_mem_arena = config.cpu_arena
    options.enable_mem_pattern = config.mem_pattern
    if not config.prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not config.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

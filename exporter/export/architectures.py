"""One place per architecture: what Optimum exports, plus what koedge registers itself.

Optimum's TasksManager is the registry; koedge adds EXAONE 4 to it (Optimum issue #2167) through
Optimum's own `TasksManager.create_register` decorator, so `main_export` and
`onnx_export_from_model` treat it like any built-in architecture.
"""

from __future__ import annotations

from runtime.errors import KoedgeError

TASK = "text-generation-with-past"
KOREAN_RELEVANT = ("gpt_neox", "llama", "gemma3_text", "qwen2", "qwen3", "exaone4")
_registered = False


def register_koedge_architectures() -> None:
    """Register the ONNX export configs Optimum lacks (idempotent)."""
    global _registered  # the registry itself is Optimum's global; this only avoids double work
    if _registered:
        return
    from optimum.exporters.onnx.model_configs import COMMON_TEXT_GENERATION_TASKS, LlamaOnnxConfig
    from optimum.exporters.tasks import TasksManager
    from optimum.utils import NormalizedTextConfigWithGQA

    register = TasksManager.create_register("onnx", overwrite_existing=True)

    @register("exaone4", *COMMON_TEXT_GENERATION_TASKS)
    class Exaone4OnnxConfig(LlamaOnnxConfig):
        """EXAONE 4: Llama-like decoder with QK-norm, GQA and hybrid sliding/global attention."""

        NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA
        MIN_TRANSFORMERS_VERSION = LlamaOnnxConfig.MIN_TRANSFORMERS_VERSION

    _registered = True


def check_exportable(model_type: str) -> None:
    register_koedge_architectures()
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if TASK not in tasks:
        raise KoedgeError(
            f"architecture '{model_type}' cannot be exported to ONNX with a KV cache "
            f"(supported Korean-relevant ones: {', '.join(KOREAN_RELEVANT)})"
        )

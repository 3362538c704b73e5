"""The export stage: a model source (packaged GGUF, local checkpoint, hub id) in, an ONNX bundle out.

- `sources.py` resolves `--model` to a checkpoint folder (packaged models are converted once).
- `architectures.py` is the one place per architecture (Optimum's registry, plus EXAONE 4).
- `convert.py` is the pass: `export_model(resolved, out, ExportConfig)`.
- `fused_attention.py`, `fused_ops.py`: the fused export's rewrites while tracing (GroupQueryAttention with the
  rotary inside and the KV cache in place; the tanh GELU as FastGelu).
- `graph_edits.py` edits the exported graph (tied embedding stored once, `logits_to_keep`, constant Reshape targets).
- `parity.py` checks the ONNX logits against torch.
May import `runtime`; never `exporter.cli`.
"""

from exporter.export.convert import ExportConfig, ExportResult, describe_export, export_model
from exporter.export.sources import ResolvedModel, resolve_model

__all__ = ["ExportConfig", "ExportResult", "ResolvedModel", "describe_export", "export_model", "resolve_model"]

"""The quantize stage: an FP32 bundle in, a quantized bundle out, judged against its source.

- `bundle.py` is the pass every method shares: `quantize_bundle(src, out, method_config)` stages the
  bundle, records the pass, evaluates against the source.
- `int4.py` (`Int4Config`: 4/8-bit weight-only MatMulNBits, RTN / GPTQ / HQQ / k-quant),
  `int8.py` (`Int8StaticConfig`: static INT8 QDQ with a float-fallback search),
  `calibration.py` (`CalibrationConfig`: Korean calibration sequences with a live KV cache).
May import `runtime`; never `exporter.cli`. onnx is imported here, so the CLI imports this lazily.
"""

from exporter.quantize.bundle import format_report, quantize_bundle
from exporter.quantize.calibration import CalibrationConfig
from exporter.quantize.int4 import Int4Config
from exporter.quantize.int8 import Int8StaticConfig

__all__ = ["CalibrationConfig", "Int4Config", "Int8StaticConfig", "format_report", "quantize_bundle"]

"""`koedge export`: a model source in, an ONNX bundle with KV cache out."""

from __future__ import annotations

import argparse

from exporter.cli.common import progress


def cmd_export(args: argparse.Namespace) -> int:
    from exporter.export import ExportConfig, describe_export, export_model, resolve_model

    resolved = resolve_model(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code,
                             progress=progress)
    config = ExportConfig(dtype=args.dtype, opset=args.opset, parity_tolerance=args.tolerance,
                          attention=args.attention, kv_dtype=args.kv_dtype,
                          gguf_accuracy_level=args.gguf_accuracy_level, max_context=args.max_context or None)
    result = export_model(resolved, args.out, config, overwrite=args.overwrite, progress=progress)
    print(describe_export(result))
    return 0


def add_commands(commands) -> None:
    export = commands.add_parser("export", help="export a model to an ONNX bundle with KV cache",
                                 description="Export a Hugging Face causal LM (or a packaged model) to a koedge "
                                             "bundle: ONNX with KV cache, tokenizer, manifest; checked against torch.")
    export.add_argument("--model", required=True,
                        help="packaged name (gemma-3-270m, smollm2-135m, polyglot-ko-1.3b-shape), "
                             "local .gguf file, local checkpoint folder, or Hugging Face id")
    export.add_argument("--out", required=True, help="bundle folder to create")
    export.add_argument("--dtype", choices=["auto", "gguf", "fp32", "fp16"], default="auto",
                        help="auto (default): gguf for a GGUF source, else fp32. gguf: every tensor the GGUF "
                             "quantized kept in its own blocks (MatMulNBits / GatherBlockQuantized), no second "
                             "rounding. fp32: the float reference (a GGUF source dequantized)")
    export.add_argument("--gguf-accuracy-level", type=int, choices=[0, 4], default=4,
                        help="gguf: 4 (default) int8 activations, fastest decode; 0 float activations, exact")
    export.add_argument("--attention", choices=["fused", "unfused"], default="fused",
                        help="fused: one GroupQueryAttention per layer, KV cache written in place (default); "
                             "unfused: Optimum's graph, for comparison")
    export.add_argument("--kv-dtype", choices=["float32", "float16"], default="float32",
                        help="KV cache element type; float16 halves it (fused attention only)")
    export.add_argument("--max-context", type=int, default=8192, metavar="N",
                        help="positions the bundle supports, at most the model's own (default 8192; 0: the model's "
                             "own); fused graphs store a rotary table row per position")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: Optimum's choice)")
    export.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (hub models)")
    export.add_argument("--tolerance", type=float, default=None, help="max |logit diff| vs torch (default by dtype)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.set_defaults(func=cmd_export)

"""`koedge quantize`: INT4 weight-only or INT8 static, into a new bundle with a report."""

from __future__ import annotations

import argparse

from exporter.cli.common import progress


def _blocks(text: str) -> dict[str, int]:
    """'down_proj=32,v_proj=32' -> {'down_proj': 32, 'v_proj': 32}."""
    from runtime.errors import KoedgeError

    blocks = {}
    for item in filter(None, text.split(",")):
        fragment, sep, size = item.partition("=")
        if not sep or not fragment or not size.isdigit():
            raise KoedgeError(f"--blocks wants FRAGMENT=SIZE items, not '{item}'")
        blocks[fragment] = int(size)
    return blocks


def _int4_config(args: argparse.Namespace):
    from exporter.quantize.int4 import Int4Config

    config = Int4Config(algo=args.algo, block_size=args.block_size, symmetric=args.symmetric,
                        accuracy_level=args.accuracy_level, embedding=args.embedding,
                        embedding_block_size=args.embedding_block_size, size_budget_mb=args.size_budget,
                        hot_rows=args.hot_rows, hot_block_size=args.hot_block_size)
    if args.blocks:
        config.blocks = _blocks(args.blocks)
    if args.int8_matmuls is not None:
        config.int8 = [fragment for fragment in args.int8_matmuls.split(",") if fragment]
    if args.calib_source:
        config.calib_source = args.calib_source
    if args.calib_samples:
        config.calib_samples = args.calib_samples
    if args.calib_max_length:
        config.calib_max_length = args.calib_max_length
    config.check()
    return config


def _int8_config(args: argparse.Namespace):
    from exporter.quantize.int8 import Int8StaticConfig

    config = Int8StaticConfig(method=args.method, accuracy_aware=not args.no_accuracy_aware)
    if args.percentile is not None:
        config.percentile = args.percentile
    if args.target_ppl is not None:
        config.target_ppl_increase = args.target_ppl
    if args.target_top1 is not None:
        config.target_same_top1 = args.target_top1
    if args.calib_source:
        config.calibration.source = args.calib_source
    if args.calib_samples:
        config.calibration.samples = args.calib_samples
    if args.calib_max_length:
        config.calibration.max_length = args.calib_max_length
    config.check()
    return config


def cmd_quantize(args: argparse.Namespace) -> int:
    from exporter.quantize.bundle import format_report, quantize_bundle

    if args.gguf:
        from exporter.quantize.gguf import GgufConfig

        config = GgufConfig(gguf=args.gguf, accuracy_level=args.accuracy_level)
        config.check()
    else:
        config = _int4_config(args) if args.int4 else _int8_config(args)
    eval_config = None
    if args.eval_texts:
        from runtime.evaluate import EvalConfig

        eval_config = EvalConfig(max_samples=args.eval_texts)
    result = quantize_bundle(args.bundle, args.out, config, overwrite=args.overwrite, progress=progress,
                             evaluate=not args.no_eval, eval_config=eval_config)
    print(format_report(result.report), end="")
    return 0


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "quantize", help="quantize a bundle: INT4 weight-only or INT8 static",
        description="Write a quantized copy of an FP32 bundle, with report.json / report.md: size, time, and "
                    "perplexity, KL and same-top-1 vs the source on Korean evaluation text.")
    parser.add_argument("bundle", help="FP32 bundle folder")
    parser.add_argument("--out", required=True, help="new bundle folder")
    method = parser.add_mutually_exclusive_group(required=True)
    method.add_argument("--int4", action="store_true", help="weight-only MatMulNBits + GatherBlockQuantized")
    method.add_argument("--int8-static", action="store_true", help="static INT8 QDQ with Korean calibration")
    method.add_argument("--gguf", metavar="FILE", default=None,
                        help="GGUF-exact: put back the quantized blocks of the .gguf this FP32 bundle was "
                             "exported from (--accuracy-level 4 or 0)")
    int4 = parser.add_argument_group("INT4")
    int4.add_argument("--algo", choices=["rtn", "hqq", "gptq", "k_quant", "best"], default="gptq",
                      help="block quantizer of the 4-bit weights (default gptq, calibrated on Korean text; best: "
                           "rtn or k_quant per MatMul, whichever has the smaller error on Korean activations)")
    int4.add_argument("--size-budget", type=float, default=None, metavar="MB",
                      help="bundle size in MB: every MatMul at 4 bits, then the most sensitive ones (measured on "
                           "Korean calibration text) at 8 bits while the bundle fits; replaces --int8-matmuls")
    int4.add_argument("--block-size", type=int, choices=[32, 64, 128], default=32, help="weights per scale")
    int4.add_argument("--symmetric", action="store_true", help="no zero points (rtn, gptq)")
    int4.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                      help="MatMulNBits compute type (default 4: int8 activations, MLAS's fast path, "
                           "~50x faster decode for 8-bit blocks; 0: unset, float path)")
    int4.add_argument("--embedding", choices=["int4", "int8", "fp32"], default="int4",
                      help="embedding table and LM head (one shared tensor when tied; default int4)")
    int4.add_argument("--embedding-block-size", type=int, choices=[16, 32, 64, 128], default=None,
                      help="block size of the embedding table (default: --block-size; 128 for the 4-bit rows when --hot-rows splits it)")
    int4.add_argument("--hot-rows", type=int, default=8192, metavar="N",
                      help="a 4-bit table keeps its rows of the N tokens most frequent in the Korean calibration "
                           "text at 8 bits (default 8192; 0: every row at 4 bits)")
    int4.add_argument("--hot-block-size", type=int, choices=[32, 64, 128], default=None,
                      help="block size of those 8-bit rows (default: --block-size)")
    int4.add_argument("--blocks", metavar="FRAGMENT=N,...", default=None,
                      help="block sizes of some MatMuls by name fragment, e.g. down_proj=32 (others: --block-size)")
    int4.add_argument("--int8-matmuls", metavar="FRAGMENTS", default=None,
                      help="comma-separated MatMul name fragments kept at 8 bits (default '/': every MatMul; "
                           "'' for none; e.g. v_proj,down_proj)")
    int8 = parser.add_argument_group("INT8 static")
    int8.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                      help="activation calibration method")
    int8.add_argument("--percentile", type=float, default=None, help="for --method percentile")
    int8.add_argument("--no-accuracy-aware", action="store_true",
                      help="quantize every activation (skip the search for what to keep in float)")
    int8.add_argument("--target-ppl", type=float, default=None, metavar="FRACTION",
                      help="held-out perplexity increase the float search stops at (default 0.02 = +2%%)")
    int8.add_argument("--target-top1", type=float, default=None, metavar="FRACTION",
                      help="held-out same-top-1 the float search stops at (default 0.90)")
    calib = parser.add_argument_group("calibration (INT8 static, INT4 gptq)")
    calib.add_argument("--calib-source", default=None, help="nsmc | klue | ko | a .txt / .jsonl file")
    calib.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: INT4 gptq 128, INT8 static 16)")
    calib.add_argument("--calib-max-length", type=int, default=None, help="tokens per calibration sequence (default: INT4 gptq 512, INT8 static 256)")
    report = parser.add_argument_group("report")
    report.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    report.add_argument("--eval-texts", type=int, default=None, help="evaluation texts (default: runtime.evaluate's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=cmd_quantize)

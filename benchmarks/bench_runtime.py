"""Runtime benchmark: one table row per bundle given on the command line.

    python benchmarks/bench_runtime.py build/gemma3-fp32 [more bundles] [--threads 2] [--repeat 3]
    python benchmarks/bench_runtime.py build/gemma3-fp32 --sessions     # session-settings table (docs/memory.md)

Every measurement runs in a fresh child process, so peak RSS (VmHWM) is that run's own. Columns:
peak RSS, load time, TTFT at --prompt-tokens, decode tok/s over --new-tokens (greedy, EOS ignored),
and the decode-step speed-up of the I/O-binding loop over the numpy-feeding loop, measured with steps
of the two loops interleaved in one process at the same context (robust to load elsewhere).
Timings move with the machine's load: say what else was running when you quote them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
SESSION_VARIANTS = {  # name -> SessionConfig fields (threads added from the command line)
    "onnxruntime defaults": dict(cpu_arena=True, mem_pattern=True, prepacking=True),
    "koedge (no arena, no pattern, no prepack)": dict(),
    "+ arena": dict(cpu_arena=True),
    "+ mem pattern": dict(mem_pattern=True),
    "+ prepacking": dict(prepacking=True),
    "optimization basic": dict(optimization="basic"),
    "optimization disable": dict(optimization="disable"),
}


def child(spec: dict) -> dict:
    """One measured run; `spec` says which bundle, session settings, loop, prompt and decode lengths."""
    from runtime.generate import Generator, SamplingConfig, load
    from runtime.memory import proc_status
    from runtime.session import SessionConfig
    from runtime.validate import prompt_ids

    release = spec.get("release_encoder", True)  # as `koedge run`: encode, drop the encoder, then the session
    lm = load(spec["bundle"], SessionConfig(**spec["session"]), open_session=not release)
    ids = prompt_ids(lm, spec["prompt_tokens"])
    if release:
        lm.release_encoder()
        lm.open_session()
    load_seconds = lm.load_seconds  # tokenizer + session, as koedge run and validate report it
    after_load = proc_status()
    generator = Generator(lm, io_binding=spec["io_binding"], prefill_chunk=spec.get("prefill_chunk", "auto"))
    result = generator.generate(ids, SamplingConfig(max_new_tokens=spec["new_tokens"], stop_at_eos=False))
    end = proc_status()
    return {"load_seconds": load_seconds, "ttft_seconds": result.ttft_seconds,
            "decode_tokens_per_second": result.decode_tokens_per_second, "peak_rss": end.get("VmHWM"),
            "load_rss": after_load.get("VmHWM"), "anon_end": end.get("RssAnon"), "file_end": end.get("RssFile"),
            "weights": lm.manifest.weight_bytes(), **({"tokens": result.tokens} if spec.get("return_tokens") else {})}


def child_ratio(spec: dict) -> dict:
    """Decode-step time of the I/O-binding loop vs the numpy loop, steps interleaved in one process.

    Interleaving makes the ratio robust on a shared machine: a burst of load elsewhere slows both alike.
    """
    from runtime.generate import load
    from runtime.kvcache import BoundCache, NumpyCache
    from runtime.memory import prefill_chunk_for
    from runtime.session import SessionConfig
    from runtime.validate import prompt_ids

    lm = load(spec["bundle"], SessionConfig(**spec["session"]))
    ids = prompt_ids(lm, spec["prompt_tokens"])
    chunk = prefill_chunk_for(lm.manifest, spec.get("prefill_chunk", "auto"))
    loops = [[cache, int(cache.run([ids], chunk=chunk)[0].argmax()), []] for cache in (BoundCache(lm), NumpyCache(lm))]
    for _ in range(spec["steps"]):
        for loop in loops:
            started = time.perf_counter()
            logits = loop[0].run([loop[1]])
            loop[2].append(time.perf_counter() - started)
            loop[1] = int(logits[0].argmax())
    bound, plain = (statistics.median(loop[2]) for loop in loops)
    return {"bound_step_seconds": bound, "numpy_step_seconds": plain, "binding_ratio": plain / bound}


def measure(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"child failed for {spec}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bundle_row(bundle: str, args: argparse.Namespace) -> dict:
    base = dict(bundle=bundle, session={"threads": args.threads}, prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk)
    runs = [measure({**base, "io_binding": True}) for _ in range(args.repeat)]
    ratios = [measure({**base, "steps": args.ratio_steps}) for _ in range(args.repeat)]
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {"bundle": bundle, **med, **{key: statistics.median(r[key] for r in ratios) for key in ratios[0]}}


def print_bundles(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nprompt {args.prompt_tokens} tokens, decode {args.new_tokens} tokens, {args.threads or 'all'} threads, "
          f"median of {args.repeat}, prefill chunk {args.prefill_chunk if args.prefill_chunk != 0 else 'one call'}")
    print("| bundle | weights MiB | peak RSS MiB | peak / weights | load s | TTFT s | decode tok/s "
          "| step ms: I/O binding / numpy loop | I/O binding speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['bundle']} | {row['weights'] / MIB:,.0f} | {row['peak_rss'] / MIB:,.0f} | "
              f"{row['peak_rss'] / row['weights']:.2f}x | {row['load_seconds']:.2f} | {row['ttft_seconds']:.2f} | "
              f"{row['decode_tokens_per_second']:.1f} | {row['bound_step_seconds'] * 1000:.0f} / "
              f"{row['numpy_step_seconds'] * 1000:.0f} | {row['binding_ratio']:.2f}x |")


def session_table(bundle: str, args: argparse.Namespace) -> None:
    rows = {name: [] for name in SESSION_VARIANTS}
    for _ in range(args.repeat):  # interleaved rounds
        for name, fields in SESSION_VARIANTS.items():
            spec = dict(bundle=bundle, session={"threads": args.threads, **fields}, io_binding=True,
                        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, release_encoder=False)
            rows[name].append(measure(spec))
            print(f"  {name}: {rows[name][-1]}", file=sys.stderr, flush=True)
    print(f"\n{bundle}: prompt {args.prompt_tokens}, decode {args.new_tokens}, {args.threads or 'all'} threads, "
          f"median of {args.repeat}; full tokenizer kept (as `koedge chat`)")
    print("| session settings | RSS after load MiB | peak RSS MiB | peak / weights | anon at end MiB "
          "| file-backed at end MiB | load s | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in rows.items():
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {name} | {med['load_rss'] / MIB:,.0f} | {med['peak_rss'] / MIB:,.0f} | "
              f"{med['peak_rss'] / med['weights']:.2f}x | {med['anon_end'] / MIB:,.0f} | "
              f"{med['file_end'] / MIB:,.0f} | "
              f"{med['load_seconds']:.2f} | {med['decode_tokens_per_second']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill-chunk", type=lambda text: text if text == "auto" else int(text), default="auto",
                        help="prompt tokens per call: auto (default) or N; 0 = the whole prompt in one call")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ratio-steps", type=int, default=48,
                        help="interleaved decode steps per loop for the I/O binding vs numpy ratio")
    parser.add_argument("--sessions", action="store_true", help="compare session settings on the first bundle")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_ratio(spec) if spec.get("steps") else child(spec)))
        return
    if not args.bundles:
        parser.error("give at least one bundle folder")
    if args.sessions:
        session_table(args.bundles[0], args)
        return
    rows = []
    for bundle in args.bundles:
        rows.append(bundle_row(bundle, args))
        print(f"  done {bundle}", file=sys.stderr, flush=True)
    print_bundles(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

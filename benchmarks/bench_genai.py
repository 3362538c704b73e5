"""The same INT4 model through onnxruntime-genai's own runtime and through koedge's runner.

    python benchmarks/bench_genai.py build/results/genai-int4 --genai-python /tmp/genai-venv/bin/python

Issue 3's target: on the same INT4 model, koedge's decode tok/s >= onnxruntime-genai's and its peak RSS
<= genai's. The model is the one benchmarks/results.py builds with genai's model builder (a koedge
bundle folder that also holds genai_config.json). onnxruntime-genai lives in its own virtual
environment (it needs transformers >= 5 to build), so its runs go through --genai-python; koedge's
runs are benchmarks/bench_runtime.py children. Every run is a fresh process measured by its VmHWM;
the same prompt token ids (Korean text, BOS first) go to both; greedy, EOS ignored; 2 threads each.
Timings move with the machine's load: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20

GENAI_CHILD = r"""
import json, sys, time
import onnxruntime_genai as og
spec = json.loads(sys.argv[1])

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

started = time.perf_counter()
config = og.Config(spec["folder"])
config.overlay(json.dumps({"model": {"decoder": {"session_options": {
    "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
model = og.Model(config)
load = time.perf_counter() - started
ids, new = spec["ids"], spec["new_tokens"]
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
generator = og.Generator(model, params)
started = time.perf_counter()
generator.append_tokens(ids)
generator.generate_next_token()
first = time.perf_counter()
tokens = [int(generator.get_next_tokens()[0])]
while len(tokens) < new and not generator.is_done():
    generator.generate_next_token()
    tokens.append(int(generator.get_next_tokens()[0]))
end = time.perf_counter()
print(json.dumps({"load_seconds": load, "ttft_seconds": first - started,
                  "decode_tokens_per_second": (len(tokens) - 1) / (end - first), "peak_rss": hwm(),
                  "tokens": tokens}))
"""


def prompt_ids(folder: Path, count: int) -> list[int]:
    """The Korean prompt koedge validate uses, tokenized with the bundle's tokenizer.json (no session)."""
    from tokenizers import Tokenizer

    from runtime.bundle import read_manifest
    from runtime.validate import KOREAN_TEXT

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = read_manifest(folder).tokens.bos_token_id
    text = KOREAN_TEXT
    while len(tokenizer.encode(text, add_special_tokens=False).ids) < count:
        text += KOREAN_TEXT
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos] if bos is not None else [])[:count] + ids[:count - (bos is not None)]


def run_genai(python: str, folder: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    spec = json.dumps({"folder": str(folder.resolve()), "ids": ids, "new_tokens": new_tokens, "threads": threads})
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(GENAI_CHILD)
    try:
        done = subprocess.run([python, script.name, spec], capture_output=True, text=True)
    finally:
        os.unlink(script.name)
    if done.returncode != 0:
        raise SystemExit(f"onnxruntime-genai run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_koedge(folder: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    from benchmarks.bench_runtime import measure

    return measure(dict(bundle=str(folder), session={"threads": threads}, prompt_tokens=prompt_tokens,
                        new_tokens=new_tokens, prefill_chunk="auto", io_binding=True, return_tokens=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="a genai-built bundle (benchmarks/results.py: build/results/genai-int4)")
    parser.add_argument("--genai-python", default="/tmp/genai-venv/bin/python")
    parser.add_argument("--lengths", default="32+64,512+256", help="prompt+new token pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = Path(args.bundle)
    if not (folder / "genai_config.json").is_file():
        raise SystemExit(f"{folder} has no genai_config.json: build it with benchmarks/results.py --peers genai-int4")
    rows = []
    for pair in args.lengths.split(","):
        prompt, new = (int(part) for part in pair.split("+"))
        ids = prompt_ids(folder, prompt)
        runs = {"onnxruntime-genai runtime": [], "koedge runner": []}
        for _ in range(args.repeat):  # interleaved, so that load elsewhere hits both alike
            runs["onnxruntime-genai runtime"].append(run_genai(args.genai_python, folder, ids, new, args.threads))
            runs["koedge runner"].append(run_koedge(folder, prompt, new, args.threads))
        first = {name: results[0]["tokens"] for name, results in runs.items()}
        same = sum(a == b for a, b in zip(*first.values()))
        for name, results in runs.items():
            med = {key: statistics.median(r[key] for r in results) for key in
                   ("load_seconds", "ttft_seconds", "decode_tokens_per_second", "peak_rss")}
            rows.append({"runner": name, "prompt": prompt, "new": new, **med, "same_tokens": f"{same}/{new}"})
        print(f"  done {pair}", file=sys.stderr, flush=True)
    print(f"\n{folder}: greedy, EOS ignored, {args.threads} threads, median of {args.repeat} fresh processes")
    print("| runner | prompt + new tokens | peak RSS MiB | load s | TTFT s | decode tok/s | same greedy tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['runner']} | {row['prompt']} + {row['new']} | {row['peak_rss'] / MIB:,.0f} | "
              f"{row['load_seconds']:.2f} | {row['ttft_seconds']:.2f} | {row['decode_tokens_per_second']:.1f} | "
              f"{row['same_tokens']} |")


if __name__ == "__main__":
    main()

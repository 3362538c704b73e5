"""The phone demo's JVM engine vs the Python runtime on the same bundles: load, TTFT, decode speed, peak RSS.

    python benchmarks/bench_android_engine.py BUNDLE [BUNDLE ...] [--threads 2] [--prompt-tokens 512] [--new-tokens 256]

Each bundle runs once per side in its own process, greedy with EOS ignored (so both decode the same number of
tokens), on the same prompt (NSMC reviews cut to `--prompt-tokens` with the BOS) and thread count: `koedge run -v`
(Python) and `java -jar koedge-engine.jar -v` (the engine the app uses, on the desktop JVM; peak RSS includes the
JVM itself). Numbers come from each side's own timing line; peak RSS is the process's VmHWM. Also checks that
both printed the same text. Prints a markdown table. A script, not a timed test: the machine's load moves
the numbers, so run it on an idle machine and read the ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JAR = ROOT / "android-demo" / "engine" / "target" / "koedge-engine.jar"
# A small heap that gives memory back after the tokenizer's parse (docs/android.md); direct buffers (KV) apart.
JVM_OPTIONS = "-Xmx256m -XX:MaxDirectMemorySize=4g -XX:MaxHeapFreeRatio=10 -XX:MinHeapFreeRatio=5"
LINE = re.compile(r"load (?P<load>[\d.]+) s · prompt (?P<prompt>\d+) tok · TTFT (?P<ttft>\d+) ms · (?P<tokens>\d+) tok at "
                  r"(?P<tps>[\d.]+) tok/s · stop: \w+.*peak RSS (?P<rss>[\d,]+) MiB")


def prompt_text(bundle: Path, tokens: int) -> str:
    """NSMC evaluation reviews, cut so that the prompt is `tokens` long with the bundle's BOS."""
    sys.path.insert(0, str(ROOT))
    from runtime.data import nsmc_rows
    from runtime.model import CausalLM

    lm = CausalLM(bundle, open_session=False)
    text = " ".join(row.text for row in nsmc_rows("eval", limit=600))
    low, high = 0, len(text)
    while low < high:  # the longest prefix whose encoding fits
        mid = (low + high + 1) // 2
        if len(lm.encode(text[:mid])) <= tokens:
            low = mid
        else:
            high = mid - 1
    return text[:low]


def parse(stderr: str) -> dict[str, float]:
    match = next((m for m in map(LINE.search, stderr.splitlines()) if m), None)
    if match is None:
        raise SystemExit(f"no timing line in:\n{stderr[-2000:]}")
    return {key: float(value.replace(",", "")) for key, value in match.groupdict().items()}


def run_side(side: str, bundle: Path, prompt: str, args: argparse.Namespace, prompt_file: Path) -> tuple[dict, bytes]:
    options = ["--max-new-tokens", str(args.new_tokens), "--ignore-eos", "--threads", str(args.threads), "-v"]
    if side == "python":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "exporter.cli", "run", str(bundle), prompt, *options]
    else:
        env = dict(os.environ)
        command = ["java", *args.jvm_options.split(), "-jar", str(JAR), str(bundle), "--prompt-file", str(prompt_file), *options]
    result = subprocess.run(command, capture_output=True, env=env, cwd=ROOT, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed on {bundle}:\n{result.stderr.decode()[-2000:]}")
    return parse(result.stderr.decode("utf-8")), result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--jvm-options", default=JVM_OPTIONS, help=f"default: {JVM_OPTIONS}")
    args = parser.parse_args()
    if not JAR.is_file():
        subprocess.run(["mvn", "-q", "-B", "-pl", "engine", "-am", "package", "-DskipTests"], cwd=JAR.parents[2],
                       check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bundle in args.bundles:
            prompt = prompt_text(bundle, args.prompt_tokens)
            prompt_file = Path(tmp) / "prompt.txt"
            prompt_file.write_text(prompt, encoding="utf-8")
            python, python_out = run_side("python", bundle, prompt, args, prompt_file)
            jvm, jvm_out = run_side("jvm", bundle, prompt, args, prompt_file)
            same = "yes" if python_out == jvm_out else "NO"
            for side, numbers in (("Python runtime", python), ("JVM engine", jvm)):
                rows.append((bundle.name, side, numbers, same))
    print(f"{args.prompt_tokens}-token prompt + {args.new_tokens} tokens, {args.threads} threads, greedy, EOS ignored, "
          f"JVM options: {args.jvm_options}\n")
    print("| bundle | runner | load s | TTFT ms | decode tok/s | peak RSS MiB | same text |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name, side, n, same in rows:
        print(f"| {name} | {side} | {n['load']:.2f} | {n['ttft']:.0f} | {n['tps']:.1f} | {n['rss']:,.0f} | {same} |")
    for index in range(0, len(rows), 2):
        py, jv = rows[index][2], rows[index + 1][2]
        print(f"\n{rows[index][0]}: JVM decode {100 * (jv['tps'] / py['tps'] - 1):+.1f}% vs Python, "
              f"peak RSS {jv['rss'] - py['rss']:+,.0f} MiB, prompt {int(py['prompt'])} / {int(jv['prompt'])} tokens")


if __name__ == "__main__":
    main()

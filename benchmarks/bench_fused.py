"""Speed, memory and accuracy of several bundles in one table (issue 15: fused attention, phone recipes).

    python benchmarks/bench_fused.py --reference /work/bundles/gemma3-fp32 \\
        "koedge INT4, genai's widths=build/q4-all" "phone-3gb=build/q8-all" ... \\
        [--genai "genai INT4=build/results/genai-int4" --genai-python /tmp/genai-venv/bin/python]

For every prompt+new pair (default 32+64 and 512+256) the systems run in turn, --repeat rounds (each run
a fresh process: peak RSS = its VmHWM), and the table shows medians: TTFT, decode tok/s, peak RSS. Beside
them: bundle size, koedge's predicted budget at the longest pair against the measured peak (runtime.memory
.predict_budget), and held-out accuracy against the FP32 reference (runtime.evaluate: KL mean,
same-top-1, PPL change; vocabulary-pruned bundles are compared on the shared tokens, by bits/byte).
Greedy, EOS ignored, the same Korean prompt for all. Timings move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20


def parse_system(text: str) -> tuple[str, Path]:
    label, sep, path = text.rpartition("=")
    return (label if sep else Path(path).name), Path(path)


def accuracy(folder: Path, reference: Path, samples: int) -> dict:
    from runtime.evaluate import EvalConfig, eval_texts, evaluate
    from runtime.model import CausalLM

    texts = eval_texts(EvalConfig(max_samples=samples))
    result = evaluate(CausalLM(folder), texts, reference=CausalLM(reference), show_progress=False)
    return {"ppl": result.perplexity, "ref_ppl": result.reference_perplexity, "bpb": result.bits_per_byte,
            "kl": result.kl_mean, "top1": result.same_top1}


def budget(folder: Path, prompt: int, new: int) -> int:
    from runtime.bundle import read_manifest
    from runtime.memory import predict_budget

    return predict_budget(read_manifest(folder), prompt, new).total


def size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    from benchmarks.bench_genai import prompt_ids, run_genai, run_koedge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("systems", nargs="+", help="LABEL=BUNDLE (koedge bundles)")
    parser.add_argument("--reference", required=True, help="the FP32 bundle accuracy is measured against")
    parser.add_argument("--genai", action="append", default=[], help="LABEL=FOLDER built by onnxruntime-genai")
    parser.add_argument("--genai-python", default="/tmp/genai-venv/bin/python")
    parser.add_argument("--lengths", default="32+64,512+256", help="prompt+new token pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out passages for KL / same-top-1 (0: skip)")
    parser.add_argument("--json", default=None, help="also write the raw rows here")
    args = parser.parse_args()
    systems = [(*parse_system(text), "koedge") for text in args.systems]
    systems += [(*parse_system(text), "genai") for text in args.genai]
    pairs = [tuple(int(part) for part in pair.split("+")) for pair in args.lengths.split(",")]
    runs: dict[tuple[str, tuple[int, int]], list[dict]] = {}
    for pair in pairs:
        for round_ in range(args.repeat):  # systems alternate, so load elsewhere hits all alike
            for label, folder, kind in systems:
                if kind == "genai":
                    result = run_genai(args.genai_python, folder, prompt_ids(folder, pair[0]), pair[1], args.threads)
                else:
                    result = run_koedge(folder, pair[0], pair[1], args.threads)
                runs.setdefault((label, pair), []).append(result)
                print(f"  {label} {pair[0]}+{pair[1]} round {round_ + 1}: {result['decode_tokens_per_second']:.1f} "
                      f"tok/s, peak {result['peak_rss'] / MIB:,.0f} MiB", file=sys.stderr, flush=True)
    rows = []
    longest = max(pairs, key=sum)
    for label, folder, kind in systems:
        row = {"system": label, "bundle": str(folder), "size": size(folder)}
        for pair in pairs:
            results = runs[(label, pair)]
            row[pair] = {key: statistics.median(r[key] for r in results)
                         for key in ("ttft_seconds", "decode_tokens_per_second", "peak_rss")}
        row["budget"] = budget(folder, *longest) if kind == "koedge" else None
        row["accuracy"] = accuracy(folder, Path(args.reference), args.eval_samples) if args.eval_samples else None
        if row["accuracy"]:
            print(f"  accuracy {label}: {row['accuracy']}", file=sys.stderr, flush=True)
        rows.append(row)
    print_table(rows, pairs, longest, args)
    if args.json:
        plain = [{(f"{key[0]}+{key[1]}" if isinstance(key, tuple) else key): value for key, value in row.items()}
                 for row in rows]
        Path(args.json).write_text(json.dumps(plain, indent=2, default=str))


def print_table(rows: list[dict], pairs: list[tuple[int, int]], longest: tuple[int, int], args) -> None:
    print(f"\n{args.threads} threads, greedy, median of {args.repeat} fresh processes per cell; accuracy on "
          f"{args.eval_samples} held-out Korean passages against {args.reference}")
    head = "| system | size MB | KL mean | same top-1 | PPL vs FP32 |"
    rule = "| --- | --- | --- | --- | --- |"
    for prompt, new in pairs:
        head += f" TTFT s @{prompt} | tok/s {prompt}+{new} | peak MiB {prompt}+{new} |"
        rule += " --- | --- | --- |"
    head += f" predicted MiB {longest[0]}+{longest[1]} (vs peak) |"
    rule += " --- |"
    print(head)
    print(rule)
    for row in rows:
        acc = row["accuracy"]
        if acc is None:
            quality = "– | – | –"
        else:
            ppl = f"{acc['ppl'] / acc['ref_ppl'] - 1:+.1%}" if acc.get("ref_ppl") else f"bpb {acc['bpb']:.4f}"
            quality = f"{acc['kl']:.4f} | {acc['top1']:.1%} | {ppl}"
        line = f"| {row['system']} | {row['size'] / 1e6:,.0f} | {quality} |"
        for pair in pairs:
            cell = row[pair]
            line += (f" {cell['ttft_seconds']:.2f} | {cell['decode_tokens_per_second']:.1f} | "
                     f"{cell['peak_rss'] / MIB:,.0f} |")
        if row["budget"]:
            peak = row[longest]["peak_rss"]
            line += f" {row['budget'] / MIB:,.0f} ({row['budget'] / peak - 1:+.0%}) |"
        else:
            line += " – |"
        print(line)


if __name__ == "__main__":
    main()

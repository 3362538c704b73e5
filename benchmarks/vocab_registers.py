"""Korean vocabulary pruning on both registers: bits per byte against the unpruned model on held-out formal
(KLUE eval split) and informal (NSMC eval split) text, for a few counting/fill settings.

    python benchmarks/vocab_registers.py --formal 507 --informal 200 --out build/vocab-registers.json

Every variant is scored from one pass of the unpruned model (exporter.prune.vocab_eval); the texts are
eval-split only, never counted on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "nsmc only, ko-en fill": dict(corpora=["nsmc"], fill="ko-en", balance=False),
    "ko (both, unbalanced), ko-en fill (before)": dict(corpora=["ko"], fill="ko-en", balance=False),
    "nsmc + klue balanced, ko-formal fill (new default)": dict(),
}


def main() -> None:
    from exporter.export.convert import load_torch_model
    from exporter.export.sources import resolve_model
    from exporter.prune.pipeline import _special_ids
    from exporter.prune.vocab import VocabConfig, plan_vocabulary, write_pruned_tokenizer
    from exporter.prune.vocab_eval import Variant, variant_costs
    from runtime.data import load_texts

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--formal", type=int, default=507, help="KLUE eval-split sentences")
    parser.add_argument("--informal", type=int, default=200, help="NSMC eval-split reviews")
    parser.add_argument("--out", default="build/vocab-registers.json")
    args = parser.parse_args()
    started = time.perf_counter()
    resolved = resolve_model(args.model)
    model = load_torch_model(resolved)
    special = _special_ids(model)
    report = {"model": args.model, "vocab_size": args.vocab_size, "slices": {}, "plans": {}}
    with tempfile.TemporaryDirectory() as scratch:
        variants = {}
        for index, (name, settings) in enumerate(VARIANTS.items()):
            plan = plan_vocabulary(resolved.path, VocabConfig(vocab_size=args.vocab_size, **settings), special, print)
            folder = Path(scratch) / str(index)
            folder.mkdir()
            write_pruned_tokenizer(resolved.path, folder, plan)
            variants[name] = Variant(plan.kept, folder / "tokenizer.json")
            report["plans"][name] = {k: v for k, v in plan.stats.items() if k != "config"}
        for slice_name, source, count in (("formal (KLUE eval)", "klue", args.formal),
                                          ("informal (NSMC eval)", "nsmc", args.informal)):
            texts = load_texts(source, split="eval")[:count]
            print(f"scoring {len(texts)} texts of {slice_name}", flush=True)
            report["slices"][slice_name] = variant_costs(model, resolved.path / "tokenizer.json", texts, variants,
                                                         model.config.bos_token_id)
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print("| variant | " + " | ".join(report["slices"]) + " |")
    for name in VARIANTS:
        cells = [f"{s[name]['delta_bpb_pct']:+.2f}% ({s[name]['texts_resegmented']} resegmented)"
                 for s in report["slices"].values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

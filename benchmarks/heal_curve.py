"""The prune -> heal curve: bits per byte against parameters removed, unhealed and healed.

    python benchmarks/heal_curve.py --teacher build/ko32k --healed build/drop2-lora build/drop4-lora \
        --unhealed build/drop1 --plot docs/heal-curve-gemma-3-270m.png

Healed points come from the heal records (`koedge-passes.json`) of healed checkpoints: each holds the
teacher's, the pruned student's and the healed student's bits per byte on the same held-out texts.
`--unhealed` checkpoints (pruned, never healed) are scored here on the same texts
(`--eval-texts`, eval split of `ko`), against the teacher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def heal_record(folder: Path) -> dict:
    records = json.loads((folder / "koedge-passes.json").read_text(encoding="utf-8"))
    heal = [r for r in records if r["name"] == "heal"]
    if not heal:
        raise SystemExit(f"{folder} has no heal record")
    prune = [r for r in records if r["name"] == "prune" and r["results"].get("structured")]
    drops = prune[-1]["config"]["structured"]["drop_layers"] if prune else []
    return {"label": folder.name, "drop_layers": drops, **heal[-1]["results"], "config": heal[-1]["config"]}


def score_unhealed(teacher: Path, folders: list[Path], eval_texts: int) -> list[dict]:
    from exporter.export.convert import load_torch_model
    from exporter.export.sources import resolve_model
    from exporter.prune.heal import HealConfig, _scorer

    model = load_torch_model(resolve_model(str(teacher)))
    scorer = _scorer(teacher, model, HealConfig(eval_texts=eval_texts))
    base = scorer.score(model)
    rows = []
    for folder in folders:
        student = load_torch_model(resolve_model(str(folder)))
        result = scorer.score(student)
        records = json.loads((folder / "koedge-passes.json").read_text(encoding="utf-8"))
        drops = records[-1]["config"]["structured"]["drop_layers"]
        rows.append({"label": folder.name, "drop_layers": drops, "eval_teacher": base, "eval_before": result,
                     "parameters": sum(p.numel() for p in student.parameters()),
                     "teacher_parameters": sum(p.numel() for p in model.parameters()),
                     "delta_bpb_pct_before": round(100 * (result["bits_per_byte"] / base["bits_per_byte"] - 1), 3)})
    return rows


def table(rows: list[dict], embedding: int) -> str:
    lines = ["| pruned | params removed (share of non-embedding) | heal | steps / tokens | heal min | tokens/s | "
             "unhealed Δ bits/byte (KL) | healed Δ bits/byte (KL) | recovered |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["teacher_parameters"] - r["parameters"], r.get("method", ""))):
        removed = r["teacher_parameters"] - r["parameters"]
        share = removed / (r["teacher_parameters"] - embedding)
        before = f"{r['delta_bpb_pct_before']:+.2f}% ({r['eval_before']['kl']:.3f})"
        if "eval_after" in r:
            after = f"{r['delta_bpb_pct_after']:+.2f}% ({r['eval_after']['kl']:.3f})"
            heal = (f"{r['method']}", f"{r['steps']} / {r['tokens']:,}", f"{r['train_seconds_this_run'] / 60:.1f}",
                    f"{r['tokens_per_second']:.1f}", after, f"{100 * r['recovered_share']:.0f}%")
        else:
            heal = ("–", "–", "–", "–", "–", "–")
        lines.append(f"| layers {','.join(map(str, r['drop_layers']))} | {removed / 1e6:.1f}M ({share:.1%}) | {heal[0]} | "
                     f"{heal[1]} | {heal[2]} | {heal[3]} | {before} | {heal[4]} | {heal[5]} |")
    return "\n".join(lines)


def plot(rows: list[dict], embedding: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    share = lambda r: 100 * (r["teacher_parameters"] - r["parameters"]) / (r["teacher_parameters"] - embedding)
    unhealed = sorted({(share(r), r["delta_bpb_pct_before"]) for r in rows})
    axis.plot([p[0] for p in unhealed], [p[1] for p in unhealed], "o-", color="tab:red", label="pruned, unhealed")
    for method, color in (("lora", "tab:blue"), ("full", "tab:green")):
        points = sorted((share(r), r["delta_bpb_pct_after"]) for r in rows if r.get("method") == method and "eval_after" in r)
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], "s--", color=color, label=f"healed ({method})")
    axis.axhline(3, color="gray", linestyle=":", label="goal: +3%")
    axis.set_xlabel("non-embedding parameters removed (%)")
    axis.set_ylabel("Δ bits per byte vs unpruned (%)")
    axis.set_title("gemma-3-270m, 32k Korean vocabulary: layers dropped, healed", fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True, help="the unpruned (vocabulary-pruned) checkpoint")
    parser.add_argument("--healed", nargs="*", default=[], help="healed checkpoints")
    parser.add_argument("--unhealed", nargs="*", default=[], help="pruned checkpoints never healed")
    parser.add_argument("--eval-texts", type=int, default=60)
    parser.add_argument("--plot", help="PNG to write")
    parser.add_argument("--json", help="rows as JSON")
    parser.add_argument("--reuse", help="unhealed rows from an earlier --json (not scored again)")
    args = parser.parse_args()
    rows = [heal_record(Path(f)) for f in args.healed]
    rows += score_unhealed(Path(args.teacher), [Path(f) for f in args.unhealed], args.eval_texts) if args.unhealed else []
    if args.reuse:
        rows += [r for r in json.loads(Path(args.reuse).read_text()) if "eval_after" not in r]
    config = json.loads((Path(args.teacher) / "config.json").read_text())
    embedding = config["vocab_size"] * config["hidden_size"]
    print(table(rows, embedding))
    if args.plot:
        plot(rows, embedding, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""The heal pass on tiny random models: KD lowers the KL to the teacher on held-out text, merged adapters
give the adapters' logits, and an interrupted heal resumes to the state of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.errors import KoedgeError
from tiny_models import KOREAN_LINES

TRAIN = [f"{a} {b}" for a in KOREAN_LINES for b in KOREAN_LINES]
HELD_OUT = ["서울의 날씨가 좋아서 영화를 봤다.", "세종대왕이 한국어를 만들었다고 합니다.",
            "The fox eats 김치찌개 123.", "휴대폰에서 언어 모델이 돌아갑니다!"]


@pytest.fixture
def texts(tmp_path) -> tuple[str, str]:
    train, held_out = tmp_path / "train.txt", tmp_path / "held-out.txt"
    train.write_text("\n".join(TRAIN) + "\n", encoding="utf-8")
    held_out.write_text("\n".join(HELD_OUT) + "\n", encoding="utf-8")
    return str(train), str(held_out)


def _pruned(tiny_checkpoints, tmp_path, arch: str = "gemma3_text") -> tuple:
    """(teacher, student): the tiny model and a copy with half its FFN channels and a layer removed."""
    from exporter.export.sources import resolve_model
    from exporter.prune.pipeline import PruneOptions, prune_checkpoint
    from exporter.prune.structured import StructuredConfig

    teacher = resolve_model(str(tiny_checkpoints[arch]))
    options = PruneOptions(structured=StructuredConfig(ffn_ratio=0.5, drop_layers=[1]), eval_texts=0)
    prune_checkpoint(teacher, tmp_path / "student", options)
    return teacher, resolve_model(str(tmp_path / "student"))


def _config(texts, **changes):
    from exporter.prune.heal import HealConfig

    train, held_out = texts
    base = dict(steps=8, seq_len=32, batch_size=4, corpus=train, eval_corpus=held_out, eval_texts=4,
                save_every=3, warmup_steps=2)
    return HealConfig(**{**base, **changes})


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_heal_lowers_kl_to_the_teacher_on_held_out_text(tiny_checkpoints, tmp_path, texts, method):
    from exporter.prune.heal import heal_checkpoint

    teacher, student = _pruned(tiny_checkpoints, tmp_path)
    config = _config(texts, method=method, steps=20, lm_weight=0.0, learning_rate=3e-3 if method == "lora" else 1e-3)
    results = heal_checkpoint(teacher, student, tmp_path / "healed", config, tmp_path / "work")
    assert results["steps"] == 20 and results["tokens"] == 20 * 4 * 32
    assert results["eval_after"]["kl"] < 0.8 * results["eval_before"]["kl"], results
    assert not (tmp_path / "work").exists()
    history = json.loads((tmp_path / "healed" / "koedge-passes.json").read_text())
    assert [record["name"] for record in history] == ["prune", "heal"]


def test_merged_adapters_give_the_adapters_logits(tiny_checkpoints, tmp_path, texts):
    import torch

    from exporter.export.convert import load_torch_model
    from exporter.export.sources import resolve_model
    from exporter.prune.heal import heal_checkpoint

    teacher, student = _pruned(tiny_checkpoints, tmp_path)
    captured = {}

    def keep_adapters(step: int, loss: float) -> None:
        captured["step"] = step

    results = heal_checkpoint(teacher, student, tmp_path / "healed", _config(texts, steps=5), tmp_path / "work",
                              on_step=keep_adapters)
    assert results["merge_max_logit_diff"] < 1e-4
    healed = load_torch_model(resolve_model(str(tmp_path / "healed")))
    assert not any("lora" in name for name in _weights(tmp_path / "healed"))
    pruned = load_torch_model(student)
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        assert not torch.allclose(healed(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-3)


def test_adapters_on_and_merged_agree_directly(tiny_checkpoints):
    """Independent of the pass: peft's merge gives the same logits as the adapters on."""
    import torch

    from exporter.export.convert import load_torch_model
    from exporter.export.sources import resolve_model
    from exporter.prune.heal import HealConfig, wrap_student

    model = wrap_student(load_torch_model(resolve_model(str(tiny_checkpoints["llama"]))), HealConfig(lora_rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # peft starts B at zero: make the adapters do something
        model.eval()
        ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
        on = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert torch.allclose(on, merged(input_ids=ids).logits, atol=1e-5)
        assert not any("lora" in name for name, _ in merged.named_parameters())


def test_interrupted_heal_resumes_to_the_same_state(tiny_checkpoints, tmp_path, texts):
    from exporter.prune.heal import heal_checkpoint

    teacher, student = _pruned(tiny_checkpoints, tmp_path)
    config = _config(texts, eval_texts=0)
    heal_checkpoint(teacher, student, tmp_path / "straight", config, tmp_path / "work-a")

    def interrupt(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal_checkpoint(teacher, student, tmp_path / "resumed", config, tmp_path / "work-b", on_step=interrupt)
    assert json.loads((tmp_path / "work-b" / "checkpoint" / "heal-state.json").read_text())["step"] == 3
    messages = []
    results = heal_checkpoint(teacher, student, tmp_path / "resumed", config, tmp_path / "work-b",
                              progress=messages.append)
    assert any("resuming from step 3" in m for m in messages) and results["steps"] == 8
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert (straight[name] - resumed[name]).abs().max() <= 1e-6, name
    with pytest.raises(KeyboardInterrupt):
        heal_checkpoint(teacher, student, tmp_path / "other", config, tmp_path / "work-c", on_step=interrupt)
    with pytest.raises(KoedgeError, match="another configuration"):
        heal_checkpoint(teacher, student, tmp_path / "other", _config(texts, eval_texts=0, seq_len=16),
                        tmp_path / "work-c")


def test_heal_errors(tiny_checkpoints, tmp_path, texts):
    from exporter.prune.heal import heal_checkpoint

    teacher, student = _pruned(tiny_checkpoints, tmp_path)
    with pytest.raises(KoedgeError, match="unknown method"):
        heal_checkpoint(teacher, student, tmp_path / "x", _config(texts, method="qlora"), tmp_path / "w")
    with pytest.raises(KoedgeError, match="steps must be at least 1"):
        heal_checkpoint(teacher, student, tmp_path / "x", _config(texts, steps=0), tmp_path / "w")
    (tmp_path / "x").mkdir()
    with pytest.raises(KoedgeError, match="exists"):
        heal_checkpoint(teacher, student, tmp_path / "x", _config(texts), tmp_path / "w")


def test_heal_command_and_its_errors(tiny_checkpoints, tiny_bundles, tmp_path, texts, capsys):
    from exporter.cli import main

    teacher, student = _pruned(tiny_checkpoints, tmp_path)
    common = ["--teacher", str(teacher.path), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
              "--corpus", texts[0], "--eval-texts", "0"]
    assert main(["heal", "--student", str(student.path), "--out", str(tmp_path / "healed"), *common]) == 0
    assert "koedge export --model" in capsys.readouterr().out
    assert (tmp_path / "healed" / "model.safetensors").is_file()
    assert not (tmp_path / ".healed.heal-work").exists()
    cases = [(["--student", str(tiny_bundles["llama"])], "is an exported bundle"),
             (["--student", str(tmp_path)], "not a checkpoint folder"),
             (["--student", str(student.path), "--out", str(tmp_path / "healed")], "exists"),
             (["--student", str(student.path), "--lora-rank", "0"], "lora_rank must be at least 1")]
    for extra, message in cases:
        out = [] if "--out" in extra else ["--out", str(tmp_path / "new")]
        assert main(["heal", *common, *out, *extra]) == 1
        assert message in capsys.readouterr().err


def test_recipe_heals_after_structured_pruning(tiny_checkpoints, tmp_path, texts, monkeypatch):
    from exporter.build.engine import run_recipe
    from exporter.recipes import parse_recipe
    from runtime.bundle import read_manifest

    monkeypatch.setenv("KOEDGE_CACHE", str(tmp_path / "cache"))
    recipe = parse_recipe(f"""
[[passes]]
pass = "prune-structured"
drop_layers = [1]
[[passes]]
pass = "heal"
steps = 2
seq_len = 16
batch_size = 2
corpus = "{texts[0]}"
eval_texts = 0
[[passes]]
pass = "export"
""", "tiny-heal")
    outcomes = run_recipe(str(tiny_checkpoints["gemma3_text"]), recipe, tmp_path / "out", progress=lambda m: None)
    assert [o.spec.name for o in outcomes] == ["prune-structured", "heal", "export"]
    assert outcomes[1].results["steps"] == 2 and outcomes[1].results["teacher_parameters"] > \
        outcomes[1].results["parameters"]
    assert [p.name for p in read_manifest(tmp_path / "out").passes][:3] == ["prune", "heal", "export"]
    with pytest.raises(KoedgeError, match="'heal' needs a 'prune-structured' pass before it"):
        parse_recipe('[[passes]]\npass = "heal"\n[[passes]]\npass = "export"\n', "bad")

"""Korean task accuracy: zero-shot choices scored by the log-likelihood of each answer after a prompt.

Samples come from the eval split only and are balanced over labels, picked in a fixed hash order so
every bundle answers the same questions. Accuracy carries a 95% Wilson interval: with a few hundred
examples, differences of a few points between bundles are noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

import numpy as np

from runtime.data import data_root, nsmc_rows, split_of
from runtime.errors import KoedgeError
from runtime.scoring import TaskResult, log_softmax, progress_bar, start_token
from runtime.model import CausalLM


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]  # continuations, each scored after the prompt
    answer: int


# The NSMC prompt and answers of lm-evaluation-harness's Korean (polyglot) branch, so numbers compare with
# published ones; on calib-split reviews gemma-3-270m was within noise of chance with it and five others.
NSMC_PROMPT = "다음 문장은 긍정일까요 부정일까요?\n{review}\n정답:"
NSMC_CHOICES = (" 부정", " 긍정")
NLI_PROMPT = "{premise}\n질문: {hypothesis} 참, 거짓, 중립 중 무엇인가요?\n답:"
NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_CHOICES = (" 참", " 중립", " 거짓")


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (sane at 0 or 100% and for small n)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def _hash_order(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def balanced(groups: list[list[tuple[str, Example]]], total: int) -> list[Example]:
    """`total // len(groups)` examples per label in hash order, interleaved label by label."""
    per_label = total // len(groups)
    if per_label < 1:
        raise KoedgeError(f"need at least {len(groups)} task samples (one per label)")
    picked = [[example for _, example in sorted(group, key=lambda item: _hash_order(item[0]))[:per_label]]
              for group in groups]
    if min(len(group) for group in picked) < per_label:
        raise KoedgeError(f"the eval split has too few examples for {per_label} per label")
    return [group[index] for index in range(per_label) for group in picked]


def nsmc_examples(samples: int) -> list[Example]:
    """NSMC eval reviews: ratings 1–4 negative, 9–10 positive (5–8 are ambiguous and left out)."""
    negative, positive = [], []
    for row in nsmc_rows("eval"):
        example = Example(NSMC_PROMPT.format(review=row.text), NSMC_CHOICES, int(row.rating >= 9))
        if row.rating <= 4:
            negative.append((row.review_id, example))
        elif row.rating >= 9:
            positive.append((row.review_id, example))
    return balanced([negative, positive], samples)


def klue_nli_examples(samples: int) -> list[Example]:
    """KLUE-NLI dev pairs whose premise is in the eval split (calibration never saw the premise)."""
    path = data_root() / "klue" / "klue-nli-v1.1_dev.json"
    if not path.is_file():
        raise KoedgeError(f"KLUE data missing: {path}")
    groups: list[list[tuple[str, Example]]] = [[] for _ in NLI_LABELS]
    for item in json.loads(path.read_text(encoding="utf-8")):
        if item["gold_label"] in NLI_LABELS and split_of("klue:" + item["premise"].strip()) == "eval":
            answer = NLI_LABELS.index(item["gold_label"])
            prompt = NLI_PROMPT.format(premise=item["premise"].strip(), hypothesis=item["hypothesis"].strip())
            groups[answer].append((item["guid"], Example(prompt, NLI_CHOICES, answer)))
    return balanced(groups, samples)


TASKS = {"nsmc": nsmc_examples, "klue-nli": klue_nli_examples}


def choice_logprobs(model: CausalLM, prompt: str, choices: tuple[str, ...]) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the prompt: one prefill, then decode steps."""
    prompt_ids = [start_token(model), *model.encode(prompt, add_bos=False)]
    prefill = model.step(np.array([prompt_ids]), model.empty_past(), last_only=True)
    first = log_softmax(prefill.logits[0, -1:])[0]
    scores = []
    for choice in choices:
        ids = model.encode(choice, add_bos=False)
        if not ids:
            raise KoedgeError(f"answer {choice!r} encodes to no tokens")
        score, past = float(first[ids[0]]), prefill.present
        for previous, target in zip(ids, ids[1:]):
            step = model.step(np.array([[previous]]), past, last_only=True)
            score += float(log_softmax(step.logits[0, -1:])[0, target])
            past = step.present
        scores.append(score)
    return scores


def run_task(model: CausalLM, name: str, samples: int = 200, show_progress: bool = True) -> TaskResult:
    if name not in TASKS:
        raise KoedgeError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")
    started = time.perf_counter()
    examples = TASKS[name](samples)
    correct = 0
    bar = progress_bar(len(examples), f"{name} {model.folder.name}", show_progress)
    for example in examples:
        scores = choice_logprobs(model, example.prompt, example.choices)
        correct += int(int(np.argmax(scores)) == example.answer)
        bar.update()
    bar.close()
    low, high = wilson(correct, len(examples))
    return TaskResult(name=name, correct=correct, total=len(examples), accuracy=correct / len(examples),
                      ci_low=low, ci_high=high, chance=1 / len(examples[0].choices),
                      seconds=round(time.perf_counter() - started, 1),
                      note=f"zero-shot, balanced, answers {'/'.join(c.strip() for c in examples[0].choices)}")


def run_tasks(model: CausalLM, names: tuple[str, ...] | list[str], samples: int = 200,
              show_progress: bool = True) -> dict[str, TaskResult]:
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise KoedgeError(f"unknown task '{unknown[0]}' (choose from {', '.join(TASKS)})")
    return {name: run_task(model, name, samples, show_progress) for name in names}

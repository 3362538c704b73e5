"""Accuracy of a bundle on fixed Korean text: perplexity, bits per byte, and KL against a reference.

Passages are defined by text (whole eval-split texts up to a byte budget), never by a tokenizer, so a
vocabulary-pruned bundle is judged on exactly the same characters as its parent. KL divergence,
its 99th percentile and same-top-1 follow llama.cpp's `perplexity --kl-divergence`:
KL(reference || candidate) per scored position, percentiles by linear interpolation.
Logits are turned into log-probabilities a few rows at a time: a 262k vocabulary makes one row 1 MB.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.data import load_texts
from runtime.errors import KoedgeError
from runtime.model import CausalLM
from runtime.scoring import TaskResult, log_softmax, progress_bar, start_token

BYTES_PER_TOKEN = 3.5  # passage budget per token: gemma-3 averages 3.8 bytes/token on this Korean text
ROWS_PER_CHUNK = 32  # log-softmax rows at a time (32 x 262k x 4 B = 34 MB)


@dataclass
class EvalConfig:
    data: str = "ko"  # named set (runtime.data: ko|nsmc|klue) or a .txt/.jsonl path
    max_samples: int = 64  # passages
    tokens_per_sample: int = 256  # passage budget: tokens_per_sample * BYTES_PER_TOKEN UTF-8 bytes
    window: int = 256  # sliding window for texts longer than this (stride = window // 2)
    tasks: tuple[str, ...] = ()  # task names from runtime.tasks (nsmc, klue-nli)
    task_samples: int = 200  # examples per task (balanced over labels)


@dataclass
class EvalResult:
    perplexity: float  # exp(mean NLL per scored token), this bundle's own tokens
    bits_per_byte: float  # sum of NLL in bits / UTF-8 bytes of the scored text
    tokens: int
    bytes: int
    passages: int
    seconds: float
    kl_mean: float | None = None  # nats, KL(reference || this) per position
    kl_p99: float | None = None
    kl_max: float | None = None
    same_top1: float | None = None  # fraction 0..1
    kl_positions: int | None = None  # positions compared (all scored ones unless tokenizations differ)
    reference_perplexity: float | None = None  # the reference's own numbers, free when it tokenizes alike
    reference_bits_per_byte: float | None = None
    vocab_note: str | None = None  # set when the vocabularies differ and KL is on shared tokens
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- text ------------------------------------------------------------------------------------
def passages_from(texts: list[str], budget_bytes: int, count: int) -> list[str]:
    """Whole texts joined by newlines while the passage stays within `budget_bytes` (one longer text
    makes a passage of its own); at most `count` passages."""
    passages: list[str] = []
    current: list[str] = []
    size = 0
    for text in texts:
        extra = len(text.encode("utf-8")) + (1 if current else 0)
        if current and size + extra > budget_bytes:
            passages.append("\n".join(current))
            if len(passages) == count:
                return passages
            current, size, extra = [], 0, extra - 1
        current.append(text)
        size += extra
    if current and (not passages or 2 * size >= budget_bytes):  # the tail, unless it is a scrap
        passages.append("\n".join(current))
    return passages


def eval_texts(config: EvalConfig) -> list[str]:
    """The fixed evaluation passages: the same characters for every bundle."""
    if config.max_samples < 1 or config.tokens_per_sample < 1:
        raise KoedgeError("max_samples and tokens_per_sample must be at least 1")
    texts = load_texts(config.data, split="eval")
    budget = int(config.tokens_per_sample * BYTES_PER_TOKEN)
    passages = passages_from(texts, budget, config.max_samples)
    if not passages:
        raise KoedgeError(f"evaluation set '{config.data}' is empty")
    return passages


# --- numerics --------------------------------------------------------------------------------
def kl_rows(ref_logprobs: np.ndarray, cand_logprobs: np.ndarray) -> np.ndarray:
    """KL(ref || cand) per row, in nats."""
    return np.sum(np.exp(ref_logprobs) * (ref_logprobs - cand_logprobs), axis=-1, dtype=np.float64)


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at fraction * (n - 1) of the sorted values."""
    return float(np.percentile(values, 100.0 * fraction, method="linear"))


def windows(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) token spans; each token is scored once, with >= window//2 context."""
    if window < 2:
        raise KoedgeError("window must be at least 2 tokens")
    if n_tokens <= window:
        return [(0, n_tokens, 0)]
    spans, scored_until = [], 0
    for begin in range(0, n_tokens, window // 2):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return spans


# --- vocabularies ----------------------------------------------------------------------------
TOKEN_MAP_FILE = "token_map.json"  # written by vocabulary pruning: {"new_to_original": [...]}
MIN_COMPARABLE = 0.5  # refuse KL when fewer positions than this share the reference's tokenization


def token_map_of(model: CausalLM) -> np.ndarray | None:
    """New id -> original id for a vocabulary-pruned bundle (manifest.model.token_map or token_map.json)."""
    token_map = getattr(model.manifest.model, "token_map", None)
    path = model.folder / TOKEN_MAP_FILE
    if token_map is None and path.is_file():
        try:
            token_map = json.loads(path.read_text(encoding="utf-8"))["new_to_original"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise KoedgeError(f"{path} is not a token map: {err}") from err
    return None if token_map is None else np.asarray(token_map, dtype=np.int64)


def original_ids(ids: list[int], token_map: np.ndarray | None) -> np.ndarray:
    ids_array = np.asarray(ids, dtype=np.int64)
    if token_map is None:
        return ids_array
    if ids_array.size and ids_array.max() >= len(token_map):
        raise KoedgeError(f"token id {int(ids_array.max())} is outside the bundle's token map ({len(token_map)})")
    return token_map[ids_array]


def common_prefix(first: np.ndarray, second: np.ndarray) -> int:
    """How many leading tokens two id sequences share."""
    length = min(len(first), len(second))
    differ = np.flatnonzero(first[:length] != second[:length])
    return int(differ[0]) if differ.size else length


def shared_vocab(ref_width: int, ref_map: np.ndarray | None, cand_width: int,
                 cand_map: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices into (reference, candidate) logits of the tokens both have; None when the vocabularies match."""
    ref_ids = np.arange(ref_width) if ref_map is None else ref_map[:ref_width]
    cand_ids = np.arange(cand_width) if cand_map is None else cand_map[:cand_width]
    if ref_width == cand_width and np.array_equal(ref_ids, cand_ids):
        return None
    _, ref_index, cand_index = np.intersect1d(ref_ids, cand_ids, assume_unique=True, return_indices=True)
    if len(ref_index) == 0:
        raise KoedgeError("the reference and the bundle share no tokens: cannot compare their distributions")
    return ref_index, cand_index


def renormalize(logprobs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Log-probabilities restricted to `index` and renormalized on it."""
    return log_softmax(logprobs[:, index])


# --- evaluation ------------------------------------------------------------------------------
@dataclass
class _Encoded:
    """One passage as both models tokenize it; KL is defined on positions whose context matches."""

    ids: list[int]
    ref_ids: list[int] | None = None
    same_prefix: int = 0  # leading tokens identical (as original ids) in both tokenizations


def _encode_all(model: CausalLM, reference: CausalLM | None, texts: list[str]) -> list[_Encoded]:
    """Tokenize everything up front so a reference that cannot be aligned fails before any forward pass."""
    encoded = [_Encoded(model.encode(text, add_bos=False)) for text in texts]
    if reference is None:
        return encoded
    cand_map, ref_map = token_map_of(model), token_map_of(reference)
    comparable = total = 0
    for item, text in zip(encoded, texts):
        item.ref_ids = reference.encode(text, add_bos=False)
        item.same_prefix = common_prefix(original_ids(item.ids, cand_map), original_ids(item.ref_ids, ref_map))
        comparable += min(item.same_prefix + 1, len(item.ids))
        total += len(item.ids)
    if total and comparable < MIN_COMPARABLE * total:
        raise KoedgeError(f"the reference tokenizes the text differently ({comparable / total:.0%} of positions "
                          "share a context): KL needs the same tokens, compare bits per byte instead")
    return encoded


@dataclass
class _Totals:
    nll: float = 0.0
    ref_nll: float | None = 0.0  # None once a passage is tokenized differently by the reference
    tokens: int = 0
    same_top1: int = 0
    kl: list[np.ndarray] = field(default_factory=list)
    outside_mass: list[np.ndarray] = field(default_factory=list)


def _score_rows(totals: _Totals, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None,
                ref_targets: np.ndarray | None, shared: tuple[np.ndarray, np.ndarray] | None) -> None:
    """NLL for rows of logits [n, vocab] predicting `targets`; KL and top-1 on the first len(ref_logits) rows
    (and the reference's NLL when `ref_targets` is given: then every row is compared)."""
    compared = 0 if ref_logits is None else len(ref_logits)
    for start in range(0, len(targets), ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        cand = log_softmax(logits[rows])
        totals.nll -= float(cand[np.arange(cand.shape[0]), targets[rows]].sum(dtype=np.float64))
        totals.tokens += cand.shape[0]
        if start >= compared:
            continue
        ref = log_softmax(ref_logits[rows])
        cand = cand[: ref.shape[0]]
        if ref_targets is not None and totals.ref_nll is not None:
            totals.ref_nll -= float(ref[np.arange(ref.shape[0]), ref_targets[rows]].sum(dtype=np.float64))
        if shared is not None:
            totals.outside_mass.append(1.0 - np.exp(ref[:, shared[0]]).sum(axis=-1, dtype=np.float64))
            ref, cand = renormalize(ref, shared[0]), renormalize(cand, shared[1])
        totals.kl.append(kl_rows(ref, cand))
        totals.same_top1 += int((ref.argmax(axis=-1) == cand.argmax(axis=-1)).sum())


def _forward(model: CausalLM, ids: list[int]) -> np.ndarray:
    """Logits [len(ids) + 1, vocab] of one full pass from an empty past; row r predicts ids[r]."""
    return model.step(np.array([[start_token(model), *ids]]), model.empty_past()).logits[0]


def evaluate(model: CausalLM, texts: list[str], reference: CausalLM | None = None,
             config: EvalConfig | None = None, show_progress: bool = True) -> EvalResult:
    """Score every token of every passage; with a reference, compare next-token distributions too."""
    config = config or EvalConfig()
    texts = [text for text in texts if text]
    if not texts:
        raise KoedgeError("evaluation set is empty")
    started = time.perf_counter()
    encoded = _encode_all(model, reference, texts)
    shared: tuple[np.ndarray, np.ndarray] | None = None
    totals = _Totals()
    differing = 0
    bar = progress_bar(len(texts), f"eval {model.folder.name}", show_progress)
    for item in encoded:
        ids = item.ids
        alike = reference is not None and item.same_prefix == len(ids) == len(item.ref_ids)
        differing += reference is not None and not alike
        if not alike:
            totals.ref_nll = None
        for begin, end, first in windows(len(ids), config.window):
            logits = _forward(model, ids[begin:end])[first - begin: end - begin]
            ref_logits = None
            compare_end = min(end, item.same_prefix + 1)  # positions whose context both models share
            if reference is not None and compare_end > first:
                ref_logits = _forward(reference, item.ref_ids[begin:min(end, item.same_prefix)])
                ref_logits = ref_logits[first - begin: compare_end - begin]
                if shared is None:
                    shared = shared_vocab(ref_logits.shape[-1], token_map_of(reference),
                                          logits.shape[-1], token_map_of(model)) or ()
            ref_targets = np.asarray(item.ref_ids[first:end]) if alike else None
            _score_rows(totals, logits, np.asarray(ids[first:end]), ref_logits, ref_targets, shared or None)
            del logits, ref_logits
        bar.update()
    bar.close()
    if totals.tokens == 0:
        raise KoedgeError("evaluation set holds no tokens")
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    result = EvalResult(perplexity=math.exp(totals.nll / totals.tokens),
                        bits_per_byte=totals.nll / math.log(2) / n_bytes,
                        tokens=totals.tokens, bytes=n_bytes, passages=len(texts), seconds=0.0)
    if reference is not None:
        kl = np.concatenate(totals.kl)
        result.kl_mean, result.kl_p99, result.kl_max = float(kl.mean()), percentile(kl, 0.99), float(kl.max())
        result.same_top1 = totals.same_top1 / len(kl)
        result.kl_positions = len(kl)
        if totals.ref_nll is not None:
            result.reference_perplexity = math.exp(totals.ref_nll / totals.tokens)
            result.reference_bits_per_byte = totals.ref_nll / math.log(2) / n_bytes
        notes = []
        if shared:
            outside = float(np.concatenate(totals.outside_mass).mean())
            notes.append(f"vocabularies differ: KL and top-1 over the {len(shared[0]):,} shared tokens, both "
                         f"renormalized on them (the reference put {outside:.2%} of its mass elsewhere)")
        if differing:
            notes.append(f"{differing} of {len(texts)} passages are tokenized differently: KL on the "
                         f"{len(kl):,} of {totals.tokens:,} positions before the first difference")
        result.vocab_note = "; ".join(notes) or None
    if config.tasks:
        from runtime.tasks import run_tasks

        result.tasks = run_tasks(model, config.tasks, config.task_samples, show_progress)
    result.seconds = round(time.perf_counter() - started, 1)
    return result


# --- report ----------------------------------------------------------------------------------
def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[tuple[str, EvalResult]]) -> str:
    """A Markdown table: one row per bundle, task columns for the tasks any row has."""
    task_names = sorted({name for _, result in rows for name in result.tasks})
    header = ["bundle", "PPL", "bits/byte", "tokens", "KL mean", "KL p99", "same top-1",
              *[f"{name} acc (95% CI)" for name in task_names], "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for label, result in rows:
        cells = [label, f"{result.perplexity:.2f}", f"{result.bits_per_byte:.4f}", f"{result.tokens:,}",
                 _number(result.kl_mean, 4), _number(result.kl_p99, 4),
                 "–" if result.same_top1 is None else f"{result.same_top1:.1%}"]
        for name in task_names:
            task = result.tasks.get(name)
            cells.append("–" if task is None else
                         f"{task.accuracy:.1%} ({task.ci_low:.1%}–{task.ci_high:.1%}, n={task.total})")
        cells.append(f"{result.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
        if result.vocab_note:
            notes.append(f"{label}: {result.vocab_note}")
    return "\n".join(lines + [f"\nnote: {note}" for note in notes])

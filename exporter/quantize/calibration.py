"""Korean calibration data for static quantization of the exported KV-cache graph.

A graph that only sees prefills during calibration misquantizes the decode path it spends its
life in, so every sample yields a prefill (empty past) and then decode steps whose past KV comes
from running the FP32 bundle on the same text. Short texts (reviews, single sentences) are packed
into one sample so that prefill lengths and decode positions cover the range the model will see.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from runtime.data import load_texts
from runtime.errors import KoedgeError
from runtime.model import CausalLM


@dataclass
class CalibrationConfig:
    source: str = "ko"  # nsmc | klue | ko | a .txt / .jsonl file
    samples: int = 16  # packed sequences used to set the activation ranges
    holdout: int = 2  # further sequences (max_length tokens each), never calibrated on, that judge the result
    max_length: int = 256  # tokens per sequence (prefill + decode steps)
    min_length: int = 16
    decode_steps: int = 4  # decode feeds per sequence, after its prefill
    seed: int = 0

    def check(self) -> None:
        if self.samples < 1 or self.holdout < 0:
            raise KoedgeError("calibration needs at least 1 sample (and a holdout of 0 or more)")
        if self.decode_steps < 0:
            raise KoedgeError("decode steps must be 0 or more")
        if not 2 <= self.min_length <= self.max_length:
            raise KoedgeError(f"calibration lengths need 2 <= min ({self.min_length}) <= max ({self.max_length})")
        if self.decode_steps >= self.min_length:
            raise KoedgeError(f"decode steps ({self.decode_steps}) must be fewer than the minimum length "
                              f"({self.min_length}) so every sample keeps a prefill")


@dataclass
class Sequence:
    """One packed token sequence; the first `prefill` tokens are one prefill, the rest decode steps."""

    ids: list[int]
    prefill: int


def _encode_all(model: CausalLM, texts: list[str], source: str) -> list[list[int]]:
    encoded = []
    for number, text in enumerate(texts, 1):
        ids = model.encode(text, add_bos=False)
        if not ids:
            raise KoedgeError(f"calibration text {number} of '{source}' tokenizes to nothing: {text[:40]!r}")
        encoded.append(ids)
    return encoded


def build_sequences(model: CausalLM, config: CalibrationConfig) -> tuple[list[Sequence], list[Sequence]]:
    """(calibration, holdout) sequences: disjoint texts, shuffled with the seed, packed to varied
    lengths for calibration and to max_length for the held-out judge (long contexts, more positions).

    Sequence i takes texts i, i+n, i+2n... of the shuffled pool (n sequences) until it reaches its
    target length, so each text is used once and each sequence starts with a text of its own.
    """
    config.check()
    texts = load_texts(config.source, split="calib")
    wanted = config.samples + config.holdout
    if len(texts) < wanted:
        raise KoedgeError(f"'{config.source}' has {len(texts)} texts, fewer than the {wanted} asked "
                          f"({config.samples} samples + {config.holdout} held out)")
    rng = random.Random(config.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    targets = [rng.randint(config.min_length, config.max_length) for _ in range(config.samples)]
    targets += [config.max_length] * config.holdout
    per_sequence = 1 + config.max_length // 4  # enough texts to fill any target (each text >= 1 token)
    pool = [texts[i] for i in order[: wanted * per_sequence]]
    encoded = _encode_all(model, pool, config.source)
    newline = model.encode("\n", add_bos=False)
    bos = model.manifest.tokens.bos_token_id
    sequences = []
    for index, target in enumerate(targets):
        ids = [] if bos is None else [bos]
        for piece in encoded[index::wanted]:
            ids += piece + newline
            if len(ids) >= target:
                break
        ids = ids[:target]
        if len(ids) < 2:
            raise KoedgeError(f"calibration sequence {index + 1} of '{config.source}' has fewer than 2 tokens")
        steps = min(config.decode_steps, len(ids) - 1)
        sequences.append(Sequence(ids, len(ids) - steps))
    return sequences[: config.samples], sequences[config.samples:]


class KVCacheReader(CalibrationDataReader):
    """Feeds for onnxruntime's calibrators: per sequence one prefill, then its decode steps.

    Decode feeds carry the past KV the FP32 model produced on the same tokens (teacher forcing),
    which is exactly what the graph sees at decode time when the model is accurate.
    """

    def __init__(self, reference: CausalLM, sequences: list[Sequence]):
        self.reference = reference
        self.sequences = sequences
        self._feeds = self._generate()

    def __len__(self) -> int:
        return sum(len(sequence.ids) - sequence.prefill + 1 for sequence in self.sequences)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:
        self._feeds = self._generate()

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        model = self.reference
        for sequence in self.sequences:
            prompt = np.array([sequence.ids[: sequence.prefill]], dtype=np.int64)
            past = model.empty_past()
            yield {**model.feeds(prompt, 0), **past}
            decode = sequence.ids[sequence.prefill:]
            if not decode:
                continue
            past = model.step(prompt, past).present
            for offset, token in enumerate(decode):
                ids = np.array([[token]], dtype=np.int64)
                yield {**model.feeds(ids, sequence.prefill + offset), **past}
                if offset + 1 < len(decode):
                    past = model.step(ids, past).present

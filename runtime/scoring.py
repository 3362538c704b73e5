"""What evaluation and the zero-shot tasks share: scores, log-probabilities, progress, the start token.

Kept apart so that `runtime.evaluate` (which runs tasks) and `runtime.tasks` (which reports task
results) do not import each other.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from runtime.errors import KoedgeError
from runtime.model import CausalLM


@dataclass
class TaskResult:
    name: str
    correct: int
    total: int
    accuracy: float
    ci_low: float  # 95% Wilson interval
    ci_high: float
    chance: float
    seconds: float
    note: str = ""



def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Rows of float32 log-probabilities (the input is not modified)."""
    rows = logits.astype(np.float32, copy=True)
    rows -= rows.max(axis=-1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return rows



# --- progress --------------------------------------------------------------------------------
class _PlainProgress:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.every = max(1, total // 10)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.done % self.every == 0 or self.done == self.total:
            print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _NoProgress(_PlainProgress):
    def update(self, count: int = 1) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm on stderr when installed (it is not a runtime dependency), else a plain counter."""
    if not enabled:
        return _NoProgress(total, desc)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def start_token(model: CausalLM) -> int:
    """BOS, or the end-of-text token for models without one, so every text token is predicted."""
    tokens = model.manifest.tokens
    if tokens.bos_token_id is not None:
        return tokens.bos_token_id
    if tokens.eos_token_ids:
        return tokens.eos_token_ids[0]
    raise KoedgeError(f"bundle {model.folder} has neither a BOS nor an EOS token to start a passage")

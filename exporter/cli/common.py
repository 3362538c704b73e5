"""What every command shares: timestamped progress lines and silencing two misleading warnings."""

from __future__ import annotations

import logging
import sys
import time


class _KnownNoise(logging.Filter):
    """Drops two warnings that misfire on koedge's own checkpoints and would alarm a user.

    transformers 4.57.6 flags any local tokenizer saved by a transformers > 4.57.2 as having
    Mistral's broken regex; Optimum reports the tied embedding as 'different candidate
    initializers', which koedge's export then stores once (exporter/export/convert.py).
    """

    PHRASES = ("fix_mistral_regex", "candidate ONNX initializers", "lm_head.weight:", "embed_tokens.weight:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(phrase in record.getMessage() for phrase in self.PHRASES)


def quiet_known_noise() -> None:
    for name in ("transformers.tokenization_utils_base", "optimum"):
        logging.getLogger(name).addFilter(_KnownNoise())


def progress(message: str) -> None:
    print(f"[koedge {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

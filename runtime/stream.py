"""Incremental detokenization: print text as tokens arrive, never half a character.

A Hangul syllable is three UTF-8 bytes, and byte-level BPE or SentencePiece byte-fallback tokens can
split it; decoding such a prefix gives U+FFFD. Decoding a lone token can also lose a leading space
(SentencePiece). So we decode a small window of recent tokens twice (with and without the new ones),
emit only the difference, and only when it does not end in U+FFFD. Stop strings are held back while
the tail of the text could still be the start of one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from runtime.errors import KoedgeError

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids one by one; get back the text that is safe to show."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), context: Sequence[int] = ()):
        """`context`: the last few prompt tokens, so the first new token keeps its leading space."""
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = list(context)
        self._prefix = 0  # start of the decode window
        self._read = len(self.tokens)  # tokens before this are already turned into text
        self._pending = ""  # decoded but held back (could start a stop string)
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was seen; nothing more is emitted

    def push(self, token: int) -> str:
        """Add one token; return the new text that can be shown now (maybe empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self.decode(self.tokens[self._prefix:self._read])
        after = self.decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for the bytes that finish it
        self._prefix, self._read = self._read, len(self.tokens)
        return self._release(self._pending + after[len(before):])

    def finish(self) -> str:
        """The end of generation: release what was held back (a trailing broken byte stays out)."""
        if self.stopped:
            return ""
        before = self.decode(self.tokens[self._prefix:self._read])
        after = self.decode(self.tokens[self._prefix:]).rstrip(REPLACEMENT)
        tail = after[len(before):] if len(after) > len(before) else ""
        text, self._pending = self._pending + tail, ""
        return self._emit(self._cut_at_stop(text))

    def _release(self, text: str) -> str:
        cut = self._cut_at_stop(text)
        if self.stopped:
            return self._emit(cut)
        hold = self._held_tail(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return self._emit(text[:len(text) - hold])

    def _cut_at_stop(self, text: str) -> str:
        """Text up to the earliest stop string (checked across the already-emitted tail too)."""
        if not self.stop:
            return text
        window = self.text[-max(len(s) for s in self.stop):] + text
        hits = [window.find(s) for s in self.stop if s in window]
        if not hits:
            return text
        self.stopped = True
        return window[:min(hits)][len(window) - len(text):] if min(hits) >= len(window) - len(text) else ""

    def _held_tail(self, text: str) -> int:
        """How many trailing characters could be the beginning of a stop string."""
        joined = self.text + text
        hold = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(joined)), 0, -1):
                if joined.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        return min(hold, len(text))

    def _emit(self, text: str) -> str:
        self.text += text
        return text


class DecodeOnlyTokenizer:
    """The decoding half of a `tokenizers.Tokenizer`, a fraction of its memory.

    Decoding maps ids to pieces, drops special tokens when asked, and runs the decoder chain, as
    `Tokenizer.decode` does. The pieces are kept as one UTF-8 blob with offsets, and the decoder chain is
    the tokenizer's own. Gemma 3's 262k-piece Unigram tokenizer holds ~220 MiB (its trie); this ~10 MiB
    (a WordLevel twin, the first version, ~60 MiB). Encoding raises a clear error.
    """

    def __init__(self, full):
        size = full.get_vocab_size(with_added_tokens=True)
        pieces = [full.id_to_token(index) for index in range(size)]
        self._missing = {index for index, piece in enumerate(pieces) if piece is None}
        encoded = [(piece or "").encode("utf-8") for piece in pieces]
        self._offsets = np.zeros(size + 1, np.int64)
        np.cumsum([len(piece) for piece in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)
        added = full.get_added_tokens_decoder()
        self._added = {token.content: index for index, token in added.items()}
        self._special = {token.content for token in added.values() if token.special}
        self._decoder = full.decoder

    def id_to_token(self, index: int) -> str | None:
        if not 0 <= index < len(self._offsets) - 1 or index in self._missing:
            return None
        return self._blob[self._offsets[index]:self._offsets[index + 1]].decode("utf-8")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        tokens = [token for token in map(self.id_to_token, ids) if token is not None]
        if skip_special_tokens:
            tokens = [token for token in tokens if token not in self._special]
        return self._decoder.decode(tokens) if self._decoder is not None else " ".join(tokens)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        starts = np.flatnonzero(np.diff(self._offsets) == len(token.encode("utf-8")))
        return next((int(index) for index in starts if self.id_to_token(int(index)) == token), None)

    def encode(self, *args, **kwargs):
        raise KoedgeError("this runner released its tokenizer's encoder to save memory; load the bundle again")

"""The KV cache kept inside onnxruntime across steps, through I/O binding.

Two ways, chosen by the manifest's `io.kv_shared_buffer`:

In place, where the graph allows it (`GroupQueryAttention` graphs such as onnxruntime-genai's model
builder writes): one buffer per layer and kind, preallocated for the whole sequence, is bound as both
the past input and the present output. onnxruntime's GQA kernel sees the same pointer, writes the new
positions into the buffer and reads the valid prefix (its length comes from the attention mask). Nothing
is copied or allocated per step; the buffer grows (doubling, one copy) only if a run outgrows it.

Ping-pong otherwise. The Optimum graphs compute
`present = Concat(past, new)` along the sequence axis, so each step's present is a *new* tensor one
position longer than its past. A bound output must have exactly the output's shape, and binding a
past and a present onto the same preallocated buffer would alias a Concat's input and output
(undefined in onnxruntime). So each step binds the previous step's present OrtValues as its past
inputs and lets onnxruntime allocate the new presents; the old ones are freed when dropped. The
cache never goes through numpy. Only logits come back, written straight into a numpy buffer we
bind (no copy): the last position's only, where the bundle has the exporter's `logits_to_keep` input,
else every position's, of which a prefill keeps the last row.

Sliding-window models (gemma3_text, exaone4) keep the full KV in these graphs; the window is
applied by the mask the graph builds from `attention_mask` and positions, so nothing is trimmed here.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.errors import KoedgeError
from runtime.model import CausalLM


class BoundCache:
    """Drives one sequence (batch of 1 or more equal-length rows) through a bundle with I/O binding."""

    def __init__(self, lm: CausalLM, batch: int = 1):
        self.lm = lm
        self.batch = batch
        self.io = lm.manifest.io
        self.past_names = [name for pair in lm.kv_names("past") for name in pair]
        self.present_names = [name for pair in lm.kv_names("present") for name in pair]
        logits_spec = next((spec for spec in self.io.outputs if spec.name == self.io.logits), None)
        if logits_spec is None:
            raise KoedgeError(f"the manifest lists no logits output named '{self.io.logits}'")
        self.logits_dtype = np.dtype(logits_spec.dtype)
        last = logits_spec.shape[-1]
        self.vocab = last if isinstance(last, int) else lm.manifest.model.vocab_size
        self.binding = lm.session.io_binding()
        self.in_place = lm.manifest.io.kv_shared_buffer
        self.length = 0
        self._past: list[ort.OrtValue] = []
        self._buffers: list[np.ndarray] = []  # in place: what the OrtValues point into
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: the past becomes empty tensors again (in place: the buffers stay)."""
        self.length = 0
        if self.in_place and self._buffers:
            return
        info = self.lm.manifest.model
        empty = np.zeros((self.batch, info.num_kv_heads, 0, info.head_dim), self.lm.kv_dtype())
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]
        self._empty = empty  # the OrtValues above point into this array

    @property
    def capacity(self) -> int:
        return self._buffers[0].shape[2] if self._buffers else 0

    def reserve(self, tokens: int) -> None:
        """In place: make the buffers hold `tokens` positions (keeping the cached ones). Else nothing to do."""
        if not self.in_place or tokens <= self.capacity:
            return
        info = self.lm.manifest.model
        tokens = min(tokens, self.max_length)
        shape = (self.batch, info.num_kv_heads, tokens, info.head_dim)
        buffers = [np.zeros(shape, self.lm.kv_dtype()) for _ in self.past_names]
        for new, old in zip(buffers, self._buffers):
            new[:, :, :self.length] = old[:, :, :self.length]
        self._buffers = buffers
        self._past = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in buffers]

    @property
    def max_length(self) -> int:
        return self.lm.manifest.model.max_positions

    def run(self, input_ids: np.ndarray | list[int], chunk: int | None = None) -> np.ndarray:
        """Feed `input_ids` ([batch, seq] or one row) after the cached tokens; return the last logits [batch, vocab].

        `chunk` splits a long prefill into calls of at most that many tokens (runtime.memory.prefill_chunk_for):
        it bounds the attention scores, and the logits of graphs that return every position's.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.shape[0] != self.batch or ids.shape[1] == 0:
            raise KoedgeError(f"expected input ids of shape [{self.batch}, n>0], got {list(ids.shape)}")
        if self.length + ids.shape[1] > self.max_length:
            raise KoedgeError(f"{self.length + ids.shape[1]} tokens exceed the model's context of {self.max_length}")
        if self.in_place and self.length + ids.shape[1] > self.capacity:
            self.reserve(max(self.length + ids.shape[1], 2 * self.capacity, 256))
        step = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            logits = self._call(ids[:, start:start + step])
        return logits

    def _call(self, ids: np.ndarray) -> np.ndarray:
        seq = ids.shape[1]
        feeds = self.lm.feeds(ids, self.length, last_only=True)
        rows = 1 if self.lm.keeps_last_logits else seq
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for value in feeds.values()]
        for name, value in zip(feeds, keep):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.past_names, self._past):
            binding.bind_ortvalue_input(name, value)
        logits = np.empty((self.batch, rows, self.vocab), self.logits_dtype)
        binding.bind_output(self.io.logits, "cpu", 0, self.logits_dtype, list(logits.shape), logits.ctypes.data)
        if self.in_place:  # the same buffer in and out: the kernel appends in place
            for name, value in zip(self.present_names, self._past):
                binding.bind_ortvalue_output(name, value)
            self.lm.session.run_with_iobinding(binding)
        else:
            for name in self.present_names:
                binding.bind_output(name, "cpu")
            self.lm.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()  # logits first, then presents, in bind order
            self._past = list(outputs[1:])
        binding.clear_binding_inputs()  # drop references to the old past so it can be freed
        self.length += seq
        return logits[:, -1, :].copy() if rows > 1 else logits[:, 0, :]

    def kv_bytes(self) -> int:
        """Bytes the cache holds now (one past or present set; in place: the whole preallocated buffers)."""
        if self.in_place:
            return sum(buffer.nbytes for buffer in self._buffers)
        return sum(value.tensor_size_in_bytes() for value in self._past) if self.length else 0


class NumpyCache:
    """The plain loop: the KV cache goes out to numpy and back in every step (CausalLM.step).

    Same interface as BoundCache; kept as the reference the bound path is checked and timed against.
    """

    def __init__(self, lm: CausalLM, batch: int = 1):
        self.lm = lm
        self.batch = batch
        self.length = 0
        self._past = lm.empty_past(batch)

    def reset(self) -> None:
        self._past = self.lm.empty_past(self.batch)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.lm.manifest.model.max_positions

    def run(self, input_ids: np.ndarray | list[int], chunk: int | None = None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if self.length + ids.shape[1] > self.max_length:
            raise KoedgeError(f"{self.length + ids.shape[1]} tokens exceed the model's context of {self.max_length}")
        step = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            piece = ids[:, start:start + step]
            out = self.lm.step(piece, self._past, last_only=True)
            self._past = out.present
            self.length += piece.shape[1]
        return out.logits[:, -1, :]

    def kv_bytes(self) -> int:
        return sum(value.nbytes for value in self._past.values())

"""The KV cache kept inside onnxruntime across steps, through I/O binding.

Two ways, chosen by the manifest's `io.kv_shared_buffer`:

In place, where the graph allows it (`GroupQueryAttention` graphs: koedge's default fused export,
exporter/export/fused_attention.py, and onnxruntime-genai's model builder): one buffer per layer and kind,
preallocated (`io.kv_buffer_length` positions, else what the first call needs, at least 256), is bound as
both the past input and the present output. onnxruntime's GQA kernel sees the same pointer, writes the new
positions into the buffer and reads the valid prefix (its length comes from the attention mask). Nothing
is copied or allocated per step; the buffer grows (doubling, one copy) only if a run outgrows it.

Ping-pong otherwise. The unfused Optimum graphs (`koedge export --attention unfused`, older bundles) compute
`present = Concat(past, new)` along the sequence axis, so each step's present is a *new* tensor one
position longer than its past. A bound output must have exactly the output's shape, and binding a
past and a present onto the same buffer would alias a Concat's input and output (undefined in
onnxruntime). So each layer and kind gets two preallocated slabs, sized like the in-place buffers;
a step reads its past as a contiguous [batch, heads, length, head_dim] tensor at the start of one slab
and has onnxruntime write the present, one position longer, at the start of the other; the next step
swaps them. Nothing is allocated per step: letting onnxruntime allocate every present instead (the
first version) fragments glibc's heap — a few MiB freed and asked again one position larger, 48
times a step — and cost the polyglot-ko-1.3b shape twin INT4 ~1 GiB of resident memory at 512 + 256
tokens (docs/memory.md). The cache never goes through numpy. Only logits come back, written straight
into a numpy buffer we bind (no copy): the last position's only, where the bundle has the exporter's
`logits_to_keep` input, else every position's, of which a prefill keeps the last row.

Bindings persist between steps: a name bound again replaces its value, so a decode step rebinds only the
small inputs (ids, mask, positions); the KV buffers and the logits buffer stay bound until they change.
With everything rebound and a fresh logits buffer every step, gemma-3-270m spent 0.43 ms of a 9 ms step in
Python between two runs; now 0.19 ms (docs/memory.md).

Sliding-window models (gemma3_text, exaone4) keep the full KV in these graphs; the window is
applied by the graph (GQA's `local_window_size`, or the mask Optimum's graph builds), so nothing is trimmed here.
But the CPU kernel multiplies the query with every cached position before it masks, so where the manifest
names a `kv_window_offset` input (exporter/export/kv_window.py) a decode step binds each sliding-window
layer's buffer as a view that starts at most a window back (moving in steps of window/8, so views are
rebound every few dozen tokens, not every step) and feeds that start. Only for batch × KV heads = 1, where
such a view is one contiguous tensor (gemma-3-270m); a prefill sees the whole buffer.
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
        self.kv_dtype = lm.kv_dtype()
        self.length = 0
        self._past: list[ort.OrtValue] = []  # in place: one OrtValue per buffer, bound as past and present
        self._buffers: list[np.ndarray] = []  # in place: [batch, heads, capacity, head_dim] per name
        self._slabs: list[list[np.ndarray]] = [[], []]  # ping-pong: two flat slabs per name
        self._side = 0  # ping-pong: the slab set that holds the past
        self._kv_bound = False  # in place: the buffers are bound as past and present (until they grow)
        self._bound_offset = 0  # where the sliding-window layers' bound views start
        self._views: list[ort.OrtValue] = []  # those views (kept alive while bound)
        info = lm.manifest.model
        self._window_slots: set[int] = set()  # positions in past_names of the layers that get views
        if self.in_place and self.io.kv_window_offset and batch * info.num_kv_heads == 1 and self.io.kv_window:
            self._window_slots = {2 * layer + kind for layer in self.io.kv_window_layers or [] for kind in (0, 1)}
        self._logits: np.ndarray | None = None  # the bound logits buffer, reused while its shape holds
        self._step = StepInputs(lm, batch)
        self._step_bound = False  # the decode-step inputs are the ones bound (a prefill binds its own)
        self.reset()

    def reset(self) -> None:
        """Forget the sequence (the buffers stay allocated)."""
        self.length = 0
        self._side = 0

    @property
    def capacity(self) -> int:
        """Positions the preallocated buffers hold."""
        if self.in_place:
            return self._buffers[0].shape[2] if self._buffers else 0
        return self._slabs[0][0].size // self._position_size if self._slabs[0] else 0

    @property
    def _position_size(self) -> int:
        info = self.lm.manifest.model
        return self.batch * info.num_kv_heads * info.head_dim

    def _shape(self, tokens: int) -> tuple[int, int, int, int]:
        info = self.lm.manifest.model
        return self.batch, info.num_kv_heads, tokens, info.head_dim

    def reserve(self, tokens: int) -> None:
        """Make the buffers hold `tokens` positions, keeping the cached ones (one copy when they grow)."""
        if tokens <= self.capacity:
            return
        if not self.capacity:  # the first allocation: at least what the manifest asks for
            tokens = max(tokens, self.io.kv_buffer_length or 0)
        tokens = min(tokens, self.max_length)
        if self.in_place:
            buffers = [np.zeros(self._shape(tokens), self.kv_dtype) for _ in self.past_names]
            for new, old in zip(buffers, self._buffers):
                new[:, :, :self.length] = old[:, :, :self.length]
            self._buffers = buffers
            self._past = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in buffers]
            self._kv_bound = False
            return
        used = self.length * self._position_size  # the past lies contiguous at the start of its slab
        slabs = [[np.zeros(tokens * self._position_size, self.kv_dtype) for _ in self.past_names] for _ in range(2)]
        for new, old in zip(slabs[self._side], self._slabs[self._side]):
            new[:used] = old[:used]
        self._slabs = slabs

    @property
    def max_length(self) -> int:
        return self.lm.manifest.model.max_positions

    @property
    def first_capacity(self) -> int:
        """Positions allocated at the first call: the manifest's `io.kv_buffer_length`, else 256."""
        return self.io.kv_buffer_length or 256

    def run(self, input_ids: np.ndarray | list[int], chunk: int | None = None) -> np.ndarray:
        """Feed `input_ids` ([batch, seq] or one row) after the cached tokens; return the last logits [batch, vocab].

        `chunk` splits a long prefill into calls of at most that many tokens (runtime.memory.prefill_chunk_for):
        it bounds the attention scores, and the logits of graphs that return every position's.
        The returned logits may be a view of the bound buffer: the next `run` overwrites them (copy to keep).
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.shape[0] != self.batch or ids.shape[1] == 0:
            raise KoedgeError(f"expected input ids of shape [{self.batch}, n>0], got {list(ids.shape)}")
        if self.length + ids.shape[1] > self.max_length:
            raise KoedgeError(f"{self.length + ids.shape[1]} tokens exceed the model's context of {self.max_length}")
        if self.length + ids.shape[1] > self.capacity:
            self.reserve(max(self.length + ids.shape[1], 2 * self.capacity, self.first_capacity))
        step = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            logits = self._call(ids[:, start:start + step])
        return logits

    def _call(self, ids: np.ndarray) -> np.ndarray:
        seq = ids.shape[1]
        binding = self.binding
        offset = self._window_offset(seq)
        if seq == 1:  # a decode step: write into the bound inputs
            self._step.bind(binding, ids, self.length, offset, rebind=not self._step_bound)
            self._step_bound = True
        else:
            feeds = self.lm.feeds(ids, self.length, last_only=True)
            keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for value in feeds.values()]
            for name, value in zip(feeds, keep):  # replaces the previous call's binding of the name
                binding.bind_ortvalue_input(name, value)
            self._step_bound = False
        logits = self._bind_logits(1 if self.lm.keeps_last_logits else seq)
        if self.in_place:  # the same buffer in and out: the kernel appends in place
            if not self._kv_bound or offset != self._bound_offset:
                self._bind_in_place(offset)
        else:  # past from one slab, present into the other
            past_shape, present_shape = list(self._shape(self.length)), list(self._shape(self.length + seq))
            for name, slab in zip(self.past_names, self._slabs[self._side]):
                binding.bind_input(name, "cpu", 0, self.kv_dtype, past_shape, slab.ctypes.data)
            for name, slab in zip(self.present_names, self._slabs[1 - self._side]):
                binding.bind_output(name, "cpu", 0, self.kv_dtype, present_shape, slab.ctypes.data)
        self.lm.session.run_with_iobinding(binding)
        if not self.in_place:
            self._side = 1 - self._side
        self.length += seq
        return logits[:, -1, :].copy() if logits.shape[1] > 1 else logits[:, 0, :]

    def _window_offset(self, seq: int) -> int:
        """Where the sliding-window layers' views start for a call of `seq` tokens: 0 for a prefill, else a
        multiple of window/8 at most `length - window` (the oldest position the window reads, one to spare)."""
        if not self._window_slots or seq != 1:
            return 0
        step = max(1, self.io.kv_window // 8)
        return max(0, (self.length - self.io.kv_window) // step * step)

    def _bind_in_place(self, offset: int) -> None:
        """Bind each buffer as its layer's past and present: from `offset` on for the sliding-window layers."""
        self._views = []
        for slot, (past, present, value) in enumerate(zip(self.past_names, self.present_names, self._past)):
            if offset and slot in self._window_slots:
                view = self._buffers[slot][:, :, offset:, :]
                assert view.flags["C_CONTIGUOUS"]  # one KV head: the view is the buffer's tail
                value = ort.OrtValue.ortvalue_from_numpy(view)
                self._views.append(value)
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self._kv_bound, self._bound_offset = True, offset

    def _bind_logits(self, rows: int) -> np.ndarray:
        """The logits output buffer [batch, rows, vocab]: bound again only when its shape changes."""
        shape = (self.batch, rows, self.vocab)
        if self._logits is None or self._logits.shape != shape:
            self._logits = np.empty(shape, self.logits_dtype)
            self.binding.bind_output(self.io.logits, "cpu", 0, self.logits_dtype, list(shape), self._logits.ctypes.data)
        return self._logits

    def kv_bytes(self) -> int:
        """Bytes the cache holds now (one past or present set; in place: the whole preallocated buffers)."""
        if self.in_place:
            return sum(buffer.nbytes for buffer in self._buffers)
        return len(self.past_names) * self.length * self._position_size * self.kv_dtype.itemsize


class StepInputs:
    """The non-KV inputs of one-token steps (`CausalLM.feeds`), kept bound from step to step: a step writes its
    token, position and window offset into the bound arrays and binds only the attention mask, which grows."""

    def __init__(self, lm: CausalLM, batch: int):
        template = lm.feeds(np.zeros((batch, 1), np.int64), 0, last_only=True)
        self.arrays = {name: np.ascontiguousarray(value) for name, value in template.items() if name != "attention_mask"}
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}
        self.window_input = lm.manifest.io.kv_window_offset
        self.ones = np.ones((batch, 256), np.int64)
        self.mask: ort.OrtValue | None = None

    def bind(self, binding: ort.IOBinding, ids: np.ndarray, length: int, offset: int, rebind: bool) -> None:
        self.arrays["input_ids"][:] = ids
        if "position_ids" in self.arrays:
            self.arrays["position_ids"][:] = length
        if self.window_input:
            self.arrays[self.window_input][:] = offset
        if rebind:
            for name, value in self.values.items():
                binding.bind_ortvalue_input(name, value)
        if self.ones.shape[1] < length + 1:
            self.ones = np.ones((self.ones.shape[0], 2 * (length + 1)), np.int64)
        self.mask = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self.ones[:, :length + 1]))  # batch 1: a view
        binding.bind_ortvalue_input("attention_mask", self.mask)


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

"""A loaded bundle: manifest + onnxruntime session + tokenizer, with a plain numpy step.

The numpy step is the simple, obviously-right path (the exporter's parity check and the
reference for the I/O-binding loop in runtime/kvcache.py); generation uses the bound path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime.bundle import Manifest, read_manifest
from runtime.errors import KoedgeError
from runtime.session import SessionConfig, create_session

Past = dict[str, np.ndarray]


@dataclass
class StepOutput:
    logits: np.ndarray  # [batch, sequence, vocab]
    present: Past = field(default_factory=dict)


class CausalLM:
    """One bundle, ready to run."""

    def __init__(self, folder: str | Path, session_config: SessionConfig | None = None, open_session: bool = True):
        """`open_session=False` defers the onnxruntime session to `open_session()`: a one-prompt run encodes
        its prompt and drops the encoder first, so the full tokenizer and the weights never share the peak."""
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder)
        config = session_config or SessionConfig()
        if config.prepacking is None:
            # bundles written before the manifest field existed say it through their pass names
            quantized = self.manifest.quantized_weights or any(
                record.name.startswith("quantize") for record in self.manifest.passes)
            config = replace(config, prepacking=quantized)
        self._session_config = config
        self.session = None
        self.load_seconds = 0.0
        tokenizer_file = self.folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise KoedgeError(f"bundle {self.folder} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        if open_session:
            self.open_session()

    def open_session(self) -> None:
        """Create the onnxruntime session (once) and check the manifest against the graph."""
        if self.session is not None:
            return
        started = time.perf_counter()
        self.session = create_session(self.folder / self.manifest.onnx_file, self._session_config)
        self.load_seconds += time.perf_counter() - started
        self._check_contract()

    # --- contract -------------------------------------------------------------------------
    def _check_contract(self) -> None:
        declared = set(self.manifest.io.input_names())
        optional = {item.name for item in self.session.get_overridable_initializers()} & declared
        graph_inputs = {item.name for item in self.session.get_inputs()} | optional
        if graph_inputs != declared:
            missing, extra = sorted(declared - graph_inputs), sorted(graph_inputs - declared)
            raise KoedgeError(
                f"manifest does not match the ONNX inputs (manifest only: {missing[:3]}, graph only: {extra[:3]})"
            )

    @property
    def num_layers(self) -> int:
        return self.manifest.model.num_layers

    def kv_names(self, kind: str) -> list[tuple[str, str]]:
        """(key, value) names per layer; kind is 'past' or 'present'."""
        io = self.manifest.io
        key, value = (io.past_key, io.past_value) if kind == "past" else (io.present_key, io.present_value)
        return [(key.format(layer=i), value.format(layer=i)) for i in range(self.num_layers)]

    def kv_dtype(self) -> np.dtype:
        return np.dtype(self.manifest.io.kv_dtype)

    def empty_past(self, batch: int = 1) -> Past:
        info = self.manifest.model
        shape = (batch, info.num_kv_heads, 0, info.head_dim)
        return {name: np.zeros(shape, self.kv_dtype()) for pair in self.kv_names("past") for name in pair}

    # --- tokenizer -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.manifest.tokens.bos_token_id
        if add_bos and bos is not None:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- numpy step ------------------------------------------------------------------------
    @property
    def keeps_last_logits(self) -> bool:
        """Whether the graph can run its LM head on the last position only (exporter's logits_to_keep)."""
        return self.manifest.io.logits_to_keep is not None

    def feeds(self, input_ids: np.ndarray, past_length: int, last_only: bool = False) -> dict[str, np.ndarray]:
        """The non-KV inputs for a step of `input_ids` [batch, seq] after `past_length` tokens.

        `last_only` asks for the last position's logits only, where the graph can (else all positions).
        """
        batch, seq = input_ids.shape
        feeds = {"input_ids": input_ids.astype(np.int64),
                 "attention_mask": np.ones((batch, past_length + seq), np.int64)}
        if self.manifest.io.uses_position_ids:
            positions = np.arange(past_length, past_length + seq, dtype=np.int64)
            feeds["position_ids"] = np.broadcast_to(positions, (batch, seq)).copy()
        if self.keeps_last_logits:  # 1: the LM head on the last position only; 0: every position
            feeds[self.manifest.io.logits_to_keep] = np.full(1, 1 if last_only else 0, np.int64)
        if self.manifest.io.kv_window_offset:  # 0: the sliding-window layers see their whole buffer
            feeds[self.manifest.io.kv_window_offset] = np.zeros(1, np.int64)
        return feeds

    def step(self, input_ids: np.ndarray, past: Past, last_only: bool = False) -> StepOutput:
        """One forward pass, KV cache in and out as numpy arrays; logits of every position unless `last_only`."""
        past_length = next(iter(past.values())).shape[2] if past else 0
        feeds = self.feeds(input_ids, past_length, last_only)
        feeds.update(past)
        present_names = [name for pair in self.kv_names("present") for name in pair]
        outputs = self.session.run([self.manifest.io.logits, *present_names], feeds)
        past_names = [name for pair in self.kv_names("past") for name in pair]
        return StepOutput(outputs[0], dict(zip(past_names, outputs[1:])))

    # --- memory ----------------------------------------------------------------------------
    def release_encoder(self) -> None:
        """Keep only the decoding half of the tokenizer once the prompt is encoded.

        Added for `koedge run` / `validate`: a 262k-piece Unigram tokenizer holds ~220 MiB, a fifth
        of gemma-3-270m's weights; its decoding half ~10 MiB. `encode` raises afterwards.
        """
        from runtime.memory import release_heap
        from runtime.stream import DecodeOnlyTokenizer

        if not isinstance(self.tokenizer, DecodeOnlyTokenizer):
            self.tokenizer = DecodeOnlyTokenizer(self.tokenizer)
            release_heap()

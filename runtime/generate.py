"""Text generation on a bundle: prefill once, then token by token with the KV cache in onnxruntime.

Sampling follows transformers' order and meaning (repetition penalty, temperature, top-k, top-p) so
that greedy output can be checked token for token against `model.generate`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.chat import render_template
from runtime.errors import KoedgeError
from runtime.kvcache import BoundCache, NumpyCache
from runtime.memory import prefill_chunk_for, prefill_heap
from runtime.model import CausalLM
from runtime.session import SessionConfig
from runtime.stream import TextStream


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (transformers' CTRL-style penalty)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    stop_token_ids: list[int] = field(default_factory=list)  # more ids that end generation (a chat's end of turn)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise KoedgeError("--max-new-tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise KoedgeError("sampling needs temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition penalty > 0")


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids (an EOS that ended generation included)
    text: str  # generated text, cut at a stop string
    stop_reason: str  # eos | stop | length | context
    load_seconds: float
    prefill_seconds: float
    ttft_seconds: float  # prompt in -> first token out (prefill + first sampling)
    decode_seconds: float  # after the first token
    kv_bytes: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def timing_line(self) -> str:
        return (f"load {self.load_seconds:.2f} s · prompt {len(self.prompt_tokens)} tok · "
                f"TTFT {self.ttft_seconds * 1000:.0f} ms · {len(self.tokens)} tok at "
                f"{self.decode_tokens_per_second:.1f} tok/s · stop: {self.stop_reason}")


class Sampler:
    """Next-token choice from one row of logits."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, seen: list[int]) -> int:
        if self.config.temperature == 0 and self.config.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # plain greedy: no copy of the (262k-wide) row
        scores = self.process(logits, seen)
        if self.config.temperature == 0:
            return int(np.argmax(scores))
        probs = _softmax(scores)
        return int(self.rng.choice(probs.size, p=probs))

    def process(self, logits: np.ndarray, seen: list[int]) -> np.ndarray:
        """Scores after penalty, temperature, top-k and top-p (-inf where a token is ruled out)."""
        config = self.config
        scores = logits.astype(np.float32, copy=True)
        if config.repetition_penalty != 1.0 and seen:
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            picked = scores[ids]
            scores[ids] = np.where(picked < 0, picked * config.repetition_penalty, picked / config.repetition_penalty)
        if config.temperature == 0:
            return scores
        scores /= config.temperature
        if config.top_k and config.top_k < scores.size:
            kth = np.partition(scores, -config.top_k)[-config.top_k]
            scores[scores < kth] = -np.inf
        if config.top_p < 1.0:
            order = np.argsort(scores, kind="stable")  # ascending, as transformers' TopPLogitsWarper
            probs = _softmax(scores[order])
            drop = np.cumsum(probs) <= (1 - config.top_p)
            drop[-1] = False  # keep at least the most likely token
            scores[order[drop]] = -np.inf
        return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x))
    return shifted / shifted.sum()


class Generator:
    """A bundle plus its KV cache; `generate` may be called repeatedly (a chat reuses the cached prefix)."""

    def __init__(self, lm: CausalLM, io_binding: bool = True, prefill_chunk: int | str | None = "auto"):
        """`prefill_chunk`: tokens per prefill call; "auto" bounds a call's logits (runtime.memory), 0 = one call."""
        self.lm = lm
        self.cache = BoundCache(lm) if io_binding else NumpyCache(lm)
        self.prefill_chunk = prefill_chunk_for(lm.manifest, prefill_chunk)
        self.cached: list[int] = []  # tokens whose KV is in the cache
        self.eos = set(lm.manifest.tokens.eos_token_ids)

    @property
    def context(self) -> int:
        return self.lm.manifest.model.max_positions

    def generate(self, prompt: list[int], config: SamplingConfig | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        config = config or SamplingConfig()
        config.check()
        self.check_prompt(prompt)
        sampler = Sampler(config)
        eos = self.eos | set(config.stop_token_ids) if config.stop_at_eos else set()
        stream = TextStream(self.lm.decode, stop=config.stop, context=prompt[-4:])
        if isinstance(self.cache, BoundCache):  # its buffers are allocated once for the whole run
            self.cache.reserve(len(prompt) + config.max_new_tokens)
        started = time.perf_counter()
        logits = self._prefill(prompt)
        prefill_seconds = time.perf_counter() - started
        tokens: list[int] = []
        reason, first_at = "length", None
        penalized = config.repetition_penalty != 1.0  # only a penalty reads the tokens seen so far
        # Text is needed per step only to stream it or to find a stop string; else it is decoded once at the end
        # (the same TextStream, fed the same tokens: the same text). Per step it cost ~85 µs of a ~9 ms step.
        streaming = on_text is not None or bool(config.stop)
        while True:
            token = sampler(logits[0], prompt + tokens if penalized else [])
            tokens.append(token)
            if first_at is None:
                first_at = time.perf_counter()
            if token in eos:
                reason = "eos"
                break
            if streaming:
                if (piece := stream.push(token)) and on_text:
                    on_text(piece)
                if stream.stopped:
                    reason = "stop"
                    break
            if len(tokens) >= config.max_new_tokens:
                break
            if self.cache.length + 1 > self.context:
                reason = "context"
                break
            logits = self.cache.run([token])
            self.cached.append(token)
        ended = time.perf_counter()
        if not streaming:
            for token in tokens[:-1] if reason == "eos" else tokens:
                stream.push(token)
        if (tail := stream.finish()) and on_text:
            on_text(tail)
        return GenerationResult(prompt_tokens=list(prompt), tokens=tokens, text=stream.text, stop_reason=reason,
                                load_seconds=self.lm.load_seconds, prefill_seconds=prefill_seconds,
                                ttft_seconds=first_at - started, decode_seconds=ended - first_at,
                                kv_bytes=self.cache.kv_bytes())

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise KoedgeError("the prompt is empty")
        if len(prompt) >= self.context:
            raise KoedgeError(f"the prompt has {len(prompt)} tokens; the model's context is {self.context}")

    def _prefill(self, prompt: list[int]) -> np.ndarray:
        """Run the prompt; when the cache already holds a prefix of it (a chat), run only the rest."""
        shared = len(self.cached) if self.cached and prompt[:len(self.cached)] == self.cached else 0
        if shared == len(prompt):
            shared = 0  # nothing new to run: we need the logits of the last prompt token again
        if not shared:
            self.cache.reset()
            self.cached = []
        with prefill_heap():
            logits = self.cache.run(np.array([prompt[shared:]]), chunk=self.prefill_chunk)
        self.cached = list(prompt)
        return logits


def load(folder: str | Path, session_config: SessionConfig | None = None, open_session: bool = True) -> CausalLM:
    """Open a bundle; `load_seconds` covers the whole load (tokenizer and session, also when the session
    is opened later with `lm.open_session()`)."""
    started = time.perf_counter()
    lm = CausalLM(folder, session_config, open_session=False)
    lm.load_seconds = time.perf_counter() - started
    if open_session:
        lm.open_session()
    return lm


# --- chat template -----------------------------------------------------------------------------

# End-of-turn markers of Korean-relevant chat templates; a GGUF-derived bundle may list only <eos>.
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endofturn|>", "</s>")


def end_of_turn_ids(lm: CausalLM) -> list[int]:
    """Ids of the end-of-turn tokens this vocabulary has: a chat reply stops at them."""
    ids = (lm.tokenizer.token_to_id(token) for token in END_OF_TURN)
    return sorted({index for index in ids if index is not None})


def chat_template(lm: CausalLM) -> str | None:
    """The tokenizer's chat template: tokenizer_config.json's `chat_template` or chat_template.jinja."""
    config_file = lm.folder / "tokenizer_config.json"
    template = None
    if config_file.is_file():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = lm.folder / "chat_template.jinja"
    if not template and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return template or None


def render_chat(lm: CausalLM, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` through the bundle's chat template, ready for the assistant's turn."""
    template = chat_template(lm)
    if template is None:
        raise KoedgeError(f"bundle {lm.folder} has no chat template; run without --chat")
    tokens = lm.manifest.tokens
    bos = lm.tokenizer.id_to_token(tokens.bos_token_id) if tokens.bos_token_id is not None else ""
    eos = lm.tokenizer.id_to_token(tokens.eos_token_ids[0]) if tokens.eos_token_ids else ""
    text = render_template(template, messages, bos or "", eos or "")
    return lm.tokenizer.encode(text, add_special_tokens=False).ids  # the template writes BOS itself

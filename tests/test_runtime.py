"""The runner: greedy output equals transformers, the bound KV path equals the numpy path, streaming never
prints half a character, sampling is reproducible, errors are one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime.errors import KoedgeError
from runtime.generate import Generator, Sampler, SamplingConfig, load
from runtime.kvcache import BoundCache, NumpyCache
from runtime.stream import REPLACEMENT, TextStream
from tiny_models import ARCHITECTURES, SLIDING_WINDOW

KOREAN_PROMPT = "대한민국의 수도는 서울이다. 안녕하세요, 반갑습니다. 오늘 날씨가"
# Words the tiny tokenizer never saw, so their syllables are split into single UTF-8 bytes.
UNSEEN_KOREAN = "똠방각하 뷁 햏햏 쀍 궯 얘들아, 괜찮니? 읽었읍니다 😀 끝."


def _transformers_greedy(checkpoint, ids: list[int], new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # 64 tokens even if EOS comes up, as our stop_at_eos=False
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_equals_transformers(arch, tiny_bundles, tiny_checkpoints):
    lm = load(tiny_bundles[arch])
    ids = lm.encode(KOREAN_PROMPT)
    assert len(ids) > SLIDING_WINDOW  # the prompt alone crosses the tiny sliding window
    result = Generator(lm).generate(ids, SamplingConfig(max_new_tokens=64, stop_at_eos=False))
    assert result.tokens == _transformers_greedy(tiny_checkpoints[arch], ids, 64)
    assert result.stop_reason == "length" and len(result.tokens) == 64


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen2", "gpt_neox"])
def test_bound_cache_equals_numpy_path(arch, tiny_bundles):
    lm = load(tiny_bundles[arch])
    ids = lm.encode(KOREAN_PROMPT)
    bound, plain = BoundCache(lm), NumpyCache(lm)
    a, b = bound.run(ids), plain.run(ids)
    np.testing.assert_array_equal(a, b)
    for _ in range(20):
        token = int(a[0].argmax())
        a, b = bound.run([token]), plain.run([token])
        if bound._bound_offset:  # sliding-window views: the local layers sum fewer (zero-weight) positions
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)
    assert bound.length == plain.length == len(ids) + 20
    if bound.in_place:  # fused export: the whole preallocated buffer
        assert bound.kv_bytes() == plain.kv_bytes() // bound.length * bound.capacity > 0
    else:
        assert bound.kv_bytes() == plain.kv_bytes() > 0
    config = SamplingConfig(max_new_tokens=40, stop_at_eos=False)
    assert Generator(lm).generate(ids, config).tokens == Generator(lm, io_binding=False).generate(ids, config).tokens


def test_ping_pong_slabs_grow_and_keep_the_cache(tiny_bundles):
    """The two preallocated slabs per layer grow (one copy) when a sequence outgrows them."""
    lm = load(tiny_bundles["llama"])
    ids = lm.encode(KOREAN_PROMPT)
    bound, plain = BoundCache(lm), NumpyCache(lm)
    bound.reserve(len(ids) + 3)
    assert bound.capacity == len(ids) + 3
    np.testing.assert_array_equal(bound.run(ids), plain.run(ids))
    for token in range(10, 22):  # past the reserved capacity, across the swap of the slabs
        np.testing.assert_array_equal(bound.run([token]), plain.run([token]))
    assert bound.capacity >= 2 * (len(ids) + 3) and bound.length == len(ids) + 12
    bound.reset()
    plain.reset()
    np.testing.assert_array_equal(bound.run(ids[:5]), plain.run(ids[:5]))


def test_chunked_prefill_gives_the_same_logits(tiny_bundles):
    lm = load(tiny_bundles["gemma3_text"])
    ids = lm.encode(KOREAN_PROMPT)
    whole, chunked = BoundCache(lm), BoundCache(lm)
    np.testing.assert_allclose(whole.run(ids), chunked.run(ids, chunk=7), atol=1e-5)
    np.testing.assert_allclose(whole.run([5]), chunked.run([5]), atol=1e-5)


def test_chat_turns_reuse_the_cached_prefix(tiny_bundles):
    lm = load(tiny_bundles["llama"])
    generator = Generator(lm)
    config = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
    first = generator.generate(lm.encode("안녕하세요"), config)
    follow_up = first.prompt_tokens + first.tokens[:-1] + lm.encode("오늘 날씨가", add_bos=False)
    fed = []
    run = generator.cache.run
    generator.cache.run = lambda ids, chunk=None: fed.append(np.asarray(ids).size) or run(ids, chunk)
    again = generator.generate(follow_up, config)
    assert fed[0] == len(follow_up) - len(first.prompt_tokens) - 7  # only the new turn was run
    fresh = Generator(lm).generate(follow_up, config)
    assert again.tokens == fresh.tokens


def test_stream_never_emits_broken_hangul(tiny_bundles):
    lm = load(tiny_bundles["llama"])
    ids = lm.encode(UNSEEN_KOREAN, add_bos=False)
    pieces = [lm.decode([token]) for token in ids]
    assert any(REPLACEMENT in piece for piece in pieces)  # tokens really do split syllables
    stream = TextStream(lm.decode)
    chunks = [stream.push(token) for token in ids] + [stream.finish()]
    assert all(REPLACEMENT not in chunk for chunk in chunks)
    assert "".join(chunks) == UNSEEN_KOREAN == stream.text
    assert chunks.count("") > 0  # it waited for the rest of a character at least once


def test_stream_keeps_leading_space_and_cuts_at_stop(tiny_bundles):
    lm = load(tiny_bundles["llama"])
    prompt = lm.encode("안녕하세요,", add_bos=False)
    full = lm.encode("안녕하세요, 반갑습니다. 오늘 날씨가 정말 좋네요.", add_bos=False)
    new = full[len(prompt):]
    stream = TextStream(lm.decode, context=prompt[-4:])
    assert "".join(stream.push(t) for t in new) + stream.finish() == " 반갑습니다. 오늘 날씨가 정말 좋네요."
    stream = TextStream(lm.decode, stop=["날씨"], context=prompt[-4:])
    shown = "".join(stream.push(t) for t in new) + stream.finish()
    assert shown == " 반갑습니다. 오늘 " and stream.stopped


@pytest.mark.parametrize("ends_on_a_stop_token", [False, True])
def test_text_decoded_at_the_end_equals_the_streamed_text(tiny_bundles, ends_on_a_stop_token):
    """Without a listener or stop strings the text is decoded once after the loop: the same text, the ending
    stop token left out."""
    lm = load(tiny_bundles["qwen2"])
    ids = lm.encode(KOREAN_PROMPT)
    config = SamplingConfig(max_new_tokens=40, stop_at_eos=False)
    if ends_on_a_stop_token:
        config = SamplingConfig(max_new_tokens=40, stop_token_ids=[Generator(lm).generate(ids, config).tokens[12]])
    pieces: list[str] = []
    streamed = Generator(lm).generate(ids, config, on_text=pieces.append)
    quiet = Generator(lm).generate(ids, config)
    assert quiet.tokens == streamed.tokens and quiet.stop_reason == streamed.stop_reason
    assert quiet.stop_reason == ("eos" if ends_on_a_stop_token else "length")
    assert quiet.text == streamed.text == "".join(pieces) and quiet.text


def test_generation_stops_at_stop_string(tiny_bundles):
    lm = load(tiny_bundles["qwen2"])
    ids = lm.encode(KOREAN_PROMPT)
    free = Generator(lm).generate(ids, SamplingConfig(max_new_tokens=30, stop_at_eos=False))
    stop = next(c for c in free.text[len(free.text) // 2:] if c not in REPLACEMENT + " \n")  # a random model's text
    stopped = Generator(lm).generate(ids, SamplingConfig(max_new_tokens=30, stop_at_eos=False, stop=[stop]))
    assert stopped.stop_reason == "stop"
    assert stopped.text == free.text[:free.text.index(stop)]
    assert stopped.tokens == free.tokens[:len(stopped.tokens)]


def test_eos_from_manifest_ends_generation(tiny_bundles):
    lm = load(tiny_bundles["llama"])  # its greedy output reaches EOS (id 1) at once on this prompt
    eos = lm.manifest.tokens.eos_token_ids
    result = Generator(lm).generate(lm.encode(KOREAN_PROMPT), SamplingConfig(max_new_tokens=64))
    assert result.stop_reason == "eos" and result.tokens[-1] in eos and len(result.tokens) < 64


def test_sampling_is_reproducible_with_a_seed(tiny_bundles):
    lm = load(tiny_bundles["gemma3_text"])
    ids = lm.encode(KOREAN_PROMPT)

    def sample(seed: int) -> list[int]:
        config = SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=seed,
                                repetition_penalty=1.1, stop_at_eos=False)
        return Generator(lm).generate(ids, config).tokens

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_sampler_matches_transformers_processors():
    import torch
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=400) * 3).astype(np.float32)
    seen = [int(i) for i in rng.integers(0, 400, 30)]
    ours = Sampler(SamplingConfig(repetition_penalty=1.3, temperature=0.7, top_k=50, top_p=0.9)).process(logits, seen)
    ids, theirs = torch.tensor([seen]), torch.tensor(logits)[None]
    for processor in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(50),
                      TopPLogitsWarper(0.9)):
        theirs = processor(ids, theirs)
    np.testing.assert_allclose(ours, theirs[0].numpy(), rtol=1e-6)
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=0))(logits, seen) == int(np.argmax(logits))


def test_release_encoder_keeps_decoding_identical(tiny_bundles):
    lm = load(tiny_bundles["gemma3_text"])
    ids = lm.encode(UNSEEN_KOREAN + " </s> <s>")
    before = [lm.decode(ids), lm.tokenizer.decode(ids, skip_special_tokens=False)]
    pieces = [lm.tokenizer.id_to_token(index) for index in ids]
    specials = [lm.tokenizer.token_to_id(token) for token in ("</s>", "<s>", pieces[3])]
    lm.release_encoder()
    assert [lm.decode(ids), lm.tokenizer.decode(ids, skip_special_tokens=False)] == before
    assert [lm.tokenizer.id_to_token(index) for index in ids] == pieces
    assert [lm.tokenizer.token_to_id(token) for token in ("</s>", "<s>", pieces[3])] == specials
    with pytest.raises(KoedgeError, match="released"):
        lm.encode("안녕")


# --- errors ------------------------------------------------------------------------------------

def test_not_a_bundle(tmp_path):
    with pytest.raises(KoedgeError, match="not a koedge bundle"):
        load(tmp_path)


def test_manifest_that_does_not_match_the_graph(tiny_bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundles["llama"], broken)
    manifest = json.loads((broken / "koedge.json").read_text())
    manifest["io"]["inputs"][0]["name"] = "token_ids"
    (broken / "koedge.json").write_text(json.dumps(manifest))
    with pytest.raises(KoedgeError, match="does not match the ONNX inputs"):
        load(broken)


def test_prompt_longer_than_context(tiny_bundles):
    lm = load(tiny_bundles["qwen2"])
    context = lm.manifest.model.max_positions
    with pytest.raises(KoedgeError, match="context"):
        Generator(lm).generate([5] * (context + 3))
    result = Generator(lm).generate([5] * (context - 4), SamplingConfig(max_new_tokens=50, stop_at_eos=False))
    assert result.stop_reason == "context" and len(result.tokens) == 5


def _koedge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_cli_run_streams_and_times(tiny_bundles):
    done = _koedge("run", str(tiny_bundles["gemma3_text"]), "대한민국의 수도는", "--max-new-tokens", "12",
                   "--ignore-eos", "-v")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("대한민국의 수도는")
    assert "TTFT" in done.stderr and "tok/s" in done.stderr and "peak RSS" in done.stderr


def test_cli_errors_are_one_line(tiny_bundles, tmp_path):
    done = _koedge("run", str(tmp_path), "안녕")
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "not a koedge bundle" in done.stderr
    done = _koedge("run", str(tiny_bundles["llama"]), "안녕", "--chat")
    assert done.returncode == 1 and "no chat template" in done.stderr


def test_cli_chat_exits_cleanly_at_eof(tiny_bundles):
    done = _koedge("chat", str(tiny_bundles["llama"]), "--max-new-tokens", "5", stdin="안녕하세요\n오늘 날씨\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("tok/s") == 2


def test_chat_template_renders_with_jinja(tiny_bundles, tmp_path):
    pytest.importorskip("jinja2")
    from runtime.generate import render_chat

    bundle = tmp_path / "templated"
    shutil.copytree(tiny_bundles["qwen2"], bundle)
    config = json.loads((bundle / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>"
                              "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}")
    (bundle / "tokenizer_config.json").write_text(json.dumps(config))
    lm = load(bundle)
    messages = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네"},
                {"role": "user", "content": "?"}]
    ids = render_chat(lm, messages)
    assert ids[0] == lm.manifest.tokens.bos_token_id
    assert (lm.tokenizer.decode(ids, skip_special_tokens=False)
            == "<s><s>user: 안녕</s><s>assistant: 네</s><s>user: ?</s><s>assistant:")
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(bundle).apply_chat_template(messages, add_generation_prompt=True)
    assert ids == list(expected)
    done = _koedge("run", str(bundle), "안녕", "--chat", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr


# --- gemma-3-270m (slow) -----------------------------------------------------------------------

@pytest.mark.slow
def test_gemma_greedy_equals_transformers(gemma_bundle, gemma_checkpoint):
    """64 greedy tokens on a Korean prompt and on one past the 512-token sliding window."""
    import torch

    from exporter.export.convert import load_torch_model
    from runtime.validate import prompt_ids

    model = load_torch_model(gemma_checkpoint)
    model.generation_config.eos_token_id = None
    lm = load(gemma_bundle)
    window = lm.manifest.model.sliding_window
    for ids in (lm.encode("대한민국의 수도는"), prompt_ids(lm, window + 64)):
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
        result = Generator(lm).generate(ids, SamplingConfig(max_new_tokens=64, stop_at_eos=False))
        assert result.tokens == expected, f"prompt of {len(ids)} tokens"

"""Logit parity between the torch model and the exported bundle, through the runtime's numpy step."""

from __future__ import annotations

import numpy as np

from runtime.errors import KoedgeError

KOREAN_PROMPT = "대한민국의 수도는 서울이다. 서울은 한강을 끼고 있으며, 인구는 약 천만 명이다."
KOREAN_PARAGRAPH = (
    "한국어는 교착어로서 조사와 어미가 발달하였다. 훈민정음은 1443년 세종대왕이 창제하였으며, "
    "오늘날 한글로 불린다. 스마트폰에서 돌아가는 작은 언어 모델은 메모리와 배터리를 아껴야 한다. "
)


def _torch_steps(model, ids: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Prefill + greedy decode in torch; returns the logits of each call and the tokens fed."""
    import torch

    logits_per_call, fed = [], []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits_per_call.append(out.logits.float().numpy())
        past = out.past_key_values
        for _ in range(steps):
            token = int(out.logits[0, -1].argmax())
            fed.append(token)
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits_per_call.append(out.logits.float().numpy())
    return logits_per_call, fed


def _onnx_steps(runner, ids: list[int], fed: list[int]) -> list[np.ndarray]:
    past = runner.empty_past()
    logits_per_call = []
    out = runner.step(np.array([ids]), past)
    logits_per_call.append(out.logits.astype(np.float32))
    for token in fed:
        out = runner.step(np.array([[token]]), out.present)
        logits_per_call.append(out.logits.astype(np.float32))
    return logits_per_call


def compare(name: str, model, runner, ids: list[int], steps: int) -> dict:
    reference, fed = _torch_steps(model, ids, steps)
    exported = _onnx_steps(runner, ids, fed)
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(reference, exported)]
    same = all(int(a[0, -1].argmax()) == int(b[0, -1].argmax()) for a, b in zip(reference, exported))
    if runner.keeps_last_logits:  # the generation path: LM head on the last position only
        last = runner.step(np.array([ids]), runner.empty_past(), last_only=True).logits
        if last.shape[1] != 1:
            raise KoedgeError(f"logits_to_keep=1 returned {last.shape[1]} positions")
        diffs.append(float(np.max(np.abs(last[0, -1] - reference[0][0, -1]))))
    return {"name": name, "tokens": len(ids), "decode_steps": steps, "max_abs_diff": max(diffs),
            "prefill_max_abs_diff": diffs[0], "same_argmax": same}


def check_parity(model, runner, config) -> dict:
    """Prefill + decode on a Korean prompt; also past the sliding window when the model has one."""
    cases = [compare("korean prompt", model, runner, runner.encode(KOREAN_PROMPT), config.parity_decode_steps)]
    window = runner.manifest.model.sliding_window
    if window and config.parity_long_prompt:
        target = window + 64
        text = KOREAN_PARAGRAPH
        while len(runner.encode(text)) < target:
            text += KOREAN_PARAGRAPH
        ids = runner.encode(text)[:target]
        cases.append(compare(f"long prompt past window {window}", model, runner, ids, config.parity_decode_steps))
    return {"cases": cases}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x.astype(np.float64) - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare_bundles(reference_folder, candidate_folder, steps: int = 8) -> dict:
    """A bundle against another of the same model (GGUF-exact vs its FP32 export): logits on a Korean prompt
    (prefill) and the greedy tokens of `steps` decode steps each generates on its own."""
    from runtime.model import CausalLM

    reference, candidate = CausalLM(reference_folder), CausalLM(candidate_folder)
    ids = reference.encode(KOREAN_PROMPT)
    p = _log_softmax(reference.step(np.array([ids]), reference.empty_past()).logits[0])
    q = _log_softmax(candidate.step(np.array([ids]), candidate.empty_past()).logits[0])
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())

    def greedy(runner) -> list[int]:
        out, tokens = runner.step(np.array([ids]), runner.empty_past()), []
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = runner.step(np.array([[tokens[-1]]]), out.present)
        return tokens

    return {"tokens": len(ids), "max_abs_diff": float(np.max(np.abs(p - q))),  # of log-probabilities
            "kl": kl, "same_top1": float((p.argmax(-1) == q.argmax(-1)).mean()),
            "same_greedy": greedy(reference) == greedy(candidate)}

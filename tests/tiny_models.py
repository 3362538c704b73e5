"""Tiny random checkpoints of every supported architecture, built in seconds for tests."""

from __future__ import annotations

from pathlib import Path

KOREAN_LINES = [
    "대한민국의 수도는 서울이다.", "안녕하세요, 반갑습니다.", "오늘 날씨가 정말 좋네요.",
    "이 영화 진짜 재밌어요! 강추합니다.", "한국어 언어 모델을 휴대폰에서 돌립니다.",
    "훈민정음은 세종대왕이 만들었다.", "배가 고파서 김치찌개를 먹었다.", "The quick brown fox 123.",
]
SLIDING_WINDOW = 16  # tiny window so a short prompt already crosses it


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(KOREAN_LINES * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(architecture: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    if architecture == "gpt_neox":
        return tf.GPTNeoXConfig(**common, rotary_pct=0.5)
    if architecture == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if architecture == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2)
    if architecture == "qwen3":  # QK-norm, like Gemma 3
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if architecture == "gemma3_text":
        return tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, num_key_value_heads=1, head_dim=32,
                                   sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    if architecture == "exaone4":
        return tf.Exaone4Config(**{**common, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=16,
                                sliding_window=SLIDING_WINDOW, sliding_window_pattern=4,
                                layer_types=["sliding_attention"] * 3 + ["full_attention"])
    raise ValueError(architecture)


ARCHITECTURES = ("gpt_neox", "llama", "qwen2", "qwen3", "gemma3_text", "exaone4")


def make_tiny_checkpoint(architecture: str, folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(architecture, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if architecture == "gemma3_text":  # random init gives near-zero norms weights; make logits lively
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

"""The plain-string chat turn format the exporter stores for the phone app equals the template's own rendering."""

from __future__ import annotations

import pytest

from runtime.chat import ChatFormat, derive_chat_format, render_template
from runtime.errors import KoedgeError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# The system prompt only on turns after the first: not fixed text around the messages.
VARYING = ("{% for message in messages %}{% if loop.index > 1 %}[{{ loop.index }}]{% endif %}"
           "{{ message['content'] }}|{% endfor %}")


@pytest.mark.parametrize("template", [CHATML, GEMMA])
def test_format_renders_like_the_template(template):
    format = derive_chat_format(template, "<bos>", "<eos>")
    assert format is not None
    turns = ["안녕하세요?", "네, 안녕하세요.", "서울의 날씨는?"]
    messages = [{"role": role, "content": text} for role, text in zip(["user", "assistant", "user"], turns)]
    assert format.prompt(turns) == render_template(template, messages, "<bos>", "<eos>")
    assert format.prompt(turns[:1]) == render_template(template, messages[:1], "<bos>", "<eos>")


def test_gemma_format_parts():
    format = derive_chat_format(GEMMA, "<bos>", "<eos>")
    assert format == ChatFormat("<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n",
                                "<end_of_turn>\n<start_of_turn>user\n")


def test_templates_without_fixed_turns_get_no_format():
    assert derive_chat_format(VARYING, "", "") is None
    assert derive_chat_format("{{ raise_exception('no') }}", "", "") is None


def test_prompt_must_end_with_a_user_turn():
    with pytest.raises(KoedgeError):
        ChatFormat("", "", "").prompt(["user", "assistant"])

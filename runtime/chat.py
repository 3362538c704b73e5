"""Chat turns: the tokenizer's own Jinja template, and the plain-string turn format the phone app uses.

The app has no template engine, so the exporter renders the template once with placeholder messages
and stores the text around them in the manifest (`tokens.chat_format`). Templates whose turns are not
plain text around the message (a system prompt that changes per turn, say) get no format: the
manifest then says None and the app offers plain completion only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from runtime.errors import KoedgeError

_USER, _REPLY, _NEXT = "\ue000", "\ue001", "\ue002"  # private-use characters no template writes


@dataclass
class ChatFormat:
    first_user_prefix: str  # before the first user message (system prompt, BOS text if the template writes it)
    assistant_prefix: str  # after a user message, up to where the assistant's reply starts
    next_user_prefix: str  # after an assistant reply, up to the next user message

    def prompt(self, turns: list[str]) -> str:
        """user, assistant, user, ... (odd count): the text that asks for the next assistant reply."""
        if len(turns) % 2 != 1:
            raise KoedgeError("a chat prompt ends with a user turn")
        text = self.first_user_prefix + turns[0] + self.assistant_prefix
        for reply, user in zip(turns[1::2], turns[2::2]):
            text += reply + self.next_user_prefix + user + self.assistant_prefix
        return text

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def render_template(template: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    """The template rendered as transformers renders it (sandboxed Jinja, generation prompt added)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise KoedgeError("chat templates need jinja2: pip install jinja2") from err

    def raise_exception(message: str) -> None:
        raise KoedgeError(f"chat template: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                        bos_token=bos, eos_token=eos)
    except TemplateError as err:
        raise KoedgeError(f"chat template failed: {err}") from err


def derive_chat_format(template: str, bos: str, eos: str) -> ChatFormat | None:
    """The turn format of `template`, or None when its turns are not fixed text around the messages."""
    try:
        one = render_template(template, [{"role": "user", "content": _USER}], bos, eos)
        three = render_template(template, [{"role": "user", "content": _USER},
                                           {"role": "assistant", "content": _REPLY},
                                           {"role": "user", "content": _NEXT}], bos, eos)
    except KoedgeError:
        return None
    if one.count(_USER) != 1 or any(three.count(mark) != 1 for mark in (_USER, _REPLY, _NEXT)):
        return None
    first, after_user = one.split(_USER)
    chat = ChatFormat(first, after_user, three.split(_REPLY)[1].split(_NEXT)[0])
    return chat if chat.prompt([_USER, _REPLY, _NEXT]) == three else None

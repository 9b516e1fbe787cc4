"""Turning chat messages into the prompt text the model was trained on.

A checkpoint's `tokenizer_config.json` carries its `chat_template` (Jinja); rendering it the way
Hugging Face `transformers` does (sandboxed Jinja, `trim_blocks`/`lstrip_blocks`, a
`raise_exception` helper, `add_generation_prompt`) gives the same prompt the model saw in training.
Models without a template (the built-in random-weight ones) use `PLAIN_TEMPLATE`, documented here so
clients can predict the prompt:

    <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n

one block per message, then an open assistant block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import invalid

PLAIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplate:
    """A compiled chat template; compile once at start-up so a broken template fails the start."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # jinja2 comes with torch/transformers; without it only the plain form
            if source:
                raise RuntimeError(
                    "the model's chat_template needs jinja2 to render; install jinja2 (pip install jinja2)"
                ) from exc
            self._template = None
            self._template_error: type[Exception] = Exception
        else:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(source or PLAIN_TEMPLATE)
            self._template_error = TemplateError
        self.source = source or PLAIN_TEMPLATE
        self.is_plain = not source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               **template_kwargs: Any) -> str:
        """`template_kwargs`: vLLM's `chat_template_kwargs` (e.g. enable_thinking), extra template variables."""
        if self._template is None:
            return _render_plain(messages, add_generation_prompt)
        try:
            reserved = ("messages", "add_generation_prompt", "bos_token", "eos_token")
            return self._template.render(
                **{k: v for k, v in template_kwargs.items() if k not in reserved},
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except _TemplateRefusal as exc:
            # The template itself refused the conversation (e.g. roles not alternating): the client's fault.
            raise invalid(f"the model's chat template refused these messages: {exc}", "messages") from None
        except self._template_error as exc:
            raise invalid(f"the model's chat template could not render these messages: {exc}", "messages") \
                from None


class _TemplateRefusal(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRefusal(message)


def _render_plain(messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")

"""Chat templates: a conversation rendered to the prompt text an instruct model was trained on.

Instruct checkpoints carry a jinja2 template (``chat_template.jinja``,
``tokenizer_config.json`` or the GGUF metadata). It is rendered here exactly as
``transformers``' ``apply_chat_template(tokenize=False)`` renders it: in a
sandbox (templates come with downloaded files, so they are untrusted code),
with ``trim_blocks`` and ``lstrip_blocks`` (templates are written for them:
without them a template's own line breaks land in the prompt), and with the
helpers templates call (``raise_exception``, ``strftime_now``, a ``tojson`` that
does not HTML-escape) and the ``bos_token`` / ``eos_token`` variables.

The rendered text already holds the special tokens the template writes, so it
is tokenized without adding any (``add_special_tokens=False``, as transformers
does): a template that writes BOS gets exactly one.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence, Union

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """A model without a chat template, a malformed conversation, or a template that refused it."""


def render_chat(model_or_template: Any, messages: Sequence[Message], add_generation_prompt: bool = True,
                **extra: Any) -> str:
    """The conversation ``messages`` (a list of ``{"role", "content"}`` dicts) as the model's prompt text.

    ``model_or_template`` is a loaded ``Model`` (its ``chat_template``, ``bos_token`` and
    ``eos_token``) or the template source itself. ``add_generation_prompt`` ends the text with the
    header of an assistant turn, so the model writes the reply. ``extra`` variables reach the
    template as they do through ``apply_chat_template(**kwargs)`` (they override the special tokens).
    """
    import jinja2

    template, tokens = _template_and_tokens(model_or_template)
    conversation = validate_messages(messages)
    variables = {**tokens, "tools": None, "documents": None, **extra}
    try:
        return _compile(template).render(messages=conversation, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused this conversation: {e}") from e


def encode_chat(model: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """A conversation as the token ids the model reads: rendered with its template, tokenized
    without adding special tokens (the template writes the ones it wants, BOS included)."""
    if getattr(model, "tokenizer", None) is None:
        raise ChatTemplateError("this model has no tokenizer: chat messages need one to become token ids")
    text = render_chat(model, messages, add_generation_prompt)
    return list(model.tokenizer.encode(text, add_special_tokens=False).ids)


def has_chat_template(model: Any) -> bool:
    """Whether ``model`` carries a chat template (instruct checkpoints do, base models usually not)."""
    return bool(getattr(model, "chat_template", None))


def validate_messages(messages: Any) -> list[dict]:
    """``messages`` as plain dicts, or a ``ChatTemplateError`` naming what is wrong.

    A conversation is a non-empty list of dicts, each with a string ``role`` and a string
    ``content``; other keys pass through, and keys whose value is None are dropped (as
    transformers does: templates handle a missing key better than a None).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                f"got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages is empty: a conversation needs at least one message")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', "
                                    f"got {type(message).__name__}: {message!r:.80}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ChatTemplateError(f"messages[{i}] needs a string {key!r}, got {message!r:.80}")
        conversation.append({k: v for k, v in message.items() if v is not None})
    return conversation


def _template_and_tokens(model_or_template: Any) -> tuple[str, dict]:
    if isinstance(model_or_template, str):
        return model_or_template, {}
    template = getattr(model_or_template, "chat_template", None)
    if not template:
        path = getattr(model_or_template, "path", None)
        raise ChatTemplateError(f"the model{f' at {path}' if path else ''} has no chat template (a base model, "
                                "or one without chat_template.jinja / tokenizer_config.json's chat_template): "
                                "send raw text prompts instead (specjax generate --raw)")
    tokens = {name: getattr(model_or_template, name, None) for name in ("bos_token", "eos_token")}
    return template, {k: v for k, v in tokens.items() if v is not None}


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson``: jinja's escapes HTML characters, which would change prompts."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_block():
    """``{% generation %}...{% endgeneration %}`` (training templates mark the assistant's text with
    it; transformers tracks those spans): rendered as its body."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationBlock


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in transformers' sandboxed environment (cached: templates repeat)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _generation_block()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid jinja2 (line {e.lineno}): {e.message}") from e


ChatInput = Union[Sequence[Message], Sequence[Sequence[Message]]]


def conversations(messages: ChatInput) -> list:
    """One conversation or a list of them, as a list of conversations."""
    if isinstance(messages, Sequence) and messages and not isinstance(messages[0], Mapping) \
            and isinstance(messages[0], Sequence) and not isinstance(messages[0], (str, bytes)):
        return list(messages)
    return [messages]

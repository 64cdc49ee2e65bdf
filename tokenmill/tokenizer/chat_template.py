"""Render a model's jinja2 chat template the way transformers' `apply_chat_template` does.

Same environment (sandboxed, immutable, trim_blocks + lstrip_blocks, loop controls), same
helpers (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII characters) and
same variables (messages, add_generation_prompt, bos_token, eos_token, ... and any extra
keyword), so a template renders byte-identically here and there.

Also the one rule for where a chat reply ends (`end_of_turn_token_ids`): every path that
applies a chat template adds those tokens to the request's stop tokens (`with_end_of_turn`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequestError

if TYPE_CHECKING:
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.tokenizer.tokenizer import Tokenizer

# End-of-turn tokens of well-known chat formats: Gemma, ChatML, Llama 3, Phi-3. A model
# trained on one of them may emit its token even where the template in use does not show it.
_KNOWN_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
# Stands in for an assistant reply, to see what the template writes after one.
_PROBE_REPLY = "tokenmillprobereply"


class _GenerationBlock(Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; for
    # rendering it is transparent.
    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidRequestError(f"the model's chat template does not compile: {exc}") from exc


def _plain(value: Any) -> Any:
    # Templates are untrusted code: hand them fresh plain JSON-like data only, never the
    # caller's objects (whose methods the sandbox does not know to be unsafe).
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


def validate_messages(messages: Any) -> None:
    """Raise InvalidRequestError unless `messages` is a list of {role: str, content: ...}."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise InvalidRequestError("messages must be a list of {'role', 'content'} objects")
    for idx, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{idx}] must be an object, got {message!r}")
        if "role" not in message:
            raise InvalidRequestError(f"messages[{idx}] has no 'role'")
        if not isinstance(message["role"], str):
            raise InvalidRequestError(f"messages[{idx}].role must be a string")
        content = message.get("content")
        if "content" not in message and not message.get("tool_calls"):
            raise InvalidRequestError(f"messages[{idx}] has no 'content'")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequestError(
                f"messages[{idx}].content must be a string or a list of parts"
            )


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    /,
    **variables: Any,
) -> str:
    """Render `template` for `messages`; template errors become InvalidRequestError. Any name
    may be a variable (the parameters are positional-only)."""
    validate_messages(messages)
    compiled = compile_template(template)
    try:
        return compiled.render(
            messages=_plain(messages),
            add_generation_prompt=add_generation_prompt,
            **{name: _plain(value) for name, value in variables.items()},
        )
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"chat template error: {exc}") from exc
    except (TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequestError(f"chat template cannot render these messages: {exc}") from exc


@lru_cache(maxsize=16)
def end_of_turn_token_ids(
    tokenizer: Tokenizer, chat_template: str | None = None
) -> tuple[int, ...]:
    """The special tokens that end an assistant turn: the first one the template (`chat_template`,
    else the tokenizer's) writes after an assistant reply, and the known end-of-turn tokens
    (`<end_of_turn>`, `<|im_end|>`, ...) that the vocabulary has as special tokens."""
    special = tokenizer.all_special_ids
    found = []
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if template is not None:
        found.extend(_template_end_of_turn(tokenizer, template))
    for name in _KNOWN_END_OF_TURN:
        token_id = tokenizer.backend.token_to_id(name)
        if token_id is not None and token_id in special:
            found.append(token_id)
    return tuple(dict.fromkeys(t for t in found if t != tokenizer.bos_token_id))


def with_end_of_turn(
    params: SamplingParams, tokenizer: Tokenizer, chat_template: str | None = None
) -> SamplingParams:
    """`params` for a reply under a chat template: its end-of-turn tokens end it, like EOS (so
    not with ignore_eos), and like EOS they are not part of the text."""
    if params.ignore_eos:
        return params
    known = {*params.stop_token_ids, *tokenizer.eos_token_ids}
    extra = [t for t in end_of_turn_token_ids(tokenizer, chat_template) if t not in known]
    if not extra:
        return params
    return dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, *extra))


def _template_end_of_turn(tokenizer: Tokenizer, template: str) -> list[int]:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": _PROBE_REPLY},
    ]
    try:
        text = render_chat_template(
            template, messages, False, **tokenizer.special_token_variables()
        )
    except InvalidRequestError:
        return []  # a template that wants another conversation shape: rely on known tokens
    pos = text.rfind(_PROBE_REPLY)
    if pos < 0:
        return []
    after = text[pos + len(_PROBE_REPLY) :].lstrip()
    ids = tokenizer.encode(after, add_special_tokens=False)[:1] if after else []
    return [t for t in ids if t in tokenizer.all_special_ids]


@lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from its context (e.g. `tools`, `documents`)."""
    from jinja2 import meta

    env = ImmutableSandboxedEnvironment(extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    try:
        return frozenset(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateSyntaxError:
        return frozenset()

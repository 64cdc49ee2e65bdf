"""Render a model's jinja2 chat template the way transformers' `apply_chat_template` does.

Same environment (sandboxed, immutable, trim_blocks + lstrip_blocks, loop controls), same
helpers (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII characters) and
same variables (messages, add_generation_prompt, bos_token, eos_token, ... and any extra
keyword), so a template renders byte-identically here and there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequestError


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
    **variables: Any,
) -> str:
    """Render `template` for `messages`; template errors become InvalidRequestError."""
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

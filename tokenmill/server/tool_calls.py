"""Tool calling: tool definitions and tool-call history into the prompt, replies into tool_calls.

The wire format is Hermes' (Qwen2.5, SmolLM3, Hermes 2/3 use it), one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that reads a `tools` variable renders the definitions itself (and sees each
assistant tool call with its arguments as an object, as Hugging Face templates expect). For one
that does not, the default below is used: the definitions go into the system message
(`DEFAULT_TOOLS_PROMPT`), earlier calls into the assistant's text as blocks like the one above,
and tool results into a user turn as `<tool_response>...</tool_response>` blocks.

tool_choice: "none" leaves the tools out of the prompt; "auto" lets the model choose, and its
reply is parsed; "required" and a named function constrain the reply to tool-call blocks by a
grammar (`tool_call_grammar`), so it always parses (a named function is called once, as vLLM
does; a reply cut short by max_tokens keeps only its complete calls and has no content).
parallel_tool_calls=false allows one call.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass

from tokenmill.server.errors import APIError
from tokenmill.server.protocol import ChatCompletionRequest, ChatMessage
from tokenmill.server.protocol_tools import FunctionCall, NamedToolChoice, ToolCall
from tokenmill.structured.grammar import JSON_OPTIONS, Grammar

CALL_START, CALL_END = "<tool_call>", "</tool_call>"

DEFAULT_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tool_choice_mode(body: ChatCompletionRequest) -> str:
    """ "none", "auto", "required", or the name of the function that must be called."""
    choice = body.tool_choice
    if not body.tools:
        if choice in (None, "none", "auto"):
            return "none"
        raise APIError(400, "tool_choice needs tools: none were given", "tool_choice")
    if choice is None:
        return "auto"
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {t.function.name for t in body.tools}:
            raise APIError(400, f"tool_choice names '{name}', which is not in tools", "tool_choice")
        return name
    return choice


def prompt_inputs(
    body: ChatCompletionRequest, messages: list[dict], has_native_tools: bool
) -> tuple[list[dict], dict]:
    """(messages, template variables) with the tools and tool-call history in them."""
    mode = tool_choice_mode(body)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] if mode != "none" else []
    if has_native_tools:
        variables = {"tools": tools} if tools else {}
        return [_native_message(m) for m in messages], variables
    out = _default_history(messages)
    if tools:
        text = DEFAULT_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def message_dict(message: ChatMessage, content: str | None) -> dict:
    """One request message as the template sees it: roles mapped to the classic four."""
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    out: dict = {"role": role, "content": content if content is not None else ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _native_message(message: dict) -> dict:
    # Hugging Face templates read a call's arguments as an object (`arguments | tojson`).
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call["function"])
        with contextlib.suppress(json.JSONDecodeError, TypeError):
            function["arguments"] = json.loads(function["arguments"])
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def _default_history(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            blocks = [_call_block(c["function"]) for c in message["tool_calls"]]
            text = "\n".join(filter(None, [message["content"], *blocks]))
            out.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("is_tool_turn"):
                out[-1]["content"] += "\n" + block  # one user turn for consecutive results
            else:
                out.append({"role": "user", "content": block, "is_tool_turn": True})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content", "name")})
    return [{k: v for k, v in m.items() if k != "is_tool_turn"} for m in out]


def _call_block(function: dict) -> str:
    try:
        arguments = json.loads(function["arguments"])
    except (json.JSONDecodeError, TypeError):
        arguments = function["arguments"]
    call = json.dumps({"name": function["name"], "arguments": arguments})
    return f"{CALL_START}\n{call}\n{CALL_END}"


def tool_call_grammar(body: ChatCompletionRequest) -> Grammar | None:
    """For tool_choice "required" or a named function: the reply is tool-call blocks only,
    each naming a given function with arguments that fit its parameters' schema."""
    mode = tool_choice_mode(body)
    if mode in ("none", "auto"):
        return None
    tools = [t for t in body.tools or () if mode == "required" or t.function.name == mode]
    alternatives = []
    for tool in tools:
        schema = dict(tool.function.parameters or {"type": "object", "properties": {}})
        schema["x-guidance"] = {**JSON_OPTIONS, "lenient": not tool.function.strict}
        head = json.dumps('{"name": ' + json.dumps(tool.function.name) + ', "arguments": ')
        alternatives.append(f"{head} %json {json.dumps(schema)} " + json.dumps("}"))
    call = f'"{CALL_START}\\n" ({" | ".join(alternatives)}) "\\n{CALL_END}"'
    # A named function is called once; "required" may call several unless told not to.
    repeat = ' ("\\n" call)*' if body.parallel_tool_calls and mode == "required" else ""
    return Grammar("lark", f"start: call{repeat}\ncall: {call}\n")


@dataclass
class ParsedReply:
    content: str | None
    tool_calls: list[ToolCall]


def parse_reply(text: str, parallel: bool = True) -> ParsedReply:
    """Tool-call blocks out of a reply; what is around them is the content. A block whose JSON
    does not parse stays in the content, as text."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    while True:
        start = text.find(CALL_START, pos)
        if start < 0:
            kept.append(text[pos:])
            break
        end = text.find(CALL_END, start)
        stop = len(text) if end < 0 else end + len(CALL_END)
        call = _parse_call(text[start + len(CALL_START) : end if end >= 0 else len(text)])
        if call is None:
            kept.append(text[pos:stop])
        else:
            kept.append(text[pos:start])
            calls.append(call)
        pos = stop
    if not parallel:
        calls = calls[:1]
    content = "".join(kept).strip() if calls else "".join(kept)
    return ParsedReply(content or None if calls else content, calls)


def _parse_call(body: str) -> ToolCall | None:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=payload["name"], arguments=arguments),
    )


class ToolCallStream:
    """A streamed reply split as it arrives into content deltas and whole tool calls; text that
    may be the start of a `<tool_call>` tag is held back until it is known not to be."""

    def __init__(self, parallel: bool = True) -> None:
        self._buffer = ""
        self._in_call = False
        self._parallel = parallel
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content, calls = "", []
        while True:
            if not self._in_call:
                start = self._buffer.find(CALL_START)
                if start < 0:
                    cut = len(self._buffer) - _partial_tag_len(self._buffer)
                    content += self._buffer[:cut]
                    self._buffer = self._buffer[cut:]
                    break
                content += self._buffer[:start]
                self._buffer, self._in_call = self._buffer[start:], True
                continue
            end = self._buffer.find(CALL_END)
            if end < 0:
                break
            cut = end + len(CALL_END)
            block, self._buffer = self._buffer[:cut], self._buffer[cut:]
            self._in_call = False
            content += self._take(block, calls)
        return self._content(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left at the end: an unterminated call block is parsed as it stands."""
        rest, self._buffer = self._buffer, ""
        calls: list[ToolCall] = []
        content = self._take(rest, calls) if self._in_call else rest
        return self._content(content), calls

    def _take(self, block: str, calls: list[ToolCall]) -> str:
        body = block[len(CALL_START) :]
        body = body[: -len(CALL_END)] if body.endswith(CALL_END) else body
        call = _parse_call(body)
        if call is None:
            return block
        if self._parallel or self.num_calls == 0:
            calls.append(call)
            self.num_calls += 1
        return ""

    def _content(self, content: str) -> str:
        # Between and after calls only whitespace separates them: not content.
        return "" if self.num_calls and not content.strip() else content


def _partial_tag_len(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of CALL_START."""
    for size in range(min(len(text), len(CALL_START) - 1), 0, -1):
        if CALL_START.startswith(text[-size:]):
            return size
    return 0

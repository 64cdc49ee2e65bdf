"""Request and response bodies for tools and structured outputs (OpenAI's, and vLLM's extras)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text, as OpenAI sends and returns it


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(_Model):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(_Model):
    """A streamed piece of a tool call: the first carries id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDefinition(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ChatCompletionToolParam(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: _FunctionName


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParam(_Model):
    """vLLM's `structured_outputs` object: one of these constraints."""

    json_: str | dict | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

"""Request bodies as pydantic models, with OpenAI's field names plus vLLM's sampling extensions
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, ...,
sent by the `openai` client through `extra_body`).

Every model is strict (no "5" for 5, no true for 1) and forbids unknown fields: a misspelt
`max_token` is a 400 naming it rather than a silently ignored limit. Fields OpenAI's clients may
send that change nothing here (`user`, `metadata`, `store`, `service_tier`, ...) are accepted and
ignored. Responses are plain dicts, built where they are produced."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ToolChoiceMode = Literal["none", "auto", "required"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: usage on every chunk
    include_obfuscation: bool | None = None  # OpenAI's; nothing to obfuscate here


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


# Sampling fields shared by completions and chat, under their SamplingParams names.
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                    "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                    "include_stop_str_in_output", "skip_special_tokens")


class SamplingRequest(_Strict):
    """What completions and chat share: the model, sampling and streaming fields."""

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: int = 0
    cache_salt: str | None = None
    # Accepted, and change nothing here.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """The sampling fields the client set, under SamplingParams' names (unset ones keep the
        engine's defaults and the model's generation_config)."""
        return {name: getattr(self, name) for name in _SAMPLING_FIELDS
                if name in self.model_fields_set and getattr(self, name) is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Any  # text, texts, token ids or lists of token ids: checked below
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        """One prompt or several, each a text or a list of token ids."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(_is_token_id(v) for v in value):
            return [value]
        if isinstance(value, list) and value and all(
                isinstance(v, str) or (isinstance(v, list) and all(_is_token_id(t) for t in v)) for v in value):
            return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         f"token-id lists, got {_describe(value)}")

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported (no fill-in-the-middle)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of is not supported (got {self.best_of}); ask for n completions instead")
        return self


class TextPart(_Strict):
    type: Literal["text", "input_text", "output_text"] = "text"
    text: str
    annotations: list | None = None  # output_text parts sent back from a response


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    """A call the assistant made, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # present when rebuilt from streamed deltas


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    # Sent back by clients that replay a response message; nothing to do with them.
    refusal: str | None = None
    annotations: list | None = None
    audio: dict | None = None
    function_call: dict | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id is required in a message with role 'tool'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls may appear only in assistant messages, not in role {self.role!r}")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required in a message with role {self.role!r}")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: until the context is full
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    reasoning_effort: str | None = None  # accepted; the template may read chat_template_kwargs instead

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if not self.messages:
            raise ValueError("messages must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        names = [tool.function.name for tool in self.tools or ()]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not in "
                             f"tools ({', '.join(names) or 'none given'})")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ResponseContentPart(_Strict):
    type: Literal["input_text", "output_text", "text", "reasoning_text", "summary_text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None


class ResponseInputItem(_Strict):
    """A message, a function call the model made, or its output (the Responses API's input)."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[ResponseContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    id: str | None = None
    status: str | None = None
    summary: list | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResponseInputItem:
        needed = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                  "function_call_output": ("call_id", "output"), "reasoning": ()}[self.type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"an input item of type {self.type!r} needs {', '.join(missing)}")
        return self


class ResponseTool(_Strict):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseNamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    name: str


class ResponseTextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseText(_Strict):
    format: ResponseTextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Strict):
    """POST /v1/responses: stateless (no `previous_response_id`, nothing stored)."""

    model: str | None = None
    input: str | list[ResponseInputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: ToolChoiceMode | ResponseNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseText | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    truncation: Literal["disabled", "auto"] | None = None
    # Accepted, and change nothing here.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    max_tool_calls: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        if self.previous_response_id is not None:
            raise ValueError("previous_response_id is not supported: this server stores no responses; send the "
                             "whole conversation in input")
        if self.background:
            raise ValueError("background is not supported: responses are answered on the request")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be empty")
        if isinstance(self.input, str) and not self.input:
            raise ValueError("input must not be empty")
        return self


class TokenizeRequest(_Strict):
    """POST /tokenize: `prompt` text, or chat `messages` rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt or messages: give exactly one")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {', '.join(sorted({type(v).__name__ for v in value}))}"
    return type(value).__name__

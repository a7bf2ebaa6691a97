"""POST /v1/chat/completions: messages through the chat template, one engine request with `n`
completions, each split into reasoning, content and tool calls (chat_output.py); answered whole
or as chunks ending `data: [DONE]`.

Constraints: `response_format` json_object / json_schema, vLLM's `structured_outputs`, and
tool_choice "required" or a named function (arguments generated under the tool's JSON schema)
each become `SamplingParams.structured_outputs`; two of them in one request are a 400."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from jaxserve.async_llm import PreparedRequest
from jaxserve.sampling_params import StructuredOutputsParams
from server.openai import chat_prompt, sse
from server.openai.chat_output import ChoiceDelta, OutputRules
from server.openai.completions import sampling_params, structured
from server.openai.errors import APIError
from server.openai.formats import Usage, chat_logprobs
from server.openai.protocol import ChatCompletionRequest, NamedToolChoice
from server.openai.serving import Serving, admitted, request_id
from server.openai.tool_parsers import constrained_tool_schema


@dataclasses.dataclass
class ChatJob:
    """A checked chat request, ready to run."""

    serving: Serving
    body: ChatCompletionRequest
    id: str
    prepared: PreparedRequest
    rules: OutputRules
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.prompt.token_ids)

    @property
    def top_logprobs(self) -> int | None:
        return (self.body.top_logprobs or 0) if self.body.logprobs else None

    async def start(self) -> AsyncIterator:
        """The admitted request's (0, delta output) stream (APIError 503 / 429 here)."""
        return await admitted(self.serving.outputs([(self.id, self.prepared)]))


async def prepare_chat(serving: Serving, body: ChatCompletionRequest, rid: str,
                       renames: dict[str, str] | None = None) -> ChatJob:
    """Render, constrain, check and tokenize; APIError 400 naming the field (through `renames`,
    engine or chat name -> the caller's) for anything wrong."""
    renames = dict(renames or {})
    serving.check_model(body.model)
    tokenizer = serving.tokenizer
    if serving.harmony is not None:
        prompt_text, prompt_ids = await serving.in_worker(_render_harmony, serving.harmony, body)
    else:
        prompt_text, prompt_ids = await serving.in_worker(_render_and_encode, tokenizer, body)
    limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    renames.setdefault("max_tokens", limit_param)
    renames.setdefault("logprobs", "top_logprobs")
    params = sampling_params(body, max_tokens=body.completion_limit, logprobs=(body.top_logprobs or 0) if body.logprobs
                             else None, structured_outputs=_constraint(body, renames))
    if serving.harmony is not None:  # <|return|> and <|call|> end the assistant's turn
        params = params.with_stop_token_ids(serving.harmony.stop_token_ids)
    prompt = {"prompt_token_ids": prompt_ids}
    if body.cache_salt is not None:
        prompt["cache_salt"] = body.cache_salt
    prepared = await serving.prepare(prompt, params, priority=body.priority, renames=renames)
    serving.check_length(prepared, body.completion_limit, renames.get(limit_param, limit_param))
    return ChatJob(serving, body, rid, prepared, output_rules(serving, body, prompt_text))


def _render_and_encode(tokenizer, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    text = chat_prompt.render(tokenizer, body.messages, body.tools, add_generation_prompt=body.add_generation_prompt,
                              template_kwargs=body.chat_template_kwargs)
    if not text:
        raise APIError(400, "the chat template rendered these messages as an empty prompt", param="messages")
    return text, tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens


def _render_harmony(harmony, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    """gpt-oss: the Harmony rendering (jaxserve/harmony.py); constraints that would bind the
    channel tokens too are refused."""
    choice = tool_choice_value(body)
    if body.tools and (choice == "required" or isinstance(choice, dict)):
        raise APIError(400, "gpt-oss (Harmony) chats call tools with tool_choice 'auto' only", param="tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "gpt-oss (Harmony) chats take no response_format: it would constrain the channel "
                       "markup too", param="response_format")
    if body.structured_outputs is not None:
        raise APIError(400, "gpt-oss (Harmony) chats take no structured_outputs", param="structured_outputs")
    kwargs = dict(body.chat_template_kwargs or {})
    effort = body.reasoning_effort or kwargs.pop("reasoning_effort", None)
    known = {"conversation_start_date", "model_identity"}
    if set(kwargs) - known:
        raise APIError(400, f"chat_template_kwargs {sorted(set(kwargs) - known)} mean nothing to gpt-oss's Harmony "
                       "format", param="chat_template_kwargs")
    messages = [message.model_dump(exclude_none=True) for message in body.messages]
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools and choice != "none" else None
    try:
        ids = harmony.render(messages, reasoning_effort=effort, tools=tools,
                             add_generation_prompt=body.add_generation_prompt, **kwargs)
    except ValueError as exc:
        param = "reasoning_effort" if "reasoning_effort" in str(exc) else "messages"
        raise APIError(400, str(exc), param=param) from None
    return harmony.encoding.decode(ids), ids


def tool_choice_value(body: ChatCompletionRequest) -> str | dict[str, Any] | None:
    """tool_choice as the tool parsers take it: a mode, or the named-function dict."""
    choice = body.tool_choice
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


def _constraint(body: ChatCompletionRequest, renames: dict[str, str]) -> StructuredOutputsParams | None:
    """The one structured-output constraint the request asks for, or None."""
    asked: dict[str, StructuredOutputsParams] = {}
    choice = tool_choice_value(body)
    if body.tools and (choice == "required" or isinstance(choice, dict)):
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        try:
            schema = constrained_tool_schema(tools, choice)
            if choice == "required" and body.parallel_tool_calls is False:
                schema = {**schema, "maxItems": 1}  # one call, and the model stops after it
            asked[renames.get("tool_choice", "tool_choice")] = StructuredOutputsParams(json=schema)
        except ValueError as exc:
            raise APIError(400, str(exc), param=renames.get("tool_choice", "tool_choice")) from None
    form = body.response_format
    param = renames.get("response_format", "response_format")
    if form is not None and form.type == "json_object":
        asked[param] = StructuredOutputsParams(json_object=True)
    elif form is not None and form.type == "json_schema":
        asked[param] = structured({"json": form.json_schema.schema_}, param)
    if body.structured_outputs is not None:
        asked["structured_outputs"] = structured(
            body.structured_outputs.model_dump(by_alias=True, exclude_none=True), "structured_outputs")
    if len(asked) > 1:
        names = sorted(asked)
        raise APIError(400, f"{' and '.join(names)} each constrain the output: give one", param=names[-1])
    return next(iter(asked.values()), None)


def output_rules(serving: Serving, body: ChatCompletionRequest, prompt_text: str) -> OutputRules:
    if serving.harmony is not None:
        return OutputRules(harmony=serving.harmony, parallel_tool_calls=body.parallel_tool_calls is not False)
    reasoning = serving.reasoning_parser() if serving.reasoning_parser is not None else None
    opened = reasoning.opened_by(prompt_text) if reasoning is not None else None
    choice = tool_choice_value(body)
    parallel = body.parallel_tool_calls is not False
    if not body.tools or choice == "none":
        return OutputRules(reasoning, opened, parallel_tool_calls=parallel)
    if choice == "required" or isinstance(choice, dict):
        return OutputRules(None, None, tool_choice=choice, parallel_tool_calls=parallel)
    parser = serving.tool_parser([tool.model_dump(exclude_none=True) for tool in body.tools]) \
        if serving.tool_parser is not None else None
    return OutputRules(reasoning, opened, tool_parser=parser, parallel_tool_calls=parallel)


def finish_reason(engine_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if engine_reason == "stop" and called else engine_reason


async def create_chat_completion(serving: Serving, body: ChatCompletionRequest, receive: Receive) -> Response:
    job = await prepare_chat(serving, body, request_id("chatcmpl-"))
    outputs = await job.start()
    if body.stream:
        return sse.EventStreamResponse(_stream(job, outputs))
    result = await sse.until_disconnected(receive, _collect(job, outputs))
    return Response(status_code=499) if result is None else JSONResponse(result)


def _envelope(job: ChatJob, kind: str, choices: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
    return {"id": job.id, "object": kind, "created": job.created, "model": job.serving.model_name,
            "choices": choices, "usage": None if usage is None else usage.chat()}


@dataclasses.dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


async def _collect(job: ChatJob, outputs: AsyncIterator) -> dict[str, Any]:
    choices = [_Choice() for _ in range(job.body.n)]
    usage = Usage(prompt_tokens=job.prompt_tokens)
    tokenizer = job.serving.tokenizer
    async with contextlib.aclosing(outputs):
        async for _, output in outputs:
            usage.cached_tokens = output.num_cached_tokens
            for completion in output.outputs:
                choice = choices[completion.index]
                choice.text += completion.text
                choice.token_ids += completion.token_ids
                if job.top_logprobs is not None:
                    choice.logprobs += chat_logprobs(completion.token_ids, completion.logprobs or [],
                                                     job.top_logprobs, tokenizer)
                if completion.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = completion.finish_reason, completion.stop_reason
    usage.completion_tokens = sum(len(choice.token_ids) for choice in choices)
    out = []
    for index, choice in enumerate(choices):
        split = job.rules.parse(choice.text, choice.token_ids)
        message: dict[str, Any] = {"role": "assistant", "content": split.content}
        if split.reasoning is not None:
            message["reasoning_content"] = split.reasoning
        if split.calls:
            message["tool_calls"] = [{"id": call.id, "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in split.calls]
        out.append({"index": index, "message": message, "finish_reason": finish_reason(choice.finish_reason,
                                                                                         bool(split.calls)),
                    "stop_reason": choice.stop_reason,
                    "logprobs": {"content": choice.logprobs} if job.top_logprobs is not None else None})
    return _envelope(job, "chat.completion", out, usage)


def tool_call_deltas(deltas) -> list[dict[str, Any]]:
    """Streamed call pieces as OpenAI's `delta.tool_calls`, one entry per call index."""
    merged: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        entry = merged.setdefault(delta.index, {"index": delta.index, "function": {}})
        if delta.id is not None:
            entry["id"], entry["type"] = delta.id, "function"
        if delta.name is not None:
            entry["function"]["name"] = delta.name
            entry["function"].setdefault("arguments", "")
        if delta.arguments:
            entry["function"]["arguments"] = entry["function"].get("arguments", "") + delta.arguments
    return list(merged.values())


async def _stream(job: ChatJob, outputs: AsyncIterator) -> AsyncIterator[bytes]:
    n, body, tokenizer = job.body.n, job.body, job.serving.tokenizer
    streams = [job.rules.stream() for _ in range(n)]
    started, called = [False] * n, [False] * n
    usage = Usage(prompt_tokens=job.prompt_tokens)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
    async with contextlib.aclosing(outputs):
        try:
            async for _, output in outputs:
                usage.cached_tokens = output.num_cached_tokens
                for completion in output.outputs:
                    i = completion.index
                    usage.completion_tokens += len(completion.token_ids)
                    if not started[i]:
                        started[i] = True
                        yield sse.data(_envelope(job, "chat.completion.chunk", [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], None))
                    parsed = streams[i].feed(completion.text, completion.token_ids)
                    if completion.finish_reason is not None:
                        parsed = _joined(parsed, streams[i].finish())
                    called[i] = called[i] or bool(parsed.calls)
                    delta: dict[str, Any] = {}
                    if parsed.reasoning:
                        delta["reasoning_content"] = parsed.reasoning
                    if parsed.content:
                        delta["content"] = parsed.content
                    if parsed.calls:
                        delta["tool_calls"] = tool_call_deltas(parsed.calls)
                    logprobs = None
                    if job.top_logprobs is not None and completion.token_ids:
                        logprobs = {"content": chat_logprobs(completion.token_ids, completion.logprobs or [],
                                                             job.top_logprobs, tokenizer)}
                    if delta or logprobs or completion.finish_reason is not None:
                        choice = {"index": i, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason(completion.finish_reason, called[i])}
                        if completion.finish_reason is not None:
                            choice["stop_reason"] = completion.stop_reason
                        yield sse.data(_envelope(job, "chat.completion.chunk", [choice],
                                                 usage if continuous else None))
        except APIError as exc:
            yield sse.data(exc.body())
    if body.include_usage:
        yield sse.data(_envelope(job, "chat.completion.chunk", [], usage))
    yield sse.DONE


def _joined(first: ChoiceDelta, second: ChoiceDelta) -> ChoiceDelta:
    return ChoiceDelta(_concat(first.reasoning, second.reasoning), _concat(first.content, second.content),
                       first.calls + second.calls)


def _concat(a: str | None, b: str | None) -> str | None:
    return (a or "") + (b or "") or None

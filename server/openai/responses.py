"""POST /v1/responses, stateless: the input (text, or messages, function calls and their outputs)
becomes a chat request and runs through the chat path; the answer is a Response object, whole or
as the Responses API's named events (`response.created`, `response.output_item.added`,
`response.output_text.delta`, `response.function_call_arguments.delta`, ...,
`response.completed`). Nothing is stored: `previous_response_id` is a 400."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from server.openai import sse
from server.openai.chat import ChatJob, prepare_chat
from server.openai.chat_output import ChoiceDelta, ChoiceText
from server.openai.errors import APIError, validation_message
from server.openai.formats import Usage, chat_logprobs
from server.openai.protocol import (ChatCompletionRequest, ChatMessage, ChatTool, FunctionCall, FunctionDefinition,
                                    JsonSchemaFormat, NamedFunction, NamedToolChoice, ResponseFormat,
                                    ResponseNamedToolChoice, ResponsesRequest, ToolCallIn)
from server.openai.serving import Serving, request_id

# Chat names (and the engine's) -> the Responses API's, for errors' `param`.
RENAMES = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text.format", "logprobs": "top_logprobs"}


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that answers `body`."""
    fields: dict[str, Any] = dict(messages=_messages(body), stream=body.stream)
    for name in ("model", "temperature", "top_p", "top_k", "seed", "parallel_tool_calls"):
        if getattr(body, name) is not None:
            fields[name] = getattr(body, name)
    if body.max_output_tokens is not None:
        fields["max_tokens"] = body.max_output_tokens
    if body.top_logprobs is not None:
        fields.update(logprobs=True, top_logprobs=body.top_logprobs)
    if body.tools:
        fields["tools"] = [ChatTool(function=FunctionDefinition(name=tool.name, description=tool.description,
                                                                parameters=tool.parameters, strict=tool.strict))
                           for tool in body.tools]
    if isinstance(body.tool_choice, ResponseNamedToolChoice):
        fields["tool_choice"] = NamedToolChoice(function=NamedFunction(name=body.tool_choice.name))
    elif body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    form = body.text.format if body.text is not None else None
    if form is not None and form.type != "text":
        schema = None if form.type == "json_object" else JsonSchemaFormat(name=form.name or "response",
                                                                            schema=form.schema_, strict=form.strict)
        fields["response_format"] = ResponseFormat(type=form.type, json_schema=schema)
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as exc:
        message, param = validation_message(exc.errors()[0])
        param = RENAMES.get(param.split("[")[0].split(".")[0], param) if param else None
        raise APIError(400, message, param=param) from None


def _messages(body: ResponsesRequest) -> list[ChatMessage]:
    messages = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, ChatMessage(role="user", content=body.input)]
    for item in body.input:
        if item.type == "message":
            text = item.content if isinstance(item.content, str) else "\n".join(p.text for p in item.content)
            messages.append(ChatMessage(role=item.role, content=text))
        elif item.type == "function_call":
            call = ToolCallIn(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":  # parallel calls: one assistant turn
                messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), call]})
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif item.type == "function_call_output":
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=item.output))
    return messages


async def create_response(serving: Serving, body: ResponsesRequest, receive: Receive) -> Response:
    chat = chat_request(body)
    job = await prepare_chat(serving, chat, request_id("resp_"), renames=RENAMES)
    outputs = await job.start()
    writer = _Writer(job, body)
    if body.stream:
        return sse.EventStreamResponse(writer.events(outputs))
    result = await sse.until_disconnected(receive, writer.collect(outputs))
    return Response(status_code=499) if result is None else JSONResponse(result)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Writer:
    """The Response object and its events, built as the completion arrives."""

    def __init__(self, job: ChatJob, body: ResponsesRequest):
        self.job, self.body = job, body
        self.usage = Usage(prompt_tokens=job.prompt_tokens)
        self.items: list[dict[str, Any]] = []  # finished output items
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.sequence = 0
        self.logprobs: list[dict] = []
        self.finish: str | None = None

    def response(self, status: str, error: dict | None = None) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.job.id, "object": "response", "created_at": self.job.created, "status": status,
            "model": self.job.serving.model_name, "output": list(self.items), "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": self.usage.responses() if status != "in_progress" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": _dump(body.tool_choice) or "auto", "tools": [_dump(tool) for tool in body.tools or ()],
            "text": _dump(body.text) or {"format": {"type": "text"}}, "truncation": body.truncation or "disabled",
            "previous_response_id": None, "reasoning": body.reasoning, "store": False, "user": body.user}

    def _status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def _fold(self, completion) -> None:
        self.usage.completion_tokens += len(completion.token_ids)
        if self.job.top_logprobs is not None:
            self.logprobs += chat_logprobs(completion.token_ids, completion.logprobs or [], self.job.top_logprobs,
                                           self.job.serving.tokenizer)
        if completion.finish_reason is not None:
            self.finish = completion.finish_reason

    async def collect(self, outputs: AsyncIterator) -> dict[str, Any]:
        text, token_ids = "", []
        async with contextlib.aclosing(outputs):
            async for _, output in outputs:
                self.usage.cached_tokens = output.num_cached_tokens
                for completion in output.outputs:
                    text += completion.text
                    token_ids += completion.token_ids
                    self._fold(completion)
        self.items = self._whole_items(self.job.rules.parse(text, token_ids))
        return self.response(self._status())

    def _whole_items(self, split: ChoiceText) -> list[dict[str, Any]]:
        items = []
        if split.reasoning is not None:
            items.append(_reasoning_item(split.reasoning, "completed"))
        if split.content is not None or not split.calls:
            items.append(_message_item(split.content or "", "completed", self.logprobs))
        items += [_call_item(call.id, call.name, call.arguments, "completed") for call in split.calls]
        return items

    # ---- streaming ----

    def _event(self, kind: str, **payload: Any) -> bytes:
        self.sequence += 1
        return sse.event(kind, {"type": kind, "sequence_number": self.sequence - 1, **payload})

    async def events(self, outputs: AsyncIterator) -> AsyncIterator[bytes]:
        yield self._event("response.created", response=self.response("in_progress"))
        yield self._event("response.in_progress", response=self.response("in_progress"))
        stream = self.job.rules.stream()
        async with contextlib.aclosing(outputs):
            try:
                async for _, output in outputs:
                    self.usage.cached_tokens = output.num_cached_tokens
                    for completion in output.outputs:
                        self._fold(completion)
                        for event in self._deltas(stream.feed(completion.text, completion.token_ids)):
                            yield event
                for event in self._deltas(stream.finish()):
                    yield event
                for event in self._close():
                    yield event
                if not self.items:
                    for event in self._open_message():
                        yield event
                    for event in self._close():
                        yield event
            except APIError as exc:
                yield self._event("response.failed", response=self.response(
                    "failed", {"code": exc.code or str(exc.status), "message": exc.message}))
                return
        status = self._status()
        yield self._event("response.completed" if status == "completed" else "response.incomplete",
                          response=self.response(status))

    def _deltas(self, delta: ChoiceDelta) -> list[bytes]:
        events = []
        if delta.reasoning:
            if self.open is None or self.open["type"] != "reasoning":
                events += self._close() + self._open_item(_reasoning_item("", "in_progress"))
            self.open["content"][0]["text"] += delta.reasoning
            events.append(self._event("response.reasoning_text.delta", item_id=self.open["id"],
                                      output_index=len(self.items), content_index=0, delta=delta.reasoning))
        if delta.content:
            if self.open is None or self.open["type"] != "message":
                events += self._close() + self._open_message()
            self.open["content"][0]["text"] += delta.content
            events.append(self._event("response.output_text.delta", item_id=self.open["id"],
                                      output_index=len(self.items), content_index=0, delta=delta.content,
                                      logprobs=[]))
        for call in delta.calls:
            if call.id is not None:
                events += self._close() + self._open_item(_call_item(call.id, call.name or "", "", "in_progress"))
            if call.arguments:
                self.open["arguments"] += call.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=self.open["id"],
                                          output_index=len(self.items), delta=call.arguments))
        return events

    def _open_item(self, item: dict[str, Any]) -> list[bytes]:
        self.open = item
        return [self._event("response.output_item.added", output_index=len(self.items), item=_copy(item))]

    def _open_message(self) -> list[bytes]:
        events = self._open_item(_message_item("", "in_progress", []))
        part = self.open["content"][0]
        return events + [self._event("response.content_part.added", item_id=self.open["id"],
                                     output_index=len(self.items), content_index=0,
                                     part={**part, "text": ""})]

    def _close(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = "completed"
        where = dict(item_id=item["id"], output_index=len(self.items))
        events = []
        if item["type"] == "reasoning":
            events.append(self._event("response.reasoning_text.done", content_index=0,
                                      text=item["content"][0]["text"], **where))
        elif item["type"] == "message":
            part = item["content"][0]
            part["logprobs"] = self.logprobs
            events += [self._event("response.output_text.done", content_index=0, text=part["text"], logprobs=[],
                                   **where),
                       self._event("response.content_part.done", content_index=0, part=_copy(part), **where)]
        else:
            events.append(self._event("response.function_call_arguments.done", arguments=item["arguments"],
                                      name=item["name"], **where))
        events.append(self._event("response.output_item.done", output_index=len(self.items), item=_copy(item)))
        self.items.append(item)
        return events


def _reasoning_item(text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": _item_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def _message_item(text: str, status: str, logprobs: list) -> dict[str, Any]:
    return {"type": "message", "id": _item_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": _item_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {key: ([dict(v) for v in value] if key == "content" else value) for key, value in item.items()}


def _dump(model) -> Any:
    if model is None or isinstance(model, str):
        return model
    return model.model_dump(by_alias=True, exclude_none=True)

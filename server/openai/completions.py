"""POST /v1/completions: one engine request per prompt (each with `n` completions), answered
whole or as server-sent chunks ending `data: [DONE]`. Choice `i * n + j` is prompt i's j-th
completion, as OpenAI numbers them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from jaxserve.async_llm import PreparedRequest
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from server.openai import sse
from server.openai.errors import APIError, from_value_error
from server.openai.formats import CompletionLogprobs, Usage, merge_completion_logprobs
from server.openai.protocol import CompletionRequest, SamplingRequest
from server.openai.serving import Serving, admitted, engine_ids, request_id


def sampling_params(body: SamplingRequest, **fields: Any) -> SamplingParams:
    """The request's SamplingParams: its sampling fields and `fields` (None values left out)."""
    kwargs = body.sampling_kwargs()
    kwargs.update({name: value for name, value in fields.items() if value is not None})
    if body.structured_outputs is not None and "structured_outputs" not in kwargs:
        kwargs["structured_outputs"] = structured(body.structured_outputs.model_dump(by_alias=True, exclude_none=True),
                                                  "structured_outputs")
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise from_value_error(exc) from None


def structured(fields: dict[str, Any], param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None


def engine_prompt(prompt: str | list[int], cache_salt: str | None) -> dict[str, Any]:
    form = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    return form if cache_salt is None else {**form, "cache_salt": cache_salt}


@dataclasses.dataclass
class _Choice:
    """One completion as it comes: its text so far, tokens, logprob parts and finish."""

    index: int
    prefix: str = ""  # the echoed prompt, sent before the first token
    text: str = ""
    num_tokens: int = 0
    logprobs: list[dict[str, list]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False


class _Run:
    """The state of one completions request while its outputs arrive."""

    def __init__(self, serving: Serving, body: CompletionRequest, prepared: list[PreparedRequest], rid: str):
        self.serving, self.body, self.prepared, self.id = serving, body, prepared, rid
        self.created = int(time.time())
        self.n = body.n
        self.choices = [_Choice(i) for i in range(len(prepared) * self.n)]
        self.loggers = [CompletionLogprobs(body.logprobs, serving.tokenizer) if body.logprobs is not None else None
                        for _ in self.choices]
        self.usage = Usage(prompt_tokens=sum(len(p.prompt.token_ids) for p in prepared))
        self.cached = [0] * len(prepared)

    def update(self, prompt_index: int, output) -> list[dict[str, Any]]:
        """Fold in one delta output; return the chunk choices it makes."""
        self.cached[prompt_index] = output.num_cached_tokens
        self.usage.cached_tokens = sum(self.cached)
        chunk_choices = []
        for completion in output.outputs:
            choice = self.choices[prompt_index * self.n + completion.index]
            logger = self.loggers[choice.index]
            text, parts = completion.text, []
            if not choice.started:
                choice.started = True
                if self.body.echo:
                    prompt = self.prepared[prompt_index].prompt
                    text = self._prompt_text(prompt) + text
                    if logger is not None:
                        parts.append(logger.add(prompt.token_ids, self._prompt_positions(output, prompt)))
            if logger is not None:
                parts.append(logger.add(completion.token_ids, completion.logprobs or []))
            choice.text += text
            choice.num_tokens += len(completion.token_ids)
            choice.logprobs.extend(parts)
            self.usage.completion_tokens += len(completion.token_ids)
            if completion.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = completion.finish_reason, completion.stop_reason
            chunk_choices.append({"index": choice.index, "text": text,
                                  "logprobs": merge_completion_logprobs(parts) if logger is not None else None,
                                  "finish_reason": completion.finish_reason,
                                  "stop_reason": completion.stop_reason})
        return chunk_choices

    def _prompt_text(self, prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.serving.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    def _prompt_positions(self, output, prompt) -> list:
        positions = list(output.prompt_logprobs or [])
        return (positions + [None] * len(prompt.token_ids))[:len(prompt.token_ids)]

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.serving.model_name, "choices": choices, "usage": usage}

    def whole(self) -> dict[str, Any]:
        return self.envelope([{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                               "stop_reason": c.stop_reason,
                               "logprobs": merge_completion_logprobs(c.logprobs) if self.body.logprobs is not None
                               else None} for c in self.choices], self.usage.chat())


async def create_completion(serving: Serving, body: CompletionRequest, receive: Receive) -> Response:
    serving.check_model(body.model)
    logprobs = body.logprobs
    params = sampling_params(body, max_tokens=body.max_tokens, logprobs=logprobs,
                             prompt_logprobs=body.prompt_logprobs if body.prompt_logprobs is not None
                             else (logprobs if body.echo and logprobs is not None else None))
    prepared = list(await asyncio.gather(*(
        serving.prepare(engine_prompt(prompt, body.cache_salt), params, priority=body.priority)
        for prompt in body.prompt)))
    for request in prepared:
        serving.check_length(request, body.max_tokens, "max_tokens")
    rid = request_id("cmpl-")
    outputs = await admitted(serving.outputs(list(zip(engine_ids(rid, len(prepared)), prepared))))
    run = _Run(serving, body, prepared, rid)
    if body.stream:
        return sse.EventStreamResponse(_stream(run, outputs))
    result = await sse.until_disconnected(receive, _collect(run, outputs))
    return Response(status_code=499) if result is None else JSONResponse(result)


async def _collect(run: _Run, outputs: AsyncIterator) -> dict[str, Any]:
    async with contextlib.aclosing(outputs):
        async for prompt_index, output in outputs:
            run.update(prompt_index, output)
    return run.whole()


async def _stream(run: _Run, outputs: AsyncIterator) -> AsyncIterator[bytes]:
    continuous = bool(run.body.stream_options and run.body.stream_options.continuous_usage_stats)
    async with contextlib.aclosing(outputs):
        try:
            async for prompt_index, output in outputs:
                choices = run.update(prompt_index, output)
                if choices:
                    yield sse.data(run.envelope(choices, run.usage.chat() if continuous else None))
        except APIError as exc:
            yield sse.data(exc.body())
    if run.body.include_usage:
        yield sse.data(run.envelope([], run.usage.chat()))
    yield sse.DONE

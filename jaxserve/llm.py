"""`LLM`: the offline API (vLLM's names). `generate` takes a batch, `stream` yields deltas,
`chat` renders the model's chat template first."""

from __future__ import annotations

import contextlib
import itertools
import types
from typing import Any, Iterator, Sequence

from jaxserve.config import EngineConfig
from jaxserve.distributed import build_engine
from jaxserve.harmony import Harmony, uses_harmony
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams
from models.loader import LoadedModel

Prompt = str | list[int] | dict


class LLM:
    """An engine in this process. `LLM(model="smollm2-135m-instruct", max_model_len=2048, ...)`
    takes every `EngineConfig` option as a keyword, or a ready `config=`."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 loaded: LoadedModel | None = None, **options: Any):
        """`loaded`: an already loaded model (tests, notebooks); `config.model` then only names it."""
        if config is None:
            config = EngineConfig(**({"model": model} if model else {}), **options)
        elif model is not None or options:
            raise ValueError("pass either config= or model/options, not both")
        self.engine = build_engine(config, loaded)  # a LeaderEngine on process 0 of several
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompts), "sampling_params", SamplingParams())
        priorities = _per_prompt(priority, len(prompts), "priority", 0) if priority is not None else [0] * len(prompts)
        ids = self._add_all(prompts, params, priorities, stream=False)
        results: dict[str, RequestOutput] = {}
        with _progress_bar(len(ids), use_tqdm) as bar:
            while len(results) < len(ids):
                for output in self.engine.step():
                    if output.finished and output.request_id in ids:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               priority: int = 0) -> Iterator[CompletionOutput]:
        """Yield each completion's new tokens and text as they are produced (every
        `stream_interval` tokens after the first); the last delta has the finish_reason."""
        (request_id,) = self._add_all([prompt], [sampling_params or SamplingParams()], [priority], stream=True)
        try:
            finished = False
            while not finished:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield from output.outputs
                        finished = output.finished
        finally:  # unfinished ids only; also one a multi-host leader has logged, not applied
            if not finished:
                self.engine.abort_request(request_id)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them; `tools`
        (OpenAI function tools) reach the chat template.

        gpt-oss renders with OpenAI's Harmony format (jaxserve/harmony.py; `chat_template_kwargs`
        may give `reasoning_effort` "low" / "medium" / "high" and `conversation_start_date`);
        each completion's `text` is then its final answer and `reasoning_content` its analysis."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if uses_harmony(self.engine.model_config.architecture):
            return self._chat_harmony(conversations, sampling_params, chat_template_kwargs or {}, tools,
                                      add_generation_prompt, use_tqdm)
        template_kwargs = {**({"tools": tools} if tools else {}), **(chat_template_kwargs or {})}
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, **template_kwargs)
                   for c in conversations]
        # The rendered template already holds the BOS token: encode it without adding another.
        token_prompts = [{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)

    def _chat_harmony(self, conversations, sampling_params, kwargs: dict, tools, add_generation_prompt: bool,
                      use_tqdm: bool) -> list[RequestOutput]:
        harmony = Harmony()
        unknown = set(kwargs) - {"reasoning_effort", "conversation_start_date", "model_identity"}
        if unknown:
            raise ValueError(f"chat_template_kwargs: {sorted(unknown)} mean nothing to the Harmony format "
                             "(reasoning_effort, conversation_start_date, model_identity)")
        prompts = [{"prompt_token_ids": harmony.render(c, tools=tools, add_generation_prompt=add_generation_prompt,
                                                       **kwargs)} for c in conversations]
        params = _per_prompt(sampling_params, len(prompts), "sampling_params", SamplingParams())
        params = [p.with_stop_token_ids(harmony.stop_token_ids) for p in params]
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm)
        for output in outputs:
            for completion in output.outputs:
                split = harmony.parse(completion.token_ids)
                completion.text, completion.reasoning_content = split.content or "", split.reasoning
        return outputs

    def _add_all(self, prompts, params, priorities, *, stream: bool) -> list[str]:
        """Add every request or none: a bad one aborts those added before it, then raises."""
        ids = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p, priority=prio, stream=stream)
                ids.append(request_id)
        except ValueError as e:
            self.engine.abort_request(ids)
            self.engine.step()  # flush the aborted outputs
            raise ValueError(f"prompt {len(ids)}: {e}") from e
        return ids


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts


def _per_prompt(value, count: int, name: str, default):
    if value is None:
        return [default] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    return [value] * count


def _progress_bar(total: int, enabled: bool):
    """tqdm's bar (`tqdm.auto`: a widget in a notebook, text in a terminal), or a silent stand-in
    that needs no tqdm (the bare GPU image lacks it)."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="generate")
    return contextlib.nullcontext(types.SimpleNamespace(update=lambda n=1: None))

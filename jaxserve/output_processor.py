"""Turning sampled token ids into `RequestOutput`s: detokenization, stops, logprobs, streaming.

One `RequestState` per user request; with `n > 1` it has one completion (an `OutputTracker`)
per child. Streamed outputs carry deltas: the first token goes out at once, later ones every
`stream_interval` tokens and at the finish. Final outputs carry everything.
"""

from __future__ import annotations

import time

from jaxserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.stop_checker import OutputTracker


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 *, tokenizer, eos_token_ids, max_model_len: int, stream: bool, stream_interval: int,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.stream = stream
        self.stream_interval = stream_interval
        self.trackers = [
            OutputTracker(tokenizer.hf, prompt_token_ids, params, eos_token_ids=eos_token_ids,
                          max_model_len=max_model_len)
            for _ in range(params.n)
        ]
        self.logprobs: list[list[PositionLogprobs] | None] = [
            [] if params.logprobs is not None else None for _ in range(params.n)]
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic(),
                                      num_prompt_tokens=len(prompt_token_ids))
        # Streaming: what each completion has not yet sent.
        self._unsent_ids = [[] for _ in range(params.n)]
        self._unsent_text = ["" for _ in range(params.n)]
        self._sent_any = [False] * params.n
        self._finish_sent = [False] * params.n
        self._final_sent = False

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.trackers)

    def add_tokens(self, index: int, token_ids: list[int], logprobs: list[PositionLogprobs] | None = None) -> bool:
        """Feed sampled tokens to completion `index`; returns True if it just finished."""
        tracker = self.trackers[index]
        if tracker.finished:
            return False
        now = time.monotonic()
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        delta = tracker.add_tokens(token_ids)
        self.metrics.num_generation_tokens += len(delta.token_ids)
        if logprobs is not None and self.logprobs[index] is not None:
            self.logprobs[index].extend(logprobs[: len(delta.token_ids)])
        self._unsent_ids[index].extend(delta.token_ids)
        self._unsent_text[index] += delta.text
        if tracker.finished:
            self.metrics.finished_time = now
        return tracker.finished

    def stop(self, index: int) -> bool:
        """End completion `index` now with finish_reason "stop" (its structured-output grammar is
        complete, or broken); returns True if it was still running."""
        tracker = self.trackers[index]
        if tracker.finished:
            return False
        self._unsent_text[index] += tracker.finish_now("stop").text
        self.metrics.finished_time = time.monotonic()
        return True

    def add_prompt_logprobs(self, entries: list[PositionLogprobs]) -> None:
        if self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(entries)

    def abort(self) -> None:
        for index, tracker in enumerate(self.trackers):
            if not tracker.finished:
                delta = tracker.abort()
                self._unsent_text[index] += delta.text
        self.metrics.finished_time = time.monotonic()

    def make_output(self) -> RequestOutput | None:
        """The output to hand out now, or None (nothing new, or held back by stream_interval)."""
        if self.stream:
            return self._delta_output()
        if self.finished and not self._final_sent:
            self._final_sent = True
            outputs = [self._completion(i, t.text, list(t.token_ids), self.logprobs[i]) for i, t in enumerate(self.trackers)]
            return self._request_output(outputs)
        return None

    def _delta_output(self) -> RequestOutput | None:
        outputs = []
        for i, tracker in enumerate(self.trackers):
            if self._finish_sent[i]:
                continue
            ids = self._unsent_ids[i]
            first = not self._sent_any[i] and bool(ids)
            if not (first or len(ids) >= self.stream_interval or tracker.finished):
                continue
            logprobs = None
            if self.logprobs[i] is not None:
                logprobs = self.logprobs[i][len(self.logprobs[i]) - len(ids):] if ids else []
            outputs.append(self._completion(i, self._unsent_text[i], list(ids), logprobs))
            self._unsent_ids[i], self._unsent_text[i] = [], ""
            self._sent_any[i] = True
            self._finish_sent[i] = tracker.finished
        return self._request_output(outputs) if outputs else None

    def _completion(self, index, text, token_ids, logprobs) -> CompletionOutput:
        tracker = self.trackers[index]
        finish = tracker.finish
        return CompletionOutput(
            index=index, text=text, token_ids=token_ids,
            finish_reason=finish.finish_reason if finish else None,
            stop_reason=finish.stop_reason if finish else None,
            logprobs=logprobs,
        )

    def _request_output(self, outputs) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=outputs, finished=self.finished, metrics=self.metrics,
            prompt_logprobs=self.prompt_logprobs, num_cached_tokens=self.metrics.num_cached_tokens,
        )


def position_logprobs(tokenizer, token_id: int, token_logprob: float, rank: int, top_ids, top_logprobs,
                      k: int) -> PositionLogprobs:
    """vLLM's per-position dict: the top-k candidates plus the actual token."""
    entry: PositionLogprobs = {}
    for r, (tid, lp) in enumerate(zip(top_ids[:k], top_logprobs[:k]), start=1):
        entry[int(tid)] = Logprob(float(lp), r, tokenizer.decode([int(tid)], skip_special_tokens=False))
    if int(token_id) not in entry:
        entry[int(token_id)] = Logprob(float(token_logprob), int(rank),
                                       tokenizer.decode([int(token_id)], skip_special_tokens=False))
    return entry

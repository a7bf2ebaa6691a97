"""Proto messages to and from jaxserve's Python types. Bad values raise ValueError naming the
field (the servicer turns that into INVALID_ARGUMENT)."""

from __future__ import annotations

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from server import generation_pb2 as pb

# Scalar SamplingParams fields carried as proto `optional`: copied only when set.
_OPTIONAL_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "max_tokens",
                    "min_tokens", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "include_stop_str_in_output", "skip_special_tokens")


def sampling_params_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Unset fields keep the Python defaults (an unset temperature is 1.0)."""
    kwargs = {name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)}
    if message.stop:
        kwargs["stop"] = list(message.stop)
    if message.stop_token_ids:
        kwargs["stop_token_ids"] = list(message.stop_token_ids)
    if message.logit_bias:
        kwargs["logit_bias"] = dict(message.logit_bias)
    if message.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_outputs_from_proto(message.structured_outputs)
    return SamplingParams(**kwargs)


def structured_outputs_from_proto(message: pb.StructuredOutputs) -> StructuredOutputsParams:
    """The fields that are set; none or several is a ValueError (the engine compiles it later)."""
    kwargs = {name: getattr(message, name) for name in ("json", "regex", "grammar", "json_object")
              if message.HasField(name)}
    if message.choice:
        kwargs["choice"] = list(message.choice)
    return StructuredOutputsParams(**kwargs)


def prompt_from_proto(request: pb.GenerateRequest) -> str | dict:
    """The engine's prompt form: text, or vLLM's dict with token ids and an optional cache salt."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt must be set: give text or token_ids")
    if kind == "text" and not request.text:
        raise ValueError("prompt must not be empty (text is empty)")
    if kind == "token_ids" and not request.token_ids.ids:
        raise ValueError("prompt must not be empty (token_ids has no ids)")
    prompt = {"prompt": request.text} if kind == "text" else {"prompt_token_ids": list(request.token_ids.ids)}
    if request.cache_salt:
        prompt["cache_salt"] = request.cache_salt
    return prompt


def responses_from_output(output: RequestOutput) -> list[pb.GenerateResponse]:
    """One chunk per completion that has news (tokens or its finish) in this delta output."""
    chunks = []
    for completion in output.outputs:
        if not completion.token_ids and completion.finish_reason is None:
            continue
        chunk = pb.GenerateResponse(request_id=output.request_id, index=completion.index,
                                    token_ids=completion.token_ids, text=completion.text,
                                    logprobs=_logprobs_to_proto(completion))
        if completion.finish_reason is not None:
            chunk.finish_reason = completion.finish_reason
            if completion.stop_reason is not None:
                chunk.stop_reason = str(completion.stop_reason)
        chunks.append(chunk)
    return chunks


def _logprobs_to_proto(completion: CompletionOutput) -> list[pb.TokenLogprobs]:
    """A delta output's logprobs: one entry per new token, in order."""
    messages = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or []):
        chosen = position[token_id]
        top = [pb.TopLogprob(token_id=tid, logprob=lp.logprob, rank=lp.rank or 0, decoded_token=lp.decoded_token or "")
               for tid, lp in position.items()]
        messages.append(pb.TokenLogprobs(token_id=token_id, logprob=chosen.logprob, rank=chosen.rank or 0, top=top))
    return messages

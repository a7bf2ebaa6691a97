"""Helpers shared by the host-tier and KV-transfer engine tests."""

from jaxserve.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=2)


def generate(engine, prompts, max_tokens=4, tag="r"):
    """Run `prompts` to completion on `engine`; returns (completions by prompt, scheduled rows by prompt)."""
    ids = [f"{tag}{i}" for i in range(len(prompts))]
    rows = {request_id: [] for request_id in ids}
    original = engine.scheduler.schedule

    def recording_schedule():
        out = original()
        for row in out.scheduled:
            if row.request_id in rows:
                rows[row.request_id].append(row)
        return out

    engine.scheduler.schedule = recording_schedule
    try:
        for request_id, prompt in zip(ids, prompts):
            engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
        outputs = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0]
    finally:
        engine.scheduler.schedule = original
    return [outputs[i] for i in ids], [rows[i] for i in ids]

"""After warm-up nothing compiles, whatever the clients send (issue 15): a compile at request time
stalled every stream for seconds, and any client could trigger one by asking for a new mix of
sampling options."""

import numpy as np

from jaxserve.compile_stats import backend_compile_count
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from tests.engine_utils import random_prompts, tiny_engine, tiny_loaded_model

VOCAB = 96
# On the word-level test vocabulary ("w2", "w3", ...): masks that leave many tokens (the regex and
# the grammar), and ones that leave only EOS, whose grammar then rejects it (choice, JSON).
CONSTRAINTS = [StructuredOutputsParams(regex="[a-z][0-9]+"),
               StructuredOutputsParams(grammar='start: /[a-z][0-9]+/ "w7"?'),
               StructuredOutputsParams(choice=["w2", "w3 w4"]), StructuredOutputsParams(json_object=True),
               StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}})]


def random_params(rng: np.random.Generator, max_n: int) -> SamplingParams:
    """Every SamplingParams feature, each on or off at random."""
    maybe = lambda p: rng.random() < p  # noqa: E731
    options = dict(temperature=float(rng.choice([0.0, 0.7, 1.0])), max_tokens=int(rng.integers(1, 12)),
                   ignore_eos=bool(maybe(0.5)))
    if maybe(0.3):
        options["top_k"] = int(rng.integers(1, VOCAB + 10))
    if maybe(0.3):
        options["top_p"] = float(rng.uniform(0.1, 1.0))
    if maybe(0.2):
        options["min_p"] = float(rng.uniform(0.0, 0.3))
    if maybe(0.4):
        options["logprobs"] = int(rng.integers(0, 21))
    if maybe(0.2):
        options["prompt_logprobs"] = int(rng.integers(0, 21))
    if maybe(0.3):
        options["presence_penalty"] = float(rng.uniform(-2, 2))
    if maybe(0.3):
        options["frequency_penalty"] = float(rng.uniform(-2, 2))
    if maybe(0.3):
        options["repetition_penalty"] = float(rng.uniform(0.5, 2))
    if maybe(0.3):
        ids = rng.choice(VOCAB, int(rng.integers(1, VOCAB)), replace=False)
        options["logit_bias"] = {int(i): float(rng.uniform(-5, 5)) for i in ids}
    if maybe(0.3):
        options["seed"] = int(rng.integers(-(2**63), 2**63))
    if maybe(0.2):
        options["n"] = int(rng.integers(2, max_n + 1))
    if maybe(0.3):
        options["stop"] = [f"w{i}" for i in rng.integers(2, VOCAB, int(rng.integers(1, 4)))]
    if maybe(0.3):
        options["stop_token_ids"] = rng.integers(2, VOCAB, int(rng.integers(1, 64))).tolist()
    if maybe(0.3):
        options["min_tokens"] = int(rng.integers(0, options["max_tokens"] + 1))
    if maybe(0.3):
        options["structured_outputs"] = CONSTRAINTS[int(rng.integers(len(CONSTRAINTS)))]
    return SamplingParams(**options)


def test_300_random_requests_compile_nothing_after_warm_up():
    engine = tiny_engine(tiny_loaded_model(), compile_at_startup=True, max_num_seqs=8, max_num_batched_tokens=64,
                         request_buckets=(4,), token_buckets=(16,))
    rng = np.random.default_rng(15)
    compiles = backend_compile_count()
    submitted, finished = 0, set()
    while submitted < 300 or engine.has_unfinished_requests():
        burst = min(int(rng.integers(1, 13)), 300 - submitted)  # random batch sizes, partly queued
        for prompt in random_prompts(rng, burst, 1, 60, VOCAB):
            engine.add_request(str(submitted), prompt, random_params(rng, engine.config.max_n))
            submitted += 1
        for _ in range(int(rng.integers(1, 6))):
            finished.update(out.request_id for out in engine.step() if out.finished)
    assert len(finished) == 300
    assert backend_compile_count() == compiles
    assert engine.structured.num_filled_steps > 0 and engine.structured.num_waits > 0

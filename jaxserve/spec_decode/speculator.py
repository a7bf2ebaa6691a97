"""The engine's side of speculative decoding: which requests carry drafts, and their drafts.

After a step's tokens reach the host, `Speculator.propose` asks the proposer for each running
request's next drafts and leaves them in `Request.spec_token_ids`, where the scheduler picks them
up (jaxserve/scheduler.py, "Speculative decoding"). A request carries none while it needs what
the verifier does not apply at draft positions, so that it behaves exactly as without speculation:
structured outputs (the mask follows each token) and an active `min_tokens` ban
(output shorter than `min_tokens`: the ban ends inside the run). Such a request samples one token
per step, by the ordinary sampler.

Async scheduling. The n-gram proposer reads the accepted tokens, so drafts for step N + 1 exist
only once step N's tokens are on the host: while speculating, the engine processes step N before
it schedules step N + 1 (`EngineCore.step`), and the device idles for that processing, the
proposal and the dispatch. The draft model's proposer (jaxserve/spec_decode/draft_model.py) runs
its own engine on the host's tokens the same way. The draft heads ("eagle3", "mtp") draft on
device within the step itself (jaxserve/spec_decode/draft_head.py): their drafts arrive with the
step's tokens, with no proposal work on the host, but the next step is still scheduled after
them.
"""

from __future__ import annotations

from typing import Sequence

from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.spec_decode.config import SpeculativeConfig
from jaxserve.spec_decode.draft_head import DraftHeadProposer
from jaxserve.spec_decode.draft_model import DraftModelProposer
from jaxserve.spec_decode.proposer import NgramProposer, Proposer


def can_speculate(params: SamplingParams) -> bool:
    """Whether a request's tokens come out of the verifier exactly as from the ordinary sampler
    (the `min_tokens` ban aside, which `Speculator.propose` checks per step)."""
    return params.structured_outputs is None


def make_proposer(config: SpeculativeConfig, draft_engine=None) -> Proposer:
    """The proposer of `config.method` (only built methods pass `SpeculativeConfig`'s checks);
    "draft_model" runs `draft_engine` (an `EngineCore` of the draft model, built by the engine)."""
    if config.method == "ngram":
        return NgramProposer(config)
    if config.method == "draft_model":
        return DraftModelProposer(config, draft_engine)
    if config.method in ("eagle3", "mtp"):
        return DraftHeadProposer(config)
    raise ValueError(f"speculative_config.method {config.method!r} is not implemented in this build")


class Speculator:
    """`draft_engine`: the draft model's `EngineCore` for method "draft_model"."""

    def __init__(self, config: SpeculativeConfig, draft_engine=None):
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens
        self.proposer = make_proposer(config, draft_engine)

    def propose(self, requests: Sequence[tuple[Request, SamplingParams]], step_drafts: dict | None = None) -> None:
        """Set each request's `spec_token_ids` to its next drafts (none when it may not speculate).
        `step_drafts`: request id -> the drafts its row computed on device (draft heads)."""
        wanted = []
        for request, params in requests:
            request.spec_token_ids = []
            if (request.status != RequestStatus.RUNNING or not can_speculate(params)
                    or request.num_output_tokens < params.min_tokens):
                continue
            max_drafts = min(self.num_speculative_tokens, request.max_tokens - request.num_output_tokens - 1)
            if max_drafts > 0:
                wanted.append((request, max_drafts))
        if self.proposer.needs_hidden_states:
            proposals = [self.proposer.propose(r.all_token_ids, n, (step_drafts or {}).get(r.request_id))
                         for r, n in wanted]
        else:
            proposals = self.proposer.propose_batch([(r.all_token_ids, n) for r, n in wanted]) if wanted else []
        for (request, _), proposal in zip(wanted, proposals):
            request.spec_token_ids = proposal.token_ids

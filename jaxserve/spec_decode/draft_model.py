"""The "draft_model" proposer: a smaller model with the same tokenizer drafts k tokens.

The draft model runs in an engine of its own (`EngineCore`, built by the target's engine with
the target's limits): its own paged KV cache, scheduler and jitted steps. Each proposal is a
batch of greedy requests, one per speculating row, whose prompt is the row's tokens so far and
which generate up to k tokens; the draft engine's prefix cache holds the previous proposal's
blocks, so a proposal computes the tokens accepted since (and the last partial block), then k - 1
one-token steps. Drafts are greedy, i.e. one-hot q: the verifier's acceptance min(1, p/q) is
then exact for sampled target rows too (a sampled draft with its q would be accepted more often).
"""

from __future__ import annotations

import itertools
from typing import Sequence

from jaxserve.sampling_params import SamplingParams
from jaxserve.spec_decode.config import SpeculativeConfig
from jaxserve.spec_decode.proposer import Proposal, Proposer


class DraftModelProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, draft_engine):
        super().__init__(config)
        if draft_engine is None:
            raise ValueError("speculative_config.method 'draft_model' needs the draft model's engine")
        self.engine = draft_engine
        self._ids = itertools.count()

    def propose(self, token_ids: Sequence[int], max_drafts: int, hidden_states=None) -> Proposal:
        return self.propose_batch([(token_ids, max_drafts)])[0]

    def propose_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[Proposal]:
        engine = self.engine
        ids = []
        for token_ids, max_drafts in requests:
            max_drafts = min(max_drafts, self.num_speculative_tokens, engine.max_model_len - len(token_ids))
            if max_drafts <= 0:
                ids.append(None)
                continue
            request_id = f"draft-{next(self._ids)}"
            engine.add_request(request_id, list(token_ids), SamplingParams(
                max_tokens=max_drafts, temperature=0.0, ignore_eos=True))
            ids.append(request_id)
        drafts: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    drafts[output.request_id] = list(output.outputs[0].token_ids)
        return [Proposal(drafts.get(request_id, []) if request_id else []) for request_id in ids]

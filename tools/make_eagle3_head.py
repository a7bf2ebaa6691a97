"""An EAGLE-3 head for a target model, in the published format, for benchmarks on machines
without a trained head (no model hub here).

The layer's weights are random (N(0, 0.02) matrices, the target's head and MLP sizes); only the
LM head is fitted: ridge regression from the head's normed hidden states to the token two
positions ahead (what the head's first draft predicts), over the draft vocabulary (the most
frequent tokens of the fitting text). The fitting text is `bench speculative`'s copy workload
(`throughput.copy_prompts`, another seed) plus the target's greedy answers to it, so a
benchmark on that workload measures a head that knows its text: an optimistic stand-in for a
trained head, not a measure of EAGLE-3's quality. Later drafts read the head's own hidden
states, for which nothing was fitted.

    PYTHONPATH=. .venv/bin/python tools/make_eagle3_head.py --out /tmp/eagle3-smollm2 [--draft-vocab 8192]
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxserve.benchmarks.throughput import copy_prompts
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams
from models.eagle3 import Eagle3Config, Eagle3Head
from models.kv_spec import allocate
from models.layers import AttentionMetadata
from models.registry import kv_spec

BLOCK = 16


def head_hidden(model, head, tokens: list[int]) -> np.ndarray:
    """The head's normed hidden states at positions 0 .. n - 2 of `tokens` (target features at p,
    token p + 1), one sequence in fresh caches."""
    n = len(tokens) - 1
    num_blocks = n // BLOCK + 2
    positions = jnp.arange(n, dtype=jnp.int32)
    meta = AttentionMetadata(
        slot_mapping=(1 + positions // BLOCK) * BLOCK + positions % BLOCK, query_start_loc=jnp.asarray([0, n]),
        seq_lens=jnp.asarray([n]), block_tables=jnp.arange(1, num_blocks + 1, dtype=jnp.int32)[None],
        num_seqs=jnp.asarray(1), token_mask=jnp.ones(n, bool))
    caches = [allocate(layer, num_blocks + 1, BLOCK, jnp.float32) for layer in kv_spec(model.config).layers]
    _, _, features = model(jnp.asarray(tokens[:n]), positions, caches, meta, capture=head.aux_layers)
    cache = allocate(head.kv_layer, num_blocks + 1, BLOCK, jnp.float32)
    hidden, _ = head(model, head.project(model, features), jnp.asarray(tokens[1:]), positions, cache, meta)
    return np.asarray(head.norm(hidden))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", required=True)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--fit-prompts", type=int, default=24)
    p.add_argument("--answer-len", type=int, default=128)
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    llm = LLM(model=args.model, dtype="float32", max_model_len=1024, compile_at_startup=False)
    loaded = llm.engine.loaded
    target = loaded.config
    hf = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": target.hidden_size,
          "num_attention_heads": target.num_heads, "num_key_value_heads": target.num_kv_heads,
          "head_dim": target.head_dim, "intermediate_size": target.intermediate_size,
          "rms_norm_eps": target.rms_norm_eps, "rope_theta": target.rope_theta,
          "max_position_embeddings": target.max_position_embeddings, "vocab_size": target.vocab_size,
          "draft_vocab_size": args.draft_vocab}
    head = Eagle3Head(Eagle3Config.from_hf(hf, target), rngs=nnx.Rngs(args.seed))

    prompts = copy_prompts(llm.tokenizer, args.fit_prompts, seed=args.seed)
    outputs = llm.generate([{"prompt_token_ids": q} for q in prompts],
                           SamplingParams(max_tokens=args.answer_len, temperature=0.0), use_tqdm=False)
    texts = [q + list(o.outputs[0].token_ids) for q, o in zip(prompts, outputs)]
    counts = collections.Counter(t for text in texts for t in text)
    vocab = np.asarray(sorted(t for t, _ in counts.most_common(args.draft_vocab)), np.int64)
    if len(vocab) < args.draft_vocab:  # pad with the lowest ids not used, so the shapes are as asked
        unused = np.setdiff1d(np.arange(target.vocab_size), vocab)[: args.draft_vocab - len(vocab)]
        vocab = np.sort(np.concatenate([vocab, unused]))
    index = {int(t): i for i, t in enumerate(vocab)}

    xs, ys = [], []
    for text in texts:
        hidden = head_hidden(loaded.model, head, text)  # position p drafts token p + 2
        for p_, token in enumerate(text[2:]):
            if token in index:
                xs.append(hidden[p_])
                ys.append(index[token])
    x, y = np.asarray(xs, np.float64), np.asarray(ys)
    gram = x.T @ x + args.ridge * len(x) * np.eye(x.shape[1])
    targets = np.zeros((len(x), len(vocab)))
    targets[np.arange(len(x)), y] = 1.0
    weight = np.linalg.solve(gram, x.T @ targets)  # [H, draft vocab]
    fit_accuracy = float(np.mean(np.argmax(x @ weight, axis=1) == y))

    state = nnx.state(head)
    flat = {".".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}
    tensors = {}
    for name, value in flat.items():
        if name in ("d2t", "lm_head.kernel"):
            continue
        if name.endswith(".kernel"):
            name, value = name[: -len("kernel")] + "weight", value.T
        tensors[name] = np.ascontiguousarray(value, np.float32)
    tensors["lm_head.weight"] = np.ascontiguousarray(weight.T, np.float32)
    tensors["d2t"] = vocab - np.arange(len(vocab))
    tensors["t2d"] = np.isin(np.arange(target.vocab_size), vocab)
    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "model.safetensors"))
    hf["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(head.aux_layers)}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    print(json.dumps({"out": args.out, "fit_positions": len(x), "fit_top1_accuracy": fit_accuracy,
                      "draft_vocab": len(vocab), "aux_layers": list(head.aux_layers)}))


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main()

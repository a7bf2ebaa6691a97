"""Tiny random-weight models and engines for behaviour tests (no files, no tokenizer download)."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine import EngineCore
from models.config import ModelConfig
from models.loader import LoadedModel, random_model
from models.tokenizer import Tokenizer

EOS_ID = 1


def tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """Word-level: id 0 "<unk>", 1 "<eos>", then "w2", "w3", ...; decode joins words with spaces."""
    return Tokenizer.word_level(vocab_size, eos_id=EOS_ID)


def tiny_config(architecture="LlamaForCausalLM", **overrides) -> ModelConfig:
    hf = dict(architectures=[architecture], vocab_size=96, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, eos_token_id=EOS_ID, rms_norm_eps=1e-5)
    hf.update(overrides)
    return ModelConfig.from_hf(hf)


# DeepSeek-V3-like: MLA over a latent cache (32 + 8 values per token), a dense first layer, 8 experts in
# 4 groups (top-2 groups), sigmoid + correction bias, a shared expert.
DEEPSEEK_TINY = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
                     moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
                     num_key_value_heads=4, num_nextn_predict_layers=1)


def tiny_deepseek_config(**overrides) -> ModelConfig:
    return tiny_config("DeepseekV3ForCausalLM", **{**DEEPSEEK_TINY, **overrides})


def tiny_loaded_model(config: ModelConfig | None = None, seed: int = 0) -> LoadedModel:
    # Weights 8x the N(0, 0.02) default, so greedy tokens vary along a sequence.
    loaded = random_model(config or tiny_config(), seed=seed, weight_scale=8.0)
    return dataclasses.replace(loaded, source=f"tiny-{loaded.config.architecture}-{seed}", name="tiny")


def tiny_engine_config(**options) -> EngineConfig:
    defaults = dict(model="tiny", block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=320,
                    kv_cache_memory_bytes=4 << 20, compile_at_startup=False, request_buckets=(4,),
                    token_buckets=(16,))
    defaults.update(options)
    return EngineConfig(**defaults)


def tiny_engine(loaded: LoadedModel | None = None, kv_connector=None, **options) -> EngineCore:
    return EngineCore(tiny_engine_config(**options), loaded=loaded or tiny_loaded_model(), kv_connector=kv_connector)


def random_prompts(rng: np.random.Generator, count: int, low: int, high: int, vocab: int) -> list[list[int]]:
    return [rng.integers(2, vocab, int(n)).tolist() for n in rng.integers(low, high + 1, count)]


@contextlib.contextmanager
def failing_steps(runner):
    """Inside the block, `runner.execute` raises RuntimeError("device lost") once for each True
    appended to the yielded list (a lost device, say); restored on exit."""
    execute, failures = runner.execute, []

    def flaky_execute(plan):
        if failures and failures.pop():
            raise RuntimeError("device lost")
        return execute(plan)

    runner.execute = flaky_execute
    try:
        yield failures
    finally:
        runner.execute = execute

"""Quantized weights: block FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8) and MXFP4 experts (gpt-oss).

A block-FP8 checkpoint stores each quantized linear `X.weight` as float8_e4m3fn `[out, in]` and
`X.weight_scale_inv` float32 `[ceil(out/bo), ceil(in/bi)]`, (bo, bi) = `weight_block_size`: the
weight is `weight * scale_inv`, the scale broadcast over its block (the last blocks of a row or
column may be short). Embeddings, norms, MoE routers and the LM head are stored unquantized.

MXFP4 checkpoints (gpt-oss, `quant_method` "mxfp4") store the MoE experts' weights as e2m1 values
in blocks of 32 with an e8m0 scale each (`X_blocks`, `X_scales`; the section "MXFP4" below), 4.25
bits a weight, and everything else in bf16. `fp8_weights` decides for them as for fp8: kept
("keep", the GPU default; families in `MXFP4_KEPT_FAMILIES`), `models.moe.Experts` holds them
packed (uint8 [S, in/2, out] and e8m0 scales [S, in/32, out], pallas_kernels/mxfp4.py: 0.53 bytes
a weight) and the MoE forward reads them packed (the Triton MXFP4 grouped matmul) or dequantizes
them in the step (reference, expert parallelism); else the loader dequantizes them on
the host, one expert at a time, into the parameter dtype (`mxfp4_dequantize`).

A block-FP8 model is built with its weight format (`fp8_weights`, resolved by `resolve_fp8_weights`):
- "dequantize": plain layers; the loader dequantizes each fp8 tensor on the host, one at a time,
  straight into the parameter's dtype (CPU default: there is no fp8 arithmetic to gain from);
- "keep": `models.layers.Linear` layers built with `linear_quant(config)` store the fp8 kernel
  `[in, out]` and its float32 block scales `[ceil(in/bi), ceil(out/bo)]` (a `QuantScale`, our
  layout: the transpose of the file's), 1 byte per weight instead of 2 (GPU default). Stacked MoE
  experts (`models.moe.Experts`, DeepSeek-V3's 97%) keep fp8 weights [S, in, out] with scales
  [S, ceil(in/bi), ceil(out/bo)] too; the MoE forward (`pallas_kernels.moe_ffn`,
  `models.expert_parallel.ep_moe_ffn`) takes the scales, not `block_fp8_matmul`.

A kept layer multiplies through `block_fp8_matmul`, by one of these methods (`MATMUL_METHODS`):
- "dequantize": the kernel is dequantized to the activations' dtype inside the step (on GPU XLA
  can fuse the convert and the scale into the dot's operand), then one dot in that dtype;
- "scaled": DeepSeek's recipe. Activations are quantized to fp8 per token and group of `bi`
  inputs (dynamic scales, max|x| / 448), each input block is an fp8 x fp8 dot accumulated in
  float32, scaled by the token's group scale times the weight block's scale, summed over blocks.
  In XLA the per-block partial products are materialized ([blocks, tokens, out] float32, in chunks
  of `SCALED_CHUNK_BYTES`): only a kernel that keeps the accumulator on chip reaches the fp8
  dot's rate;
- "pallas": the same math with that kernel: activations quantized as for "scaled" (in XLA), then
  `pallas_kernels.triton_fp8_matmul` (Triton lowering, sm_89+; 128 x 128 weight blocks only),
  which accumulates the scaled per-block fp8 dots in registers (interpret mode inside
  `pallas_kernels.interpret.interpret_mode()`);
- "auto" (`DEFAULT_MATMUL`): resolved per layer while tracing, by
  `pallas_kernels.dispatch.choose_fp8_matmul_kernel`: "pallas" on a GPU where the kernel takes the
  shape, else "dequantize". On CPU "dequantize" is faster from 64 tokens on, "scaled" only below 16
  (1.1-1.8x; BUILD.md, "Block-FP8 weights"), and it is exact up to the rounding of the dequantized
  weight to the activations' dtype. On GPU the preference for "pallas" is unmeasured until a GPU
  run: `jaxserve/benchmarks/gpu_parts.py` ("fp8_matmul") times every method there.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import FP8_WEIGHTS, ModelConfig
from pallas_kernels.dispatch import choose_fp8_matmul_kernel
from pallas_kernels.interpret import interpreting
from pallas_kernels.mxfp4 import (  # noqa: F401 - the MXFP4 format, used from here
    E8M0_NAN, E8M0_ONE, FP4_VALUES, MXFP4_BITS, MXFP4_BLOCK, MXFP4_SCALE_BLOCK, e8m0_to_float, mxfp4_dequantize,
    to_kernel_layout, unpack_fp4,
)

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
MATMUL_METHODS = ("auto", "dequantize", "scaled", "pallas")
DEFAULT_MATMUL = "auto"
# The "scaled" method's per-block partial products are computed in chunks of at most this many bytes.
SCALED_CHUNK_BYTES = 256 << 20


class QuantScale(nnx.Param):
    """The float32 block scales of an fp8 kernel: parameters, never cast to the compute dtype."""


@dataclasses.dataclass(frozen=True)
class BlockFP8:
    """How a quantized Linear stores its weight (static: part of the model's graph definition).

    `block_size` is the checkpoint's `weight_block_size`, (out, in) as the file stores the weight;
    the kernel here is [in, out], so its blocks are (`block_in`, `block_out`)."""

    block_size: tuple[int, int]
    matmul: str = DEFAULT_MATMUL

    def __post_init__(self):
        if len(self.block_size) != 2 or min(self.block_size) < 1:
            raise ValueError(f"block_size must be two positive sizes, got {self.block_size}")
        if self.matmul not in MATMUL_METHODS:
            raise ValueError(f"matmul must be one of {MATMUL_METHODS}, got {self.matmul!r}")

    @property
    def block_in(self) -> int:
        return self.block_size[1]

    @property
    def block_out(self) -> int:
        return self.block_size[0]

    @property
    def kernel_block(self) -> tuple[int, int]:
        """(rows, columns) of one block of the [in, out] kernel."""
        return self.block_in, self.block_out

    def scale_shape(self, in_features: int, out_features: int) -> tuple[int, int]:
        return scale_shape((in_features, out_features), self.kernel_block)


@dataclasses.dataclass(frozen=True)
class MXFP4:
    """Stacked MoE experts kept as MXFP4 (models.moe.Experts; the layout in pallas_kernels/mxfp4.py):
    packed uint8 weights [S, in/2, out] and uint8 e8m0 scales [S, in/32, out]."""

    @property
    def kernel_block(self) -> tuple[int, int]:
        """(rows, columns) of the [in, out] weight one scale covers."""
        return MXFP4_SCALE_BLOCK


# Families whose checkpoint conversion (`hf_tensors`) places packed MXFP4 experts: where "keep"
# keeps them. Elsewhere MXFP4 experts are dequantized at load.
MXFP4_KEPT_FAMILIES = ("gpt_oss",)


def expert_quant(config: ModelConfig) -> BlockFP8 | MXFP4 | None:
    """How the stacked MoE experts of a model built from `config` store their weights: block-FP8
    (as `linear_quant`), MXFP4, or None (plain)."""
    return MXFP4() if config.quant_method == "mxfp4" else linear_quant(config)


def linear_quant(config: ModelConfig, matmul: str | None = None, layout=None) -> BlockFP8 | None:
    """The `quant` for the quantized Linear layers of a model built from `config` (None: plain).
    `config` is the one the model is built with (`config_for_weights`). A model laid out over more
    than one device (`layout`, models/layout.py) takes the in-step dequantization: the Pallas
    kernel's call has no partitioning rule, so on a mesh XLA would gather its operands to every
    device (a shard_map around it is the step left)."""
    if config.quant_method != "fp8":
        return None
    if matmul is None and layout is not None and math.prod(layout.mesh.shape.values()) > 1:
        matmul = "dequantize"
    return BlockFP8(tuple(config.weight_block_size or (128, 128)), matmul or DEFAULT_MATMUL)


def resolve_fp8_weights(fp8_weights: str, platform: str | None = None) -> str:
    """"auto" -> "keep" on GPU, "dequantize" elsewhere; "keep" and "dequantize" as given."""
    if fp8_weights not in FP8_WEIGHTS:
        raise ValueError(f"fp8_weights must be one of {', '.join(map(repr, FP8_WEIGHTS))}, got {fp8_weights!r}")
    if fp8_weights != "auto":
        return fp8_weights
    return "keep" if (platform or jax.default_backend()) == "gpu" else "dequantize"


def config_for_weights(config: ModelConfig, fp8_weights: str) -> ModelConfig:
    """The config a model is built with: `config` when its quantized weights are kept (fp8, or
    MXFP4 experts of a family in `MXFP4_KEPT_FAMILIES`), else the same without its quantization
    (the built model holds plain weights, and says so). `fp8_weights` decides for both formats."""
    kept = config.quant_method == "fp8" or (config.quant_method == "mxfp4" and config.family in MXFP4_KEPT_FAMILIES)
    if config.quant_method is None or (kept and resolve_fp8_weights(fp8_weights) == "keep"):
        return config
    return dataclasses.replace(config, quant_method=None, weight_block_size=None, modules_to_not_convert=())


# ---- blocks over the last two axes (numpy on the host, jax on device) ----

def scale_shape(shape, block: tuple[int, int]) -> tuple[int, ...]:
    """Block scales of an array of `shape` in blocks of `block` over its last two axes."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def expand_scales(scale, shape, block: tuple[int, int]):
    """Each block's scale repeated over its elements, cut to `shape` (ragged last blocks)."""
    xp = np if isinstance(scale, np.ndarray) else jnp
    full = xp.repeat(xp.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return full[..., :shape[-2], :shape[-1]]


def dequantize(weight, scale, block: tuple[int, int], dtype=np.float32):
    """fp8 `weight` times its block `scale` (over the last two axes), as `dtype`. numpy arrays are
    dequantized on the host a leading slice at a time (one expert of a stacked tensor), so that a
    tensor is never held whole in float32 beside its result."""
    if isinstance(weight, np.ndarray) and weight.ndim > 2:
        out = np.empty(weight.shape, dtype)
        for index in np.ndindex(*weight.shape[:-2]):
            out[index] = dequantize(weight[index], scale[index], block, dtype)
        return out
    xp = np if isinstance(weight, np.ndarray) else jnp
    *lead, rows, cols = weight.shape
    nr, nc = scale.shape[-2:]
    if (rows, cols) == (nr * block[0], nc * block[1]):  # whole blocks: a broadcast, which XLA fuses
        blocks = weight.astype(xp.float32).reshape(*lead, nr, block[0], nc, block[1])
        value = (blocks * scale.astype(xp.float32)[..., :, None, :, None]).reshape(weight.shape)
    else:
        value = weight.astype(xp.float32) * expand_scales(scale.astype(xp.float32), weight.shape, block)
    return value.astype(dtype)


def quantize(weight, block: tuple[int, int]):
    """-> (float8_e4m3fn weight, float32 block scales): each block scaled so that its largest
    magnitude is 448 (an all-zero block gets scale 1). numpy in, numpy out; jax in, jax out."""
    xp = np if isinstance(weight, np.ndarray) else jnp
    *lead, rows, cols = weight.shape
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    pad = [(0, 0)] * len(lead) + [(0, nr * block[0] - rows), (0, nc * block[1] - cols)]
    blocks = xp.pad(weight.astype(xp.float32), pad).reshape(*lead, nr, block[0], nc, block[1])
    amax = xp.max(xp.abs(blocks), axis=(-3, -1))
    scale = xp.where(amax > 0, amax / FP8_MAX, 1.0).astype(xp.float32)
    q = xp.clip(blocks / scale[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q.reshape(*lead, nr * block[0], nc * block[1])[..., :rows, :cols], scale


def init_kernel(rngs: nnx.Rngs | None, shape: tuple[int, int], axes, quant: BlockFP8, std: float = 0.02):
    """(fp8 kernel Param, QuantScale) for a quantized Linear: N(0, std) weights quantized, or zeros
    with unit scales when `rngs` is None (shape-only builds)."""
    if rngs is None:
        kernel = jnp.zeros(shape, FP8)
        scale = jnp.ones(quant.scale_shape(*shape), jnp.float32)
    else:
        kernel, scale = quantize(std * jax.random.normal(rngs.params(), shape, jnp.float32), quant.kernel_block)
    return nnx.Param(kernel, logical_axes=tuple(axes)), QuantScale(scale, logical_axes=tuple(axes))


# ---- the matmul ----

def quantize_activations(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token-group quantization: x [..., K] -> (fp8 [..., G*group], the last group
    zero-padded; float32 scales [..., G]), G = ceil(K / group); x ~ fp8 * scale per group."""
    k = x.shape[-1]
    groups = -(-k // group)
    padded = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, groups * group - k)])
    padded = padded.reshape(*x.shape[:-1], groups, group)
    scale = jnp.maximum(jnp.max(jnp.abs(padded), axis=-1), 1e-12) / FP8_MAX
    q = jnp.clip(padded / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q.reshape(*x.shape[:-1], groups * group), scale


def block_fp8_matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array, quant: BlockFP8,
                     method: str | None = None) -> jax.Array:
    """x [..., in] @ the block-FP8 kernel [in, out] (scales [ceil(in/bi), ceil(out/bo)]) ->
    [..., out] in x's dtype, by `method` (default `quant.matmul`; module docstring)."""
    method = method or quant.matmul
    if method not in MATMUL_METHODS:
        raise ValueError(f"method must be one of {MATMUL_METHODS}, got {method!r}")
    if method in ("auto", "pallas"):
        choice = choose_fp8_matmul_kernel("auto" if method == "auto" else "triton", k_dim=kernel.shape[0],
                                          n_dim=kernel.shape[1], weight_block=quant.kernel_block, dtype=x.dtype)
        method = "pallas" if choice.backend == "triton" else "dequantize"
    if method == "dequantize":
        return x @ dequantize(kernel, scale, quant.kernel_block, x.dtype)
    if method == "pallas":
        return _pallas_matmul(x, kernel, scale, quant)
    return _scaled_matmul(x, kernel, scale, quant).astype(x.dtype)


def _pallas_matmul(x, kernel, scale, quant: BlockFP8) -> jax.Array:
    from pallas_kernels.triton_fp8_matmul import block_fp8_matmul_triton  # imports the Triton lowering

    (k, n), lead = kernel.shape, x.shape[:-1]
    xq, xs = quantize_activations(x.reshape(math.prod(lead), k), quant.block_in)  # [T, nk*bi], [T, nk]
    out = block_fp8_matmul_triton(xq[:, :k], xs, kernel, scale, out_dtype=x.dtype, interpret=interpreting())
    return out.reshape(*lead, n)


def _scaled_matmul(x, kernel, scale, quant: BlockFP8) -> jax.Array:
    bi, bo = quant.kernel_block
    (k, n), lead = kernel.shape, x.shape[:-1]
    tokens, blocks = math.prod(lead), scale.shape[0]
    xq, xs = quantize_activations(x.reshape(tokens, k), bi)  # [T, nk*bi], [T, nk]
    chunk = max(1, min(blocks, SCALED_CHUNK_BYTES // max(1, tokens * n * 4)))
    steps = -(-blocks // chunk)
    pad = steps * chunk - blocks  # zero blocks: zero products, whatever their scale
    xq = jnp.pad(xq, ((0, 0), (0, pad * bi))).reshape(tokens, steps, chunk, bi)
    xs = jnp.pad(xs, ((0, 0), (0, pad))).reshape(tokens, steps, chunk)
    wq = jnp.pad(kernel, ((0, steps * chunk * bi - k), (0, 0))).reshape(steps, chunk, bi, n)
    ws = jnp.pad(jnp.repeat(scale, bo, axis=1)[:, :n], ((0, pad), (0, 0))).reshape(steps, chunk, n)

    def add_chunk(acc, step):
        xq_c, xs_c, wq_c, ws_c = step  # [T, c, bi], [T, c], [c, bi, n], [c, n]
        partial = jax.lax.dot_general(xq_c, wq_c, (((2,), (1,)), ((1,), (0,))),
                                      preferred_element_type=jnp.float32)  # [c, T, n]
        return acc + jnp.sum(partial * xs_c.T[:, :, None] * ws_c[:, None, :], axis=0), None

    xs_steps = (jnp.moveaxis(xq, 1, 0), jnp.moveaxis(xs, 1, 0), wq, ws)
    if steps == 1:
        out, _ = add_chunk(jnp.zeros((tokens, n), jnp.float32), jax.tree.map(lambda a: a[0], xs_steps))
    else:
        out, _ = jax.lax.scan(add_chunk, jnp.zeros((tokens, n), jnp.float32), xs_steps)
    return out.reshape(*lead, n)


# ---- MXFP4 (gpt-oss's MoE experts): the format in pallas_kernels/mxfp4.py ----

def mxfp4_quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., K] (K a multiple of 32) -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]),
    on the host: each block scaled by the least power of two that brings its largest magnitude
    within e2m1's 6, each value rounded to the nearest e2m1 value (ties toward zero). Writes the
    MXFP4 checkpoints of tests and tools; the loader only reads them."""
    *lead, k = weight.shape
    if k % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 quantizes the last axis in blocks of {MXFP4_BLOCK}, got length {k}")
    groups = np.asarray(weight, np.float32).reshape(*lead, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = np.max(np.abs(groups), axis=-1)
    exponent = np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / FP4_VALUES[7]))
    scales = np.clip(exponent + 127, 0, E8M0_NAN - 1).astype(np.uint8)
    scaled = groups / e8m0_to_float(scales)[..., None]
    midpoints = (FP4_VALUES[:7] + FP4_VALUES[1:8]) / 2  # magnitudes past the last one saturate at 6
    codes = np.searchsorted(midpoints, np.abs(scaled)).astype(np.uint8) | (np.signbit(scaled).astype(np.uint8) << 3)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scales


# ---- what a model's weights take ----

@dataclasses.dataclass(frozen=True)
class WeightSummary:
    """Bytes of a model's parameters, and the formats they are stored in."""

    bytes: int
    params: int  # weights, not counting block scales
    formats: dict[str, int]  # "fp8 with block scales" or a dtype name -> parameters stored so
    on_disk: WeightSummary | None = None  # the checkpoint's, where it differs (MXFP4 experts)

    @property
    def bytes_per_param(self) -> float:
        return self.bytes / max(1, self.params)

    def __str__(self) -> str:
        shares = sorted(self.formats.items(), key=lambda item: -item[1])
        described = ", ".join(name if len(shares) == 1 else f"{name} {count / max(1, self.params):.0%}"
                              for name, count in shares)
        size = f"{self.bytes / 2**30:.2f} GiB" if self.bytes >= 2**30 else f"{self.bytes / 2**20:.1f} MiB"
        text = f"{size}, {self.bytes_per_param:.2f} bytes/param ({described})"
        return text if self.on_disk is None else f"{text}; in the checkpoint {self.on_disk}"


def weight_summary(model: nnx.Module, stored_as: str | None = None) -> WeightSummary:
    """What `model`'s parameters take (start-up log, `jaxserve bench throughput`). `stored_as`
    "mxfp4": the model was loaded from a checkpoint with MXFP4 experts, whose size is added
    (`mxfp4_checkpoint_summary`)."""
    if stored_as == "mxfp4":
        return dataclasses.replace(weight_summary(model), on_disk=mxfp4_checkpoint_summary(model))
    total, params, formats = 0, 0, {}
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        total += value.size * jnp.dtype(value.dtype).itemsize
        if isinstance(var, QuantScale):
            continue
        count = 2 * value.size if value.dtype == jnp.uint8 else value.size  # MXFP4: two weights a byte
        params += count
        name = ("fp8 with block scales" if value.dtype == FP8 else "mxfp4 with e8m0 scales" if value.dtype == jnp.uint8
                else jnp.dtype(value.dtype).name)
        formats[name] = formats.get(name, 0) + count
    return WeightSummary(total, params, formats)


def mxfp4_checkpoint_summary(model: nnx.Module) -> WeightSummary:
    """What `model`'s weights take in an MXFP4 checkpoint: the stacked expert weights (3-D
    parameters over the "expert" axis) at 4.25 bits each, everything else (expert biases too) in
    bfloat16, as gpt-oss ships them."""
    total, formats = 0.0, {"mxfp4": 0, "bfloat16": 0}
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, QuantScale):
            continue
        value = var.get_value()
        size = 2 * value.size if value.dtype == jnp.uint8 else value.size  # kept MXFP4: two weights a byte
        axes = var.get_metadata().get("logical_axes") or ()
        stored = "mxfp4" if len(axes) == 3 and axes[0] == "expert" else "bfloat16"
        formats[stored] += size
        total += size * (MXFP4_BITS / 8 if stored == "mxfp4" else 2)
    return WeightSummary(int(total), sum(formats.values()), {k: v for k, v in formats.items() if v})

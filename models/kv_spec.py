"""What a model family keeps in the KV cache, per token and per layer, and the typed cache of one layer.

A family declares its `KVSpec` (`kv_spec(config)` in its module): for every layer, the arrays it
caches per token (standard attention: K and V, `[num_kv_heads, head_dim]` each; MLA: one latent
row) and its sliding window. Everything that sizes, allocates, moves or checks KV reads it from
there: KV sizing and `max_model_len="auto"` (bytes per token), the runner (one `KVCache` per layer,
each array `[num_blocks, block_size, *token_shape]`), whole-block I/O for the host tier and
disaggregation (a block is the layers' arrays flattened in spec order), the transfer handshake
(`signature`) and FP8 scales (one per array). A family with another cache shape changes its own
module and its attention kernel, not the engine.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KVArraySpec:
    """One cached array of a layer: `token_shape` per token, `logical_axes` naming its dims for
    sharding (models/mesh.py LOGICAL_RULES; the block axis is "cache_blocks")."""

    name: str
    token_shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]

    @property
    def token_elements(self) -> int:
        return math.prod(self.token_shape)


@dataclasses.dataclass(frozen=True)
class LayerKVSpec:
    arrays: tuple[KVArraySpec, ...]
    sliding_window: int | None = None  # the layer attends to this many most recent keys; None: all


@dataclasses.dataclass(frozen=True)
class KVSpec:
    layers: tuple[LayerKVSpec, ...]
    # For a compressed cache (MLA): elements per token the same context would take as per-head K
    # and V, reported beside the real size at start-up.
    expanded_token_elements: int | None = None

    @classmethod
    def standard(cls, num_layers: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None) -> KVSpec:
        """K and V `[num_kv_heads, head_dim]` per token in every layer (Llama, Mistral, Qwen, MoEs)."""
        arrays = tuple(KVArraySpec(name, (num_kv_heads, head_dim), ("cache_heads", None)) for name in ("k", "v"))
        return cls(tuple(LayerKVSpec(arrays, sliding_window) for _ in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def token_elements(self) -> int:
        """Cache elements one token takes over all layers and arrays."""
        return sum(a.token_elements for layer in self.layers for a in layer.arrays)

    def bytes_per_token(self, dtype) -> int:
        return self.token_elements * jnp.dtype(dtype).itemsize

    def group_windows(self) -> tuple[int | None, ...]:
        """The layers' distinct windows, one KV group each: None (full attention) first, then
        the sliding windows from the smallest (the engine's KV manager, jaxserve/kv/cache_manager.py)."""
        windows = {layer.sliding_window for layer in self.layers}
        return ((None,) if None in windows else ()) + tuple(sorted(w for w in windows if w is not None))

    def layer_groups(self, windows: tuple[int | None, ...]) -> tuple[int, ...]:
        """Each layer's group among `windows` (a single group `(None,)` holds every layer)."""
        if windows == (None,):
            return (0,) * self.num_layers
        return tuple(windows.index(layer.sliding_window) for layer in self.layers)

    def signature(self) -> str:
        """A canonical description (the KV transfer handshake compares it): runs of equal layers,
        e.g. `30x[k:3x64,v:3x64]`, with `@w4096` for a sliding window."""
        runs: list[list] = []
        for layer in self.layers:
            text = "[" + ",".join(f"{a.name}:{'x'.join(map(str, a.token_shape))}" for a in layer.arrays) + "]"
            if layer.sliding_window is not None:
                text += f"@w{layer.sliding_window}"
            if runs and runs[-1][1] == text:
                runs[-1][0] += 1
            else:
                runs.append([1, text])
        return "+".join(f"{count}x{text}" for count, text in runs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's paged cache: `arrays` in the order of its `LayerKVSpec`, each
    `[num_blocks, block_size, *token_shape]`; `scales` holds one float32 scalar per array for a
    quantized (FP8) cache (stored = value / scale), else is empty. Donated to the step and
    updated in place by the attention layer."""

    arrays: tuple[jax.Array, ...]
    scales: tuple[jax.Array, ...] = ()

    def replace(self, *arrays: jax.Array) -> KVCache:
        """The same cache with new array contents (scales kept)."""
        return KVCache(tuple(arrays), self.scales)

    @property
    def dtype(self):
        return self.arrays[0].dtype


def allocate(layer: LayerKVSpec, num_blocks: int, block_size: int, dtype, placement=None) -> KVCache:
    """Zeroed arrays of one layer; `placement(shape, logical_axes)` gives each array's device or
    sharding (None: the default device)."""
    arrays = []
    for spec in layer.arrays:
        shape = (num_blocks, block_size, *spec.token_shape)
        device = None if placement is None else placement(shape, ("cache_blocks", None, *spec.logical_axes))
        arrays.append(jnp.zeros(shape, dtype, device=device))
    return KVCache(tuple(arrays))

"""Decoder layers run one at a time on any subset of rows, with a pre-allocated KV cache per layer.

The runtime does not call a model's ``forward``: it needs to stop after any layer, run a layer for some
rows only, and write keys/values for layers a row skipped. Each supported architecture gets a small
adapter that reads the layer's own modules (norms, projections, MLP) and implements its attention with
:func:`torch.nn.functional.scaled_dot_product_attention` over a :class:`KVCache`:

- :class:`LlamaAdapter`: Llama, Mistral, Qwen2, Qwen3 (pre-norm, RoPE from ``model.model.rotary_emb``,
  grouped-query attention, optional q/k biases and Qwen3's per-head q/k norms);
- :class:`GPT2Adapter`: GPT-2 (pre-norm, learned absolute positions, fused ``c_attn`` Conv1D).

Every adapter offers the same three operations on hidden states ``(n, S, d)`` of rows ``rows`` (global
batch indices, or None for all rows) at cache columns ``[col, col + S)``:

- ``embed(ids, positions)``: token (+ position) embeddings;
- ``layer(i, h, ...)``: run decoder layer ``i`` (writes its keys/values into the cache);
- ``propagate(i, h, ...)``: state propagation, only layer ``i``'s input norm and key/value projections
  of ``h`` (written into the cache), for rows that exited before layer ``i``.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RUNTIME_ARCHITECTURES", "GPT2Adapter", "KVCache", "LayerAdapter", "LlamaAdapter", "Step", "adapter_for"]

#: ``config.model_type`` values the runtime decodes (decoder-only; encoder-decoder models are not yet supported).
RUNTIME_ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Pre-allocated keys and values of every layer, ``(B, n_kv_heads, max_len, head_dim)`` each.

    All rows share the column index of a position (prompts are left-padded to one width), so writing
    step ``t`` touches column ``prompt_len + t - 1`` of the rows that ran or propagated that layer.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def write(self, layer: int, rows: torch.Tensor | None, col: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` ``(n, n_kv_heads, S, head_dim)`` at columns ``[col, col + S)`` of ``rows``."""
        stop = col + k.shape[2]
        if rows is None:
            self.keys[layer][:, :, col:stop] = k
            self.values[layer][:, :, col:stop] = v
        else:
            self.keys[layer][rows, :, col:stop] = k
            self.values[layer][rows, :, col:stop] = v

    def read(self, layer: int, rows: torch.Tensor | None, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of columns ``[0, stop)``: a view for all rows, a gathered copy for a subset."""
        if rows is None:
            return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]
        return self.keys[layer][rows, :, :stop], self.values[layer][rows, :, :stop]


@dataclass(frozen=True)
class Step:
    """Where the current rows are: cache columns, positions and the attention mask.

    Attributes
    ----------
    rows : torch.Tensor or None
        Global batch indices ``(n,)`` of the rows, None for the whole batch in order.
    col : int
        First cache column written (``S`` columns are written).
    positions : torch.Tensor
        Position ids ``(n, S)``.
    mask : torch.Tensor or None
        Additive attention mask ``(n, 1, S, col + S)`` (0 or the dtype's minimum), None when every key is
        visible (no padding and ``S == 1``).
    """

    rows: torch.Tensor | None
    col: int
    positions: torch.Tensor
    mask: torch.Tensor | None

    def subset(self, local: torch.Tensor, rows: torch.Tensor) -> Step:
        """The same step for a subset ``local`` (indices into this step's rows) with global ``rows``."""
        return Step(rows, self.col, self.positions[local], None if self.mask is None else self.mask[local])


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


class LayerAdapter(ABC):
    """Architecture-specific embedding, layer and state-propagation functions over a :class:`KVCache`."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        self.model = model
        self.layers = layers
        self.n_layers = len(layers)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(
            self.n_layers, batch, self.n_kv_heads, max_len, self.head_dim, dtype=self.dtype, device=self.device
        )

    @abstractmethod
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(n, S, d)`` of token ids and position ids ``(n, S)``."""

    @abstractmethod
    def rotary(self, h: torch.Tensor, positions: torch.Tensor):
        """Per-step position data shared by every layer (RoPE cos/sin), or None."""

    @abstractmethod
    def layer(self, i: int, h: torch.Tensor, step: Step, cache: KVCache, rope) -> torch.Tensor:
        """Output ``(n, S, d)`` of decoder layer ``i``; writes its keys/values into ``cache``."""

    @abstractmethod
    def propagate(self, i: int, h: torch.Tensor, step: Step, cache: KVCache, rope) -> None:
        """State propagation: layer ``i``'s keys/values of ``h`` ``(n, S, d)``, written into ``cache``."""

    def _attend(self, i: int, q: torch.Tensor, step: Step, cache: KVCache, scale: float) -> torch.Tensor:
        """Attention of queries ``(n, H, S, hd)`` over the cached columns ``[0, col + S)`` -> ``(n, S, H*hd)``."""
        n, _, s, _ = q.shape
        k, v = cache.read(i, step.rows, step.col + s)  # (n, KVH, col + S, hd)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=step.mask, scale=scale, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (n, H, S, hd)
        return out.transpose(1, 2).reshape(n, s, self.n_heads * self.head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAdapter(LayerAdapter):
    """Llama-family layers: ``h + o(attn(rope(q(n1 h)), rope(k(n1 h)), v(n1 h)))``, then ``+ mlp(n2 h)``."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        super().__init__(model, layers)
        config = model.config
        # Sliding-window attention equals full attention while the sequence fits the window; the
        # runtime checks that (longer sequences are refused, not silently changed).
        layer_types = getattr(config, "layer_types", None) or []
        window = None
        if "sliding_attention" in layer_types or config.model_type == "mistral":
            window = getattr(config, "sliding_window", None)
        self.sliding_window = None if window is None else int(window)
        attn = layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.hidden_size = int(config.hidden_size)
        self.base = model.model
        self.scales = [float(layer.self_attn.scaling) for layer in layers]

    def embed(self, ids, positions):
        return self.base.embed_tokens(ids)  # (n, S, d)

    def rotary(self, h, positions):
        return self.base.rotary_emb(h, position_ids=positions)  # cos, sin: (n, S, hd) each

    def _qkv(self, attn, x: torch.Tensor, rope, *, query: bool):
        n, s, _ = x.shape
        cos, sin = rope[0][:, None], rope[1][:, None]  # (n, 1, S, hd)
        k = attn.k_proj(x).view(n, s, self.n_kv_heads, self.head_dim)
        if hasattr(attn, "k_norm"):  # Qwen3: RMSNorm over each head
            k = attn.k_norm(k)
        k = k.transpose(1, 2)  # (n, KVH, S, hd)
        v = attn.v_proj(x).view(n, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (n, KVH, S, hd)
        k = k * cos + _rotate_half(k) * sin
        if not query:
            return None, k, v
        q = attn.q_proj(x).view(n, s, self.n_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)  # (n, H, S, hd)
        q = q * cos + _rotate_half(q) * sin
        return q, k, v

    def layer(self, i, h, step, cache, rope):
        block = self.layers[i]
        attn = block.self_attn
        x = block.input_layernorm(h)  # (n, S, d)
        q, k, v = self._qkv(attn, x, rope, query=True)
        cache.write(i, step.rows, step.col, k, v)
        h = h + attn.o_proj(self._attend(i, q, step, cache, self.scales[i]))  # (n, S, d)
        return h + block.mlp(block.post_attention_layernorm(h))  # (n, S, d)

    def propagate(self, i, h, step, cache, rope):
        block = self.layers[i]
        _, k, v = self._qkv(block.self_attn, block.input_layernorm(h), rope, query=False)
        cache.write(i, step.rows, step.col, k, v)


class GPT2Adapter(LayerAdapter):
    """GPT-2 blocks: ``h + proj(attn(c_attn(ln_1 h)))``, then ``+ mlp(ln_2 h)``; positions are embedded."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        super().__init__(model, layers)
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported by the runtime")
        self.sliding_window = None
        self.hidden_size = int(config.hidden_size)
        self.n_heads = self.n_kv_heads = int(config.num_attention_heads)
        self.head_dim = self.hidden_size // self.n_heads
        self.base = model.transformer
        self.scales = [float(block.attn.scaling) for block in layers]
        d = self.hidden_size
        # Key/value halves of the fused c_attn (Conv1D: x @ W + b, W (d, 3d)): views, not copies.
        self.kv_weight = [block.attn.c_attn.weight[:, d:] for block in layers]  # (d, 2d)
        self.kv_bias = [block.attn.c_attn.bias[d:] for block in layers]  # (2d,)

    def embed(self, ids, positions):
        return self.base.wte(ids) + self.base.wpe(positions)  # (n, S, d)

    def rotary(self, h, positions):
        return None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, -1, self.head_dim).transpose(1, 2)  # (n, H, S, hd)

    def layer(self, i, h, step, cache, rope):
        block = self.layers[i]
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(self.hidden_size, dim=2)  # (n, S, d) each
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        cache.write(i, step.rows, step.col, k, v)
        h = h + block.attn.c_proj(self._attend(i, q, step, cache, self.scales[i]))  # (n, S, d)
        return h + block.mlp(block.ln_2(h))  # (n, S, d)

    def propagate(self, i, h, step, cache, rope):
        x = self.layers[i].ln_1(h)  # (n, S, d)
        kv = torch.addmm(self.kv_bias[i], x.reshape(-1, self.hidden_size), self.kv_weight[i])  # (n*S, 2d)
        k, v = kv.view(*x.shape[:2], 2 * self.hidden_size).split(self.hidden_size, dim=2)
        cache.write(i, step.rows, step.col, self._heads(k), self._heads(v))


def adapter_for(model: nn.Module, layers: nn.ModuleList) -> LayerAdapter:
    """The adapter of ``model``'s architecture.

    Raises
    ------
    ValueError
        When the architecture is not one of :data:`RUNTIME_ARCHITECTURES` (the message names both).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "gpt2":
        return GPT2Adapter(model, layers)
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        return LlamaAdapter(model, layers)
    raise ValueError(
        f"the early-exit runtime does not support model type {model_type!r} ({type(model).__name__}); "
        f"supported: {list(RUNTIME_ARCHITECTURES)} (encoder-decoder models are not supported yet)"
    )

"""Decoder layers run one at a time on any subset of rows, with a pre-allocated KV cache per layer.

The runtime does not call a model's ``forward``: it needs to stop after any layer, run a layer for some
rows only, and write keys/values for layers a row skipped. Each supported architecture family gets a
small adapter that reads the layer's own modules (norms, projections, MLP) and implements its attention
with :func:`torch.nn.functional.scaled_dot_product_attention` over a :class:`KVCache`:

- :class:`LlamaAdapter`: Llama, Mistral, Qwen2, Qwen3 (pre-norm, RoPE from ``model.model.rotary_emb``,
  grouped-query attention, optional q/k biases and Qwen3's per-head q/k norms);
- :class:`GPT2Adapter`: GPT-2 (pre-norm, learned absolute positions, fused ``c_attn`` Conv1D);
- :class:`T5Adapter`: T5 (pre-norm RMS norms, relative position bias computed by the first layer and
  shared by all, unscaled attention, no absolute positions);
- :class:`BartAdapter`: BART (post-norm) and mBART (pre-norm): learned positions with offset 2,
  ``layernorm_embedding``, scaled token embeddings.

The first two share :class:`DecoderOnlyAdapter`, whose layers split into ``attend`` and ``finish``
(token elimination, :mod:`calibrate.lat`, removes rows in between); the last two share
:class:`EncoderDecoderAdapter`: the encoder (the model's own) runs once over the
input, every decoder layer's cross-attention keys/values are computed once from its output, and a
decoder layer is three residual sub-blocks (self-attention, cross-attention, MLP).

Every adapter offers the same operations on decoder hidden states ``(n, S, d)`` of rows ``rows`` (global
batch indices, or None for all rows) at cache columns ``[col, col + S)``:

- ``embed(ids, positions)``: token (+ position) embeddings;
- ``positional(h, step)``: position data shared by every layer of one step (RoPE cos/sin, T5's bias);
- ``layer(i, h, ...)``: run decoder layer ``i`` (writes its self-attention keys/values into the cache);
- ``propagate(i, h, ...)``: state propagation, only layer ``i``'s self-attention input norm (pre-norm
  layers) and key/value projections of ``h`` (written into the cache), for rows that exited before
  layer ``i``. Cross-attention keys/values do not depend on the decoder state, so nothing else is needed.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RUNTIME_ARCHITECTURES",
    "BartAdapter",
    "DecoderOnlyAdapter",
    "EncoderDecoderAdapter",
    "GPT2Adapter",
    "KVCache",
    "LayerAdapter",
    "LlamaAdapter",
    "Step",
    "T5Adapter",
    "adapter_for",
    "additive_mask",
    "attend_and_count",
]

#: ``config.model_type`` values the runtime decodes.
RUNTIME_ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "t5", "bart", "mbart")


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive mask (0 or the dtype's minimum: finite, so no NaN on empty rows)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Pre-allocated self-attention keys and values of every layer, ``(B, n_kv_heads, max_len, head_dim)`` each.

    All rows share the column index of a position (prompts are left-padded to one width), so writing
    step ``t`` touches column ``prompt_len + t - 1`` of the rows that ran or propagated that layer.
    Encoder-decoder models also keep each layer's cross-attention keys and values of the encoder output,
    ``(B, n_heads, S_enc, head_dim)``, and the encoder's additive padding mask (:meth:`set_cross`).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.cross_keys: list[torch.Tensor] = []
        self.cross_values: list[torch.Tensor] = []
        self.cross_mask: torch.Tensor | None = None

    def set_cross(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor | None) -> None:
        """Store every layer's cross-attention ``keys``/``values`` and the mask ``(B, 1, 1, S_enc)``
        (None: no padding)."""
        self.cross_keys, self.cross_values, self.cross_mask = keys, values, mask

    def read_cross(
        self, layer: int, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Cross-attention keys, values and mask of ``rows``: the stored tensors, or gathered copies for a subset."""
        k, v, mask = self.cross_keys[layer], self.cross_values[layer], self.cross_mask
        if rows is None:
            return k, v, mask
        return k[rows], v[rows], None if mask is None else mask[rows]

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
        visible (no padding and ``S == 1``) or ``causal``.
    causal : bool, default=False
        A prefill (``col == 0``) without padding: the causal mask is implied (the fused kernels' fast path).
    """

    rows: torch.Tensor | None
    col: int
    positions: torch.Tensor
    mask: torch.Tensor | None
    causal: bool = False

    def subset(self, local: torch.Tensor, rows: torch.Tensor) -> Step:
        """The same step for a subset ``local`` (indices into this step's rows) with global ``rows``."""
        mask = None if self.mask is None else self.mask[local]
        return Step(rows, self.col, self.positions[local], mask, self.causal)


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
    #: Whether the model has an encoder (:class:`EncoderDecoderAdapter`).
    encoder_decoder: bool = False
    #: Sliding-window length of the attention, None for full attention.
    sliding_window: int | None = None
    #: Per-query weights ``(n, S)`` (e.g. 1 for real tokens, 0 for filler): when set, attention is computed
    #: explicitly and :attr:`attention` keeps the attention each key received and the values of the call.
    query_weight: torch.Tensor | None = None
    attention: tuple[torch.Tensor, torch.Tensor] | None = None
    #: Queries per chunk of that explicit attention (memory ``n * H * chunk * S_k`` floats).
    count_chunk: int = 128

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        self.model = model
        self.layers = layers
        self.n_layers = len(layers)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        # The residual stream's dtype: T5 loaded in float16 keeps its MLP output projections in float32
        # (_keep_in_fp32_modules), so its layers' outputs are float32, in transformers as here.
        floats = {p.dtype for p in layers.parameters() if p.is_floating_point()}
        self.state_dtype = functools.reduce(torch.promote_types, floats, self.dtype)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(
            self.n_layers, batch, self.n_kv_heads, max_len, self.head_dim, dtype=self.dtype, device=self.device
        )

    @abstractmethod
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(n, S, d)`` of token ids and position ids ``(n, S)``."""

    @abstractmethod
    def positional(self, h: torch.Tensor, step: Step):
        """Position data of one step shared by every layer: a tuple of ``(n, ...)`` tensors, or None."""

    @abstractmethod
    def layer(self, i: int, h: torch.Tensor, step: Step, cache: KVCache, pos_data) -> torch.Tensor:
        """Output ``(n, S, d)`` of decoder layer ``i``; writes its keys/values into ``cache``."""

    @abstractmethod
    def propagate(self, i: int, h: torch.Tensor, step: Step, cache: KVCache, pos_data) -> None:
        """State propagation: layer ``i``'s keys/values of ``h`` ``(n, S, d)``, written into ``cache``."""

    def _attend(
        self, i: int, q: torch.Tensor, step: Step, cache: KVCache, scale: float, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of queries ``(n, H, S, hd)`` over the cached columns ``[0, col + S)`` -> ``(n, S, H*hd)``.

        ``bias`` ``(n, H, S, col + S)`` is added to the scores (T5's relative positions).
        """
        n, _, s, _ = q.shape
        if step.causal and step.col != 0:
            raise ValueError("Step.causal is a prefill without padding: col must be 0")
        k, v = cache.read(i, step.rows, step.col + s)  # (n, KVH, col + S, hd)
        mask = step.mask if bias is None else (bias if step.mask is None else step.mask + bias)
        if self.query_weight is not None:  # explicit, to add up the attention each key receives
            out = self._attend_and_count(q, k, v, mask, step.causal, scale)
        else:
            if step.causal and bias is not None:  # the kernel takes a mask or is_causal, not both
                mask = mask + additive_mask(torch.ones((s, s), dtype=torch.bool, device=q.device).tril(), q.dtype)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and step.causal,
                scale=scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (n, H, S, hd)
        return out.transpose(1, 2).reshape(n, s, self.n_heads * self.head_dim)

    def _attend_and_count(self, q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
        """:func:`attend_and_count` with :attr:`query_weight`; keeps ``(received, values)`` in :attr:`attention`.

        A prefill (``S_k == S``) is causal in column order for the queries that count (filler columns come
        first; a query with weight 0 may get any output), so a chunk of queries reads the keys up to its end.
        """
        out, received = attend_and_count(
            q,
            k,
            v,
            mask,
            scale,
            self.query_weight,
            causal=causal,
            causal_columns=k.shape[2] == q.shape[2],
            chunk=self.count_chunk,
        )
        self.attention = (received, v)
        return out


def attend_and_count(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    query_weight: torch.Tensor,
    *,
    causal: bool = False,
    causal_columns: bool = False,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention computed explicitly in chunks of queries, adding up the attention each key receives (one pass).

    Parameters
    ----------
    q : torch.Tensor
        Queries ``(n, H, S, hd)``.
    k, v : torch.Tensor
        Keys and values ``(n, KVH, S_k, hd)``; query head ``h`` reads key/value head ``h // (H / KVH)``.
    mask : torch.Tensor or None
        Additive mask ``(n, 1 or H, S, S_k)`` (may include a position bias).
    scale : float
        Score scale.
    query_weight : torch.Tensor
        ``(n, S)``: how much each query's attention counts (1 real, 0 filler).
    causal : bool, default=False
        Mask future keys (the prefill's implied causal mask).
    causal_columns : bool, default=False
        The queries that count see no key past their own column (a decoder prefill), so a chunk of queries
        ``[lo, hi)`` reads keys ``[0, hi)`` only.
    chunk : int, default=128
        Queries per chunk: memory ``n * H * chunk * S_k`` floats.

    Returns
    -------
    out : torch.Tensor
        ``(n, H, S, hd)``.
    received : torch.Tensor
        ``(n, H, S_k)`` float32: ``sum_i w_i A[h, i, j]``.
    """
    n, heads, s, hd = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = (q * scale).view(n, kv_heads, group, s, hd)  # scaled once here, not every (query, key) score
    received = torch.zeros((n, kv_heads, group, k.shape[2]), dtype=torch.float32, device=q.device)
    out = torch.empty_like(qg)
    weight = query_weight.float()  # (n, S)
    for lo in range(0, s, chunk):
        hi = min(s, lo + chunk)
        keys = hi if causal_columns else k.shape[2]
        scores = torch.einsum("nkgqd,nkjd->nkgqj", qg[:, :, :, lo:hi], k[:, :, :keys])  # (n, KVH, g, c, keys)
        if mask is not None:  # (n, 1 or H, S or 1, S_k)
            m = mask[:, :, lo:hi, :keys] if mask.shape[2] > 1 else mask[..., :keys]
            scores += m.unsqueeze(2) if m.shape[1] == 1 else m.view(n, kv_heads, group, hi - lo, -1)
        if causal:
            future = torch.ones((hi - lo, keys), dtype=torch.bool, device=q.device).triu(lo + 1)
            scores.masked_fill_(future, -math.inf)
        probs = scores.float().softmax(dim=-1)
        received[..., :keys] += torch.einsum("nkgqj,nq->nkgj", probs.detach(), weight[:, lo:hi])
        out[:, :, :, lo:hi] = torch.einsum("nkgqj,nkjd->nkgqd", probs.to(v.dtype), v[:, :, :keys])
    return out.view(n, heads, s, hd), received.view(n, heads, -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderOnlyAdapter(LayerAdapter):
    """A decoder-only layer split where token elimination removes rows: after attention, before the MLP."""

    def layer(self, i, h, step, cache, pos_data):
        return self.finish(i, h, self.attend(i, h, step, cache, pos_data))

    @abstractmethod
    def attend(self, i: int, h: torch.Tensor, step: Step, cache: KVCache, pos_data) -> torch.Tensor:
        """Self-attention of layer ``i`` before its output projection, ``(n, S, H*hd)``; writes keys/values."""

    @abstractmethod
    def finish(self, i: int, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of layer ``i``: output projection and residual, then the feed-forward block -> ``(n, S, d)``."""

    @abstractmethod
    def out_weight(self, i: int) -> torch.Tensor:
        """Layer ``i``'s attention output projection as a ``(H*hd, d)`` matrix (``out = attended @ W``)."""


class LlamaAdapter(DecoderOnlyAdapter):
    """Llama-family layers: ``h + o(attn(rope(q(n1 h)), rope(k(n1 h)), v(n1 h)))``, then ``+ mlp(n2 h)``."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        super().__init__(model, layers)
        config = model.config
        # Sliding-window attention equals full attention while the sequence fits the window; the
        # runtime checks that (longer sequences are refused, not silently changed).
        layer_types = getattr(config, "layer_types", None) or []
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

    def positional(self, h, step):
        return self.base.rotary_emb(h, position_ids=step.positions)  # cos, sin: (n, S, hd) each

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

    def attend(self, i, h, step, cache, rope):
        block = self.layers[i]
        q, k, v = self._qkv(block.self_attn, block.input_layernorm(h), rope, query=True)
        cache.write(i, step.rows, step.col, k, v)
        return self._attend(i, q, step, cache, self.scales[i])  # (n, S, H*hd)

    def finish(self, i, h, attended):
        block = self.layers[i]
        h = h + block.self_attn.o_proj(attended)  # (n, S, d)
        return h + block.mlp(block.post_attention_layernorm(h))  # (n, S, d)

    def out_weight(self, i):
        return self.layers[i].self_attn.o_proj.weight.T  # (H*hd, d)

    def propagate(self, i, h, step, cache, rope):
        block = self.layers[i]
        _, k, v = self._qkv(block.self_attn, block.input_layernorm(h), rope, query=False)
        cache.write(i, step.rows, step.col, k, v)


class GPT2Adapter(DecoderOnlyAdapter):
    """GPT-2 blocks: ``h + proj(attn(c_attn(ln_1 h)))``, then ``+ mlp(ln_2 h)``; positions are embedded."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        super().__init__(model, layers)
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported by the runtime")
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

    def positional(self, h, step):
        return None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, -1, self.head_dim).transpose(1, 2)  # (n, H, S, hd)

    def attend(self, i, h, step, cache, pos_data):
        block = self.layers[i]
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(self.hidden_size, dim=2)  # (n, S, d) each
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        cache.write(i, step.rows, step.col, k, v)
        return self._attend(i, q, step, cache, self.scales[i])  # (n, S, d)

    def finish(self, i, h, attended):
        block = self.layers[i]
        h = h + block.attn.c_proj(attended)  # (n, S, d)
        return h + block.mlp(block.ln_2(h))  # (n, S, d)

    def out_weight(self, i):
        return self.layers[i].attn.c_proj.weight  # Conv1D: x @ W, (d, d)

    def propagate(self, i, h, step, cache, pos_data):
        x = self.layers[i].ln_1(h)  # (n, S, d)
        kv = torch.addmm(self.kv_bias[i], x.reshape(-1, self.hidden_size), self.kv_weight[i])  # (n*S, 2d)
        k, v = kv.view(*x.shape[:2], 2 * self.hidden_size).split(self.hidden_size, dim=2)
        cache.write(i, step.rows, step.col, self._heads(k), self._heads(v))


@dataclass(frozen=True)
class _Attention:
    """Projections ``(..., d) -> (..., H*hd)`` (``o``: back to ``d``) of one attention and its score scale."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    scale: float


@dataclass(frozen=True)
class _DecoderBlock:
    """The modules of one encoder-decoder decoder layer: three residual sub-blocks, each with its norm."""

    self_norm: nn.Module
    self_attn: _Attention
    cross_norm: nn.Module
    cross_attn: _Attention
    mlp_norm: nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]


class EncoderDecoderAdapter(LayerAdapter):
    """Encoder-decoder models: the encoder once, then decoder layers of self-attention, cross-attention, MLP.

    Each sub-block ``f`` is pre-norm, ``h + f(norm(h))`` (T5, mBART), or post-norm, ``norm(h + f(h))``
    (BART). Subclasses give the modules of a layer (:meth:`_block`), the embeddings and position data.
    The decoder prompt never has padding (it is the start token, or Hugging Face's decoder prompt), so a
    position equals its cache column.
    """

    encoder_decoder = True
    #: Whether the sub-blocks normalise their input (else their output).
    pre_norm: bool

    def __init__(self, model: nn.Module, layers: nn.ModuleList, *, n_heads: int, head_dim: int) -> None:
        super().__init__(model, layers)
        self.hidden_size = int(model.config.d_model)
        self.n_heads = self.n_kv_heads = int(n_heads)
        self.head_dim = int(head_dim)
        self.encoder = model.get_encoder()
        self.blocks = [self._block(layer) for layer in layers]

    @abstractmethod
    def _block(self, layer: nn.Module) -> _DecoderBlock:
        """The modules of decoder layer ``layer``."""

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, self.n_heads, self.head_dim).transpose(1, 2)  # (n, H, S, hd)

    def encode(
        self, cache: KVCache, mask: torch.Tensor, *, ids: torch.Tensor | None, states: torch.Tensor | None
    ) -> None:
        """Run the encoder on ``ids`` ``(B, S_enc)`` (unless its output ``states`` ``(B, S_enc, d)`` is given)
        and store every decoder layer's cross-attention keys/values and the padding ``mask`` ``(B, S_enc)``."""
        if states is None:
            states = self.encoder(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state  # (B, S, d)
        keys = [self._split(block.cross_attn.k(states)) for block in self.blocks]  # (B, H, S_enc, hd) each
        values = [self._split(block.cross_attn.v(states)) for block in self.blocks]
        padded = None if bool(mask.all()) else additive_mask(mask.bool()[:, None, None, :], self.dtype)
        cache.set_cross(keys, values, padded)  # mask (B, 1, 1, S_enc)

    def _sub_block(self, norm: nn.Module, h: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return h + f(norm(h)) if self.pre_norm else norm(h + f(h))

    def _self_attention(self, i: int, x: torch.Tensor, step: Step, cache: KVCache, pos_data) -> torch.Tensor:
        attn = self.blocks[i].self_attn
        q, k, v = self._split(attn.q(x)), self._split(attn.k(x)), self._split(attn.v(x))  # (n, H, S, hd)
        cache.write(i, step.rows, step.col, k, v)
        return attn.o(self._attend(i, q, step, cache, attn.scale, bias=None if pos_data is None else pos_data[0]))

    def _cross_attention(self, i: int, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        attn = self.blocks[i].cross_attn
        n, s, _ = x.shape
        k, v, mask = cache.read_cross(i, step.rows)  # (n, H, S_enc, hd), mask (n, 1, 1, S_enc)
        out = F.scaled_dot_product_attention(self._split(attn.q(x)), k, v, attn_mask=mask, scale=attn.scale)
        return attn.o(out.transpose(1, 2).reshape(n, s, self.n_heads * self.head_dim))  # (n, S, d)

    def layer(self, i, h, step, cache, pos_data):
        block = self.blocks[i]
        h = self._sub_block(block.self_norm, h, lambda x: self._self_attention(i, x, step, cache, pos_data))
        h = self._sub_block(block.cross_norm, h, lambda x: self._cross_attention(i, x, step, cache))
        return self._sub_block(block.mlp_norm, h, block.mlp)  # (n, S, d)

    def propagate(self, i, h, step, cache, pos_data):
        block = self.blocks[i]
        x = block.self_norm(h) if self.pre_norm else h  # the self-attention's input
        cache.write(i, step.rows, step.col, self._split(block.self_attn.k(x)), self._split(block.self_attn.v(x)))


class T5Adapter(EncoderDecoderAdapter):
    """T5 decoder blocks (pre-norm); the first layer's relative position bias is added in every layer.

    Not reproduced: Hugging Face's clamping of infinite float16 activations (T5 overflows in float16).
    """

    pre_norm = True

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        config = model.config
        super().__init__(model, layers, n_heads=config.num_heads, head_dim=config.d_kv)
        self.decoder = model.decoder
        self.relative = layers[0].layer[0].SelfAttention  # owns relative_attention_bias

    def _block(self, layer):
        self_layer, cross_layer, mlp_layer = layer.layer

        def attention(a: nn.Module) -> _Attention:
            return _Attention(a.q, a.k, a.v, a.o, float(a.scaling))

        return _DecoderBlock(
            self_layer.layer_norm,
            attention(self_layer.SelfAttention),
            cross_layer.layer_norm,
            attention(cross_layer.EncDecAttention),
            mlp_layer.layer_norm,
            mlp_layer.DenseReluDense,
        )

    def embed(self, ids, positions):
        return self.decoder.embed_tokens(ids)  # (n, S, d): positions enter through the bias

    def positional(self, h, step):
        s = h.shape[1]
        bias = self.relative.compute_bias(s, step.col + s, device=h.device, past_seen_tokens=step.col)  # (1, H, S, K)
        return (bias.expand(h.shape[0], -1, -1, -1),)  # (n, H, S, col + S): every row at the same positions


class BartAdapter(EncoderDecoderAdapter):
    """BART (post-norm) and mBART (pre-norm) decoder layers; learned positions with offset 2."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        config = model.config
        heads = config.decoder_attention_heads
        super().__init__(model, layers, n_heads=heads, head_dim=config.d_model // heads)
        self.pre_norm = config.model_type == "mbart"
        self.decoder = model.model.decoder

    def _block(self, layer):
        def attention(a: nn.Module) -> _Attention:
            return _Attention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, float(a.scaling))

        return _DecoderBlock(
            layer.self_attn_layer_norm,
            attention(layer.self_attn),
            layer.encoder_attn_layer_norm,
            attention(layer.encoder_attn),
            layer.final_layer_norm,
            lambda x: layer.fc2(layer.activation_fn(layer.fc1(x))),
        )

    def embed(self, ids, positions):
        table = self.decoder.embed_positions  # rows offset by 2
        h = self.decoder.embed_tokens(ids) + F.embedding(positions + table.offset, table.weight)  # (n, S, d)
        return self.decoder.layernorm_embedding(h)

    def positional(self, h, step):
        return None


def adapter_for(model: nn.Module, layers: nn.ModuleList) -> LayerAdapter:
    """The adapter of ``model``'s architecture.

    Raises
    ------
    ValueError
        When the architecture is not one of :data:`RUNTIME_ARCHITECTURES` (the message names both).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"the early-exit runtime does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported: {list(RUNTIME_ARCHITECTURES)}"
        )
    adapter = _ADAPTERS[model_type]
    if issubclass(adapter, EncoderDecoderAdapter) and not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(  # BartForCausalLM: its "encoder" would be the whole model
            f"the early-exit runtime decodes model type {model_type!r} as an encoder-decoder "
            f"(...ForConditionalGeneration); {type(model).__name__} is its decoder alone"
        )
    _placement_iv(model)
    _skipped_hooks_iv(model, layers)
    return adapter(model, layers)


def _placement_iv(model: nn.Module) -> None:
    """Refuse ``model`` spread over several devices (``device_map``), with its embeddings offloaded (on the meta
    device), or run under ``torch.autocast``.

    The runtime, LAT and extraction keep one device for every layer's keys, values and states; under autocast
    its numbers would be another dtype's than the one a cache and a certificate record (the parameters'), and
    early exit writes keys of one dtype into a cache of the other.
    """
    param = next(model.parameters(), None)
    devices = sorted({str(p.device) for p in model.parameters()} - {"meta"})  # meta: offloaded, run where moved in
    if len(devices) > 1 or (param is not None and param.is_meta):
        where = f"it is spread over {devices}" if len(devices) > 1 else "its embeddings are offloaded (on meta)"
        raise ValueError(
            f"{where}: calm-calibrate keeps every layer's keys, values and states on the device of the model's "
            "embeddings (no device_map over several devices); load the model on one device (model.to(device))"
        )
    for device in {"cpu", "cpu" if param is None else param.device.type}:
        if torch.is_autocast_enabled(device):
            raise ValueError(
                f"torch.autocast is on ({device}, {torch.get_autocast_dtype(device)}): calm-calibrate records the "
                "model's own dtype, so a cache or certificate would describe numbers the runtime does not compute; "
                "cast the model instead (model.to(dtype)) and call outside the autocast block"
            )


def _run_by_parts(module: nn.Module) -> bool:
    """Whether the runtime and LAT run ``module`` (inside a layer) by its parts, never its ``forward``: attention
    blocks, T5's sub-layer wrappers, BERT's output blocks."""
    name = type(module).__name__
    return "Attention" in name or name == "T5LayerFF" or name.endswith("Output")


def _skipped_hooks_iv(model: nn.Module, layers: nn.ModuleList) -> None:
    """Refuse forward hooks that the runtime (or LAT) would skip: on the modules whose ``forward`` it never calls (the
    model, the stacks around ``layers``, each layer, its blocks run by parts: :func:`_run_by_parts`).
    Hugging Face's output-capturing hooks and calm-calibrate's own (which run in the thread that set them) are
    left aside; hooks on the parts it calls (an MLP, a norm, a projection, the LM head) run."""
    path = next(name for name, module in model.named_modules() if module is layers)
    parts = path.split(".")
    skipped = [(".".join(parts[:k]), model.get_submodule(".".join(parts[:k]))) for k in range(len(parts))]
    for i, layer in enumerate(layers):
        skipped += [
            (f"{path}.{i}{'.' if name else ''}{name}", module)
            for name, module in layer.named_modules()
            if not name or _run_by_parts(module)
        ]
    hooked = [
        name or "the model"
        for name, module in skipped
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
        if not str(getattr(hook, "__module__", "")).startswith(("transformers.", "calibrate."))
    ]
    if hooked:
        raise ValueError(
            f"the model has forward hooks on {sorted(set(hooked))[:5]}, modules whose forward early exit and token "
            "elimination do not call (they run their parts), so they would run without them, unlike the model's "
            "forward: remove them (handle.remove()), or hook the parts (an MLP, a projection, a norm)"
        )


#: ``config.model_type`` -> adapter class (keys: :data:`RUNTIME_ARCHITECTURES`).
_ADAPTERS: dict[str, type[LayerAdapter]] = {
    "gpt2": GPT2Adapter,
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "qwen3": LlamaAdapter,
    "t5": T5Adapter,
    "bart": BartAdapter,
    "mbart": BartAdapter,
}

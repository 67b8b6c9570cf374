"""Keep schedules of token elimination: how many word vectors each layer processes, from one speed-up knob.

A schedule for a prompt of ``N`` tokens on an ``L``-layer model is a non-increasing sequence
``keep[0] = N >= keep[1] >= ... >= keep[L-1]``: ``keep[l]`` vectors enter layer ``l``'s attention, and
layer ``l - 1`` removes the others after its attention, before its feed-forward block (as PoWER-BERT
extracts). Vectors are removed after every ``e``-th layer only (``e = round(L / 6)``: elimination points at
layers ``e, 2e, ...`` below ``L``, five for 12, 24 or 30 layers, each of which costs an explicitly computed
attention to score the vectors), and one scalar
``alpha >= 0`` spans the family (linear in depth, like learned token pruning's thresholds)::

    keep[l] = max(min_keep, ceil(N * (1 - alpha * e * floor(l / e) / (L - 1))))

and :meth:`KeepSchedule.from_speedup` picks the smallest ``alpha`` whose predicted speed-up reaches the
knob. The cost model counts multiply-adds of the prefill (embeddings and the LM head of the last token
excluded, the same in both):

- layer ``l`` with ``n = keep[l]`` inputs and ``m = keep[l + 1]`` survivors (``keep[L] = keep[L-1]``):
  ``n * c_qkv + n**2 * c_attn + m * (c_out + c_mlp)``;
- ``c_qkv = d (H + 2 KVH) hd`` (query, key, value projections), ``c_attn = 2 H hd`` (scores and the
  weighted sum, per query-key pair, as a dense kernel computes them), ``c_out = H hd d``, ``c_mlp`` =
  ``3 d d_ff`` for gated MLPs (Llama, Mistral, Qwen) or ``2 d d_ff`` (GPT-2, BERT, T5).

This module needs numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from calibrate._validation import int_at_least

__all__ = ["KeepSchedule", "LayerCosts", "layer_costs"]

#: ``config.model_type`` values whose MLP is gated (three projections of width ``d_ff``).
_GATED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LayerCosts:
    """Multiply-adds of one transformer layer, per token (``qkv``, ``out``, ``mlp``) and per query-key pair (``attn``).

    Examples
    --------
    >>> from calibrate.lat.schedule import LayerCosts
    >>> costs = LayerCosts(n_layers=4, qkv=3 * 64 * 64, attn=2 * 64, out=64 * 64, mlp=3 * 64 * 128)
    >>> costs.prefill([100, 100, 100, 100])              # every layer processes all 100 prompt tokens
    21504000.0
    >>> round(costs.prefill([100] * 4) / costs.prefill([100, 50, 50, 50]), 3)   # halve after the first layer
    1.947
    """

    n_layers: int
    qkv: float
    attn: float
    out: float
    mlp: float

    def prefill(self, keep) -> float:
        """Multiply-adds of a prefill whose layer ``l`` gets ``keep[l]`` vectors (``len(keep) == n_layers``)."""
        n = np.asarray(keep, dtype=np.float64)
        if n.shape != (self.n_layers,) or not np.all(np.isfinite(n) & (n >= 0)):
            raise ValueError(
                f"keep must hold n_layers={self.n_layers} counts >= 0, got {np.asarray(keep).tolist()!r:.80}"
            )
        m = np.append(n[1:], n[-1])  # survivors of each layer's attention
        return float(np.sum(n * self.qkv + n * n * self.attn + m * (self.out + self.mlp)))


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def layer_costs(model_config: Any) -> LayerCosts:
    """The cost model of a Hugging Face config (decoder-only, encoder of T5, BERT family).

    Parameters
    ----------
    model_config : transformers.PretrainedConfig, any object with its attributes, or a dict of them
        Reads ``hidden_size`` (``n_embd``, ``d_model``), the head counts, the layer count and the
        feed-forward width (``intermediate_size``, ``n_inner`` or ``4 d`` for GPT-2, ``d_ff``).

    Returns
    -------
    LayerCosts

    Raises
    ------
    ValueError
        When a size is missing or not positive.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from calibrate.lat.schedule import layer_costs
    >>> config = SimpleNamespace(model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    ...                          intermediate_size=128)
    >>> layer_costs(config)                               # gated MLP: mlp = 3 * 64 * 128
    LayerCosts(n_layers=4, qkv=12288.0, attn=128.0, out=4096.0, mlp=24576.0)
    >>> layer_costs(SimpleNamespace(n_embd=64, n_layer=4, n_head=4)).mlp   # GPT-2 names: d_ff = 4 d, 2 d d_ff
    32768.0
    """
    if isinstance(model_config, Mapping):  # e.g. config.json read with json.load
        model_config = SimpleNamespace(**model_config)
    d = _config_int(model_config, "hidden_size", "n_embd", "d_model")
    n_layers = _config_int(model_config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _config_int(model_config, "num_attention_heads", "n_head", "num_heads")
    if d is None or n_layers is None or heads is None or min(d, n_layers, heads) < 1:
        raise ValueError(
            "model_config must give positive hidden_size, num_hidden_layers and num_attention_heads (or their GPT-2 "
            f"/ T5 names), got d={d}, layers={n_layers}, heads={heads}"
        )
    kv_heads = _config_int(model_config, "num_key_value_heads") or heads
    head_dim = _config_int(model_config, "head_dim", "d_kv") or d // heads
    d_ff = _config_int(model_config, "intermediate_size", "n_inner", "d_ff") or 4 * d
    # T5 v1.1 / Flan: T5Config derives is_gated_act from feed_forward_proj, which a config.json holds alone
    projection = str(getattr(model_config, "feed_forward_proj", ""))
    gated = (
        getattr(model_config, "model_type", None) in _GATED
        or bool(getattr(model_config, "is_gated_act", False))
        or projection.startswith("gated-")
    )
    return LayerCosts(
        n_layers=n_layers,
        qkv=float(d * (heads + 2 * kv_heads) * head_dim),
        attn=float(2 * heads * head_dim),
        out=float(heads * head_dim * d),
        mlp=float((3 if gated else 2) * d * d_ff),
    )


def _every(n_layers: int) -> int:
    """Layers between two elimination points, ``round(L / 6)`` (``L = 30``: 5, eliminating at layers 5, 10, ..., 25)."""
    return max(1, round(n_layers / 6))


def _counts(prompt_len: int, n_layers: int, alpha: float, min_keep: int) -> tuple[int, ...]:
    every = _every(n_layers)
    depth = (np.arange(n_layers) // every * every) / max(n_layers - 1, 1)
    keep = np.ceil(prompt_len * (1.0 - alpha * depth) - 1e-9).astype(np.int64)
    keep = np.clip(keep, min(min_keep, prompt_len), prompt_len)
    keep[0] = prompt_len
    return tuple(int(k) for k in keep)


def _speedup_iv(speedup) -> float:
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float, np.integer, np.floating)):
        raise TypeError(f"speedup must be a number >= 1, got {type(speedup).__name__}")
    speedup = float(speedup)
    if not math.isfinite(speedup) or speedup < 1.0:
        raise ValueError(f"speedup must be a finite number >= 1 (1 = the unmodified model), got {speedup}")
    return speedup


@dataclass(frozen=True)
class KeepSchedule:
    """Per-layer keep counts of token elimination for one prompt length.

    Attributes
    ----------
    keep : tuple of int
        ``keep[l]``: word vectors entering layer ``l`` (0-based), ``keep[0]`` = the prompt length,
        non-increasing.
    prompt_len : int
        Tokens of the prompt.
    speedup : float
        The knob the schedule was made for (>= 1).
    predicted_speedup : float
        Multiply-adds of the full prefill over those of this schedule (>= ``speedup`` unless clipped).
    max_speedup : float
        The largest predicted speed-up any schedule reaches for this prompt length (every layer after
        the first elimination point keeps ``min_keep`` vectors).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> config = SimpleNamespace(model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    ...                          intermediate_size=128)
    >>> s = KeepSchedule.from_speedup(config, prompt_len=100, speedup=1.5)
    >>> s.keep
    (100, 84, 68, 52)
    >>> round(s.predicted_speedup, 2)
    1.51
    """

    keep: tuple[int, ...]
    prompt_len: int
    speedup: float
    predicted_speedup: float
    max_speedup: float

    @classmethod
    def from_speedup(
        cls, model_config: Any, prompt_len: int, speedup: float, *, min_keep: int = 2, clip: bool = False
    ) -> KeepSchedule:
        """The least aggressive schedule of the family whose predicted speed-up reaches ``speedup``.

        Parameters
        ----------
        model_config : transformers.PretrainedConfig
            Sizes for the cost model (see :func:`layer_costs`).
        prompt_len : int
            Prompt tokens, >= 1.
        speedup : float
            Target predicted prefill speed-up, finite and >= 1 (1 keeps every token).
        min_keep : int, default=2
            Vectors every layer keeps at least (the first token and, in decoders, the last prompt token).
        clip : bool, default=False
            When the speed-up cannot be reached: False raises, True returns the most aggressive schedule.

        Returns
        -------
        KeepSchedule

        Raises
        ------
        ValueError
            When ``speedup`` is below 1, NaN or infinite, or cannot be reached (the message gives the
            maximum) and ``clip`` is False; when ``prompt_len`` or ``min_keep`` is below 1.
        """
        speedup = _speedup_iv(speedup)
        prompt_len, min_keep = int_at_least(prompt_len, "prompt_len"), int_at_least(min_keep, "min_keep")
        costs = layer_costs(model_config)
        n_layers = costs.n_layers
        full = costs.prefill([prompt_len] * n_layers)

        def predicted(alpha: float) -> float:
            return full / costs.prefill(_counts(prompt_len, n_layers, alpha, min_keep))

        top = float(n_layers)  # alpha at which every layer after the first elimination point is at min_keep
        best = predicted(top)
        if speedup > best * (1 + 1e-12):
            if not clip:
                raise ValueError(
                    f"speedup {speedup:g} cannot be reached for a prompt of {prompt_len} tokens on this model: "
                    f"the most is {best:.4g} (every layer after the first elimination point keeps "
                    f"{min(min_keep, prompt_len)} "
                    "tokens)"
                )
            alpha = top
        else:
            lo, hi = 0.0, top
            if predicted(lo) >= speedup:
                hi = lo
            for _ in range(60):  # smallest alpha whose prediction reaches the knob
                if hi - lo < 1e-9:
                    break
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if predicted(mid) >= speedup else (mid, hi)
            alpha = hi
        keep = _counts(prompt_len, n_layers, alpha, min_keep)
        return cls(
            keep=keep,
            prompt_len=prompt_len,
            speedup=speedup,
            predicted_speedup=full / costs.prefill(keep),
            max_speedup=best,
        )

"""The config and the result of an early-exit run: :class:`EarlyExitConfig` and :class:`EarlyExitOutput`.

Both are re-exported by :mod:`calibrate.runtime`; this module imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from calibrate._format import level
from calibrate.exits import Decay

__all__ = ["EarlyExitConfig", "EarlyExitOutput"]


def generated_lengths(new_tokens: torch.Tensor, eos_ids) -> torch.Tensor:
    """Tokens of each row ``(B, T)`` up to and including its first EOS (all ``T`` without one), shape ``(B,)``."""
    ends = torch.isin(new_tokens, torch.as_tensor(tuple(eos_ids), dtype=new_tokens.dtype, device=new_tokens.device))
    first = ends.int().argmax(dim=1) + 1
    return torch.where(ends.any(dim=1), first, torch.full_like(first, new_tokens.shape[1]))


@dataclass(frozen=True)
class EarlyExitConfig:
    """Settings of one early-exit decoding run (built by :func:`generate` from its arguments).

    Attributes
    ----------
    max_new_tokens : int
        Most tokens generated per row (>= 1).
    n_layers : int
        Decoder layers ``L`` of the model.
    lambda_hat : float or None
        Certified threshold; None runs the full model (no certificate, or "full model only").
    measure : str or None
        Confidence measure (one of :data:`~calibrate.runtime.RUNTIME_MEASURES`), None for the
        full model or a fixed exit layer.
    decay : Decay or None
        Decaying threshold as certified (``lambda_t = clip(0.9 lambda + 0.1 exp(-tau t / N), 0, 1)``).
    exit_layer : int or None
        Fixed exit layer (1-based) for every token, instead of a certificate (benchmarks and tests; no
        guarantee attached).
    eos_token_ids : tuple of int
        Tokens that end a row (kept as its last token); later positions get ``pad_token_id``.
    pad_token_id : int
        Filler after a row's EOS.
    """

    max_new_tokens: int
    n_layers: int
    lambda_hat: float | None = None
    measure: str | None = None
    decay: Decay | None = None
    exit_layer: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @property
    def full_model(self) -> bool:
        """Whether every token runs every layer."""
        return self.lambda_hat is None and self.exit_layer is None

    def threshold(self, t: int) -> float:
        """``lambda_t`` of the ``t``-th (0-based) generated token; ``inf`` for the full model."""
        if self.lambda_hat is None:
            return math.inf
        if self.decay is None:
            return float(self.lambda_hat)
        # The same float64 formula as the calibration (calibrate.exits.Decay.thresholds).
        return float(self.decay.thresholds(np.array([self.lambda_hat]), np.array([t]))[0, 0])


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, as the reports are
class EarlyExitOutput:
    """Result of :func:`generate`, shaped like Hugging Face ``GenerateDecoderOnlyOutput`` plus exit layers.

    Attributes
    ----------
    sequences : torch.LongTensor, shape (batch, prompt_length + n_steps)
        Prompt (as given, left-padded) followed by the generated tokens; for encoder-decoder models the
        decoder's sequence, ``decoder_start_token_id`` then the generated tokens. After a row's EOS its
        positions hold ``pad_token_id``: exactly what ``model.generate`` returns. ``n_steps <=
        max_new_tokens`` (the loop stops when every row has finished).
    exit_layers : torch.LongTensor, shape (batch, n_steps)
        1-based layer that emitted each generated token (``n_layers`` = full model), 0 at the padding
        after a row's EOS.
    prompt_length : int
        Width of the (padded) prompt; 1 (the start token) for encoder-decoder models.
    n_layers : int
        Decoder layers ``L`` of the model.
    thresholds : tuple of float, shape (n_steps,)
        ``lambda_t`` used at each step (``inf`` when running the full model).
    measure : str or None
        Confidence measure used (None for the full model or a fixed exit layer).
    config : EarlyExitConfig
        All settings of the run.
    """

    sequences: torch.Tensor
    exit_layers: torch.Tensor
    prompt_length: int
    n_layers: int
    thresholds: tuple[float, ...]
    measure: str | None
    config: EarlyExitConfig = field(repr=False)

    @property
    def new_tokens(self) -> torch.Tensor:
        """Generated part of :attr:`sequences`, shape ``(batch, n_steps)``."""
        return self.sequences[:, self.prompt_length :]

    @property
    def n_generated(self) -> torch.Tensor:
        """Tokens generated per row, EOS included, shape ``(batch,)``."""
        return (self.exit_layers > 0).sum(dim=1)

    @property
    def mean_exit_layer(self) -> float:
        """Average 1-based exit layer over all generated tokens (``n_layers`` for the full model)."""
        used = self.exit_layers[self.exit_layers > 0]
        return float(used.float().mean()) if used.numel() else float("nan")

    @property
    def layer_savings(self) -> float:
        """Fraction of decoder layers skipped, ``1 - mean_exit_layer / n_layers``."""
        return 1.0 - self.mean_exit_layer / self.n_layers

    def __repr__(self) -> str:
        return (
            f"EarlyExitOutput(batch={self.sequences.shape[0]}, prompt_length={self.prompt_length}, "
            f"n_steps={self.exit_layers.shape[1]}, n_layers={self.n_layers}, measure={self.measure!r}, "
            f"mean_exit_layer={level(self.mean_exit_layer, '.2f', side='down')})"  # 29.98 of 30 is no full model
        )

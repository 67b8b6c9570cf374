"""Offline tuning for token elimination: one set of weights for every speed-up (:func:`calibrate.lat.finetune`).

The Latency-Adjustable Transformer fine-tunes with the knob drawn at random, so that the tuned weights
serve every speed-up without retraining. :func:`finetune` does that parameter-efficiently on a decoder:

- **targets**: the unmodified model's greedy continuation of each training prompt (sequence-level
  self-distillation): the tuned model learns to say, with a thinned-out prompt, what the full model says;
- **each step** draws one speed-up uniformly from ``speedup_range`` for its batch, thins the prompts out
  as :func:`calibrate.lat.generate` does (same schedule, scores and always-kept tokens), feeds the target
  tokens after them (teacher forcing; they attend to each layer's survivors, as generated tokens do) and
  minimises their cross-entropy, plus ``anchor`` times the same loss with nothing removed (so that the
  tuned model keeps the unmodified model's outputs at speed-up 1);
- **trained**: low-rank adapters (LoRA, ``W + (alpha / r) B A`` with ``B = 0`` at the start) on the
  decoder layers' linear projections, merged into the weights at the end, so the result is a plain
  Hugging Face model that :func:`calibrate.lat.generate`, :func:`calibrate.lat.fit` and
  ``save_pretrained`` take as is.

The tuned model is a copy; the model passed in is not modified. Certify the tuned model itself: its
certificate records its own :func:`~calibrate.lat.model_id`.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch
import torch.nn.functional as F
from torch import nn

from calibrate._extract_checks import _context_iv, prompt_ids, prompts_iv
from calibrate._extract_steps import _pad
from calibrate._frozen import Rebuilt, read_only_arrays
from calibrate._validation import finite_at_least, finite_positive, int_at_least, seed_iv, torch_seed
from calibrate.heads import ExitHeads, decoder_layers
from calibrate.lat.decode import _prefill, _schedules, _special_ids, generate
from calibrate.lat.schedule import _speedup_iv
from calibrate.lat.scores import SCORES, _always_kept
from calibrate.runtime._layers import adapter_for

__all__ = ["FINETUNE_ARCHITECTURES", "DEFAULT_TARGETS", "FinetuneResult", "finetune"]

#: ``config.model_type`` values :func:`finetune` tunes (their projections are ``nn.Linear``).
FINETUNE_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
#: Names of the decoder layers' linear projections that get adapters by default.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, as the reports are
class FinetuneResult(Rebuilt):
    """Result of :func:`finetune`.

    Attributes
    ----------
    model : transformers.PreTrainedModel
        The tuned copy, adapters merged into its weights, in eval mode.
    losses : ndarray of float64, shape (steps,)
        Training loss of each step: mean cross-entropy (nats per target token) at the drawn speed-up, plus
        ``anchor`` times that at speed-up 1.
    speedups : ndarray of float64, shape (steps,)
        The speed-up drawn for each step.
    trainable : int
        Parameters trained (the adapters').
    seconds : float
        Wall-clock time of the training loop (the targets' decoding excluded).
    """

    model: nn.Module
    losses: np.ndarray
    speedups: np.ndarray
    trainable: int
    seconds: float

    def __post_init__(self) -> None:
        read_only_arrays(self, "losses", "speedups")

    def __repr__(self) -> str:
        first, last = (self.losses[: max(1, len(self.losses) // 10)], self.losses[-max(1, len(self.losses) // 10) :])
        return (
            f"FinetuneResult(steps={len(self.losses)}, trainable={self.trainable}, seconds={self.seconds:.0f}, "
            f"loss first/last tenth={np.mean(first):.4f}/{np.mean(last):.4f})"
        )

    def plot(self, ax=None):
        """Training loss per step (and its running mean), coloured by the speed-up drawn.

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Where to draw; default: a new figure.

        Returns
        -------
        matplotlib.figure.Figure
            The figure of ``ax``; without ``ax`` a new one, which pyplot keeps open (shown by ``plt.show()`` and in
            notebooks) until ``plt.close(fig)``: close it when drawing many, in a loop or a server.
        """
        import matplotlib.pyplot as plt

        from calibrate.audit import _tight

        ax = ax or plt.figure(figsize=(6, 3.5)).subplots()
        steps = np.arange(1, len(self.losses) + 1)
        points = ax.scatter(steps, self.losses, c=self.speedups, s=8, cmap="viridis")
        window = max(1, len(self.losses) // 20)
        mean = np.convolve(self.losses, np.ones(window) / window, "valid")
        ax.plot(steps[window - 1 :], mean, color="k", label=f"running mean ({window} steps)")
        ax.figure.colorbar(points, ax=ax, label="speed-up drawn")
        # the loss: cross-entropy with elimination, plus anchor times that without (see finetune)
        ax.set(xlabel="step", ylabel="training loss (nats / token)", title="Token-elimination tuning")
        ax.legend(fontsize=8)
        _tight(ax.figure)
        return ax.figure


class _LoRALinear(nn.Module):
    """``base(x) + (alpha / r) x A^T B^T`` with ``A`` ``(r, in)`` random and ``B`` ``(out, r)`` zero at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        a = torch.randn((rank, w.shape[1]), generator=generator, dtype=torch.float32) / math.sqrt(w.shape[1])
        self.a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.b = nn.Parameter(torch.zeros((w.shape[0], rank), device=w.device, dtype=w.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``(out, in)`` (the value-weighted score reads projections' weights)."""
        return self.base.weight + self.scale * self.b @ self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T) @ self.b.T * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the adapter added into its weight."""
        self.base.weight += self.scale * self.b @ self.a
        return self.base


def _install(layers: nn.ModuleList, targets: Sequence[str], rank: int, alpha: float, seed: int) -> list[_LoRALinear]:
    """Wrap every ``nn.Linear`` of ``layers`` whose attribute name is in ``targets``; returns the wrappers."""
    generator = torch.Generator().manual_seed(torch_seed(seed))
    wrapped = []
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    lora = _LoRALinear(child, rank, alpha, generator)
                    setattr(parent, name, lora)
                    wrapped.append(lora)
    return wrapped


def _merge(layers: nn.ModuleList) -> None:
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _LoRALinear):
                    setattr(parent, name, child.merged())


def _targets(model, tokenizer, tokens: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The unmodified model's greedy continuation of each prompt, up to and including its first EOS."""
    out = []
    for s in range(0, len(tokens), batch_size):
        ids, mask = _pad(tokens[s : s + batch_size], tokenizer.pad_token_id or 0, left=True)
        result = generate(model, ids, mask, max_new_tokens=max_new_tokens, tokenizer=tokenizer)
        out += [row[:k].tolist() for row, k in zip(result.new_tokens.cpu().numpy(), result.n_generated.tolist())]
    return out


def _target_loss(adapter, heads, ids, mask, y, y_mask, speedup: float, special, score: str) -> torch.Tensor:
    """Mean cross-entropy of the targets ``y`` ``(b, T)`` fed back after the prompts thinned out at ``speedup``."""
    _, keep = _schedules(adapter.model.config, mask, speedup, 2)
    tail = y.shape[1] - 1  # the targets fed back, all but the last
    always = torch.cat(
        [_always_kept(ids, mask, special, last=True), torch.ones_like(y[:, :tail], dtype=torch.bool)], dim=1
    )
    full_ids = torch.cat([ids, y[:, :tail]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(y[:, :tail])], dim=1)
    cache = adapter.new_cache(ids.shape[0], full_ids.shape[1])
    h, *_ = _prefill(adapter, full_ids, full_mask, keep, always, score, cache, tail=tail)  # (b, T, d)
    logits = heads(h, layer=adapter.n_layers - 1).float()  # (b, T, V): predicts y
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return (loss * y_mask.flatten()).sum() / y_mask.sum()


def _finetune_iv(
    model,
    prompts,
    speedup_range,
    steps,
    batch_size,
    lr,
    rank,
    alpha,
    anchor,
    targets,
    score,
    max_seconds,
    max_new_tokens,
    seed,
):
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FINETUNE_ARCHITECTURES:
        raise ValueError(
            f"finetune does not support model_type {getattr(config, 'model_type', None)!r}; supported: "
            f"{FINETUNE_ARCHITECTURES}"
        )
    prompts_iv(prompts)
    if not isinstance(speedup_range, Sequence) or len(speedup_range) != 2:
        raise ValueError(f"speedup_range must be (low, high), got {speedup_range!r}")
    low, high = (_speedup_iv(s) for s in speedup_range)
    if high < low:
        raise ValueError(f"speedup_range must be (low, high) with low <= high, got {speedup_range!r}")
    counts = (("steps", steps), ("batch_size", batch_size), ("rank", rank), ("max_new_tokens", max_new_tokens))
    for name, value in counts:
        int_at_least(value, name)
    rates = finite_positive(lr, "lr"), finite_positive(alpha, "alpha"), finite_at_least(anchor, "anchor")
    seed_iv(seed)
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of projection names, got {targets!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    max_seconds = None if max_seconds is None else finite_positive(max_seconds, "max_seconds")
    return low, high, *rates, max_seconds


def finetune(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    speedup_range: tuple[float, float] = (1.0, 3.0),
    steps: int = 200,
    batch_size: int = 4,
    lr: float = 1e-3,
    rank: int = 8,
    alpha: float = 16.0,
    anchor: float = 1.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    max_new_tokens: int = 16,
    score: str = "attention",
    seed: int = 0,
    max_seconds: float | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Tune a decoder so that one set of weights serves every token-elimination speed-up in a range.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A Llama-family decoder (``config.model_type`` in :data:`FINETUNE_ARCHITECTURES`); not modified.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer (prompts one by one, left-padded; special tokens always kept, as in decoding).
    prompts : sequence of str
        Training prompts, disjoint from the calibration and test prompts.
    speedup_range : (float, float), default=(1.0, 3.0)
        Each step draws its speed-up uniformly from ``[low, high]`` (each finite and >= 1).
    steps : int, default=200
        Optimiser steps (each on ``batch_size`` prompts drawn without replacement).
    batch_size : int, default=4
        Prompts per step.
    lr : float, default=1e-3
        AdamW learning rate of the adapters.
    rank : int, default=8
        Rank ``r`` of each adapter.
    alpha : float, default=16.0
        Adapter scale numerator: the update is ``(alpha / r) B A``.
    anchor : float, default=1.0
        Weight of the same batch's loss at speed-up 1 added to each step (0: none). Without it the tuned
        model drifts from the unmodified one at speed-up 1 too (on SmolLM2: ROUGE-L loss 0.51 after 20
        minutes), which the certificate, made against the tuned model's own output, would not show.
    targets : sequence of str, default=DEFAULT_TARGETS
        Attribute names of the ``nn.Linear`` projections in the decoder layers that get adapters.
    max_new_tokens : int, default=16
        Length of the target continuations.
    score : {"attention", "value"}, default="attention"
        Contribution score used while training (decode and certify with the same).
    seed : int, default=0
        Seed of the adapters' initialisation, the batches and the speed-ups drawn.
    max_seconds : float, optional
        Stop after this much training time even if fewer than ``steps`` steps ran (wall-clock time: how many
        steps run then depends on the machine, so the seed no longer fixes the result).
    progress : bool, default=True
        Show progress bars.

    Returns
    -------
    FinetuneResult
        The tuned copy (adapters merged), per-step losses and speed-ups.

    Raises
    ------
    ValueError
        For an unsupported architecture, a bad range, count, rate, score or prompt list; targets that
        match no ``nn.Linear``.
    TypeError
        When ``prompts`` is not a sequence of str, or a count or rate is not a number (a bool or a str).

    Examples
    --------
    >>> import torch
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    >>> from calibrate import lat
    >>> words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
    >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    >>> tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    >>> _ = torch.manual_seed(0)
    >>> config = LlamaConfig(num_hidden_layers=6, hidden_size=16, intermediate_size=32, num_attention_heads=2,
    ...                      vocab_size=32, eos_token_id=1, pad_token_id=0)
    >>> model = LlamaForCausalLM(config).eval()
    >>> prompts = [" ".join(f"w{(i * j) % 29}" for j in range(12)) for i in range(16)]
    >>> result = lat.finetune(model, tokenizer, prompts, steps=5, max_new_tokens=4)
    >>> result.losses.shape, result.trainable
    ((5,), 13056)
    """
    from calibrate._progress import tqdm

    low, high, lr, alpha, anchor, max_seconds = _finetune_iv(  # the rates as floats (a Fraction or numpy scalar given)
        model,
        prompts,
        speedup_range,
        steps,
        batch_size,
        lr,
        rank,
        alpha,
        anchor,
        targets,
        score,
        max_seconds,
        max_new_tokens,
        seed,
    )
    special = _special_ids(tokenizer, model.config.vocab_size)  # as lat.fit and lat.generate keep them
    tokens = prompt_ids(tokenizer, prompts)
    _context_iv(model.config, False, tokens, max_new_tokens, teacher_forced=True)  # prompt + continuation
    with torch.no_grad():
        wanted = _targets(model, tokenizer, tokens, max_new_tokens, 8)

    tuned = copy.deepcopy(model).eval()
    tuned.requires_grad_(False)
    layers = decoder_layers(tuned)
    adapters = _install(layers, tuple(targets), rank, alpha, seed)
    if not adapters:
        raise ValueError(f"targets {tuple(targets)} match no nn.Linear in the decoder layers")
    params = [p for a in adapters for p in (a.a, a.b)]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    adapter, heads = adapter_for(tuned, layers), ExitHeads.from_model(tuned)
    rng = np.random.default_rng(seed)
    pad_id = tokenizer.pad_token_id or 0
    losses, drawn = [], []
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="token-elimination tuning", unit="step", disable=not progress):
        rows = rng.choice(len(prompts), size=min(batch_size, len(prompts)), replace=False)
        speedup = float(rng.uniform(low, high))
        ids, mask = (t.to(adapter.device) for t in _pad([tokens[r] for r in rows], pad_id, left=True))  # (b, P)
        y, y_mask = (t.to(adapter.device) for t in _pad([wanted[r] for r in rows], pad_id, left=False))  # (b, T)
        loss = _target_loss(adapter, heads, ids, mask, y, y_mask, speedup, special, score)
        if anchor and speedup != 1.0:  # keep the unmodified behaviour: the same targets with nothing removed
            loss = loss + anchor * _target_loss(adapter, heads, ids, mask, y, y_mask, 1.0, special, score)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        drawn.append(speedup)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    seconds = time.perf_counter() - start
    _merge(layers)
    tuned.requires_grad_(False)
    return FinetuneResult(
        model=tuned.eval(),
        losses=np.asarray(losses),
        speedups=np.asarray(drawn),
        trainable=sum(p.numel() for p in params),
        seconds=seconds,
    )

"""Sequence classification with token elimination in the encoder (BERT family).

:func:`classify` runs a ``...ForSequenceClassification`` model's encoder with
:func:`calibrate.lat.encoders.encode` and its own classification head on the result. The head reads the
first column (``[CLS]``, or ``<s>`` for RoBERTa), which is always kept. With ``speedup=1`` nothing is
removed and the logits equal ``model(input_ids, attention_mask).logits``.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibrate.certificate import Certificate
from calibrate.heads import _context_positions
from calibrate.lat.decode import _knob_iv, _predicted, _schedules
from calibrate.lat.encoders import CLASSIFIER_ARCHITECTURES, encode, encoder_for
from calibrate.lat.schedule import KeepSchedule, layer_costs
from calibrate.lat.scores import _always_kept
from calibrate.models import _eval_mode
from calibrate.runtime._inputs import _ids_iv

__all__ = ["ClassificationOutput", "classify"]


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, as the reports are
class ClassificationOutput:
    """Result of :func:`classify`.

    Attributes
    ----------
    logits : torch.Tensor
        ``(B, num_labels)`` float.
    speedup : float
        The knob (1 = the unmodified model).
    schedules : tuple of KeepSchedule
        One per row, for its own input length.
    processed : torch.Tensor
        ``(B, L)`` long: word vectors of each row that entered each encoder layer.
    kept : tuple of torch.Tensor
        Per layer, ``(B, W_l)`` long: the input columns that entered it, ``-1`` for filler.
    predicted_speedup : float
        Predicted encoder speed-up of the batch (full multiply-adds over those processed, summed over rows).
    """

    logits: torch.Tensor
    speedup: float
    schedules: tuple[KeepSchedule, ...]
    processed: torch.Tensor
    kept: tuple[torch.Tensor, ...]
    predicted_speedup: float = 1.0

    @property
    def labels(self) -> torch.Tensor:
        """Predicted labels ``(B,)``: the argmax of the logits."""
        return self.logits.argmax(dim=-1)

    def __repr__(self) -> str:
        return (
            f"ClassificationOutput(batch={self.logits.shape[0]}, labels={self.logits.shape[1]}, "
            f"speedup={self.speedup:g}, mean vectors per layer={self.processed.float().mean():.1f} of "
            f"{self.processed[:, 0].float().mean():.1f})"
        )


def _head(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The classifier's logits ``(B, num_labels)`` from the encoder's states ``(B, W, d)`` (it reads column 0)."""
    if model.config.model_type == "bert":
        pooled = model.bert.pooler(states)  # tanh(dense(states[:, 0]))
        return model.classifier(model.dropout(pooled))
    return model.classifier(states)  # RoBERTa's head takes states[:, 0] itself


@torch.no_grad()
def _token_types_iv(token_type_ids, shape: torch.Size, n_types: int) -> None:
    integer = isinstance(token_type_ids, torch.Tensor) and not (
        token_type_ids.is_floating_point() or token_type_ids.is_complex() or token_type_ids.dtype == torch.bool
    )
    if not integer:
        raise TypeError(f"token_type_ids must be an integer torch.Tensor, got {token_type_ids!r:.80}")
    if tuple(token_type_ids.shape) != tuple(shape):
        raise ValueError(
            f"token_type_ids must have the shape of input_ids {tuple(shape)}, got {tuple(token_type_ids.shape)}"
        )
    if token_type_ids.numel() and not (0 <= int(token_type_ids.min()) and int(token_type_ids.max()) < n_types):
        raise ValueError(f"token_type_ids must lie in [0, config.type_vocab_size={n_types})")


def _classifier_iv(model) -> None:
    """Refuse a model :func:`classify` cannot run: another architecture, or no sequence-classification head."""
    config = model.config
    if config.model_type not in CLASSIFIER_ARCHITECTURES:
        raise ValueError(
            f"lat.classify does not support model_type {config.model_type!r}; supported: {CLASSIFIER_ARCHITECTURES}"
        )
    base = getattr(model, config.model_type, None)
    if base is None or not hasattr(model, "classifier") or (config.model_type == "bert" and base.pooler is None):
        raise ValueError(
            f"lat.classify needs a ...ForSequenceClassification model (pooler and classifier), got "
            f"{type(model).__name__}"
        )
    param = next(model.parameters())
    with torch.no_grad(), _eval_mode(model):  # the head's own output: multiple-choice and token heads pass the above
        logits = _head(model, torch.zeros(1, 1, config.hidden_size, dtype=param.dtype, device=param.device))
    if logits.ndim != 2 or logits.shape[1] < 2:  # a multiple-choice or one-label head: every argmax would be 0
        raise ValueError(
            f"lat.classify needs a ...ForSequenceClassification model with num_labels >= 2 (a label is the argmax of "
            f"its logits), got logits of shape {tuple(logits.shape)} from {type(model).__name__}"
        )


@torch.no_grad()
def classify(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    speedup: float = 1.0,
    certificate: Certificate | None = None,
    token_type_ids: torch.Tensor | None = None,
    score: str = "attention",
    tokenizer=None,
    min_keep: int = 2,
) -> ClassificationOutput:
    """Classify with an encoder that removes the least contributing word vectors layer by layer.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        ``BertForSequenceClassification`` or ``RobertaForSequenceClassification`` (``config.model_type`` in
        :data:`~calibrate.lat.encoders.CLASSIFIER_ARCHITECTURES`); run in eval mode (as calibrated: a model
        left in training mode would classify with dropout), its modes restored after.
    input_ids : torch.Tensor
        ``(B, P)`` ids, right-padded, ``[CLS]`` in column 0 (the head reads column 0, as the model's own).
    attention_mask : torch.Tensor, optional
        ``(B, P)`` 0/1, default all ones.
    speedup : float, default=1.0
        Predicted encoder speed-up, finite and >= 1 (1 = the unmodified model); each row gets
        :meth:`KeepSchedule.from_speedup` for its own length, clipped to the most it can reach.
    certificate : Certificate, optional
        A ``token_keep`` certificate of this model (from :func:`calibrate.lat.fit`): classify at its
        certified speed-up with the settings it was certified with.
    token_type_ids : torch.Tensor, optional
        ``(B, P)`` segment ids (BERT), as for the model's ``forward``.
    score : {"attention", "value"}, default="attention"
        Contribution score (:func:`calibrate.lat.scores.contribution_scores`).
    tokenizer : transformers tokenizer, optional
        Its special tokens ([SEP], ...) are always kept; without it only the first real token is.
    min_keep : int, default=2
        Vectors every layer keeps at least.

    Returns
    -------
    ClassificationOutput

    Raises
    ------
    ValueError
        For a speed-up below 1, NaN or infinite; an unsupported architecture (the message names the
        supported ones) or a model without its sequence-classification head, or whose head gives fewer than 2
        logits (a multiple-choice or ``num_labels=1`` head); a certificate for another
        knob or another model; invalid ids or mask, or a left-padded batch; inputs longer than the
        model's positions; ``token_type_ids`` of another shape or outside ``[0, config.type_vocab_size)``;
        ``min_keep`` below 1 or not an int.
    TypeError
        When ``token_type_ids`` is not an integer tensor.

    Examples
    --------
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from calibrate import lat
    >>> _ = torch.manual_seed(0)
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64,
    ...                     vocab_size=100, num_labels=3)
    >>> model = BertForSequenceClassification(config).eval()
    >>> ids = torch.randint(1, 100, (2, 60))
    >>> torch.allclose(lat.classify(model, ids).logits, model(ids).logits, atol=1e-5)
    True
    >>> out = lat.classify(model, ids, speedup=2.0)
    >>> out.processed[0].tolist(), round(out.predicted_speedup, 2)
    ([60, 51, 41, 32, 22, 13], 2.0)
    """
    config = model.config
    _classifier_iv(model)
    speedup, score, min_keep, special = _knob_iv(model, speedup, certificate, score, min_keep, tokenizer)
    device = next(model.parameters()).device
    ids, mask = _ids_iv(input_ids, attention_mask, model, device, left_padded=False)
    if not bool(mask[:, 0].all()):
        raise ValueError("input_ids must be right-padded with [CLS] in column 0 (the head reads column 0)")
    name, context = _context_positions(config) or (None, None)
    if context is not None and ids.shape[1] > context:
        raise ValueError(
            f"input_ids has {ids.shape[1]} columns but the model has {context} positions (config.{name}="
            f"{getattr(config, name)}); shorten the inputs (nothing is truncated)"
        )
    if token_type_ids is not None:
        _token_types_iv(token_type_ids, ids.shape, getattr(config, "type_vocab_size", 1))
    schedules, keep = _schedules(config, mask, speedup, min_keep)
    always = _always_kept(ids, mask, special, last=False)
    types = None if token_type_ids is None else token_type_ids.to(device)
    with _eval_mode(model):
        states, _, kept, processed = encode(encoder_for(model), ids, mask, keep, always, score, types)
        logits = _head(model, states).float()
    return ClassificationOutput(
        logits=logits,
        speedup=speedup,
        schedules=schedules,
        processed=processed,
        kept=kept,
        predicted_speedup=_predicted(layer_costs(config), processed),
    )

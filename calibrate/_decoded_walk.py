"""Decoded mode's grid and its lazy walk: :func:`decoded_lambdas`, the decoder that decodes the prompts at one grid
value and scores them against the full model, and the fixed-sequence walk that decodes each value only when reached.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from calibrate import runtime
from calibrate._certify import _too_few_reason, certify
from calibrate.bounds import p_values
from calibrate.certificate import Certificate
from calibrate.exits import _grid
from calibrate.losses import _TOKEN_LEVEL, LossTable
from calibrate.models import _eval_mode

#: The only FWER method that can stop decoding at the first failure; the others need every p-value.
_LAZY_METHOD = "fixed_sequence"


def decoded_lambdas(*, decay: bool = False) -> np.ndarray:
    """The default grid of decoded mode: 17 thresholds in ``[0, 1]``, safest (1.0) first.

    Each tested threshold costs a full decode of the calibration prompts, so the grid is much coarser than
    :func:`calibrate.exits.default_lambdas` (201 values): ``0, 0.1, ..., 1`` plus ``1 - 10**u`` for
    ``u = -4, -3.5, ..., -1.5`` (0.9999 ... 0.968), where saturation and softmax thresholds matter most.
    With ``decay=True``, 3 values above 1 come first (:func:`calibrate.exits.with_decay_headroom`).

    Parameters
    ----------
    decay : bool, default=False
        Whether the grid is for the decaying threshold (then it starts at ``1 / 0.9``).

    Returns
    -------
    ndarray of float64, shape (17,) or (20,)
        Strictly decreasing.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.decoded import decoded_lambdas
    >>> np.round(decoded_lambdas(), 4).tolist()
    [1.0, 0.9999, 0.9997, 0.999, 0.9968, 0.99, 0.9684, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    >>> np.round(decoded_lambdas(decay=True)[:4], 4)   # headroom above 1 for the decaying threshold
    array([1.1111, 1.0741, 1.037 , 1.    ])
    """
    return _grid(11, 1, np.logspace(-4.0, -1.5, 6), headroom=3 if decay else 0)


# --------------------------------------------------------------------------------------------------
# Decoding and scoring
# --------------------------------------------------------------------------------------------------


class _Decoder:
    """Decodes the calibration prompts with the runtime and scores outputs against the full model's.

    The full model's outputs are decoded once, on first use, in the same batches as every threshold (so
    padding affects both sides alike).
    """

    def __init__(self, model, tokenizer, heads, batches, max_new_tokens, consistency, references, decode) -> None:
        from measures.consistency import PairScorer

        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        #: ``(input_ids, attention_mask, certificate) -> (outputs, exit-layer sum or None)``: one batch decoded
        #: with the certificate's knob; early exit by default (token elimination swaps it, calibrate.lat).
        self.run_batch: Callable = self._early_exit
        self.batches, self.max_new_tokens = batches, max_new_tokens
        self.n = sum(int(input_ids.shape[0]) for input_ids, _ in batches)
        self.consistency, self.references, self.decode = consistency, references, decode
        textual = consistency not in _TOKEN_LEVEL
        self.scorer = PairScorer(consistency.removeprefix("risk_")) if textual else None  # caches across lambdas
        #: The grid value that runs the unmodified model (speed-up 1, the full tree), decoded once as the full
        #: model's outputs; None when no grid value does (early exit).
        self.full_at: float | None = None
        self._full: tuple[list[np.ndarray], float] | None = None
        self._full_texts: list[str] | None = None

    def _early_exit(self, input_ids, attention_mask, certificate: Certificate) -> tuple[list[np.ndarray], int]:
        out = runtime.generate(
            self.model,
            input_ids,
            attention_mask,
            certificate=certificate,
            max_new_tokens=self.max_new_tokens,
            heads=self.heads,
            tokenizer=self.tokenizer,  # EOS and pad fall back to the tokenizer's, as in extract()
        )
        new = out.new_tokens.cpu().numpy()  # (b, n_steps)
        return [new[row, :k] for row, k in enumerate(out.n_generated.tolist())], int(out.exit_layers.sum())

    def outputs(self, certificate: Certificate) -> tuple[list[np.ndarray], float]:
        """Generated ids per prompt (EOS kept, as in a cache) and their token-averaged exit layer (NaN if none)."""
        outputs, layer_sum = [], 0.0
        with _eval_mode(self.model):  # a model left in training mode would decode with dropout
            for input_ids, attention_mask in self.batches:
                batch, layers = self.run_batch(input_ids, attention_mask, certificate)
                outputs += batch
                layer_sum += math.nan if layers is None else layers
        return outputs, layer_sum / sum(o.size for o in outputs)

    def losses(self, certificate: Certificate) -> tuple[np.ndarray, float]:
        """Losses ``(n,)`` in ``[0, 1]`` of the outputs at ``certificate.lambda_hat``, and their average exit layer."""
        if self._full is None:
            self._full = self.outputs(dataclasses.replace(certificate, lambda_hat=None))
        full = self._full[0]
        same = self.full_at is not None and certificate.lambda_hat == self.full_at
        early, avg_layer = self._full if same else self.outputs(certificate)
        if self.consistency == "token":
            return np.array([_token_disagreement(e, f) for e, f in zip(early, full)]), avg_layer
        if self.consistency == "sequence":
            return np.array([float(not np.array_equal(e, f)) for e, f in zip(early, full)]), avg_layer
        from measures.consistency import risk_consistency, textual_loss

        if self._full_texts is None:
            self._full_texts = [self.decode(f) for f in full]
        early_texts = [self.decode(e) for e in early]
        if self.consistency.startswith("risk_"):
            return risk_consistency(early_texts, self._full_texts, self.references, metric=self.scorer), avg_layer
        return textual_loss(early_texts, self._full_texts, metric=self.scorer), avg_layer


def _token_disagreement(early: np.ndarray, full: np.ndarray) -> float:
    """Share of positions where two outputs differ, over the longer one (a missing token differs); in [0, 1]."""
    common = min(early.size, full.size)
    longer = max(early.size, full.size)  # >= 1: every output has a token
    return (int(np.count_nonzero(early[:common] != full[:common])) + longer - common) / longer


def _certify_lazily(decoder: _Decoder, template: Certificate, progress: bool) -> Certificate:
    """Fixed-sequence testing that decodes each threshold only when the walk reaches it."""
    from calibrate._progress import tqdm

    delta, epsilon, bound, n = template.delta, template.epsilon, template.bound, template.n
    too_few = _too_few_reason(n, delta, epsilon, bound)
    if too_few is not None:  # no loss could pass: decoding would be wasted
        return dataclasses.replace(template, reason=f"{too_few}; nothing was decoded")
    columns, layers = [], []
    with tqdm(total=len(template.lambdas), desc="decoded calibration", unit="lambda", disable=not progress) as bar:
        for lam in template.lambdas:
            loss, avg_layer = decoder.losses(dataclasses.replace(template, lambda_hat=lam))  # (n,), float
            columns.append(loss)
            layers.append(avg_layer)
            p = float(p_values(loss[:, None], delta, bound=bound, epsilon=epsilon)[0])
            bar.update()
            bar.set_postfix(lam=f"{lam:.4g}", risk=f"{loss.mean():.4f}", p=f"{p:.3g}")
            if p > epsilon:
                break
    m, k = len(columns), len(template.lambdas)
    table = LossTable(
        np.column_stack(columns), template.lambdas[:m], "decoded", template.consistency, layers, template.n_layers
    )
    tested = certify(table, delta=delta, epsilon=epsilon, bound=bound, method=_LAZY_METHOD)
    untested = (math.nan,) * (k - m)
    return dataclasses.replace(
        template,
        lambda_hat=tested.lambda_hat,
        risks=tested.risks + untested,
        p_values=tested.p_values + untested,
        certified=tested.certified + (False,) * (k - m),
        avg_layers=None if template.avg_layers is None else tested.avg_layers + untested,
        reason=tested.reason,
    )

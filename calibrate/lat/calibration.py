"""Certify the token-elimination speed-up knob in decoded mode (``calibrate.lat.fit``).

The same machinery as :func:`calibrate.fit_decoded`: the full model decodes the calibration prompts
once; then each speed-up of the grid, safest first, decodes them with :func:`calibrate.lat.generate`,
its losses against the full model's outputs give a p-value, and the walk stops at the first failure
(fixed-sequence testing, lazily). The certificate's knob is ``token_keep`` and its ``lambdas`` are
``1 / speedup`` (the predicted share of prefill compute kept, strictly decreasing from 1 = the full model),
so that :func:`calibrate.certify`'s convention (safest first, decreasing) holds unchanged.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from calibrate.certificate import Certificate
from calibrate.decoded import _certify_lazily, _decoder_iv, _risk_iv, _template
from calibrate.lat.decode import generate, model_id, settings
from calibrate.lat.schedule import _speedup_iv
from calibrate.lat.scores import SCORES

__all__ = ["DEFAULT_SPEEDUPS", "fit", "heldout_losses"]

#: Default grid of predicted prefill speed-ups, safest first (each one costs a decode of the prompts).
DEFAULT_SPEEDUPS = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


def _speedups_iv(speedups) -> np.ndarray:
    values = np.array([_speedup_iv(s) for s in (DEFAULT_SPEEDUPS if speedups is None else speedups)], dtype=np.float64)
    if values.size == 0 or np.any(np.diff(values) <= 0):
        raise ValueError(
            f"speedups must be a non-empty, strictly increasing grid (safest first), got {values.tolist()}"
        )
    return values


def fit(
    model,
    tokenizer,
    prompts: Sequence[str],
    delta: float = 0.1,
    epsilon: float = 0.05,
    *,
    speedups: Sequence[float] | None = None,
    consistency: str = "token",
    references: Sequence[str | None] | None = None,
    bound: str = "hoeffding_bentkus",
    score: str = "attention",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    decode: Callable[[np.ndarray], str] | None = None,
    progress: bool = False,
) -> Certificate:
    """Certify the largest token-elimination speed-up whose risk stays within ``delta`` (decoded mode).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model :func:`calibrate.lat.generate` supports; not modified.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer; prompts are tokenised one by one and left-padded in batches, as in
        :func:`calibrate.fit_decoded`. Its special tokens are never eliminated.
    prompts : sequence of str, shape (n,)
        Calibration prompts, one example each.
    delta : float, default=0.1
        Tolerance on the consistency loss, in (0, 1).
    epsilon : float, default=0.05
        Failure probability, in (0, 1).
    speedups : sequence of float, optional
        Grid of predicted prefill speed-ups, strictly increasing from the safest, each >= 1; default
        :data:`DEFAULT_SPEEDUPS`. Fixed before seeing the prompts.
    consistency : str, default="token"
        Loss against the full model's output, one of :data:`calibrate.losses.CONSISTENCIES` (token, sequence,
        ROUGE-L, BLEU, token F1, or ``risk_*`` against ``references``).
    references : sequence of str or None, optional
        Reference texts for the ``risk_*`` losses.
    bound : str, default="hoeffding_bentkus"
        p-value (see :func:`calibrate.certify`).
    score : {"attention", "value"}, default="attention"
        Contribution score that ranks the word vectors; recorded as the certificate's ``measure`` and used
        by :func:`calibrate.lat.generate` with that certificate.
    max_new_tokens : int, default=32
        Most tokens generated per prompt (deploy with the same value).
    batch_size : int, default=8
        Prompts per decode call.
    decode : callable, optional
        Token ids -> text for the textual losses (default: the tokenizer, special tokens skipped).
    progress : bool, default=False
        Show a progress bar over the speed-ups.

    Returns
    -------
    Certificate
        ``knob="token_keep"``, ``mode="decoded"``, ``lambdas = 1 / speedups``; ``lambda_hat`` is ``1 /`` the
        certified speed-up (None: the full model only); ``model`` is :func:`calibrate.lat.model_id`;
        ``measure_state`` the decoding settings (score, ``min_keep``, the tokenizer's special ids, always
        kept), which :func:`calibrate.lat.generate` applies when it spends the certificate.

    Raises
    ------
    ValueError
        For an invalid grid (a speed-up below 1, NaN, infinite, or not increasing), ``delta``, ``epsilon``,
        ``bound``, ``score`` or ``consistency``; prompts that are empty or too long; an unsupported model.

    Notes
    -----
    Guarantee: ``P(risk(speedup_hat) <= delta) >= 1 - epsilon`` over draws of the calibration prompts, where
    the risk is the expected loss of what :func:`calibrate.lat.generate` emits at that speed-up against the
    unmodified model's output, for prompts exchangeable with the calibration ones. The speed-up itself is
    the cost model's prediction for the prefill; measure the real one with ``benchmarks/lat.py``.

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
    >>> config = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
    ...                      vocab_size=32, eos_token_id=1, pad_token_id=0)
    >>> model = LlamaForCausalLM(config).eval()
    >>> prompts = [" ".join(f"w{(i * j) % 29}" for j in range(12)) for i in range(40)]
    >>> cert = lat.fit(model, tokenizer, prompts, delta=0.3, epsilon=0.1, speedups=[1.0, 1.5], max_new_tokens=4)
    >>> cert.knob, cert.lambdas[0], cert.risks[0]
    ('token_keep', 1.0, 0.0)
    """
    delta, epsilon = _risk_iv(delta, epsilon, bound, consistency)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    lambdas = 1.0 / _speedups_iv(speedups)
    decoder, lam, heads = _decoder(
        model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, decode
    )
    special = getattr(tokenizer, "all_special_ids", None) or []
    template = dataclasses.replace(
        _template(
            decoder,
            lam,
            heads,
            delta=delta,
            epsilon=epsilon,
            bound=bound,
            method="fixed_sequence",
            knob="token_keep",
            measure=score,
        ),
        model=model_id(model),
        heads=None,
        avg_layers=None,
        n_layers=None,
        measure_state=settings(score, 2, special),
    )
    return _certify_lazily(decoder, template, progress)


def heldout_losses(
    certificate: Certificate,
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    references: Sequence[str | None] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    decode: Callable[[np.ndarray], str] | None = None,
) -> np.ndarray:
    """Losses of held-out prompts decoded at a certificate's speed-up, against the unmodified model (an audit).

    Parameters
    ----------
    certificate : Certificate
        A ``token_keep`` certificate of ``model`` (from :func:`fit`); its consistency is the loss.
    model, tokenizer, prompts, references, max_new_tokens, batch_size, decode
        As in :func:`fit`; ``prompts`` are held out (not used to certify).

    Returns
    -------
    ndarray of float64, shape (n,)
        Per-prompt losses in ``[0, 1]``; their mean estimates the risk that the certificate bounds by
        ``delta`` (with probability at least ``1 - epsilon`` over calibration draws); a finite sample's mean
        may exceed it by chance.

    Raises
    ------
    ValueError
        When the certificate is not a ``token_keep`` certificate of this model, or as :func:`fit`.
    """
    if not isinstance(certificate, Certificate) or certificate.knob != "token_keep":
        raise ValueError("certificate must be a 'token_keep' Certificate from calibrate.lat.fit")
    decoder, _, _ = _decoder(
        model, tokenizer, prompts, references, certificate.consistency, [1.0], max_new_tokens, batch_size, decode
    )
    return decoder.losses(certificate)[0]


def _decoder(model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, decode):
    """Decoded mode's validated decoder, grid and heads, decoding with :func:`generate` at each speed-up."""
    decoder, lam, heads = _decoder_iv(
        model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, None, decode
    )

    def run_batch(input_ids, attention_mask, certificate: Certificate) -> tuple[list[np.ndarray], None]:
        out = generate(model, input_ids, attention_mask, certificate=certificate, max_new_tokens=decoder.max_new_tokens)
        return [row[: _length(row, out.eos_ids)] for row in out.new_tokens.cpu().numpy()], None

    decoder.run_batch = run_batch
    return decoder, lam, heads


def _length(row: np.ndarray, eos_ids: tuple[int, ...]) -> int:
    """Tokens up to and including the first EOS (all of them without one)."""
    hits = np.flatnonzero(np.isin(row, eos_ids)) if eos_ids else np.array([], dtype=np.int64)
    return int(hits[0]) + 1 if hits.size else row.size

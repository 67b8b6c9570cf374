"""Certify the token-elimination speed-up knob in decoded mode (``calibrate.lat.fit``).

The same machinery as :func:`calibrate.fit_decoded`: the full model decodes the calibration prompts
once; then each speed-up of the grid, safest first, decodes them with :func:`calibrate.lat.generate`,
its losses against the full model's outputs give a p-value, and the walk stops at the first failure
(fixed-sequence testing, lazily). The certificate's knob is ``token_keep`` and its ``lambdas`` are
``1 / speedup`` (the predicted share of prefill compute kept, strictly decreasing from 1 = the full model),
so that :func:`calibrate.certify`'s convention (safest first, decreasing) holds unchanged.

Sequence classifiers (BERT family, :func:`calibrate.lat.classify`) are certified the same way with a 0/1
loss: ``"label"`` (the label differs from the unmodified model's) or ``"risk_label"`` (the unmodified
model is right about the reference label and the thinned one is wrong).

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch

from calibrate._decoded_checks import _decoder_iv, _prompts_iv, _risk_iv
from calibrate._decoded_walk import _certify_lazily
from calibrate._digest import tokenizer_eos_warning
from calibrate._extract_checks import _context_iv, prompt_ids
from calibrate._extract_steps import _pad
from calibrate._validation import caller_stacklevel, int_at_least, label_count_iv
from calibrate.audit import AuditReport, _calibration_data_digest, _held_out_iv, _held_out_report
from calibrate.certificate import Certificate, _budget, _spend_iv
from calibrate.lat.classification import _classifier_iv, classify
from calibrate.lat.decode import LAT_ARCHITECTURES, _settings, _special_ids, generate, model_id
from calibrate.lat.encoders import CLASSIFIER_ARCHITECTURES
from calibrate.lat.schedule import KeepSchedule, _speedup_iv
from calibrate.lat.scores import SCORES
from calibrate.models import _eval_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CLASSIFIER_CONSISTENCIES", "DEFAULT_SPEEDUPS", "audit", "fit", "heldout_losses"]

#: Losses of a classifier: label disagreement with the unmodified model, or risk consistency on labels.
CLASSIFIER_CONSISTENCIES = ("label", "risk_label")

#: Default grid of predicted prefill speed-ups, safest first (each one costs a decode of the prompts).
DEFAULT_SPEEDUPS = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


def _speedups_iv(speedups) -> np.ndarray:
    if isinstance(speedups, (str, bytes)) or (speedups is not None and np.ndim(speedups) != 1):
        raise ValueError(
            f"speedups must be a sequence (a grid, safest first), got {type(speedups).__name__} {speedups!r:.60}; for "
            "one value use [value]"
        )
    values = np.array([_speedup_iv(s) for s in (DEFAULT_SPEEDUPS if speedups is None else speedups)], dtype=np.float64)
    if values.size == 0 or np.any(np.diff(values) <= 0):
        raise ValueError(
            f"speedups must be a non-empty, strictly increasing grid (safest first), got {values.tolist()}"
        )
    return values


def fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    delta: float = 0.1,
    epsilon: float = 0.05,
    *,
    speedups: Sequence[float] | None = None,
    consistency: str | None = None,
    references: Sequence[str | int | None] | None = None,
    bound: str | None = None,
    score: str = "attention",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    decode: Callable[[np.ndarray], str] | None = None,
    progress: bool = True,
) -> Certificate:
    """Certify the largest token-elimination speed-up whose risk stays within ``delta`` (decoded mode).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model :func:`calibrate.lat.generate` supports (decoder-only or T5), or a sequence classifier
        :func:`calibrate.lat.classify` supports; not modified.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer; prompts are tokenised one by one and padded in batches (left for decoders), as in
        :func:`calibrate.fit_decoded`. Its special tokens are never eliminated.
    prompts : sequence of str, shape (n,)
        Calibration prompts (inputs of a classifier), one example each.
    delta : float, default=0.1
        Tolerance on the consistency loss, in (0, 1) (alpha in LTT/MAPIE).
    epsilon : float, default=0.05
        Failure probability, in (0, 1) (delta in LTT/MAPIE).
    speedups : sequence of float, optional
        Grid of predicted prefill speed-ups, strictly increasing from the safest, each >= 1; default
        :data:`DEFAULT_SPEEDUPS`. Fixed before seeing the prompts.
    consistency : str, optional
        Loss against the full model's output. Generators: one of :data:`calibrate.losses.CONSISTENCIES`
        (token, sequence, ROUGE-L, BLEU, token F1, or ``risk_*`` against ``references``), default
        ``"token"``. Classifiers: one of :data:`CLASSIFIER_CONSISTENCIES`, default ``"label"``.
    references : sequence, optional
        Reference texts for the ``risk_*`` losses; reference labels (int) for ``"risk_label"``.
    bound : str, optional
        p-value (see :func:`calibrate.certify`); default ``"hoeffding_bentkus"``.
    score : {"attention", "value"}, default="attention"
        Contribution score that ranks the word vectors; recorded as the certificate's ``measure`` and used
        by :func:`calibrate.lat.generate` with that certificate.
    max_new_tokens : int, default=32
        Most tokens generated per prompt (deploy with the same value).
    batch_size : int, default=8
        Prompts per decode call.
    decode : callable, optional
        Token ids -> text for the textual losses (default: the tokenizer, special tokens skipped).
    progress : bool, default=True
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
    supported = LAT_ARCHITECTURES + CLASSIFIER_ARCHITECTURES
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in supported:  # before any work (with few prompts nothing is decoded)
        raise ValueError(f"token elimination does not support model_type {model_type!r}; supported: {supported}")
    classifier = _is_classifier(model)
    if classifier:
        _classifier_iv(model)  # a model without its classification head: refused before any work
    if consistency is None:
        consistency = "label" if classifier else "token"
    zero_one = consistency in CLASSIFIER_CONSISTENCIES  # 0/1 like "sequence": the exact binomial applies
    delta, epsilon, bound = _risk_iv(delta, epsilon, bound, "sequence" if zero_one else consistency)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    speedups = _speedups_iv(speedups)
    lambdas = 1.0 / speedups
    scorer = _scorer(model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, decode)
    tokenizer_eos_warning(model, tokenizer)
    min_keep = 2  # vectors every layer keeps: the first token and, in decoders, the last prompt token
    _warn_unreachable(model.config, [len(ids) for ids in prompt_ids(tokenizer, prompts)], speedups, min_keep)
    special = _special_ids(tokenizer, model.config.vocab_size)
    untested = (math.nan,) * lambdas.size
    template = Certificate(
        lambda_hat=None,
        delta=delta,
        epsilon=epsilon,
        n=scorer.n,
        lambdas=tuple(float(v) for v in lambdas),
        risks=untested,
        p_values=untested,
        certified=(False,) * lambdas.size,
        bound=bound,
        method="fixed_sequence",
        mode="decoded",
        consistency=consistency,
        knob="token_keep",
        measure=score,
        model=model_id(model, fresh=True),
        measure_state=_settings(score, min_keep, special),
        cache_checksum=_calibration_data_digest(list(prompts)),
        # classifiers generate nothing
        max_new_tokens=None if isinstance(scorer, _Classifier) else scorer.max_new_tokens,
    )
    return _certify_lazily(scorer, template, progress)


def _warn_unreachable(config, lengths: Sequence[int], speedups: np.ndarray, min_keep: int) -> None:
    """Warn about grid speed-ups above what the longest calibration prompt can reach (each prompt's schedule is
    capped at its own maximum, so those values all run the most aggressive schedules)."""
    reach = max(KeepSchedule.from_speedup(config, n, 1.0, min_keep=min_keep).max_speedup for n in set(lengths))
    beyond = [float(s) for s in speedups if s > reach * (1 + 1e-9)]
    if beyond:
        warnings.warn(
            f"speedups {beyond} exceed the most any calibration prompt reaches ({reach:.4g}x for the longest, "
            f"{max(lengths)} tokens): every prompt runs its most aggressive schedule at each of them, so they test "
            "the same outputs; a certificate for one means 'as fast as each prompt allows', not that speed-up",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def heldout_losses(
    certificate: Certificate,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    references: Sequence[str | None] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    decode: Callable[[np.ndarray], str] | None = None,
) -> np.ndarray:
    """Losses of held-out prompts decoded at a certificate's speed-up, against the unmodified model (an audit).

    Parameters
    ----------
    certificate : Certificate
        A ``token_keep`` certificate of ``model`` (from :func:`fit`); its consistency is the loss.
    model, tokenizer, prompts, references, batch_size, decode
        As in :func:`fit`; ``prompts`` are held out (not used to certify).
    max_new_tokens : int, optional
        Most tokens generated per prompt; default the certificate's ``max_new_tokens``, else 32.

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
    scorer = _heldout_scorer(certificate, model, tokenizer, prompts, references, max_new_tokens, batch_size, decode)
    return scorer.losses(certificate)[0]


def _heldout_scorer(certificate, model, tokenizer, prompts, references, max_new_tokens, batch_size, decode):
    """What :func:`heldout_losses` and :func:`audit` decode with, once the certificate is checked to be a
    ``token_keep`` one and the prompts not its calibration prompts."""
    if not isinstance(certificate, Certificate) or certificate.knob != "token_keep":
        raise ValueError("certificate must be a 'token_keep' Certificate from calibrate.lat.fit")
    _spend_iv(certificate, "token_keep", model_id(model), "calibrate.lat.fit")  # before decoding the reference
    budget = _budget(certificate, max_new_tokens)
    _held_out_iv(certificate, prompts, "prompts")
    return _scorer(model, tokenizer, prompts, references, certificate.consistency, [1.0], budget, batch_size, decode)


def audit(
    certificate: Certificate,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    references: Sequence[str | int | None] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    decode: Callable[[np.ndarray], str] | None = None,
    progress: bool = True,
) -> AuditReport:
    """Held-out risk of a ``token_keep`` certificate at every speed-up of its grid (for the curve and the figure).

    Parameters
    ----------
    certificate : Certificate
        A ``token_keep`` certificate of ``model`` (from :func:`fit`).
    model, tokenizer, prompts, references, batch_size, decode
        As in :func:`fit`; ``prompts`` are held out. Each grid value costs one pass over them.
    max_new_tokens : int, optional
        Most tokens generated per prompt; default the certificate's ``max_new_tokens``, else 32.
    progress : bool, default=True
        Show a progress bar over the speed-ups.

    Returns
    -------
    AuditReport
        ``risks`` per grid value, ``risk`` at the certified speed-up (0 for the full model); the layer
        fields are NaN. ``report.plot()`` draws risk against speed-up, ``report.summary()`` the verdict.
    """
    from calibrate._progress import tqdm

    scorer = _heldout_scorer(certificate, model, tokenizer, prompts, references, max_new_tokens, batch_size, decode)
    lambdas = certificate.lambdas
    with tqdm(lambdas, desc="held-out speed-ups", unit="speed-up", disable=not progress) as bar:
        risks = np.array([scorer.losses(dataclasses.replace(certificate, lambda_hat=lam))[0].mean() for lam in bar])
    return _held_out_report(certificate, scorer.n, risks)


def _is_classifier(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in CLASSIFIER_ARCHITECTURES


def _scorer(model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, decode):
    """What turns a certificate into per-prompt losses: a decoder for generators, else a :class:`_Classifier`."""
    if _is_classifier(model):
        return _Classifier(model, tokenizer, prompts, references, consistency, batch_size)
    decoder, _, _ = _decoder_iv(
        model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, None, decode
    )

    def run_batch(input_ids, attention_mask, certificate: Certificate) -> tuple[list[np.ndarray], None]:
        # with the tokenizer, as deployment decodes: EOS and pad fall back to the tokenizer's
        out = generate(
            model, input_ids, attention_mask, certificate=certificate, max_new_tokens=decoder.max_new_tokens,
            tokenizer=tokenizer,
        )  # fmt: skip
        return [row[:k] for row, k in zip(out.new_tokens.cpu().numpy(), out.n_generated.tolist())], None

    decoder.run_batch = run_batch
    decoder.full_at = 1.0  # speed-up 1 is the unmodified model: not decoded twice
    return decoder


class _Classifier:
    """Classifies the calibration inputs at a certificate's speed-up; 0/1 losses against the unmodified model.

    Inputs are tokenised one by one and right-padded in batches; the unmodified model's labels are
    computed once, on first use.
    """

    def __init__(self, model, tokenizer, prompts, references, consistency, batch_size) -> None:
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be the model's Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if consistency not in CLASSIFIER_CONSISTENCIES:
            raise ValueError(
                f"a classifier's consistency must be one of {CLASSIFIER_CONSISTENCIES}, got {consistency!r}"
            )
        prompts, _ = _prompts_iv(prompts, None, "label")  # (references are labels, checked below)
        if consistency == "risk_label":
            label_count_iv(references, len(prompts), "prompt")
            bad = next((r for r in references if isinstance(r, bool) or not isinstance(r, (int, np.integer))), None)
            if bad is not None or not all(0 <= r < model.config.num_labels for r in references):
                raise ValueError(
                    f"references must be int labels in [0, {model.config.num_labels}) for consistency='risk_label', "
                    f"got {bad if bad is not None else list(references)!r:.80}"
                )
            self.references = np.asarray(references, dtype=np.int64)
        batch_size = int_at_least(batch_size, "batch_size")
        self.model, self.consistency, self.n = model, consistency, len(prompts)
        pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        ids = prompt_ids(tokenizer, prompts)
        _context_iv(model.config, False, ids, 0)  # empty or longer than the positions: refused, not truncated
        self.batches = [_pad(ids[s : s + batch_size], pad_id, left=False) for s in range(0, len(ids), batch_size)]
        self._full: np.ndarray | None = None

    def labels(self, certificate: Certificate) -> np.ndarray:
        """Predicted labels ``(n,)`` at the certificate's speed-up."""
        with _eval_mode(self.model):  # a model left in training mode would classify with dropout
            labels = [classify(self.model, i, m, certificate=certificate).labels.cpu() for i, m in self.batches]
        return torch.cat(labels).numpy()

    def losses(self, certificate: Certificate) -> tuple[np.ndarray, float]:
        """0/1 losses ``(n,)`` at ``certificate.lambda_hat`` (and NaN: no exit layers)."""
        if self._full is None:
            self._full = self.labels(dataclasses.replace(certificate, lambda_hat=None))
        early = self._full if certificate.lambda_hat == 1.0 else self.labels(certificate)  # speed-up 1: unmodified
        if self.consistency == "label":
            return (early != self._full).astype(np.float64), math.nan
        return ((early != self.references) & (self._full == self.references)).astype(np.float64), math.nan



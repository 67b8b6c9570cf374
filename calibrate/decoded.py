"""Decoded-mode calibration: losses from really decoding the calibration prompts with the runtime.

:func:`fit_decoded` certifies an early-exit threshold with losses computed from what
:func:`calibrate.runtime.generate` emits: the full model decodes every calibration prompt once, then each
threshold of the grid decodes them again, **lazily in fixed-sequence order** (safest first), and the walk
stops at the first threshold whose p-value exceeds ``epsilon``. The guarantee then holds for free-running
early-exit generation by the runtime, not for a teacher-forced simulation (``mode="proxy"``).
:func:`decoded_losses` decodes every grid value of a certificate (no early stop), e.g. to compare proxy and
decoded losses (``benchmarks/proxy_vs_decoded.py``); :func:`audit_decoded` checks a certificate on held-out
prompts that way.

Losses compare each early output with the full model's output for the same prompt, as in DESIGN section 7;
the outputs may differ in length here, so the token loss counts a missing token as a disagreement.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrate._decoded_checks import _decoded_losses_iv, _fit_decoded_iv
from calibrate._decoded_walk import _certify_lazily, decoded_lambdas
from calibrate.audit import AuditReport, _held_out_iv, _held_out_report
from calibrate.cache import LayerCache
from calibrate.certificate import Certificate, _budget
from calibrate.exits import Decay
from calibrate.fwer import FixedSequence
from calibrate.heads import ExitHeads
from calibrate.losses import LossTable

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["audit_decoded", "decoded_lambdas", "decoded_losses", "fit_decoded"]


def fit_decoded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    delta: float = 0.1,
    epsilon: float = 0.05,
    *,
    references: Sequence[str | None] | None = None,
    measure: str = "softmax_gap",
    consistency: str = "token",
    bound: str | None = None,
    method: str | FixedSequence = "fixed_sequence",
    lambdas: Sequence[float] | None = None,
    decay: Decay | dict | float | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    heads: ExitHeads | None = None,
    train_cache: LayerCache | None = None,
    seed: int = 0,
    decode: Callable[[np.ndarray], str] | None = None,
    progress: bool = True,
    measure_options: Mapping[str, Any] | None = None,
) -> Certificate:
    """Certify an early-exit threshold by decoding the calibration prompts with the runtime (decoded mode).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model :func:`calibrate.runtime.generate` decodes (:data:`calibrate.runtime.RUNTIME_ARCHITECTURES`);
        not modified.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer; prompts are tokenised one by one with its special tokens, as :func:`calibrate.extract` does.
    prompts : sequence of str, shape (n,)
        The calibration prompts, one example each (apply a chat template before if the model needs one).
    delta : float, default=0.1
        Tolerance on the consistency loss, in (0, 1) (alpha in LTT/MAPIE).
    epsilon : float, default=0.05
        Failure probability, in (0, 1) (delta in LTT/MAPIE).
    references : sequence of str or None, shape (n,), optional
        Reference texts, needed by the ``risk_*`` consistencies.
    measure : {"softmax_gap", "softmax_max", "entropy", "state_saturation", "classifier", \
"halting_geometric", "halting_token_multinomial", "halting_sequence_multinomial"}
        Confidence measure, evaluated by the runtime (:data:`calibrate.runtime.RUNTIME_MEASURES`). The learned
        ones (:data:`measures.learned.LEARNED_MEASURES`: the exit classifier and the Depth-Adaptive Transformer
        halting heads) are trained on ``train_cache`` by :func:`measures.learned.train_measure`.
    consistency : str, default="token"
        Loss, one of :data:`calibrate.losses.CONSISTENCIES`, between each early output and the full model's
        output for the same prompt. ``"token"``: share of positions where the two differ, over the longer
        output's length (a token one output lacks counts as a disagreement); ``"sequence"``: 1 unless equal;
        textual ones on the decoded texts; ``risk_*`` against ``references``.
    bound : {"hoeffding_bentkus", "hoeffding", "hoeffding_kl", "bentkus", "binomial", "wsr"}, optional
        p-value for the null ``risk(lambda) > delta``, default ``"hoeffding_bentkus"``; ``"binomial"`` needs
        ``consistency="sequence"``.
    method : "fixed_sequence" or calibrate.fwer.FixedSequence
        Only fixed-sequence testing: the other methods need every threshold's p-value, i.e. a full decode per
        threshold (for a study, decode them with :func:`decoded_losses` and call :func:`calibrate.certify`;
        that certificate knows only the loss table, not the measure, decay, heads or token budget, so the
        runtime refuses it).
    lambdas : array_like, shape (n_lambdas,), optional
        Threshold grid, strictly decreasing, fixed before seeing the prompts; default :func:`decoded_lambdas`
        (``decay=True`` when ``decay`` is set).
    decay : Decay, dict, float or None
        Decaying threshold: a :class:`~calibrate.Decay`, a dict of its fields, or a float ``tau`` with
        ``N = max_new_tokens``.
    max_new_tokens : int, default=32
        Most tokens generated per prompt (deploy with the same value: it caps the outputs compared).
    batch_size : int, default=8
        Prompts per :func:`~calibrate.runtime.generate` call, in prompt order.
    heads : ExitHeads, optional
        What a layer predicts; default ``ExitHeads.from_model(model)``. Deploy with the same heads.
    train_cache : LayerCache, optional
        For the learned measures only: a cache with hidden states (``extract(..., store_hidden=True)``) of
        **other** prompts, on which the measure is trained (the classifier on ``features="hidden"``, the only
        features the runtime evaluates: ``measure_options={"features": "topk"}`` is refused).
    seed : int, default=0
        Seed of the classifier's training (the halting heads' fit is deterministic).
    decode : callable, optional
        Token ids (1-D int array) -> text, for the textual losses. Default:
        ``tokenizer.decode(ids, skip_special_tokens=True)``.
    progress : bool, default=True
        Show a progress bar over the thresholds.
    measure_options : dict, optional
        Learned measures only: keyword arguments of the estimator (:func:`measures.learned.check_options`),
        e.g. ``{"max_iter": 1000}``.

    Returns
    -------
    Certificate
        ``mode="decoded"``, with the model's identity (``model``, ``heads``) and, for a learned measure, its
        state. Thresholds after the first failing one were never decoded: their ``risks``, ``p_values`` and
        ``avg_layers`` are NaN and ``certified`` is False (``Certificate.tested``).

    Raises
    ------
    TypeError
        When ``model`` is not a Hugging Face model, ``tokenizer`` is not callable, ``prompts`` is not a
        sequence of str, or another argument has the wrong type.
    ValueError
        When ``prompts`` is empty or a prompt is empty or too long for the model's context, ``method`` is not
        fixed-sequence testing, ``measure``, ``consistency``, ``bound`` or ``lambdas`` is invalid, references are
        missing for a ``risk_*`` loss, ``train_cache`` is missing or unusable for a learned measure, or the runtime
        refuses the model.

    Warns
    -----
    UserWarning
        When calibration prompts also occur in ``train_cache``.

    See Also
    --------
    calibrate.fit : proxy mode from a layer cache, or ``mode="decoded"`` on the cache's prompts.
    decoded_losses : decoded losses at every grid value, without the early stop.

    Notes
    -----
    The full model decodes every prompt once; then threshold ``lambda_k`` (``k = 0, 1, ...``, safest first)
    decodes them with ``calibrate.runtime.generate(..., certificate=c_k)``, ``c_k`` being the returned
    certificate with ``lambda_hat = lambda_k``, and its p-value is computed at once; the walk stops at the
    first p-value above ``epsilon``. This is fixed-sequence testing exactly (it never looks at a later
    threshold), so with valid p-values

        P( risk(lambda_hat) <= delta ) >= 1 - epsilon

    over draws of the calibration prompts, where the risk is the expected loss of what the runtime emits at
    ``lambda_hat`` against what it emits as the full model, for prompts exchangeable with the calibration ones,
    decoded with the same ``max_new_tokens`` and heads. Assumptions: i.i.d. prompts, losses in [0, 1], the grid
    and its order fixed before seeing the prompts, and a learned measure trained on data independent of them.
    Batches are padded; padding changes floating-point sums, so a near tie may be broken differently at another
    batch size, and logits processors of the model's generation config that read the prompt
    (``no_repeat_ngram_size``, ``repetition_penalty``, ``min_length``) read its padding, as in Hugging Face's
    ``generate``, which can change the outputs outright (a warning says so; ``batch_size=1`` avoids it).
    When even zero observed loss cannot give ``p <= epsilon`` (too few prompts), nothing is decoded.

    Examples
    --------
    >>> import torch
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    >>> from calibrate import fit_decoded
    >>> words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
    >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    >>> tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    >>> _ = torch.manual_seed(0)
    >>> config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, eos_token_id=1, pad_token_id=0)
    >>> model = GPT2LMHeadModel(config).eval()
    >>> prompts = [f"w{i} w{(3 * i) % 29}" for i in range(40)]
    >>> cert = fit_decoded(model, tokenizer, prompts, delta=0.3, epsilon=0.1, lambdas=[1.0, 0.5, 0.0], max_new_tokens=4)
    >>> cert.mode, cert.lambdas, cert.risks[0]
    ('decoded', (1.0, 0.5, 0.0), 0.0)
    """
    decoder, template = _fit_decoded_iv(
        model,
        tokenizer,
        prompts,
        delta,
        epsilon,
        references,
        measure,
        consistency,
        bound,
        method,
        lambdas,
        decay,
        max_new_tokens,
        batch_size,
        heads,
        train_cache,
        seed,
        decode,
        measure_options,
    )
    return _certify_lazily(decoder, template, progress)


def decoded_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    certificate: Certificate,
    *,
    references: Sequence[str | None] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    heads: ExitHeads | None = None,
    decode: Callable[[np.ndarray], str] | None = None,
    progress: bool = True,
) -> LossTable:
    """Decoded losses of the prompts at **every** grid value of a certificate (no early stop).

    Parameters
    ----------
    model, tokenizer, prompts, references, batch_size, heads, decode
        As in :func:`fit_decoded`.
    certificate : Certificate
        Supplies the grid (``lambdas``), the measure (with its ``measure_state``), the decay and the
        ``consistency``; e.g. a proxy certificate of :func:`calibrate.fit`, or a decoded one with held-out
        prompts (an audit). ``lambda_hat`` is ignored.
    max_new_tokens : int, optional
        New tokens per prompt, ``>= 1``; default the certificate's ``max_new_tokens`` (its calibration budget),
        else 32.
    progress : bool, default=True
        Show a progress bar over the thresholds.

    Returns
    -------
    LossTable
        ``mode="decoded"``, shape ``(n, n_lambdas)``, with the token-averaged exit layer per threshold.

    Raises
    ------
    TypeError, ValueError
        As :func:`fit_decoded`; also when ``certificate`` is not an exit-threshold certificate with a measure
        and a consistency.

    Notes
    -----
    Costs ``n_lambdas + 1`` decodes of the prompts. Certifying from this table with a method other than
    fixed-sequence testing is valid (mode ``"decoded"`` losses, any FWER method), at that cost; the
    certificate :func:`calibrate.certify` makes from a table records its decay but no measure, heads or
    token budget, so it is a study's result, not one the runtime decodes with.
    """
    from calibrate._progress import tqdm

    max_new_tokens = _budget(certificate, max_new_tokens)
    decoder, lam, heads = _decoded_losses_iv(
        model, tokenizer, prompts, certificate, references, max_new_tokens, batch_size, heads, decode
    )
    columns, layers = [], []
    for value in tqdm(lam, desc="decoded losses", unit="lambda", disable=not progress):
        loss, avg_layer = decoder.losses(dataclasses.replace(certificate, lambda_hat=float(value)))
        columns.append(loss)
        layers.append(avg_layer)
    decay = None if certificate.decay is None else Decay(**certificate.decay)
    return LossTable(np.column_stack(columns), lam, "decoded", certificate.consistency, layers, heads.n_layers, decay)


def audit_decoded(
    certificate: Certificate,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    references: Sequence[str | None] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    heads: ExitHeads | None = None,
    decode: Callable[[np.ndarray], str] | None = None,
    progress: bool = True,
) -> AuditReport:
    """Check an exit-threshold certificate on held-out prompts decoded by the runtime (what deployment emits).

    The decoded counterpart of :func:`calibrate.audit`, which checks on a held-out cache with teacher-forced
    proxy losses (and refuses decoded certificates).

    Parameters
    ----------
    certificate : Certificate
        An ``exit_threshold`` certificate of ``model`` with a runtime measure: decoded
        (:func:`fit_decoded`, ``calibrate.fit(mode="decoded")``) or proxy (:func:`calibrate.fit`; its
        decoded held-out risk then shows what the proxy guarantee misses).
    model, tokenizer, references, batch_size, heads, decode
        As in :func:`fit_decoded`; ``heads`` must be those the certificate was calibrated with.
    prompts : sequence of str
        Held-out prompts, disjoint from the calibration prompts (and a learned measure's training ones).
    max_new_tokens : int, optional
        New tokens per prompt; default the certificate's ``max_new_tokens`` (the calibration budget), else 32.
    progress : bool, default=True
        Show a progress bar over the thresholds.

    Returns
    -------
    AuditReport
        Held-out ``risks`` and average exit layers at every grid value, the risk at ``lambda_hat``
        (0 and all layers for a "full model only" certificate); ``report.plot()`` draws them.

    Raises
    ------
    TypeError, ValueError
        As :func:`decoded_losses`; also for a certificate of another knob (:func:`calibrate.lat.audit`,
        :func:`calibrate.fff.audit` check those).

    Notes
    -----
    Costs ``n_lambdas + 1`` decodes of the prompts: 18 for the default decoded grid, 202 for a proxy
    certificate's default grid.
    """
    _held_out_iv(certificate, prompts, "prompts")
    table = decoded_losses(
        model,
        tokenizer,
        prompts,
        certificate,
        references=references,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        heads=heads,
        decode=decode,
        progress=progress,
    )
    return _held_out_report(certificate, table.n, table.risks, table.avg_layers, table.n_layers)

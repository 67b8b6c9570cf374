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
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from calibrate import runtime
from calibrate._certify import _risk_control_iv, _too_few_reason, certify
from calibrate._extract_checks import _context_iv
from calibrate._extract_steps import _pad
from calibrate._validation import caller_stacklevel, int_at_least, seed_iv
from calibrate.audit import AuditReport, _held_out_report
from calibrate.bounds import p_values
from calibrate.cache import LayerCache
from calibrate.certificate import Certificate, _audit_budget
from calibrate.exits import Decay, _grid, _lambdas_iv
from calibrate.fit import _decay_iv
from calibrate.fwer import FixedSequence
from calibrate.heads import ExitHeads, decoder_layers
from calibrate.losses import _TOKEN_LEVEL, CONSISTENCIES, LossTable, tokenizer_decode
from calibrate.models import _eval_mode
from calibrate.runtime._inputs import _runtime_measure_iv

__all__ = ["audit_decoded", "decoded_lambdas", "decoded_losses", "fit_decoded"]

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
        exits = out.exit_layers.cpu().numpy()  # (b, n_steps), 0 after a row's EOS
        lengths = (exits > 0).sum(axis=1)  # (b,)
        return [new[row, :k] for row, k in enumerate(lengths)], int(exits.sum())

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


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _prompts_iv(prompts, references, consistency: str) -> tuple[list[str], list[str | None] | None]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a sequence of str (one per calibration example), got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one calibration prompt, got none")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"prompts must hold str, got {type(prompts[bad]).__name__} at index {bad}")
    if references is not None:
        if isinstance(references, str) or not isinstance(references, Sequence) or len(references) != len(prompts):
            raise ValueError(
                f"references must be a sequence with one str or None per prompt ({len(prompts)}), got {references!r:.80}"
            )
        references = [r if isinstance(r, str) else None for r in references]
    if consistency.startswith("risk_"):
        missing = len(prompts) if references is None else sum(r is None for r in references)
        if missing:
            raise ValueError(
                f"consistency={consistency!r} compares with references, but {missing} of {len(prompts)} prompts have "
                "none; pass references= with a str for every prompt"
            )
    return prompts, references


def _decoder_iv(
    model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, heads, decode
) -> tuple[_Decoder, np.ndarray, ExitHeads]:
    """What every decoded-mode function validates: returns the decoder, the grid and the heads."""
    decoder_layers(model)  # TypeError / ValueError naming `model` for anything the heads do not know
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be the model's Hugging Face tokenizer (callable on a str), got {type(tokenizer).__name__}"
        )
    if consistency not in CONSISTENCIES:
        raise ValueError(f"consistency must be one of {CONSISTENCIES}, got {consistency!r}")
    prompts, references = _prompts_iv(prompts, references, consistency)
    lam = decoded_lambdas() if lambdas is None else _lambdas_iv(lambdas)
    max_new_tokens = int_at_least(max_new_tokens, "max_new_tokens")
    batch_size = int_at_least(batch_size, "batch_size")
    if heads is None:
        heads = ExitHeads.from_model(model)
    elif not isinstance(heads, ExitHeads):
        raise TypeError(f"heads must be an ExitHeads (or None for the model's own), got {type(heads).__name__}")
    if decode is None:
        decode = tokenizer_decode(tokenizer)
    elif not callable(decode):
        raise TypeError(f"decode must be a callable (token ids -> str) or None, got {type(decode).__name__}")
    # Tokenise and pad as extract() does: one prompt at a time, then batches in prompt order.
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    _context_iv(model.config, encoder_decoder, ids, max_new_tokens)  # empty or too long prompts
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    batches = [_pad(ids[s : s + batch_size], pad_id, left=not encoder_decoder) for s in range(0, len(ids), batch_size)]
    decoder = _Decoder(model, tokenizer, heads, batches, max_new_tokens, consistency, references, decode)
    return decoder, lam, heads


def _measure_iv(measure, train_cache, prompts, heads: ExitHeads, seed, options) -> tuple[dict | None, int]:
    """``(learned measure's state or None, training sequences)``; trains a learned measure on ``train_cache``."""
    from measures.learned import LEARNED_MEASURES, check_options, train_measure

    if measure not in runtime.RUNTIME_MEASURES:
        raise ValueError(
            f"measure must be one of {runtime.RUNTIME_MEASURES} (those the runtime evaluates), got {measure!r}"
        )
    seed_iv(seed)
    options = check_options(measure, options)
    if measure not in LEARNED_MEASURES:
        if train_cache is not None:
            raise ValueError(
                f"train_cache trains the learned measures {LEARNED_MEASURES} only; got it with measure={measure!r}"
            )
        return None, 0
    if train_cache is None:
        raise ValueError(
            f"measure={measure!r} needs train_cache=: a LayerCache with hidden states "
            "(extract(..., store_hidden=True)) of prompts other than the calibration prompts (a measure trained on "
            "them voids the guarantee)"
        )
    if not isinstance(train_cache, LayerCache):
        raise TypeError(f"train_cache must be a LayerCache, got {type(train_cache).__name__}")
    if not train_cache.has("hidden"):
        raise ValueError(
            f"train_cache has no 'hidden' array: the runtime evaluates measure={measure!r} on hidden states; extract "
            "the training cache with store_hidden=True"
        )
    described = train_cache.user_meta.get("heads")
    if described is not None and described != heads.describe():
        raise ValueError(
            f"train_cache was extracted with other exit heads ({described}) than the ones decoding now "
            f"({heads.describe()}); measure={measure!r} would score other states"
        )
    shared = set(prompts) & set(train_cache.sequences["prompt"].tolist())
    if shared:
        warnings.warn(
            f"{len(shared)} calibration prompts also occur in train_cache; if they are the same examples, the "
            f"measure {measure!r} saw the calibration data and the guarantee is void",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    learned = train_measure(measure, train_cache, seed=int(seed), options=options)
    return learned.to_dict(), train_cache.n_sequences


def _decoded_losses_iv(
    model, tokenizer, prompts, certificate, references, max_new_tokens, batch_size, heads, decode
) -> tuple[_Decoder, np.ndarray, ExitHeads]:
    """The certificate supplies grid, measure and consistency; the rest is checked as in fit_decoded."""
    if not isinstance(certificate, Certificate):
        raise TypeError(f"certificate must be a calibrate.Certificate, got {type(certificate).__name__}")
    if certificate.consistency is None:
        raise ValueError("certificate must name a consistency (the loss to decode), got consistency=None")
    _runtime_measure_iv(certificate)  # before decoding anything
    return _decoder_iv(
        model,
        tokenizer,
        prompts,
        references,
        certificate.consistency,
        certificate.lambdas,
        max_new_tokens,
        batch_size,
        heads,
        decode,
    )


def _template(decoder: _Decoder, lam, heads: ExitHeads, **fields) -> Certificate:
    """A certificate for the grid with nothing tested yet (risks and p-values NaN, ``lambda_hat`` None).

    ``dataclasses.replace(template, lambda_hat=lam_k)`` is what the runtime decodes with at ``lam_k``.
    """
    k = lam.size
    untested = (math.nan,) * k
    model = decoder.model
    return Certificate(
        lambda_hat=None,
        n=decoder.n,
        lambdas=tuple(float(v) for v in lam),
        risks=untested,
        p_values=untested,
        certified=(False,) * k,
        avg_layers=untested,
        n_layers=heads.n_layers,
        max_new_tokens=decoder.max_new_tokens,
        mode="decoded",
        consistency=decoder.consistency,
        model=getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None,
        heads=heads.describe(fresh=True),
        **fields,
    )


def _risk_iv(delta, epsilon, bound, consistency, method=_LAZY_METHOD) -> tuple[float, float, str]:
    """Checked ``(delta, epsilon, bound)`` of a lazy fixed-sequence walk (``bound`` None: the default p-value;
    ``"binomial"`` only for 0/1 losses); ``method`` must be fixed-sequence testing."""
    delta, epsilon, bound, _ = _risk_control_iv(delta, epsilon, bound, _LAZY_METHOD)
    if not (method == _LAZY_METHOD or type(method) is FixedSequence):
        name = method if isinstance(method, str) else type(method).__name__
        raise ValueError(
            f"method must be 'fixed_sequence' in decoded mode, got {name!r}: each threshold costs a full decode of the "
            "prompts, so they are decoded lazily in fixed-sequence order and the walk stops at the first p-value above "
            "epsilon; other methods would decode at every threshold, and decoded mode does not offer them "
            "(decoded_losses gives the losses at every value of a certificate's grid, for a study)"
        )
    if bound == "binomial" and consistency != "sequence":
        raise ValueError(
            f"bound='binomial' is exact for 0/1 losses only, i.e. consistency='sequence'; got {consistency!r}"
        )
    return delta, epsilon, bound


def _fit_decoded_iv(
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
) -> tuple[_Decoder, Certificate]:
    """The decoder and the certificate template (nothing tested yet); trains a learned measure if asked."""
    delta, epsilon, bound = _risk_iv(delta, epsilon, bound, consistency, method)
    decoder, lam, heads = _decoder_iv(
        model, tokenizer, prompts, references, consistency, lambdas, max_new_tokens, batch_size, heads, decode
    )
    if isinstance(decay, numbers.Real) and not isinstance(decay, (bool, np.bool_)):
        decay = Decay(max_len=decoder.max_new_tokens, tau=float(decay))  # N: the decoding budget, not the data
    else:
        decay = _decay_iv(decay, None)
    if lambdas is None and decay is not None:
        lam = decoded_lambdas(decay=True)
    measure_state, n_train = _measure_iv(measure, train_cache, list(prompts), heads, seed, measure_options)
    template = _template(
        decoder,
        lam,
        heads,
        delta=delta,
        epsilon=epsilon,
        bound=bound,
        method=_LAZY_METHOD,
        measure=measure,
        decay=None if decay is None else decay.to_dict(),
        measure_state=measure_state,
        n_train=n_train,
    )
    return decoder, template


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def fit_decoded(
    model,
    tokenizer,
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
        threshold (decode them with :func:`decoded_losses` and call :func:`calibrate.certify` for that).
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
        **other** prompts, on which the measure is trained (the classifier on ``features="hidden"``).
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
    batch size. When even zero observed loss cannot give ``p <= epsilon`` (too few prompts), nothing is decoded.

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


def _certify_lazily(decoder: _Decoder, template: Certificate, progress: bool) -> Certificate:
    """Fixed-sequence testing that decodes each threshold only when the walk reaches it."""
    from tqdm.auto import tqdm

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


def decoded_losses(
    model,
    tokenizer,
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
    fixed-sequence testing is valid (mode ``"decoded"`` losses, any FWER method), at that cost.
    """
    from tqdm.auto import tqdm

    max_new_tokens = _audit_budget(certificate, max_new_tokens)
    decoder, lam, heads = _decoded_losses_iv(
        model, tokenizer, prompts, certificate, references, max_new_tokens, batch_size, heads, decode
    )
    columns, layers = [], []
    for value in tqdm(lam, desc="decoded losses", unit="lambda", disable=not progress):
        loss, avg_layer = decoder.losses(dataclasses.replace(certificate, lambda_hat=float(value)))
        columns.append(loss)
        layers.append(avg_layer)
    return LossTable(np.column_stack(columns), lam, "decoded", certificate.consistency, layers, heads.n_layers)


def audit_decoded(
    certificate: Certificate,
    model,
    tokenizer,
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
    if isinstance(certificate, Certificate) and certificate.knob != "exit_threshold":
        raise ValueError(
            f"audit_decoded checks exit_threshold certificates, got knob={certificate.knob!r} (token_keep: "
            "calibrate.lat.audit; fff_depth: calibrate.fff.audit)"
        )
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

"""Input checks of decoded mode (:mod:`calibrate.decoded`): prompts, references, risk options and the measure turned
into a decoder and a certificate template; lat and fff reuse the prompt, decoder and risk checks.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from calibrate import runtime
from calibrate._certify import _risk_control_iv
from calibrate._decoded_walk import _LAZY_METHOD, _Decoder, decoded_lambdas
from calibrate._digest import tokenizer_eos_warning
from calibrate._extract_checks import _context_iv, _warn_padding_read, prompt_ids, prompts_iv
from calibrate._extract_steps import _pad
from calibrate._validation import caller_stacklevel, int_at_least, seed_iv
from calibrate.audit import _calibration_data_digest
from calibrate.cache import LayerCache
from calibrate.certificate import Certificate
from calibrate.concat import _heads_difference
from calibrate.exits import Decay, _lambdas_iv
from calibrate.fit import _decay_iv
from calibrate.fwer import FixedSequence
from calibrate.heads import ExitHeads, decoder_layers
from calibrate.losses import _TOKEN_LEVEL, CONSISTENCIES, _str_decode, tokenizer_decode
from calibrate.runtime._inputs import _runtime_measure_iv


def _prompts_iv(prompts, references, consistency: str) -> tuple[list[str], list[str | None] | None]:
    """:func:`prompts_iv`, and a reference for every prompt where ``consistency`` compares with references."""
    prompts, references = prompts_iv(prompts, references)
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
    if decode is not None and not callable(decode):
        raise TypeError(f"decode must be a callable (token ids -> str) or None, got {type(decode).__name__}")
    decode = _str_decode(tokenizer_decode(tokenizer) if decode is None else decode)
    if consistency not in _TOKEN_LEVEL:  # a decode that fails or returns no str: refused before any decoding
        decode(np.zeros(1, dtype=np.int64))
    # Tokenise and pad as extract() does: one prompt at a time, then batches in prompt order.
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    ids = prompt_ids(tokenizer, prompts)
    _context_iv(model.config, encoder_decoder, ids, max_new_tokens)  # empty or too long prompts
    _warn_padding_read(model, ids, batch_size)
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
    if (options or {}).get("features", "hidden") not in ("auto", "hidden"):  # trained, then refused by the runtime
        raise ValueError(
            f"measure_options={options!r}: the runtime evaluates the classifier on features='hidden' only (hidden "
            "state + saturation at each layer); leave 'features' out"
        )
    described = train_cache.user_meta.get("heads")
    if described is not None and _heads_difference(described, heads.describe(), states_only=True):
        raise ValueError(
            f"train_cache was extracted with other exit heads ({described}) than the ones decoding now "
            f"({heads.describe()}); measure={measure!r} would score other states"
        )
    if (train_cache.n_layers, train_cache.hidden_size) != (heads.n_layers, heads.hidden_size):
        raise ValueError(  # trained, then refused by the runtime after the full model decoded every prompt
            f"train_cache has n_layers={train_cache.n_layers}, hidden_size={train_cache.hidden_size} but the model "
            f"decoding has n_layers={heads.n_layers}, hidden_size={heads.hidden_size}: measure={measure!r} would "
            "be trained on another model's states"
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
    if certificate.knob != "exit_threshold":
        raise ValueError(
            f"audit_decoded and decoded_losses take exit_threshold certificates, got knob={certificate.knob!r} "
            "(token_keep: calibrate.lat.audit; fff_depth: calibrate.fff.audit)"
        )
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
    tokenizer_eos_warning(model, tokenizer)  # where a certificate is made (its audits decode as it was made)
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
        cache_checksum=_calibration_data_digest(list(prompts)),
    )
    return decoder, template

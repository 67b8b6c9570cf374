"""From losses (or a layer cache) to a certificate.

:func:`certify` is the generic risk-control step: any loss table whose columns follow a knob from safest
to fastest (it lives in ``calibrate._certify`` with its checks, and is exported here). :func:`fit` is the
early-exit orchestration: confidence measure -> exit simulation -> proxy losses -> :func:`certify`.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from calibrate import fwer as _fwer
from calibrate._cache_checks import meta_keys_iv
from calibrate._certify import METHODS, _certify, _risk_control_iv, certify
from calibrate._digest import PROCESSING_OPTIONS
from calibrate._validation import caller_stacklevel, open_interval, seed_iv
from calibrate.certificate import Certificate
from calibrate.exits import Decay, _lambdas_iv, default_lambdas
from calibrate.losses import _TOKEN_LEVEL, LossTable, _consistency_iv, _text_iv, proxy_losses

if TYPE_CHECKING:
    from dask.distributed import Client
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from calibrate.cache import LayerCache
    from calibrate.chunked import ChunkedCache
    from calibrate.heads import ExitHeads

__all__ = ["METHODS", "TRAIN_FRACTION", "certify", "fit"]
#: Default share of sequences that trains a learned measure (never used for calibration).
TRAIN_FRACTION = 0.3


def _logit_processing(cache) -> list[str]:
    """The options of the model's generation config recorded at extraction
    (``meta["generation"]["model_generation_config"]``) that process logits, as ``"name=value"``."""
    config = (cache.user_meta.get("generation") or {}).get("model_generation_config") or {}
    return [f"{name}={config[name]!r}" for name, idle in PROCESSING_OPTIONS.items() if config.get(name) not in idle]


def _generation_budget(cache) -> int | None:
    """The cache's ``meta["generation"]["max_new_tokens"]`` (new tokens per output), None when not recorded."""
    value = (cache.user_meta.get("generation") or {}).get("max_new_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"the cache's meta['generation']['max_new_tokens'] must be an int >= 1, got {value!r}")
    lengths = np.diff(np.asarray(cache.offsets))
    if lengths.size and lengths.max() > value:
        longest = int(np.argmax(lengths))
        raise ValueError(
            f"the cache's meta['generation']['max_new_tokens'] = {value} is below the length of its sequence {longest} "
            f"({lengths[longest]} tokens): the recorded generation settings do not describe this cache (the "
            "certificate's token budget and decay's N come from them)"
        )
    return int(value)


def _decay_iv(decay, cache) -> Decay | None:
    if decay is None or isinstance(decay, Decay):
        return decay
    if isinstance(decay, dict):
        unknown = set(decay) - {"max_len", "tau"}
        if unknown or "max_len" not in decay:
            raise ValueError(f"decay as a dict needs the keys 'max_len' and optionally 'tau', got {sorted(decay)}")
        return Decay(**decay)
    if isinstance(decay, numbers.Real) and not isinstance(decay, (bool, np.bool_)):  # e.g. np.float32 too
        # N must not depend on the calibration data, so it comes from the generation settings
        max_len = _generation_budget(cache)
        if max_len is None:
            raise ValueError(
                "decay=<tau> takes N from the cache's generation settings (meta['generation']['max_new_tokens']), "
                "which this cache lacks; pass decay=calibrate.Decay(max_len=N, tau=tau), N being the new-token budget "
                "its outputs were generated with"
            )
        return Decay(max_len=max_len, tau=float(decay))
    raise TypeError(f"decay must be None, a Decay, a dict or a float tau, got {type(decay).__name__}")


def _calibration_split(cache, measure: str, train_fraction: float, seed: int, train_cache=None):
    """``(train, rows)``: the in-memory cache ``measure`` trains on and the calibration sequences of ``cache``.

    A learned measure trains on ``train_cache`` when given (and is calibrated on all of ``cache``), else on a
    seeded split by sequence (read into memory from a chunked cache); any other measure gets ``(None, None)``.
    ``rows`` are sorted sequence indices into ``cache``, None for all of them.
    """
    from calibrate.cache import LayerCache, _split_indices
    from measures.learned import LEARNED_MEASURES

    if measure not in LEARNED_MEASURES:
        if train_cache is not None:
            raise ValueError(f"train_cache is used only by the learned measures {LEARNED_MEASURES}, not {measure!r}")
        return None, None
    if train_cache is None:
        train_fraction = open_interval(train_fraction, "train_fraction")
        try:
            train, rows = _split_indices(cache.n_sequences, [train_fraction, 1.0 - train_fraction], seed=seed)
        except ValueError as err:  # an empty part
            raise ValueError(
                f"train_fraction={train_fraction} of {cache.n_sequences} sequences leaves none to train the measure "
                f"{measure!r} on or none to calibrate with; give another train_fraction or a train_cache"
            ) from err
        return (cache.subset(train) if isinstance(cache, LayerCache) else cache.take(train)), rows
    return _train_cache_iv(train_cache, cache), None


def _heads_of_another_model(a, b) -> bool:
    """Whether two heads descriptions (``describe()``) differ in more than their adapters: then no re-scoring helps."""
    from calibrate.concat import _heads_difference

    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return any(key not in ("kind", "adapters_digest") for key in _heads_difference(a, b, states_only=True))


def _train_cache_iv(train_cache, cache):
    """``train_cache``, checked: a LayerCache other than ``cache``, from the same model and heads."""
    from calibrate.cache import _in_memory_iv
    from calibrate.concat import _heads_difference, _loaded_by_name

    _in_memory_iv(train_cache, "train_cache")
    if train_cache.checksum == cache.checksum:
        raise ValueError("train_cache is the calibration cache itself; the measure must train on other sequences")
    train_meta, meta = train_cache.user_meta, cache.user_meta
    for what in ("heads", "model"):  # heads: those both record, not the generation config (states are read alone)
        a, b = train_meta.get(what), meta.get(what)
        differs = _heads_difference(a, b, states_only=True) if what == "heads" else a != b
        if differs and not _loaded_by_name(what, train_meta, meta):
            other_model = what == "model" or _heads_of_another_model(train_meta.get(what), meta.get(what))
            advice = (
                "it comes from another model (other weights, config or dtype): extract it with the calibration "
                "cache's model" if other_model else "re-score the train cache with calibrate.rehead(train_cache, "
                "heads), heads those of the calibration cache"
            )
            raise ValueError(
                f"train_cache and the calibration cache were extracted with different {what} "
                f"({train_cache.user_meta.get(what)!r} vs {cache.user_meta.get(what)!r}); {advice}"
            )
    shared = _shared_examples(train_cache, cache)
    if shared:
        warnings.warn(
            f"{shared} calibration sequences also occur in train_cache (the same prompt, with full-model outputs of "
            "which one starts the other, as another token budget cuts them; without a prompt the same full-model "
            "tokens); if they are the same examples, the learned measure saw the calibration data and the guarantee "
            "is void",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return train_cache


def _shared_examples(train_cache, cache) -> int:
    """How many sequences of ``cache`` also occur in ``train_cache``: the same prompt with full-model outputs of
    which one starts the other (greedy decoding with another ``max_new_tokens`` cuts the same output elsewhere), or
    for a sequence without a prompt (a cache made from bare arrays) the same full-model tokens."""

    def sequences(c):
        table = c.sequences
        return zip(table["prompt"].fillna(""), (tuple(int(t) for t in ids) for ids in table["output_ids"]))

    outputs: dict[str, list[tuple[int, ...]]] = {}
    for prompt, ids in sequences(train_cache):
        outputs.setdefault(prompt or str(ids), []).append(ids)
    return sum(
        any(ids[: len(other)] == other[: len(ids)] for other in outputs.get(prompt or str(ids), ()))
        for prompt, ids in sequences(cache)
    )


def _chunked_table(
    cache,
    *,
    measure,
    consistency,
    lambdas,
    decay,
    train_fraction,
    seed,
    train_cache,
    measure_options,
    client,
    decode,
    progress,
):
    """fit's data step on a :class:`~calibrate.chunked.ChunkedCache`, as :func:`_proxy_table` in memory.

    A learned measure trains on the same seeded split (read into memory) or ``train_cache``; the workers
    rebuild it from its JSON state and compute the calibration sequences' losses per partition.
    """
    from calibrate.chunked import _client_iv

    _measure_iv(measure, cache._array_specs())
    seed_iv(seed)
    _client_iv(client, None if consistency in _TOKEN_LEVEL else decode)  # before a learned measure's training
    learned, rows, n_train = _learned_measure(
        cache, cache._vocab, measure, consistency, decode, train_fraction, seed, train_cache, measure_options
    )
    run = dict(
        measure=measure, consistency=consistency, lambdas=lambdas, decay=decay, client=client, decode=decode,
        progress=progress,
    )
    if learned is None:
        return cache.loss_table(**run), _source_state(cache, measure), 0
    state = learned.to_dict()
    return cache.loss_table(measure_state=state, sequences=rows, **run), state, n_train


def _learned_measure(cache, vocab, measure, consistency, decode, train_fraction, seed, train_cache, options):
    """``(trained measure, rows, training sequences)`` for a learned ``measure``, trained on ``train_cache`` or a
    seeded split of ``cache`` (``rows``: its calibration sequences, as :func:`_calibration_split`); ``(None, None,
    0)`` for any other. Text losses are checked first (``vocab``: a callable giving the cache's vocab)."""
    from measures.learned import LEARNED_MEASURES, train_measure

    if measure in LEARNED_MEASURES and consistency not in _TOKEN_LEVEL:  # before it trains; else the losses check
        _text_iv(vocab(), cache._table, consistency, decode)
    train, rows = _calibration_split(cache, measure, train_fraction, seed, train_cache)
    if train is None:
        return None, None, 0
    _consistency_iv(consistency, cache._table if rows is None else cache._table.iloc[rows])  # before it trains
    if train_cache is not None:
        _features_iv(measure, options, train_cache, cache)
    return train_measure(measure, train, seed=int(seed), options=options), rows, train.n_sequences


def _features_iv(measure: str, options, train_cache, cache) -> None:
    """Before training on a separate ``train_cache``: refuse a measure whose features (as ``train_cache`` resolves
    them) the calibration ``cache`` lacks (it failed after the training, naming a ``features`` never passed) or
    has in another shape (on Dask, each partition's task failed and was retried)."""
    from measures.classifier import _resolve_features

    classifier = measure == "classifier"
    features = _resolve_features(train_cache, (options or {}).get("features", "auto")) if classifier else "hidden"
    field = "hidden" if features == "hidden" else "topk_logprobs"
    if cache.has(field):
        trained, scored = _token_shape(train_cache, field), _token_shape(cache, field)
        if field == "topk_logprobs":  # the entropy feature's normaliser
            trained, scored = (*trained, train_cache.vocab_size), (*scored, cache.vocab_size)
        if trained != scored:
            what = "(layers, hidden size)" if field == "hidden" else "(layers, top_k) and vocab_size"
            raise ValueError(
                f"train_cache's {field!r} features have {what} {trained}, the calibration cache's {scored}: a "
                f"measure trained on them could not score the calibration cache (it failed after the training)"
            )
        return
    if field == "topk_logprobs":
        advice = "extract it with calibrate.extract, which stores them"
    else:
        advice = "extract it with store_hidden=True" + (", or pass measure_options={'features': 'topk'}" * classifier)
    raise ValueError(
        f"measure={measure!r} scores {field!r} features (as train_cache has them), which the calibration cache "
        f"lacks: {advice}"
    )


def _token_shape(cache, field: str) -> tuple[int, ...]:
    """The shape of one token's ``field`` in a cache, in memory or chunked (read from its metadata)."""
    specs = getattr(cache, "_array_specs", None)
    return tuple(specs()[field]["shape"][1:]) if specs is not None else tuple(cache.arrays[field].shape[1:])


#: The ``measure_state`` of a state saturation computed from a cache's float16 hidden states (not stored).
_FROM_FLOAT16_STATES = {"from_hidden": "float16"}


def _source_state(cache, measure: str) -> dict | None:
    """The certificate's ``measure_state`` for a built-in confidence that ``cache`` gives otherwise than the runtime
    and an extraction compute it: a bound from its top-k log-probabilities (``{"from_topk": k}``), or a saturation
    from its float16 hidden states, not stored (``{"from_hidden": "float16"}``: the runtime rounds its states so);
    else None."""
    from measures.confidence import _topk_bound

    k = _topk_bound(cache, measure)
    if k is not None:
        return {"from_topk": k}
    return dict(_FROM_FLOAT16_STATES) if measure == "state_saturation" and not cache.has(measure) else None


def _measure_iv(measure, array_names) -> None:
    """``measure`` is a known one or a score among the cache's ``array_names``, and not both."""
    from measures.confidence import MEASURES, _stored_score
    from measures.learned import LEARNED_MEASURES

    allowed = (*MEASURES, *LEARNED_MEASURES)
    if measure not in allowed and not _stored_score(array_names, measure):
        raise ValueError(f"measure must be one of {allowed} or the name of a score the cache stores, got {measure!r}")
    if measure in LEARNED_MEASURES and _stored_score(array_names, measure):
        raise ValueError(
            f"the cache stores a score named {measure!r}, which is also a learned measure fit would train: "
            "store the score under another name"
        )


def fit(
    cache: LayerCache | ChunkedCache,
    delta: float = 0.1,
    epsilon: float = 0.05,
    *,
    measure: str = "softmax_gap",
    consistency: str = "token",
    bound: str | None = None,
    method: str | _fwer.FWERProcedure = "fixed_sequence",
    lambdas: Sequence[float] | None = None,
    decay: Decay | dict | float | None = None,
    train_fraction: float = TRAIN_FRACTION,
    seed: int = 0,
    decode: Callable[[Sequence[int]], str] | None = None,
    progress: bool | None = None,
    mode: str = "proxy",
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    heads: ExitHeads | None = None,
    batch_size: int = 8,
    train_cache: LayerCache | None = None,
    measure_options: Mapping[str, Any] | None = None,
    client: Client | None = None,
) -> Certificate:
    """Certify an early-exit threshold from a development layer cache (proxy mode) or its prompts (decoded mode).

    Parameters
    ----------
    cache : LayerCache or ChunkedCache
        Calibration data: one example per sequence. A cache opened with ``open_cache(path, chunks=n)``
        (proxy mode) is processed per partition on Dask and gives the same certificate as the cache in
        memory; a learned measure's training split is read into memory first.
    delta : float, default=0.1
        Tolerance on the consistency loss, in (0, 1) (alpha in LTT/MAPIE).
    epsilon : float, default=0.05
        Failure probability, in (0, 1) (delta in LTT/MAPIE).
    measure : {"softmax_gap", "softmax_max", "entropy", "state_saturation", "classifier", \
"halting_geometric", "halting_token_multinomial", "halting_sequence_multinomial"} or str
        Confidence measure, or the name of a score the cache stores (a measure of your own, given as
        ``scores=`` to :meth:`LayerCache.from_arrays`; audits read it from the test cache, the runtime
        cannot compute it). The learned ones (:data:`measures.learned.LEARNED_MEASURES`: the per-layer
        logistic exit classifier and the Depth-Adaptive Transformer halting heads) are trained on a random
        ``train_fraction`` of the sequences, or on ``train_cache``, and calibrated on the others (disjoint,
        as the guarantee requires). The halting heads read hidden states; the classifier reads them when the
        cache has them, else the top-k log-probabilities.
    consistency : str, default="token"
        Loss, one of :data:`calibrate.losses.CONSISTENCIES`.
    bound, method
        As in :func:`certify` (default ``"hoeffding_bentkus"``, none with ``method="crc"``).
    lambdas : array_like, optional
        Threshold grid, strictly decreasing; default :func:`calibrate.exits.default_lambdas` (201 values), or
        the coarser :func:`calibrate.decoded_lambdas` (17 values) in decoded mode; with ``decay``, preceded
        by values up to ``1 / 0.9`` (:func:`calibrate.exits.with_decay_headroom`).
    decay : Decay, dict, float or None
        Decaying threshold: a :class:`Decay`, a dict of its fields, or a float ``tau`` with ``N`` from the
        cache's generation settings (``meta["generation"]["max_new_tokens"]``; never from the data). Its
        thresholds lie in [0, 1]: confidences above 1 are refused.
    train_fraction : float, default=0.3
        Share of sequences used to train a learned measure.
    seed : int, default=0
        Seed of the train/calibration split.
    decode : callable, optional
        Token ids -> text for textual losses (see :func:`calibrate.losses.proxy_losses`).
    progress : bool, optional
        Show progress bars. Default: in decoded mode (which decodes the prompts at every tested
        threshold: minutes to hours), not in proxy mode.
    mode : {"proxy", "decoded"}, default="proxy"
        Where the losses come from. ``"proxy"``: the teacher-forced simulation along the cached full-model
        outputs. ``"decoded"``: :func:`calibrate.fit_decoded` decodes the prompts of the calibration sequences
        (the same ones as in proxy mode, references included) with the runtime, with the cache's
        ``max_new_tokens``; the classifier measure is trained on the same seeded split (the cache needs
        hidden states). Only ``method="fixed_sequence"``.
    model, tokenizer : optional
        Decoded mode only (required there): the Hugging Face model the cache was extracted from, and its
        tokenizer.
    heads : ExitHeads, optional
        Decoded mode only: what a layer predicts (default ``ExitHeads.from_model(model)``).
    batch_size : int, default=8
        Decoded mode only: prompts per runtime call.
    train_cache : LayerCache, optional
        Learned measures only: train on these sequences (e.g. a task's train split, through the same heads
        as ``cache``; see :func:`calibrate.rehead`) and calibrate on all of ``cache``, instead of splitting
        ``cache`` by ``train_fraction``.
    measure_options : dict, optional
        Learned measures only: keyword arguments of the estimator trained (:func:`measures.learned.check_options`),
        e.g. ``{"max_iter": 1000}`` when it warns that it did not converge, or ``{"C": 0.1}``.
    client : dask.distributed.Client, optional
        Chunked caches: run the partitions on this client's workers (default: one after another in this
        process).

    Returns
    -------
    Certificate
        With ``mode="proxy"``: it certifies the teacher-forced simulated outputs. With ``mode="decoded"``: what
        the runtime emits; thresholds after the first failing one are not tested (NaN risks and p-values).

    Raises
    ------
    ValueError
        When an option is invalid, the cache lacks what the option needs (references, generation settings,
        hidden states) or records a token budget below its longest sequence, ``model`` or ``tokenizer`` is
        missing in decoded mode or given in proxy mode.
    TypeError
        When ``cache`` is not a layer cache, ``lambdas`` are not real numbers, or ``decay``, ``seed`` or
        ``decode`` has the wrong type.

    Warns
    -----
    UserWarning
        In proxy mode, when the model's generation config recorded in the cache processes logits before
        each greedy choice (a repetition penalty, n-gram blocking, forced or suppressed tokens, a minimum
        length): the runtime applies that to the emitting layer, the simulation scores raw top-1 tokens.

    See Also
    --------
    certify : the risk-control step on any loss table.
    calibrate.fit_decoded : decoded mode on any list of prompts.
    calibrate.audit : check a certificate on held-out data.

    Notes
    -----
    Guarantee, with a method that controls the family-wise error rate: ``P(risk(lambda_hat) <= delta) >= 1 -
    epsilon`` over draws of the calibration sequences, for sequences exchangeable with those seen at deployment,
    where the risk is the expected proxy loss (proxy mode) or the expected loss of the runtime's own outputs
    (decoded mode); with ``method="crc"`` only ``E[risk(lambda_hat)] <= delta``. It assumes the grid and its
    order were fixed before seeing ``cache``: reusing these sequences to choose the grid, the measure or the
    consistency voids it (:func:`certify` has the details).

    Examples
    --------
    >>> import calibrate
    >>> cache = calibrate.synthetic_cache(300, seed=0)
    >>> cert = calibrate.fit(cache, delta=0.1, epsilon=0.05)
    >>> cert.lambda_hat is None or cert.risk_hat <= 0.1
    True
    """
    from calibrate.cache import LayerCache
    from calibrate.chunked import ChunkedCache

    if not isinstance(cache, (LayerCache, ChunkedCache)):
        raise TypeError(
            f"cache must be a calibrate.LayerCache (or a chunked one), got {type(cache).__name__}: open a saved "
            "cache with calibrate.open_cache(path); for losses of your own, call calibrate.certify(losses, lambdas)"
        )
    if decode is not None and not callable(decode):
        raise TypeError(f"decode must be a callable from token ids to text, got {type(decode).__name__}")
    if mode == "decoded":
        if client is not None:
            raise ValueError("client= computes proxy losses on Dask; mode='decoded' decodes in this process")
        return _fit_cache_decoded(
            cache,
            delta,
            epsilon,
            measure=measure,
            consistency=consistency,
            bound=bound,
            method=method,
            lambdas=lambdas,
            decay=decay,
            train_fraction=train_fraction,
            seed=seed,
            decode=decode,
            progress=True if progress is None else progress,
            model=model,
            tokenizer=tokenizer,
            heads=heads,
            batch_size=batch_size,
            train_cache=train_cache,
            measure_options=measure_options,
        )
    if mode != "proxy":
        raise ValueError(
            f"mode must be 'proxy' or 'decoded', got {mode!r} (for losses of your own generator, mode 'user', "
            "call calibrate.certify)"
        )
    if model is not None or tokenizer is not None or heads is not None:
        raise ValueError("model, tokenizer and heads are used only with mode='decoded'; proxy mode reads the cache")
    measure_options, budget = _proxy_iv(
        cache, delta, epsilon, bound, method, measure=measure, consistency=consistency,
        measure_options=measure_options, lambdas=lambdas,
    )  # fmt: skip
    options = dict(
        measure=measure,
        consistency=consistency,
        lambdas=lambdas,
        train_fraction=train_fraction,
        seed=seed,
        train_cache=train_cache,
        measure_options=measure_options,
    )
    if isinstance(cache, ChunkedCache):  # one Dask task per partition of whole sequences
        decay = _decay_iv(decay, cache)
        table, measure_state, n_train = _chunked_table(
            cache, decay=decay, client=client, decode=decode, progress=bool(progress), **options
        )
    elif client is not None:
        raise ValueError(
            "client= runs a chunked cache on Dask: open the cache with calibrate.open_cache(path, chunks=n) "
            "(an in-memory cache: cache.save(path) first)"
        )
    else:
        table, decay, measure_state, n_train = _proxy_table(
            cache, decay=decay, decode=decode, progress=bool(progress), **options
        )
    cert, caveat = _certify(table, None, delta, epsilon, bound, method, "exit_threshold")
    if caveat:
        warnings.warn(caveat, UserWarning, stacklevel=caller_stacklevel())
    processing = _logit_processing(cache)
    if processing:
        warnings.warn(
            f"the model's generation config processes logits before each greedy choice ({', '.join(processing)}): "
            "model.generate and the runtime apply that to the emitting layer, but the proxy simulation scores each "
            "layer's raw top-1, so this certificate does not cover what the processing does to early tokens; "
            "certify the runtime's outputs with calibrate.fit(cache, mode='decoded', model=..., tokenizer=...) "
            "(Python)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return dataclasses.replace(
        cert,
        measure=measure,
        decay=None if decay is None else decay.to_dict(),
        measure_state=measure_state,
        n_train=n_train,
        max_new_tokens=budget,
        cache_checksum=cache.checksum,
        model=cache.user_meta.get("model"),
        heads=cache.user_meta.get("heads"),
    )


def _fit_cache_decoded(
    cache, delta, epsilon, *, model, tokenizer, train_fraction, seed, decay, train_cache, **options
) -> Certificate:
    """fit(mode="decoded"): decode the prompts of the cache's calibration split with the cache's settings."""
    if model is None or tokenizer is None:
        raise ValueError(
            "mode='decoded' needs model= and tokenizer= (the runtime decodes the cache's prompts); got "
            f"model={type(model).__name__}, tokenizer={type(tokenizer).__name__}"
        )
    max_new_tokens = _generation_budget(cache)
    if max_new_tokens is None:
        raise ValueError(
            "mode='decoded' decodes with the cache's max_new_tokens (meta['generation']['max_new_tokens']), which "
            "this cache lacks; call calibrate.fit_decoded(model, tokenizer, prompts, max_new_tokens=...) instead"
        )
    from calibrate.decoded import fit_decoded
    from measures.learned import LEARNED_MEASURES

    if options["measure"] in LEARNED_MEASURES and train_cache is None and not cache.has("hidden"):
        raise ValueError(  # fit_decoded would name its train_cache, which is this cache's train split here
            f"measure={options['measure']!r} in decoded mode is trained on the cache's train split and evaluated by "
            "the runtime on hidden states: this cache has none; extract it with store_hidden=True"
        )
    decay = _decay_iv(decay, cache)
    train, rows = _calibration_split(cache, options["measure"], train_fraction, seed, train_cache)
    table = cache.sequences if rows is None else cache.sequences.iloc[rows]
    _consistency_iv(options["consistency"], table)  # the rows decoded (fit_decoded would ask for references=)
    cert = fit_decoded(
        model,
        tokenizer,
        table["prompt"].tolist(),
        delta,
        epsilon,
        references=[r if isinstance(r, str) else None for r in table["reference"].tolist()],
        decay=decay,
        max_new_tokens=max_new_tokens,
        train_cache=train,
        seed=seed,
        **options,
    )
    return cert  # its data identity: a digest of the prompts decoded, which audit_decoded refuses as held-out


def _proxy_iv(
    cache, delta, epsilon, bound, method, *, measure="softmax_gap", consistency="token", measure_options=None,
    lambdas=None,
) -> tuple[Mapping[str, Any] | None, int | None]:
    """Proxy mode's checks before any work (fit's, and validity's): ``(measure options, token budget)``."""
    from measures import learned

    _risk_control_iv(delta, epsilon, bound, method)
    meta_keys_iv(cache.user_meta, "the cache's meta")  # a cache saved with such meta opens
    if measure not in learned.LEARNED_MEASURES:  # a learned one's calibration rows: checked after the split
        _consistency_iv(consistency, cache.sequences)
    measure_options = learned.check_options(measure, measure_options)
    budget = _generation_budget(cache)  # one below the longest sequence: refused before the losses are computed
    if lambdas is not None:
        _lambdas_iv(lambdas)
    return measure_options, budget


def _proxy_table(
    cache,
    *,
    measure: str = "softmax_gap",
    consistency: str = "token",
    lambdas=None,
    decay=None,
    train_fraction: float = TRAIN_FRACTION,
    seed: int = 0,
    decode=None,
    progress: bool = False,
    train_cache=None,
    measure_options: Mapping[str, Any] | None = None,
) -> tuple[LossTable, Decay | None, dict | None, int]:
    """fit's data step: ``(calibration loss table, decay, learned measure's state or None, training sequences)``.

    A learned measure trains on ``train_cache`` or else on a seeded split, and the table holds only the
    other sequences.
    """
    from measures.confidence import _saturation_layer1_iv, confidence

    _measure_iv(measure, cache.arrays)
    seed_iv(seed)
    decay = _decay_iv(decay, cache)
    lam = default_lambdas(decay=decay is not None) if lambdas is None else lambdas
    measure_state = None
    learned, rows, n_train = _learned_measure(
        cache, lambda: cache.vocab, measure, consistency, decode, train_fraction, seed, train_cache, measure_options
    )
    cache = cache if rows is None else cache.subset(rows)
    if learned is not None:
        conf = learned.predict_confidence(cache)
        measure_state = learned.to_dict()
    elif cache.has(measure):  # stored: float32 (n_tokens, n_layers), checked finite when the cache was built
        conf = cache.arrays[measure]
        if measure == "state_saturation":  # refused here, where it is used: the cache opens for other measures
            _saturation_layer1_iv(conf)
    else:
        conf = confidence(cache, measure)
        measure_state = _source_state(cache, measure)
    table = proxy_losses(cache, conf, lam, consistency=consistency, decay=decay, decode=decode, progress=progress)
    return table, decay, measure_state, n_train

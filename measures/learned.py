"""Learned confidence measures by name: train one on a cache, or rebuild one from a certificate's state.

``calibrate.fit`` trains a learned measure on a seeded split of the development cache that is kept out of
the calibration sequences; a certificate stores the trained measure's JSON state
(``Certificate.measure_state``) so that the audit and the runtime evaluate the same function.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from measures.classifier import ExitClassifier
from measures.halting import HALTING_MEASURES, HaltingHead

__all__ = ["LEARNED_MEASURES", "check_options", "measure_from_state", "plain_state", "train_measure"]

#: Names of the measures that are trained on a cache (the halting heads need hidden states; the classifier uses them
#: when the cache has them, else the top-k log-probabilities).
LEARNED_MEASURES: tuple[str, ...] = ("classifier", *HALTING_MEASURES)


def plain_state(value: Any) -> Any:
    """JSON-like data as plain dicts and lists (a certificate keeps its states read-only: mappings and tuples).

    Parameters
    ----------
    value : object
        Any value; mappings and lists or tuples are converted recursively, anything else is returned as it is.

    Returns
    -------
    object
        Every mapping as a new dict, every list or tuple as a new list; other values (numbers, strings, None,
        arrays) are the objects given, not copies.

    Examples
    --------
    >>> from types import MappingProxyType
    >>> from measures.learned import plain_state
    >>> plain_state(MappingProxyType({"params": ((1.0, 2.0), (3.0,)), "meta": MappingProxyType({"n_layers": 12})}))
    {'params': [[1.0, 2.0], [3.0]], 'meta': {'n_layers': 12}}
    """
    if isinstance(value, Mapping):
        return {k: plain_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_state(v) for v in value]
    return value


def _name_iv(name: Any) -> str:
    if name not in LEARNED_MEASURES:
        raise ValueError(f"a learned measure must be one of {LEARNED_MEASURES}, got {name!r}")
    return name


def _estimator(name: str) -> type:
    return ExitClassifier if name == "classifier" else HaltingHead


def check_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as keyword arguments of the learned measure ``name``'s estimator, checked by name.

    ``"classifier"`` takes :class:`~measures.classifier.ExitClassifier`'s ``C``, ``features`` and ``max_iter``
    (its ``seed`` is the caller's); the halting measures take :class:`~measures.halting.HaltingHead`'s options
    but ``kind`` (the measure's name says it). Values are checked when the estimator is built.

    Parameters
    ----------
    name : str
        The measure; options are accepted only for one of :data:`LEARNED_MEASURES`.
    options : mapping of str to object, optional
        Keyword arguments of the estimator; None for none (accepted with any ``name``).

    Returns
    -------
    dict of str to object
        A copy of ``options`` (``{}`` for None).

    Raises
    ------
    ValueError
        When ``name`` is not a learned measure (and ``options`` are given) or an option is not the estimator's.
    TypeError
        When ``options`` is not a mapping with str keys.
    """
    if options is None:
        return {}
    if name not in LEARNED_MEASURES:
        raise ValueError(
            f"measure_options configure the learned measures {LEARNED_MEASURES} only; got them with measure={name!r}"
        )
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"measure_options must be a dict of keyword arguments, got {options!r}")
    fixed = ("seed",) if name == "classifier" else ("kind",)
    accepted = [p for p in inspect.signature(_estimator(name)).parameters if p not in fixed]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"measure_options {unknown} are not options of measure={name!r} ({_estimator(name).__name__}); it takes "
            f"{accepted}" + (" (the seed is fit's seed=)" if "seed" in unknown and name == "classifier" else "")
        )
    return dict(options)


def train_measure(
    name: str, train_cache: Any, *, seed: int = 0, options: Mapping[str, Any] | None = None
) -> ExitClassifier | HaltingHead:
    """Train the learned measure ``name`` on ``train_cache``.

    Parameters
    ----------
    name : str
        One of :data:`LEARNED_MEASURES`: ``"classifier"`` (:class:`~measures.classifier.ExitClassifier`) or
        ``"halting_<kind>"`` (:class:`~measures.halting.HaltingHead` of that kind, trained against the
        consistency oracle).
    train_cache : LayerCache
        Training sequences, disjoint from the calibration sequences (with hidden states for the halting heads).
    seed : int, default=0
        Seed of the classifier (the halting heads' fit is deterministic).
    options : dict, optional
        Keyword arguments of the estimator (see :func:`check_options`), e.g. ``{"max_iter": 1000}`` when it
        warns that it did not converge, or ``{"C": 0.1}``.

    Returns
    -------
    ExitClassifier or HaltingHead
        Fitted; ``predict_confidence(cache)`` gives ``(n_tokens, n_layers)`` confidences in [0, 1].
    """
    options = check_options(_name_iv(name), options)
    if name == "classifier":
        return ExitClassifier(seed=seed, **options).fit(train_cache)
    return HaltingHead(name.removeprefix("halting_"), **options).fit(train_cache)


def measure_from_state(name: str, state: Mapping[str, Any] | None) -> ExitClassifier | HaltingHead:
    """Rebuild the learned measure ``name`` from its JSON state (``Certificate.measure_state``).

    Parameters
    ----------
    name : str
        One of :data:`LEARNED_MEASURES`.
    state : mapping, optional
        The trained measure's ``to_dict()``, as a certificate stores it (read-only mappings and tuples are
        accepted).

    Returns
    -------
    ExitClassifier or HaltingHead
        The fitted measure: ``predict_confidence(cache)`` gives ``(n_tokens, n_layers)`` confidences in [0, 1],
        the same as the measure that was trained.

    Raises
    ------
    ValueError
        When ``name`` is not a learned measure, the state is missing, or it belongs to another measure.
    TypeError
        When the state is not a mapping.

    Examples
    --------
    >>> import numpy as np
    >>> import calibrate
    >>> from measures.learned import measure_from_state, train_measure
    >>> train, test = calibrate.synthetic_cache(300, seed=0).split([0.5, 0.5], seed=0)
    >>> clf = train_measure("classifier", train)
    >>> rebuilt = measure_from_state("classifier", clf.to_dict())   # the state a certificate stores
    >>> conf = rebuilt.predict_confidence(test)
    >>> conf.shape
    (3078, 12)
    >>> np.array_equal(conf, clf.predict_confidence(test))   # the same function as the trained measure
    True
    """
    _name_iv(name)
    if state is None:
        raise ValueError(f"the certificate uses measure={name!r} but carries no measure_state")
    if not isinstance(state, Mapping):
        raise TypeError(f"measure_state must be a mapping (a learned measure's to_dict()), got {type(state).__name__}")
    if name == "classifier":
        return ExitClassifier.from_dict(plain_state(state))
    head = HaltingHead.from_dict(plain_state(state))
    if f"halting_{head.kind}" != name:
        raise ValueError(f"measure_state holds a halting head of kind {head.kind!r}, not the certificate's {name!r}")
    return head

"""Learned confidence measures by name: train one on a cache, or rebuild one from a certificate's state.

``calibrate.fit`` trains a learned measure on a seeded split of the development cache that is kept out of
the calibration sequences; a certificate stores the trained measure's JSON state
(``Certificate.measure_state``) so that the audit and the runtime evaluate the same function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from measures.classifier import ExitClassifier
from measures.halting import HALTING_MEASURES, HaltingHead

__all__ = ["LEARNED_MEASURES", "measure_from_state", "plain_state", "train_measure"]

#: Names of the measures that are trained on a cache (all need hidden states).
LEARNED_MEASURES: tuple[str, ...] = ("classifier", *HALTING_MEASURES)


def plain_state(value: Any) -> Any:
    """JSON-like data as plain dicts and lists (a certificate keeps its states read-only: mappings and tuples).

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


def train_measure(name: str, train_cache: Any, *, seed: int = 0) -> ExitClassifier | HaltingHead:
    """Train the learned measure ``name`` on ``train_cache``.

    Parameters
    ----------
    name : str
        One of :data:`LEARNED_MEASURES`: ``"classifier"`` (:class:`~measures.classifier.ExitClassifier`) or
        ``"halting_<kind>"`` (:class:`~measures.halting.HaltingHead` of that kind, trained against the
        consistency oracle).
    train_cache : LayerCache
        Training sequences (with hidden states), disjoint from the calibration sequences.
    seed : int, default=0
        Seed of the classifier (the halting heads' fit is deterministic).

    Returns
    -------
    ExitClassifier or HaltingHead
        Fitted; ``predict_confidence(cache)`` gives ``(n_tokens, n_layers)`` confidences in [0, 1].
    """
    if _name_iv(name) == "classifier":
        return ExitClassifier(seed=seed).fit(train_cache)
    return HaltingHead(name.removeprefix("halting_")).fit(train_cache)


def measure_from_state(name: str, state: Mapping[str, Any] | None) -> ExitClassifier | HaltingHead:
    """Rebuild the learned measure ``name`` from its JSON state (``Certificate.measure_state``).

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

"""Checks of a :class:`~calibrate.certificate.Certificate`'s fields: JSON-safe read-only values, grids a knob can
take, and evidence (risks, p-values, flags) that supports what a stored certificate claims."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from calibrate._validation import JSON_DEPTH, to_float

if TYPE_CHECKING:
    from calibrate.certificate import Certificate


class _ReadOnlyDict(dict):
    """A dict that refuses changes: a certificate's mappings (a dict, so ``dataclasses.asdict``, ``json`` and
    ``copy.deepcopy`` take them, which a ``MappingProxyType`` does not)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a certificate's mappings are read-only: make another with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return (type(self), (dict(self),))


def _frozen(value: Any, where: str, depth: int = 1) -> Any:
    """A read-only deep copy of JSON data: mappings as a read-only dict, lists as tuples, NumPy scalars as
    Python ones (:func:`measures.learned.plain_state` inverts it); anything JSON cannot hold, or nesting deeper
    than stored JSON may, is refused, naming ``where``, so that ``to_json``, equality and the hash never fail later."""
    if isinstance(value, (Mapping, list, tuple)) and depth > JSON_DEPTH:
        raise ValueError(f"{where} nests deeper than {JSON_DEPTH} levels")
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where} keys must be str (JSON object keys), got {key!r}")
        return _ReadOnlyDict({k: _frozen(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be finite (JSON has no NaN or inf), got {value!r}")
    if value is not None and not isinstance(value, (str, bool, int, float)):
        raise TypeError(
            f"{where} must hold JSON data (str, int, float, bool, None, lists, mappings), got {type(value).__name__}"
        )
    return value


def _knob_grid_iv(knob: str, grid, where: str = "") -> None:
    """Refuse a grid of values the knob cannot take: whole depths >= 0 (``fff_depth``), ``1 / speed-up`` in
    (0, 1] (``token_keep``); thresholds (``exit_threshold``) are any reals. ``where`` prefixes the message."""
    grid = np.asarray(grid, dtype=float)
    if knob == "fff_depth" and not np.all((grid >= 0) & (grid == np.round(grid))):
        raise ValueError(f"{where}an fff_depth grid holds whole depths >= 0, got {grid.tolist()!r:.120}")
    if knob == "token_keep" and not np.all((grid > 0) & (grid <= 1)):
        raise ValueError(f"{where}a token_keep grid holds 1 / speed-up, in (0, 1], got {grid.tolist()!r:.120}")


#: Slack on a stored risk (a mean in [0, 1]) when its p-value is recomputed: the p-value came from the exact sum
#: of the losses, of which ``n * risk`` is a rounding (a Bentkus count one below an integer sum, at most).
_RISK_SLACK = 1e-9


def _evidence_iv(cert: Certificate) -> None:
    """Refuse a stored certificate that claims more than its own numbers support (edited after it was written).

    Nothing is certified from no examples. CRC: the certified values form a prefix of the grid, each with an
    adjusted risk <= delta. Otherwise every certified threshold has a p-value <= epsilon; the p-values of the
    built-in mean-based bounds are at least what the stored risks, ``n`` and ``delta`` give (WSR's at least
    ``(1 + delta)**-n``, the most its capital can grow); fixed-sequence, Bonferroni and Holm certify no more
    than the stored p-values allow, and multi-start no more than ``epsilon`` split over its runs. A certificate
    that claims less than its evidence allows (larger p-values, fewer flags) is not refused; nor, as the losses
    are not stored, a larger ``n`` with p-values recomputed to match.
    """
    from calibrate import bounds, fwer

    risks, p, flags = np.asarray(cert.risks), np.asarray(cert.p_values), np.asarray(cert.certified)
    edited = "the certificate was edited after it was written, or is corrupt"

    def at(k) -> str:
        return f"[{int(k)}] (lambda={cert.lambdas[int(k)]:g})"

    for k in np.flatnonzero(np.isnan(risks) & ~np.isnan(p)):
        raise ValueError(f"risks{at(k)} is null (not tested) but p_values{at(k)} is {p[k]:g}: {edited}")
    hits = np.flatnonzero(flags)
    if hits.size and cert.n == 0:
        raise ValueError(f"certified{at(hits[0])} is True, but from n=0 examples nothing is certified: {edited}")
    if cert.method == "crc":
        adjusted = cert.n / (cert.n + 1.0) * risks + 1.0 / (cert.n + 1.0)
        bad = np.flatnonzero(flags & ~(adjusted <= cert.delta + _RISK_SLACK))  # NaN (never tested) is bad too
        holes = np.flatnonzero(~flags[: hits[-1] + 1]) if hits.size else hits
        if bad.size or holes.size:
            raise ValueError(
                f"certified{at(bad[0] if bad.size else holes[0])} contradicts conformal risk control (certified "
                f"values form a prefix of the grid, each with adjusted risk n/(n+1) risk + 1/(n+1) <= "
                f"delta={cert.delta:g}): {edited}"
            )
        return
    for k in np.flatnonzero(flags & ~(p <= cert.epsilon)):  # NaN (never tested) fails too
        raise ValueError(
            f"certified{at(k)} is True but its p-value is {p[k]:g}, not <= epsilon={cert.epsilon:g}: the stored "
            "flags contradict the certificate's own evidence"
        )
    if cert.bound is None and hits.size:
        raise ValueError(f"certified{at(hits[0])} is True, but with method={cert.method!r} a bound is needed: {edited}")
    recomputable = cert.bound in bounds._MEAN_BASED or cert.bound in bounds._ON_RAW_LOSSES
    for k in np.flatnonzero(~np.isnan(p)) if cert.n >= 1 and recomputable else ():
        r = float(risks[k])
        if cert.bound in bounds._ON_RAW_LOSSES:  # WSR: its capital grows at most (1 + delta)-fold per loss
            low, source = (1.0 + cert.delta) ** -cert.n, f"WSR can reach with n={cert.n}, delta={cert.delta:g}"
        else:  # p grows with the risk; a count of failures (binomial) needs no slack
            at_risk = r if cert.bound == "binomial" else max(r - _RISK_SLACK, 0.0)
            try:
                low = float(bounds._MEAN_BASED[cert.bound](at_risk, cert.n, cert.delta))
            except ValueError:
                if cert.bound != "binomial":
                    raise
                raise ValueError(  # n * risk is no count of failures
                    f"risks{at(k)} is {r:g}, which is no count of failures over n={cert.n} as the {cert.bound} bound's "
                    f"p-values need: {edited}"
                ) from None
            source = f"the {cert.bound} bound gives for risks[{k}]={r:g}, n={cert.n}, delta={cert.delta:g}"
        if not p[k] >= low * (1 - 1e-9):
            raise ValueError(f"p_values{at(k)} is {p[k]:g}, below the {low:.6g} that {source}: {edited}")
    if cert.method in ("fixed_sequence", "bonferroni", "holm"):
        untested_as_one = np.where(np.isnan(p), 1.0, p)
        allowed = np.asarray(fwer.control_fwer(untested_as_one, cert.epsilon, method=cert.method), dtype=bool)
        over = np.flatnonzero(flags & ~allowed)
        if over.size:
            raise ValueError(
                f"certified{at(over[0])} is True, but {cert.method} at epsilon={cert.epsilon:g} does not certify it "
                f"from the stored p-values: {edited}"
            )
    elif cert.method == "multistart" and hits.size:  # one walk at epsilon / m per run of flags at least
        runs = 1 + int(np.count_nonzero(np.diff(hits) > 1))
        over = hits[~(p[hits] <= cert.epsilon / runs)]
        if over.size:
            raise ValueError(
                f"certified{at(over[0])} is True, but multistart certifies {runs} separate runs only with p-values "
                f"<= epsilon/{runs}={cert.epsilon / runs:g}, got {p[over[0]]:g}: {edited}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _floats(value: Any, name: str, *, nan: bool) -> tuple[float, ...]:
    """``value`` as a tuple of floats (NaN allowed where ``nan``), else ValueError naming the field."""
    try:  # numbers only: float() would also read "0.1" (and a str "987" as 9.0, 8.0, 7.0)
        bad = isinstance(value, (str, bytes)) or not all(_is_number(v) for v in value)
        out = () if bad else tuple(to_float(v) for v in value)  # an int beyond the float range: inf, refused
        bad = bad or any(not np.isfinite(v) for v in out if not (nan and np.isnan(v)))
    except TypeError:  # not iterable
        bad = True
    if bad:
        what = "numbers or NaN" if nan else "finite numbers"
        raise ValueError(f"Certificate.{name} must be a sequence of {what}, got {value!r:.120}")
    return out

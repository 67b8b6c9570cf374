"""Input checks shared by the public functions, so every message names the argument the same way."""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

import numpy as np

from measures._arrays import as_numpy
from measures._callers import caller_stacklevel as caller_stacklevel  # re-exported: calibrate's modules use it here


def to_float(value: numbers.Real) -> float:
    """``float(value)``, an int beyond the float range as infinity (``float`` raises OverflowError, which
    callers asking for a finite number would not name)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


#: Deepest nesting accepted in a stored JSON document (certificates, cache metadata, shard manifests, the settings
#: in weight files): the library writes a few levels; thousands exhaust Python's recursion limit.
JSON_DEPTH = 100


def parse_json(text: str, what: str) -> Any:
    """``text`` parsed as JSON; ValueError naming ``what`` when it is not JSON or nests deeper than
    :data:`JSON_DEPTH`."""
    too_deep = f"{what} nests JSON deeper than {JSON_DEPTH} levels, far more than this library writes"
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(too_deep) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > JSON_DEPTH:
                raise ValueError(too_deep)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def open_interval(value, name: str, *, upper: float = 1.0, upper_name: str = "1") -> float:
    """``value`` as a float in ``(0, upper)``; TypeError for a non-number, ValueError outside."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number in the open interval (0, {upper_name}), got {type(value).__name__}"
        )
    number = to_float(value)
    if not 0.0 < number < upper:
        shown = repr(number) if math.isfinite(number) else short_repr(value)
        raise ValueError(f"{name} must lie in the open interval (0, {upper_name}), got {shown}")
    return number


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 40 characters, for messages (an int too long for Python to print: its bit count)."""
    try:
        return f"{value!r:.40}"
    except ValueError:  # more digits than sys.get_int_max_str_digits()
        return f"an int of {value.bit_length()} bits"


def bounded_array(
    values,
    name: str,
    *,
    ndims: tuple[int, ...] = (2,),
    shapes: str = "(n, K)",
    upper: float = 1.0,
    upper_name: str = "1",
    why: str = "",
) -> np.ndarray:
    """``values`` (an array, a sequence or a torch tensor) as a non-empty float64 array with ``ndim`` in ``ndims``
    and entries in ``[0, upper]``."""
    arr = as_numpy(values)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim not in ndims:
        raise ValueError(f"{name} must have shape {shapes}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty with shape {shapes}, got shape {arr.shape}")
    lo, hi = arr.min(), arr.max()  # NaN propagates through both
    if np.isnan(lo) or np.isnan(hi):
        raise ValueError(f"{name} contain NaN; every entry must be a number in [0, {upper_name}]")
    if lo < 0.0 or hi > upper:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must lie in [0, {upper_name}]{reason}, got range [{lo:g}, {hi:g}]")
    return arr


def exit_layers_iv(avg: np.ndarray, n_layers: int | None, name: str) -> None:
    """ValueError naming ``name`` unless every entry of ``avg`` is NaN (not tested) or an average exit layer in
    ``[1, n_layers]`` (``[1, inf)`` without a layer count)."""
    top = np.inf if n_layers is None else n_layers
    if not np.all(np.isnan(avg) | ((avg >= 1) & (avg <= top) & np.isfinite(avg))):
        raise ValueError(f"{name} must be exit layers in [1, {top:g}] or NaN, got {avg.tolist()!r:.120}")


def label_count_iv(references, n: int, per: str) -> None:
    """For ``consistency="risk_label"``: refuse no ``references``, or other than one label per ``per`` (n of them)."""
    if references is None:
        raise ValueError(f"consistency='risk_label' needs references=, one int label per {per} ({n})")
    shape = getattr(references, "shape", None)
    if shape is not None:
        ok, given = tuple(shape) == (n,), f"shape {tuple(shape)}"
    elif hasattr(references, "__len__"):
        ok, given = len(references) == n, f"{len(references)} labels"
    else:
        ok, given = False, type(references).__name__
    if not ok:
        raise ValueError(f"references must hold one int label per {per} ({n}), got {given}")


def int_at_least(value, name: str, low: int = 1) -> int:
    """``value`` as an int ``>= low``: TypeError naming ``name`` for bools, floats and other non-integers,
    ValueError for smaller values."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {low}, got {short_repr(value)} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {short_repr(value)}")
    return int(value)


def int_in(value, name: str, low: int, high: int, why: str = "") -> int:
    """``value`` as an int in ``low..high``: TypeError naming ``name`` for a non-integer, ValueError outside."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        rule = f"{name} must be an int in {low}..{high}{why}"
        raise TypeError(f"{rule}, got {short_repr(value)} ({type(value).__name__})")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}{why}, got {short_repr(value)}")
    return int(value)


def seed_iv(seed, name: str = "seed") -> int:
    """``seed`` as an int ``>= 0``: TypeError for a non-integer (None, bool, float), ValueError if negative."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0 (it seeds the random draws), got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name} must be an int >= 0 (it seeds the random draws), got {short_repr(seed)}")
    return int(seed)


def torch_seed(seed: int) -> int:
    """A checked seed (an int >= 0) as torch's generators take it, in ``[0, 2**64)``: itself below that, else
    a value drawn from it by :class:`numpy.random.SeedSequence` (so larger seeds still differ)."""
    return seed if seed < 2**64 else int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])


def finite_at_least(value, name: str, low: float = 0.0, *, strict: bool = False, why: str = "") -> float:
    """``value`` (any real number: numpy scalars, fractions) as a float, finite and ``>= low`` (``> low`` if
    ``strict``); TypeError naming ``name`` for a bool or a non-number, ValueError otherwise (``why`` follows the
    rule in both messages)."""
    rule = f"{name} must be a finite number {'>' if strict else '>='} {low:g}{why}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{rule}, got {short_repr(value)} ({type(value).__name__})")
    x = to_float(value)
    if not (math.isfinite(x) and (x > low if strict else x >= low)):
        raise ValueError(f"{rule}, got {short_repr(value)}")
    return x


def finite_positive(value, name: str, why: str = "") -> float:
    """``value`` as a finite float ``> 0`` (:func:`finite_at_least`)."""
    return finite_at_least(value, name, strict=True, why=why)



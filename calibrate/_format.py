"""How numbers of the guarantee are printed."""

from __future__ import annotations

import decimal
import math
import re


def level(x: float, spec: str = "g", *, side: str = "up") -> str:
    """A tolerance, probability or risk as ``format(x, spec)`` prints it (``spec`` ``"g"``, ``".3g"``, ``".4f"``
    ...), rounded towards the weaker claim and with more digits where the text would mislead.

    With ``side="up"`` (tolerances, failure probabilities, p-values, risks) the text is never below ``x``, with
    ``side="down"`` (a confidence ``1 - epsilon``) never above it: ``level(1 / 3)`` is ``"0.333334"``, not
    ``"0.333333"``; ``level(0.10004, ".4f")`` is ``"0.1001"``, not ``"0.1000"``. A value in (0, 1) that would
    print as ``0`` or ``1`` gets more digits: ``f"{1 - 1e-12:g}"`` is ``"1"``, which would read as certainty;
    ``level(1 - 1e-12, side="down")`` is ``"0.999999999999"``.
    """
    x = float(x)
    digits, kind = re.fullmatch(r"(?:\.(\d+))?([fg])", spec).groups()
    wrong = (lambda shown: shown < x) if side == "up" else (lambda shown: shown > x)
    rounding = decimal.ROUND_CEILING if side == "up" else decimal.ROUND_FLOOR
    for precision in range(int(digits or 6), 18):  # 17 significant digits print every float exactly
        text = format(x, f".{precision}{kind}")
        if wrong(float(text)):  # round towards the weaker claim at the same precision, in decimal (exact)
            exact = decimal.Decimal(x)
            exponent = -precision if kind == "f" else exact.adjusted() - precision + 1
            rounded = exact.quantize(decimal.Decimal(1).scaleb(exponent), rounding=rounding)
            as_float = float(rounded)  # formatted as a float is (no trailing zeros), unless beyond the float range
            text = format(rounded if as_float in (-math.inf, math.inf) else as_float, f".{precision}{kind}")
        shown = float(text)
        if not wrong(shown) and not (0.0 < x < 1.0 and shown in (0.0, 1.0)):
            return text
    return repr(x)


def beside(risk: float, delta: float, spec: str = ".4f") -> tuple[str, str]:
    """``(level(risk, spec), level(delta))``, or both in full where the rounded texts would compare otherwise
    than the numbers (a risk of 0.10001 printed 0.1001 beside "within delta = 0.10002")."""
    risk_text, delta_text = level(risk, spec), level(delta)
    if (float(risk_text) <= float(delta_text)) != (risk <= delta):
        return repr(float(risk)), repr(float(delta))
    return risk_text, delta_text

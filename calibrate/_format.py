"""How numbers of the guarantee are printed."""

from __future__ import annotations

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
    for precision in range(int(digits or 6), 18):  # 17 significant digits print every float exactly
        text = format(x, f".{precision}{kind}")
        if wrong(float(text)):  # round towards the weaker claim at the same precision
            exponent = 0 if kind == "f" else math.floor(math.log10(abs(x))) + 1
            scale = 10.0 ** (precision - exponent)
            text = format((math.ceil if side == "up" else math.floor)(x * scale) / scale, f".{precision}{kind}")
        shown = float(text)
        if not wrong(shown) and not (0.0 < x < 1.0 and shown in (0.0, 1.0)):
            return text
    return repr(x)

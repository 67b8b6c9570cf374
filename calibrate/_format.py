"""How numbers of the guarantee are printed."""

from __future__ import annotations


def level(x: float, spec: str = "g") -> str:
    """A tolerance or probability as ``format(x, spec)`` prints it, unless that shows a value in (0, 1) as ``0``
    or ``1``: then in full.

    ``f"{1 - 1e-12:g}"`` is ``"1"``, which would read as certainty; ``level(1 - 1e-12)`` is ``"0.999999999999"``.
    """
    text = format(x, spec)
    return repr(float(x)) if 0.0 < x < 1.0 and float(text) in (0.0, 1.0) else text

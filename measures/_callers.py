"""Which stack frame a warning of this library names: the user's line, not one of the library's own.

Shared by :mod:`measures` and :mod:`calibrate` (which imports :mod:`measures`, never the other way round).
"""

from __future__ import annotations

import os
import sys

#: Where this library's two packages live (installed side by side).
_ROOT = os.path.dirname(os.path.dirname(__file__))
_PACKAGES = (os.path.join(_ROOT, "calibrate", ""), os.path.join(_ROOT, "measures", ""))


#: Decorators' wrapper frames between the library's own (``torch.no_grad``, ``contextlib.contextmanager``).
_WRAPPERS = (os.path.join("torch", "utils", "_contextlib.py"), os.sep + "contextlib.py")


def caller_stacklevel() -> int:
    """``stacklevel`` for a warning issued by the calling function that names the first frame outside this
    library (the user's line), however deep the library's own calls run."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGES) or frame.f_code.co_filename.endswith(_WRAPPERS)
    ):
        frame, level = frame.f_back, level + 1
    return level

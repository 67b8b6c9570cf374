"""Progress bars: ``tqdm.auto``'s (a widget in a notebook with ipywidgets, else text), imported without the
"IProgress not found" warning it gives in a Jupyter kernel without ipywidgets, where it falls back to text.

Every bar of the library comes from here; a bar turned off (``disable=True``) then says nothing either.
"""

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm"]

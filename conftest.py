"""Settings shared by the whole test session: tests/ and the notebooks (collected with ``--nbmake``)."""

import os

# Notebooks read this and shrink every size so that each runs in a minute or two.
os.environ.setdefault("CALM_NOTEBOOK_SMALL", "1")

"""Shared set-up: figures made through pyplot are closed after each test (pyplot keeps them open)."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt = sys.modules.get("matplotlib.pyplot")  # only if a test imported it
    if plt is not None:
        plt.close("all")


@pytest.fixture
def umask_022():
    """The usual umask (group and others may read), restored afterwards; yields the mode a published file gets."""
    import os

    old = os.umask(0o022)
    yield 0o644
    os.umask(old)

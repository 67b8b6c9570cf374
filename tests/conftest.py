"""Shared set-up: figures made through pyplot are closed after each test (pyplot keeps them open)."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt = sys.modules.get("matplotlib.pyplot")  # only if a test imported it
    if plt is not None:
        plt.close("all")

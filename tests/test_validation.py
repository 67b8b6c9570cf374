"""The argument checks every public function shares: what they accept, and messages that name the argument."""

from fractions import Fraction

import numpy as np
import pytest

from calibrate._validation import finite_positive, int_at_least, int_in, seed_iv


def test_finite_positive_takes_every_real_number():
    """numpy scalars and fractions were refused as 'must be a finite number > 0, got np.float32(0.001)'."""
    for value in (np.float32(1e-3), np.int64(2), Fraction(1, 1000), 0.5, 3):
        assert finite_positive(value, "lr") == float(value) and type(finite_positive(value, "lr")) is float
    for value in (True, np.bool_(True), "0.1", None):
        with pytest.raises(TypeError, match=r"lr must be a finite number > 0, got .* \("):
            finite_positive(value, "lr")
    for value in (0, -1.0, float("nan"), np.inf, 10**400):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            finite_positive(value, "lr")


def test_integer_checks_name_the_argument_for_ints_too_long_to_print():
    """Python's 'Exceeds the limit (4300 digits) for integer string conversion' named neither."""
    huge = -(10**5000)
    with pytest.raises(ValueError, match=r"n_sequences must be an int >= 1, got an int of 16610 bits"):
        int_at_least(huge, "n_sequences")
    with pytest.raises(ValueError, match=r"depth must be an int in 0..8, got an int of 16610 bits"):
        int_in(huge, "depth", 0, 8)
    with pytest.raises(ValueError, match=r"seed must be an int >= 0 .*, got an int of 16610 bits"):
        seed_iv(huge)

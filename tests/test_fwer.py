"""FWER procedures: hand-worked rejection sets, invariants, and MAPIE 1.6's fwer_control.

MAPIE notes: ``FWERBonferroniCorrection``'s docstring says it "stops as soon as one hypothesis is not
rejected" but its code (like ours) does not stop; it is not an ``FWERProcedure`` subclass, so MAPIE's own
``control_fwer`` only reaches it by name. ``FWERFixedSequenceTesting(n_starts=m)`` starts at
``i * (K // m)`` and lets walks run into each other's segments, which is our ``multistart(starts=m)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibrate import fwer


def _mask(k, idx):
    out = np.zeros(k, dtype=bool)
    out[list(idx)] = True
    return out


# ---------------------------------------------------------------------------------------------------
# hand-worked cases
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, eps, want",
    [
        ([0.01, 0.02, 0.049, 0.051, 0.001], 0.05, [0, 1, 2]),  # stops at 0.051, never sees 0.001
        ([0.06, 0.001, 0.001], 0.05, []),  # the safest fails: nothing
        ([0.0, 0.0, 0.05], 0.05, [0, 1, 2]),  # p == epsilon is rejected
        ([0.2], 0.25, [0]),
        ([0.2], 0.1, []),
    ],
)
def test_fixed_sequence_hand_cases(p, eps, want):
    np.testing.assert_array_equal(fwer.fixed_sequence(p, eps), _mask(len(p), want))


@pytest.mark.parametrize(
    "p, eps, want",
    [
        # K = 4, level 0.0125: does not stop at the failure at index 1
        ([0.01, 0.02, 0.0125, 0.3], 0.05, [0, 2]),
        ([0.02, 0.02, 0.02, 0.02], 0.05, []),
        ([0.001, 0.001], 0.002, [0, 1]),
    ],
)
def test_bonferroni_hand_cases(p, eps, want):
    np.testing.assert_array_equal(fwer.bonferroni(p, eps), _mask(len(p), want))


@pytest.mark.parametrize(
    "p, eps, want",
    [
        # sorted 0.001 <= .1/4, 0.02 <= .1/3, 0.03 <= .1/2, 0.5 > .1
        ([0.03, 0.001, 0.02, 0.5], 0.1, [0, 1, 2]),
        # sorted 0.01 <= .05/4 = .0125; 0.02 > .05/3 = .0167 -> stop (0.021, 0.04 not rejected)
        ([0.04, 0.01, 0.021, 0.02], 0.05, [1]),
        # Holm beats Bonferroni: 0.015 > .05/3 but after one rejection 0.015 <= .05/2; 0.04 <= .05/1
        ([0.015, 0.001, 0.04], 0.05, [0, 1, 2]),
        # ties at the boundary: 0.025, 0.025 with K = 2: .025 <= .05/2, then .025 <= .05
        ([0.025, 0.025], 0.05, [0, 1]),
        ([0.9, 0.9], 0.05, []),
    ],
)
def test_holm_hand_cases(p, eps, want):
    np.testing.assert_array_equal(fwer.holm(p, eps), _mask(len(p), want))


@pytest.mark.parametrize(
    "p, starts, want",
    [
        # two walks at 0.025: from 0 fails at once, from 1 rejects 1, 2 and stops at 0.3
        ([0.5, 0.001, 0.001, 0.3], [0, 1], [1, 2]),
        # a walk runs into the next start's segment: from 0 rejects 0..3, start 2 adds nothing
        ([0.01, 0.01, 0.01, 0.01, 0.4, 0.01], [0, 2], [0, 1, 2, 3]),
        # a start behind a failure: fixed sequence would stop at index 1
        ([0.001, 0.1, 0.001, 0.02, 0.03], [0, 2], [0, 2, 3]),
        # three starts -> level 0.05/3 = 0.0167
        ([0.01, 0.02, 0.01, 0.01, 0.016, 0.017], [0, 2, 4], [0, 2, 3, 4]),
        # unsorted starts are fine
        ([0.5, 0.001, 0.001, 0.3], [1, 0], [1, 2]),
    ],
)
def test_multistart_hand_cases(p, starts, want):
    np.testing.assert_array_equal(fwer.multistart(p, 0.05, starts=starts), _mask(len(p), want))


def test_multistart_integer_starts_are_equally_spaced():
    # K = 10, m = 3: starts 0, 3, 6 at level 0.05/3
    p = np.full(10, 0.9)
    p[[3, 4, 6]] = 0.01
    np.testing.assert_array_equal(fwer.multistart(p, 0.05, starts=3), _mask(10, [3, 4, 6]))
    np.testing.assert_array_equal(fwer.multistart(p, 0.05, starts=[0, 3, 6]), _mask(10, [3, 4, 6]))
    # more starts than hypotheses: capped at K, i.e. Bonferroni
    np.testing.assert_array_equal(fwer.multistart(p[:3], 0.05, starts=8), fwer.bonferroni(p[:3], 0.05))


# ---------------------------------------------------------------------------------------------------
# invariants on random p-values
# ---------------------------------------------------------------------------------------------------


def _random_p(rng, k):
    kind = rng.integers(3)
    if kind == 0:
        return rng.random(k) * rng.choice([0.01, 0.1, 1.0])
    if kind == 1:  # monotone, as for a monotone risk curve
        return np.sort(rng.random(k) ** 3)
    return np.round(rng.random(k) * 0.05, 3)  # many ties, near epsilon/K


def test_invariants_on_random_p_values():
    rng = np.random.default_rng(2024)
    for _ in range(500):
        k = int(rng.integers(1, 25))
        p = _random_p(rng, k)
        eps = float(rng.choice([0.01, 0.05, 0.1, 0.3]))
        fs = fwer.fixed_sequence(p, eps)
        bf = fwer.bonferroni(p, eps)
        hm = fwer.holm(p, eps)
        # fixed sequence rejects a prefix, every member with p <= eps
        j = int(fs.sum())
        assert fs[:j].all() and not fs[j:].any()
        assert np.all(p[fs] <= eps)
        # Bonferroni rejects no more than Holm
        assert np.all(hm[bf])
        # multistart: one start = fixed sequence, all K starts = Bonferroni
        np.testing.assert_array_equal(fwer.multistart(p, eps, starts=[0]), fs)
        np.testing.assert_array_equal(fwer.multistart(p, eps, starts=list(range(k))), bf)
        np.testing.assert_array_equal(fwer.multistart(p, eps, starts=k), bf)
        # any start set: each rejected p is <= eps/m, and the set contains the Bonferroni-at-m walks' starts
        m = int(rng.integers(1, k + 1))
        starts = rng.choice(k, size=m, replace=False)
        ms = fwer.multistart(p, eps, starts=starts)
        assert np.all(p[ms] <= eps / m)
        assert np.all(ms[starts[p[starts] <= eps / m]])
        # Holm is permutation-equivariant; Bonferroni too
        perm = rng.permutation(k)
        np.testing.assert_array_equal(fwer.holm(p[perm], eps), hm[perm])
        # for nondecreasing p-values fixed sequence rejects at least what Holm rejects
        ps = np.sort(p)
        assert np.all(fwer.fixed_sequence(ps, eps)[fwer.holm(ps, eps)])


# ---------------------------------------------------------------------------------------------------
# MAPIE 1.6
# ---------------------------------------------------------------------------------------------------


def _reference_mapie(p, eps, method):
    from mapie.risk_control import fwer_control as mf

    if isinstance(method, int):
        idx = mf.control_fwer(p, eps, fwer_method=mf.FWERFixedSequenceTesting(n_starts=method))
    else:
        idx = mf.control_fwer(p, eps, fwer_method=method)
    return _mask(len(p), idx)


@pytest.mark.parametrize(
    "ours, theirs",
    [("fixed_sequence", "fixed_sequence"), ("bonferroni", "bonferroni"), ("holm", "bonferroni_holm")],
)
def test_against_mapie(ours, theirs):
    rng = np.random.default_rng(11)
    for _ in range(300):
        k = int(rng.integers(1, 20))
        p = _random_p(rng, k)
        eps = float(rng.choice([0.01, 0.05, 0.2]))
        np.testing.assert_array_equal(fwer.control_fwer(p, eps, method=ours), _reference_mapie(p, eps, theirs))


def test_multistart_against_mapie():
    import warnings

    rng = np.random.default_rng(12)
    for _ in range(300):
        k = int(rng.integers(1, 20))
        m = int(rng.integers(1, k + 1))
        p = _random_p(rng, k)
        eps = float(rng.choice([0.01, 0.05, 0.2]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            theirs = _reference_mapie(p, eps, m)
        np.testing.assert_array_equal(fwer.multistart(p, eps, starts=m), theirs)
        np.testing.assert_array_equal(fwer.control_fwer(p, eps, method=fwer.MultiStart(m)), theirs)


# ---------------------------------------------------------------------------------------------------
# control_fwer and the strategy objects
# ---------------------------------------------------------------------------------------------------


def test_control_fwer_names_and_instances_agree():
    rng = np.random.default_rng(4)
    p = np.sort(rng.random(12) ** 4)
    pairs = [
        ("fixed_sequence", fwer.FixedSequence(), fwer.fixed_sequence(p, 0.1)),
        ("bonferroni", fwer.Bonferroni(), fwer.bonferroni(p, 0.1)),
        ("holm", fwer.Holm(), fwer.holm(p, 0.1)),
        ("multistart", fwer.MultiStart(), fwer.multistart(p, 0.1, starts=fwer.DEFAULT_N_STARTS)),
    ]
    for name, obj, want in pairs:
        assert obj.name == name
        np.testing.assert_array_equal(fwer.control_fwer(p, 0.1, method=name), want)
        np.testing.assert_array_equal(fwer.control_fwer(p, 0.1, method=obj), want)
        assert fwer.control_fwer(p, 0.1, method=name).dtype == bool
    np.testing.assert_array_equal(fwer.control_fwer(p, 0.1), fwer.fixed_sequence(p, 0.1))
    assert repr(fwer.MultiStart([0, 5])) == "MultiStart(starts=(0, 5))"


def test_control_fwer_rejects_other_methods():
    from mapie.risk_control.fwer_control import FWERBonferroniCorrection

    with pytest.raises(ValueError, match=r"method must be one of .*'holm'.*got 'bonferroni_holm'"):
        fwer.control_fwer([0.1], 0.05, method="bonferroni_holm")
    for bad in (FWERBonferroniCorrection(), fwer.bonferroni, None, 3):
        with pytest.raises(TypeError, match="method must be one of"):
            fwer.control_fwer([0.1], 0.05, method=bad)


def test_custom_procedure_subclass_and_checked_output():
    class Nothing(fwer.FWERProcedure):
        def reject(self, p_values, epsilon):
            return np.zeros(len(p_values), dtype=bool)

    class Wrong(fwer.FWERProcedure):
        def reject(self, p_values, epsilon):
            return np.array([1, 0])

    np.testing.assert_array_equal(fwer.control_fwer([0.0, 0.0, 0.0], 0.05, method=Nothing()), [False] * 3)
    with pytest.raises(ValueError, match="must return a boolean array of shape"):
        fwer.control_fwer([0.0, 0.0, 0.0], 0.05, method=Wrong())
    with pytest.raises(TypeError):
        fwer.FWERProcedure()


@pytest.mark.parametrize("fn", [fwer.fixed_sequence, fwer.bonferroni, fwer.holm, fwer.control_fwer])
def test_validation(fn):
    with pytest.raises(ValueError, match="NaN"):
        fn([0.1, np.nan], 0.05)
    with pytest.raises(ValueError, match=r"p_values must lie in \[0, 1\]"):
        fn([0.1, 1.2], 0.05)
    with pytest.raises(ValueError, match=r"p_values must be non-empty with shape \(K,\)"):
        fn([], 0.05)
    with pytest.raises(ValueError, match=r"p_values must have shape \(K,\)"):
        fn([[0.1, 0.2]], 0.05)
    for bad in (0.0, 1.0, -1.0):
        with pytest.raises(ValueError, match="epsilon must lie in the open interval"):
            fn([0.1], bad)
    with pytest.raises(TypeError, match="epsilon"):
        fn([0.1], True)


def test_multistart_validation():
    p = [0.01, 0.02, 0.03]
    with pytest.raises(ValueError, match="distinct"):
        fwer.multistart(p, 0.05, starts=[0, 0])
    with pytest.raises(ValueError, match=r"indices in \[0, 2\]"):
        fwer.multistart(p, 0.05, starts=[0, 3])
    with pytest.raises(ValueError, match=r"indices in \[0, 2\]"):
        fwer.multistart(p, 0.05, starts=[-1])
    with pytest.raises(TypeError, match="integer indices"):
        fwer.multistart(p, 0.05, starts=[0.0, 1.0])
    with pytest.raises(ValueError, match=">= 1"):
        fwer.multistart(p, 0.05, starts=0)
    with pytest.raises(ValueError, match="non-empty"):
        fwer.multistart(p, 0.05, starts=[])
    with pytest.raises(TypeError, match="starts"):
        fwer.MultiStart("0,1")
    for bad in (2.0, None, "ab"):  # TypeError from the function as from the class (was ValueError 'shape ()')
        with pytest.raises(TypeError, match=rf"starts must be an int .*got {type(bad).__name__}"):
            fwer.multistart(p, 0.05, starts=bad)
    with pytest.raises(ValueError, match=">= 1"):
        fwer.MultiStart(0)
    for bad, match in [
        ([], r"non-empty 1-D .*got shape \(0,\)"),
        ([[0, 1]], r"got shape \(1, 2\)"),
        ([[0], [1, 2]], "got a ragged sequence"),
        ([1, 1], "distinct"),
        ([0.0], "integer indices"),
    ]:
        for make in (fwer.MultiStart, lambda s: fwer.multistart(p, 0.05, starts=s)):  # one check, one message
            with pytest.raises(TypeError if bad == [0.0] else ValueError, match=match):
                make(bad)
    with pytest.raises(ValueError, match=r"indices in \[0, 2\]"):
        fwer.control_fwer(p, 0.05, method=fwer.MultiStart([5]))


def test_multistart_caps_its_starts_at_the_grid_size():
    """Four default starts on a three-value grid are the three values at epsilon / 3 (uncapped: four walks, one
    twice, at epsilon / 4, which certifies less)."""
    p = [0.5, 0.015, 0.015]  # 0.015 <= 0.05 / 3 but > 0.05 / 4
    np.testing.assert_array_equal(fwer.control_fwer(p, 0.05, method="multistart"), [False, True, True])
    np.testing.assert_array_equal(fwer.multistart(p, 0.05, starts=10), fwer.bonferroni(p, 0.05))

"""The generic risk-control step: :func:`certify` turns any loss table whose columns follow a knob from safest to
fastest into a :class:`~calibrate.certificate.Certificate`; with its input checks and the reasons it gives."""

from __future__ import annotations

import warnings

import numpy as np

from calibrate import bounds as _bounds
from calibrate import fwer as _fwer
from calibrate._certificate_checks import _knob_grid_iv
from calibrate._format import level
from calibrate._validation import caller_stacklevel, open_interval
from calibrate.certificate import KNOBS, Certificate
from calibrate.crc import _crc_index, _non_monotone_reason
from calibrate.exits import _lambdas_iv
from calibrate.losses import LossTable, user_losses

METHODS = (*_fwer.FWER_METHODS, "crc")


def _certify_iv(losses, lambdas, delta, epsilon, bound, method, knob):
    delta, epsilon, bound, method_name = _risk_control_iv(delta, epsilon, bound, method)
    if isinstance(losses, LossTable):
        if lambdas is not None and not np.array_equal(_lambdas_iv(lambdas), losses.lambdas):
            raise ValueError(
                "lambdas disagrees with the LossTable's own lambdas, the thresholds its columns were computed at: "
                "drop lambdas= (to test other thresholds, compute the table at them, e.g. proxy_losses(cache, conf, "
                "lambdas))"
            )
        table = losses
    else:
        if lambdas is None:
            raise ValueError("lambdas is required when losses is an array (one threshold per column)")
        table = user_losses(losses, lambdas)
    if knob not in KNOBS:
        raise ValueError(f"knob must be one of {KNOBS}, got {knob!r}")
    _knob_grid_iv(knob, table.lambdas)
    return table, delta, epsilon, bound, method_name


def _risk_control_iv(delta, epsilon, bound, method) -> tuple[float, float, str | None, str]:
    """Checked ``(delta, epsilon, bound, method name)`` of :func:`certify` (``fit`` checks them before any work)."""
    delta = open_interval(delta, "delta")
    epsilon = open_interval(epsilon, "epsilon")
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} or a calibrate.fwer.FWERProcedure, got {method!r}")
        method_name = method
    elif isinstance(method, _fwer.FWERProcedure):
        method_name = _method_name(method)
        if method_name == "crc":  # a certificate saying "crc" claims conformal risk control's guarantee
            raise ValueError("a custom FWERProcedure cannot be named 'crc' (conformal risk control's name)")
        builtin = _fwer._BY_NAME.get(method_name)
        if builtin is not None and type(method).reject is not builtin.reject:  # a loaded certificate is checked by it
            raise ValueError(
                f"a custom FWERProcedure cannot take the built-in name {method_name!r} (certificates are checked "
                f"against the procedure they name): give {type(method).__name__} a name of its own"
            )
    else:
        raise TypeError(
            f"method must be one of {METHODS} or a calibrate.fwer.FWERProcedure instance, got {type(method).__name__}"
        )
    return delta, epsilon, _bound_iv(bound, method_name), method_name


def _bound_iv(bound, method_name: str) -> str | None:
    """The p-value ``bound`` names (``None``: :data:`~calibrate.bounds.DEFAULT_BOUND`), or ``None`` for
    conformal risk control, which uses none (a named bound would be silently ignored)."""
    if method_name == "crc":
        if bound is not None:
            raise ValueError(
                f"bound={bound!r} names a Learn-Then-Test p-value; method='crc' (conformal risk control) uses "
                "none: leave bound unset"
            )
        return None
    if bound is None:
        return _bounds.DEFAULT_BOUND
    if not isinstance(bound, str) or bound not in _bounds.P_VALUES:
        raise ValueError(f"bound must be one of {sorted(_bounds.P_VALUES)}, got {bound!r}")
    return bound


def certify(
    losses,
    lambdas=None,
    delta: float = 0.1,
    epsilon: float = 0.05,
    *,
    bound: str | None = None,
    method: str | _fwer.FWERProcedure = "fixed_sequence",
    knob: str = "exit_threshold",
) -> Certificate:
    """Certify the fastest value of a knob whose risk is at most ``delta`` with probability ``1 - epsilon``.

    Parameters
    ----------
    losses : LossTable or array_like, shape (n, n_lambdas)
        Losses in ``[0, 1]`` of ``n`` i.i.d. calibration examples; column ``k`` belongs to ``lambdas[k]``.
    lambdas : array_like, shape (n_lambdas,), optional
        The knob's values, strictly decreasing from safest to fastest (taken from a ``LossTable``).
    delta : float, default=0.1
        Tolerance on the risk, in (0, 1). (LTT and MAPIE call this alpha.)
    epsilon : float, default=0.05
        Failure probability, in (0, 1). (LTT and MAPIE call this delta.)
    bound : {"hoeffding_bentkus", "hoeffding", "hoeffding_kl", "bentkus", "binomial", "wsr"}, optional
        p-value for the null ``risk(lambda) > delta``; default ``"hoeffding_bentkus"``. ``"binomial"``
        needs 0/1 losses; ``"wsr"`` depends on the order of the examples, which must not depend on their
        losses (it reads them in a fixed pseudo-random order, which does not undo a sorted one; see
        :func:`calibrate.bounds.p_values`), and its bets are tuned to ``epsilon`` (so under Bonferroni, Holm or
        multistart a larger epsilon can certify a slower threshold). Not with ``method="crc"``, which uses no
        p-value.
    method : {"fixed_sequence", "bonferroni", "holm", "multistart", "crc"} or FWERProcedure
        Family-wise error control over the grid; ``"crc"`` is conformal risk control, a guarantee in
        expectation only.
    knob : {"exit_threshold", "token_keep", "fff_depth"}, default="exit_threshold"
        Which speed knob the losses describe.

    Returns
    -------
    Certificate
        ``lambda_hat`` is the fastest certified value, ``None`` when only the full model is certified;
        ``reason`` says why.

    Raises
    ------
    TypeError
        If ``delta`` or ``epsilon`` is not a number, or ``method`` is neither a name nor a FWERProcedure.
    ValueError
        If ``delta`` or ``epsilon`` is outside (0, 1), losses are outside [0, 1] or NaN, ``lambdas`` is
        not strictly decreasing or its length differs from the number of columns.

    Notes
    -----
    With ``method`` controlling the family-wise error rate at ``epsilon`` and valid p-values,

        P( risk(lambda_hat) <= delta ) >= 1 - epsilon

    over draws of the calibration set, assuming i.i.d. (exchangeable) examples, losses in [0, 1], and a
    grid and order fixed before seeing the calibration data (Angelopoulos et al., 2021, Learn Then Test).
    Fixed-sequence testing needs no monotonicity: it certifies thresholds in order until the first
    p-value above ``epsilon``. Reusing the calibration examples for anything that shaped the grid, the
    measure or the loss voids the guarantee. Too few examples is not an error: then nothing can be
    rejected and the certificate says "full model only".

    References
    ----------
    .. [1] A. N. Angelopoulos, S. Bates, E. J. Candès, M. I. Jordan, L. Lei, "Learn then Test:
       Calibrating Predictive Algorithms to Achieve Risk Control", 2021.
    .. [2] T. Schuster et al., "Confident Adaptive Language Modeling", NeurIPS 2022.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> true_risk = np.linspace(0.0, 0.3, 7)            # grows as the knob gets faster
    >>> losses = (rng.random((2000, 7)) < true_risk).astype(float)
    >>> cert = certify(losses, lambdas=np.linspace(0.9, 0.3, 7), delta=0.1, epsilon=0.05)
    >>> cert.lambda_hat
    0.8
    """
    cert, caveat = _certify(losses, lambdas, delta, epsilon, bound, method, knob)
    if caveat:
        warnings.warn(caveat, UserWarning, stacklevel=caller_stacklevel())
    return cert


def _certify(losses, lambdas, delta, epsilon, bound, method, knob) -> tuple[Certificate, str]:
    """:func:`certify` and the caveat it warns of (``""`` if none), for callers that report it themselves: no
    ``warnings.catch_warnings`` around it, which is not thread-safe."""
    table, delta, epsilon, bound, method_name = _certify_iv(losses, lambdas, delta, epsilon, bound, method, knob)
    lam = table.lambdas
    risks = table.risks
    caveat = ""
    if method_name == "crc":
        p_values = np.full(lam.size, np.nan)
        index = _crc_index(table.losses, delta)
        caveat = _non_monotone_reason(table.losses)  # kept in the certificate's reason too
        rejected = np.zeros(lam.size, dtype=bool)
        if index is not None:
            rejected[: index + 1] = True
    else:
        p_values = _bounds.p_values(table.losses, delta, bound=bound, epsilon=epsilon)
        rejected = np.asarray(_fwer.control_fwer(p_values, epsilon, method=method), dtype=bool)
        hits = np.flatnonzero(rejected)
        index = int(hits[-1]) if hits.size else None
    reason = "; ".join(filter(None, [_reason(table, delta, epsilon, bound, method, p_values, index), caveat]))
    cert = Certificate(
        lambda_hat=None if index is None else float(lam[index]),
        delta=delta,
        epsilon=epsilon,
        n=table.n,
        lambdas=tuple(float(v) for v in lam),
        risks=tuple(float(v) for v in risks),
        p_values=tuple(float(v) for v in p_values),
        certified=tuple(bool(v) for v in rejected),
        bound=bound,
        method=method_name,
        mode=table.mode,
        knob=knob,
        consistency=table.consistency,
        avg_layers=None if table.avg_layers is None else tuple(float(v) for v in table.avg_layers),
        n_layers=table.n_layers,
        decay=None if table.decay is None else table.decay.to_dict(),
        reason=reason,
    )
    return cert, caveat


def _method_name(method) -> str:
    """The name a certificate records for a method given by name or as an FWERProcedure."""
    return method if isinstance(method, str) else getattr(method, "name", type(method).__name__)


def _reason(table: LossTable, delta, epsilon, bound, method, p_values, index) -> str:
    """Why nothing is certified (``""`` when something is); ``method`` as given to :func:`certify`."""
    if index is not None:
        return ""
    if method == "crc":
        floor = 1.0 / (table.n + 1)
        if floor > delta:
            return f"too few examples: with n={table.n}, CRC needs 1/(n+1) <= delta={level(delta)}"
        return f"the safest value has adjusted risk above delta={level(delta)}"
    too_few = _too_few_reason(table.n, delta, epsilon, bound, method, table.lambdas.size)
    if too_few is not None:
        return too_few
    return (
        f"no threshold rejected by {_method_name(method)} at epsilon={level(epsilon)}; the safest value "
        f"lambda={table.lambdas[0]:.6g} has empirical risk {table.risks[0]:.4f} and p={level(p_values[0], '.3g')}"
    )


def _too_few_reason(
    n: int, delta: float, epsilon: float, bound: str, method="fixed_sequence", k: int = 1
) -> str | None:
    """Why nothing can be certified whatever the losses (``None`` when zero loss would be certified).

    Zero loss at all ``k`` thresholds is tested as ``method`` tests them, so the per-test level of
    Bonferroni, Holm or multi-start (``epsilon / k`` or ``epsilon / m``) counts.
    """
    best = float(_bounds.p_values(np.zeros((n, 1)), delta, bound=bound, epsilon=epsilon)[0])
    if np.any(_fwer.control_fwer(np.full(k, best), epsilon, method=method)):
        return None
    if best > epsilon:
        return (
            f"too few examples: with n={n} even zero observed loss gives p={level(best, '.3g')} > "
            f"epsilon={level(epsilon)} under the {bound} bound"
        )
    return (
        f"too few examples: with n={n} even zero observed loss gives p={level(best, '.3g')} under the {bound} bound, "
        f"which {_method_name(method)} rejects at none of {k} thresholds at epsilon={level(epsilon)}"
    )

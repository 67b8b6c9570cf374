"""Held-out checks of a certificate: one audit, and a repeated-split validity study."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibrate._atomic import atomic_file
from calibrate._certify import _certify, _risk_control_iv
from calibrate._format import beside, level
from calibrate._frozen import Rebuilt, read_only_arrays
from calibrate._validation import caller_stacklevel, int_at_least, open_interval, seed_iv
from calibrate.certificate import Certificate, _budget_warning
from calibrate.exits import Decay
from calibrate.losses import LossTable, proxy_losses

if TYPE_CHECKING:
    from calibrate.cache import LayerCache

__all__ = ["AuditReport", "ValidityReport", "audit", "validity"]


def _source_words(state: dict) -> str:
    """Where a built-in confidence with this ``measure_state`` (:func:`calibrate.fit._source_state`, ``{}`` for None)
    came from, in words."""
    from measures.confidence import _source

    if "from_topk" in state:
        return _source(state["from_topk"])
    if "from_hidden" in state:
        return f"computed from {state['from_hidden']} hidden states"
    return "its exact value (stored at extraction, or computed from the full softmax)"


def _certificate_confidence(cert: Certificate, cache) -> np.ndarray:
    """Recompute the certificate's confidence measure on another cache, shape (n_tokens, n_layers)."""
    from measures.confidence import MEASURES, _stored_score, confidence
    from measures.learned import LEARNED_MEASURES, measure_from_state

    if cert.measure in LEARNED_MEASURES:
        return measure_from_state(cert.measure, cert.measure_state).predict_confidence(cache)
    if cert.measure not in MEASURES and not _stored_score(cache.arrays, cert.measure):
        raise ValueError(f"the certificate's measure {cert.measure!r} is a stored score: the test cache stores none")
    from calibrate.fit import _source_state

    made, here = cert.measure_state or {}, _source_state(cache, cert.measure) or {}
    if made != here:
        raise ValueError(
            f"the certificate's {cert.measure!r} confidence is {_source_words(made)}, the test cache's would be "
            f"{_source_words(here)}: they differ on the same tokens; audit on a cache of the calibration cache's kind "
            f"(its top_k and hidden states, with {cert.measure!r} stored or not as there)"
            + ("; a certificate made before calm-calibrate recorded where its confidence came from does not say "
               "which: refit it" if not made else "")
        )  # fmt: skip
    return confidence(cache, cert.measure)


def _certificate_losses(cert: Certificate, cache, *, decode=None, progress=False) -> LossTable:
    if cert.knob != "exit_threshold" or cert.measure is None or cert.consistency is None:
        raise ValueError(
            "audit needs an exit-threshold certificate made by calibrate.fit (with a measure and a "
            f"consistency); got knob={cert.knob!r}, measure={cert.measure!r}, consistency={cert.consistency!r}"
        )
    from calibrate._cache_checks import meta_keys_iv
    from calibrate.cache import _in_memory_iv
    from calibrate.concat import _first_difference, _heads_difference, _loaded_by_name
    from calibrate.fit import _generation_budget
    from measures.learned import plain_state

    _in_memory_iv(cache, "the test cache")
    meta_keys_iv(cache.user_meta, "the test cache's meta")
    if cert.cache_checksum is not None and cert.cache_checksum == cache.checksum:
        raise ValueError(
            "the test cache is the calibration cache itself (same checksum); audit on held-out sequences, "
            "e.g. a part of LayerCache.split"
        )
    if cert.mode == "decoded":
        raise ValueError(
            "the certificate is mode='decoded' (it certifies what the runtime emits), but a cache gives "
            "teacher-forced proxy losses; audit it on held-out prompts with "
            "calibrate.audit_decoded(cert, model, tokenizer, prompts)"
        )
    if cert.n_layers is not None and cache.n_layers != cert.n_layers:
        raise ValueError(f"the cache has {cache.n_layers} layers but the certificate was made for {cert.n_layers}")
    meta = cache.user_meta
    for what in ("model", "heads"):
        made, here = getattr(cert, what), meta.get(what)
        if made is None or here is None or _loaded_by_name(what, {"heads": cert.heads}, meta):
            continue
        made = plain_state(made)  # the certificate's read-only copy: mappings and tuples
        if what == "heads" and isinstance(here, dict) and isinstance(made, dict):  # the keys both record
            here, made = ({key: d[key] for key in sorted(set(here) & set(made))} for d in (here, made))
            if _heads_difference(here, made) == ["generation"]:
                raise ValueError(
                    "the cache was extracted under another generation config (EOS ids or logits processors such as "
                    "repetition_penalty) than the certificate was calibrated with: its full-model outputs are another "
                    "decoding's; extract the test cache with the model's generation config as calibrated"
                )
        if made != here:
            path, mine, theirs = _first_difference((what,), here, made)
            hint = (
                " (other weights, or the same weights in another dtype: extract the test cache in the dtype the "
                "certificate was calibrated in, --dtype on the command line)"
                if path.endswith("'model_digest'")
                else ""
            )
            raise ValueError(
                f"the cache was extracted with other {what} than the certificate was calibrated with: {path} is "
                f"{mine!r:.80} in the cache, {theirs!r:.80} in the certificate{hint}"
            )
    budget = _generation_budget(cache)
    if budget is not None:
        _budget_warning(cert, budget, "auditing outputs of")
    decay = None if cert.decay is None else Decay(**cert.decay)
    conf = _certificate_confidence(cert, cache)
    return proxy_losses(
        cache,
        conf,
        np.asarray(cert.lambdas),
        consistency=cert.consistency,
        decay=decay,
        decode=decode,
        progress=progress,
    )


#: How to put the panels of a report next to Axes of one's own.
_BESIDE = (
    "pass an empty figure (plt.figure()), or make subfigures first and your Axes in one of them "
    "(left, right = plt.figure().subfigures(1, 2); ax = left.subplots(); report.plot(fig=right))"
)


def _figure(fig, figsize: tuple[float, float]):
    """``fig`` (an empty Figure or SubFigure), or a new figure of ``figsize`` (inches) when None."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import FigureBase

    if fig is None:
        return plt.figure(figsize=figsize)
    if not isinstance(fig, FigureBase):
        hint = f" (the panels are several Axes: {_BESIDE})" if hasattr(fig, "figure") else ""
        raise TypeError(f"fig must be a matplotlib Figure, SubFigure or None, got {type(fig).__name__}{hint}")
    if fig.axes:
        raise ValueError(f"fig already holds {len(fig.axes)} Axes, which the panels would cover: {_BESIDE}")
    return fig


def _tight(fig) -> None:
    """``tight_layout`` for a figure without a layout engine of its own (a subfigure follows its parent's)."""
    from matplotlib.figure import Figure

    if isinstance(fig, Figure) and fig.get_layout_engine() is None:
        fig.tight_layout()


def _save_figure(fig, path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` whole or not at all, in the format its suffix names (PNG without one), and close
    it (scripts that save many figures keep none open)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True, eq=False)
class AuditReport(Rebuilt):
    """Held-out risk and layer use of a certificate.

    Attributes
    ----------
    certificate : Certificate
        The audited certificate.
    n : int
        Number of held-out sequences.
    risks : ndarray, shape (n_lambdas,)
        Held-out risk at each grid value.
    avg_layers : ndarray, shape (n_lambdas,)
        Held-out token-averaged exit layer at each grid value (NaN for a ``token_keep`` certificate).
    risk : float
        Held-out risk at ``lambda_hat`` (0 for the full model).
    layers : float
        Held-out average exit layer at ``lambda_hat`` (``n_layers`` for the full model; NaN for
        ``token_keep``).
    mode : {"proxy", "decoded"}
        How the held-out losses were computed: teacher-forced from a cache (:func:`audit`), or from what
        the model emits (:func:`calibrate.audit_decoded` and the other knobs' audits).

    Examples
    --------
    >>> import calibrate
    >>> cal, test = calibrate.synthetic_cache(300, seed=0).split([0.5, 0.5], seed=0)
    >>> report = calibrate.audit(calibrate.fit(cal, delta=0.1, epsilon=0.05, progress=False), test)
    >>> report
    AuditReport(n=150, risk=0.0334, delta=0.1, within_tolerance=True, layers=9.23/12)
    >>> round(report.layer_savings, 2)                 # share of layers skipped at lambda_hat
    0.23
    >>> report.to_frame().columns.tolist()              # calibration and held-out values per grid value
    ['lambda', 'tested', 'risk', 'p_value', 'certified', 'avg_layers', 'selected', 'test_risk', 'test_avg_layers']
    """

    certificate: Certificate
    n: int
    risks: np.ndarray
    avg_layers: np.ndarray
    risk: float
    layers: float
    mode: str = "decoded"

    def __post_init__(self) -> None:
        read_only_arrays(self, "risks", "avg_layers")

    @property
    def within_tolerance(self) -> bool:
        """Whether the held-out risk is at most ``delta``.

        The guarantee bounds the true risk, not this estimate of it: a valid certificate whose true risk
        lies near ``delta`` gives a held-out risk above ``delta`` often (about half the time at a true risk
        of ``delta``), more so on few held-out examples; a CRC certificate bounds only the expected risk.
        Only a held-out risk well above ``delta`` on many examples speaks against the certificate.
        """
        return self.risk <= self.certificate.delta

    @property
    def layer_savings(self) -> float:
        """Fraction of layers skipped on the held-out set at ``lambda_hat`` (NaN without a layer count)."""
        n_layers = self.certificate.n_layers
        return math.nan if n_layers is None else 1.0 - self.layers / n_layers

    def to_frame(self):
        """Calibration and held-out risk and layers per grid value, as a :class:`pandas.DataFrame`."""
        frame = self.certificate.to_frame()
        frame["test_risk"] = self.risks
        frame["test_avg_layers"] = self.avg_layers
        return frame

    def summary(self) -> str:
        """A few lines: held-out risk at the certified value against delta, and (exit thresholds) layers used."""
        cert = self.certificate
        verdict = "within" if self.within_tolerance else "ABOVE"
        risk, delta = beside(self.risk, cert.delta)
        if cert.knob != "exit_threshold":
            if cert.lambda_hat is None:
                at = "the full model"
            elif cert.knob == "token_keep":
                at = f"speed-up {1 / cert.lambda_hat:.4g}x (predicted)"
            else:
                at = f"evaluation depth {cert.lambda_hat:g}"
            return (
                f"Audit on {_plural(self.n, 'held-out example')} at {at}:\n"
                f"  held-out risk {risk} ({verdict} delta = {delta})"
            )
        lam = "the full model" if cert.lambda_hat is None else f"lambda_hat = {cert.lambda_hat:.6g}"
        how = "decoded by the runtime" if self.mode == "decoded" else "teacher-forced proxy losses"
        return (
            f"Audit on {_plural(self.n, 'held-out sequence')} ({how}) at {lam}:\n"
            f"  held-out risk {risk} ({verdict} delta = {delta})\n"
            f"  average layers {self.layers:.2f} of {cert.n_layers} (saves {100 * self.layer_savings:.1f}%)"
        )

    def __repr__(self) -> str:
        layers = "" if self.certificate.n_layers is None else f", layers={self.layers:.2f}/{self.certificate.n_layers}"
        risk, delta = beside(self.risk, self.certificate.delta)
        return (
            f"AuditReport(n={self.n}, risk={risk}, delta={delta}, "
            f"within_tolerance={self.within_tolerance}{layers})"
        )

    def plot(self, fig=None):
        """Risk and average layers against the threshold, and risk against layers used.

        The threshold axis follows the grid in its tested order, evenly spaced (the default grid's values
        crowd near 1), labelled with lambda values: thresholds that exit earlier lie to the right.
        ``delta``, ``lambda_hat`` and the certified grid values are marked; the calibration curve is dashed,
        the held-out one solid. The title names the measure, the loss, the mode (of each curve, where the
        held-out losses were decoded and the calibration ones not) and the guarantee's level, and says when
        only the full model is certified.

        ``token_keep`` and ``fff_depth`` certificates get one panel: calibration and held-out risk against
        the speed-up or the evaluation depth.

        Parameters
        ----------
        fig : matplotlib.figure.Figure, optional
            An empty figure to draw into; default: a new one.

        Returns
        -------
        matplotlib.figure.Figure
            ``fig``, or a new figure, which pyplot keeps open (shown by ``plt.show()`` and in notebooks) until
            ``plt.close(fig)``: close it when drawing many, in a loop or a server.
        """
        cert = self.certificate
        if cert.knob != "exit_threshold":
            return self._plot_knob(_figure(fig, (6, 4)))
        fig = _figure(fig, (13, 3.8))
        ax_risk, ax_layers, ax_trade = fig.subplots(1, 3)
        lam = np.asarray(cert.lambdas)
        x = np.arange(lam.size)  # grid order, safest first
        dots = {"marker": "o", "markersize": 4} if lam.size <= 25 else {}  # a short grid: one line per point
        risk_label = _risk_label(cert)
        ax_risk.plot(x, cert.risks, "--", label=f"calibration (n={cert.n})", **dots)
        ax_risk.plot(x, self.risks, label=f"held-out (n={self.n})", **dots)
        _mark_certified(ax_risk, cert, x)
        ax_risk.set(ylabel=risk_label, title="Risk")
        ax_layers.plot(x, self.avg_layers, color="C2", label="held-out", **dots)
        ax_layers.axhline(cert.n_layers, color="k", linestyle=":", linewidth=1, label="full model")
        ax_layers.set(ylabel="average exit layer", title="Layers used")
        ax_trade.plot(self.avg_layers, self.risks, color="C1", label="held-out", **dots)
        ax_trade.set(xlabel="average exit layer", ylabel=risk_label, title="Trade-off")
        for ax in (ax_risk, ax_trade):
            _mark_delta(ax, cert.delta)
        ticks = np.unique(np.linspace(0, lam.size - 1, min(lam.size, 7)).round().astype(int))
        for ax in (ax_risk, ax_layers):
            ax.set_xticks(ticks, [f"{v:.4g}" for v in lam[ticks]])
            ax.set_xlabel("threshold lambda, in grid order (to the right exits earlier)")
            if cert.index is not None:
                ax.axvline(cert.index, color="C3", linewidth=1, label=f"lambda_hat = {cert.lambda_hat:.4g}")
        if cert.lambda_hat is not None:
            ax_trade.plot([self.layers], [self.risk], "o", color="C3", label="at lambda_hat")
        for ax in (ax_risk, ax_layers, ax_trade):
            ax.legend(fontsize=8)
        fig.suptitle(_title(cert, f"{cert.measure} / {cert.consistency}", held_out=self.mode))
        _tight(fig)
        return fig

    def _plot_knob(self, fig):
        from matplotlib.ticker import MaxNLocator

        cert = self.certificate
        ax = fig.subplots()
        speedup = cert.knob == "token_keep"
        x = 1.0 / np.asarray(cert.lambdas) if speedup else np.asarray(cert.lambdas)
        ax.plot(x, cert.risks, "o--", label=f"calibration (n={cert.n})")
        ax.plot(x, self.risks, "s-", label=f"held-out (n={self.n})")
        _mark_certified(ax, cert, x)
        _mark_delta(ax, cert.delta)
        if cert.lambda_hat is not None:
            at = 1.0 / cert.lambda_hat if speedup else cert.lambda_hat
            unit = "x speed-up" if speedup else " depth"
            ax.axvline(at, color="C3", linewidth=1, label=f"certified {at:.3g}{unit}")
        if speedup:
            title = "Token elimination" + ("" if cert.measure is None else f" ({cert.measure} score)")
            ax.set(xlabel="predicted speed-up of the prefill")
        else:
            title = "Fast feedforward depth"
            ax.set(xlabel="evaluation depth (faster to the right)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are whole levels of the tree
            ax.invert_xaxis()
        ax.set(ylabel=_risk_label(cert))
        ax.set_title(_title(cert, title, sep="\n", held_out=self.mode), fontsize=10)  # one panel: narrow for one line
        ax.legend(fontsize=8)
        _tight(fig)
        return fig


def _mark_delta(ax, delta: float) -> None:
    """The tolerance as a dashed line, inside the risk axis even when every risk lies above it."""
    ax.axhline(delta, color="k", linestyle="--", linewidth=1, label=f"delta = {level(delta)}")
    if ax.get_ylim()[0] > 0:  # risks and delta are >= 0: show from 0, not from the line itself
        ax.set_ylim(bottom=0.0)


def _mark_certified(ax, cert: Certificate, x: np.ndarray) -> None:
    """Mark the grid values a certificate certifies (kept, for conformal risk control) on its calibration curve."""
    certified = np.asarray(cert.certified, dtype=bool)
    if certified.any():
        what = "kept by CRC" if cert.method == "crc" else "certified"
        ax.plot(x[certified], np.asarray(cert.risks)[certified], "o", color="C2", markersize=3, zorder=3,
                label=f"{what} ({certified.sum()} of {certified.size})")  # fmt: skip
    untested = ~np.asarray(cert.tested, dtype=bool)
    if untested.any():
        ax.plot([], [], " ", label=f"{untested.sum()} not tested (fixed-sequence stop)")


#: What each loss measures, for axis labels (``risk_*``: excess over the full model's, against the reference).
_LOSS_LABELS = {
    "token": "token disagreement",
    "sequence": "output mismatch",
    "rouge_l": "1 - ROUGE-L vs full model",
    "bleu": "1 - BLEU/100 vs full model",
    "token_f1": "1 - token F1 vs full model",
    "risk_rouge_l": "excess 1 - ROUGE-L vs reference",
    "risk_bleu": "excess 1 - BLEU/100 vs reference",
    "risk_token_f1": "excess 1 - token F1 vs reference",
    "label": "label disagreement",
    "risk_label": "new mistakes vs full model",
}


def _risk_label(cert: Certificate) -> str:
    """The risk axis' label: what the loss measures (``"risk"`` for losses given by hand)."""
    if cert.consistency is None:
        return "risk"
    return f"risk: {_LOSS_LABELS.get(cert.consistency, cert.consistency)}"


def _title(cert: Certificate, what: str, sep: str = ", ", held_out: str | None = None) -> str:
    """A figure title: what and the mode (each curve's, where a ``held_out`` curve's differs), then (after
    ``sep``) the guarantee's level, decay, and "full model only" when so."""
    guarantee = "conformal risk control" if cert.method == "crc" else f"epsilon = {level(cert.epsilon)}"
    decay = "" if cert.decay is None else f", decaying threshold (tau = {cert.decay['tau']:g})"
    full = "; certified: full model only" if cert.lambda_hat is None else ""
    modes = f"{cert.mode} mode" if held_out in (None, cert.mode) else f"{cert.mode} calibration, {held_out} held-out"
    return f"{what} ({modes}){sep}{guarantee}{decay}{full}"


def audit(
    cert: Certificate,
    test_cache: LayerCache,
    *,
    decode: Callable[[Sequence[int]], str] | None = None,
    progress: bool = False,
) -> AuditReport:
    """Check a certificate on held-out data.

    Parameters
    ----------
    cert : Certificate
        From :func:`calibrate.fit`.
    test_cache : LayerCache
        Held-out sequences, disjoint from the calibration (and classifier-training) sequences.
    decode : callable, optional
        Token ids -> text for textual losses, as used for fitting.
    progress : bool, default=False
        Show a progress bar.

    Returns
    -------
    AuditReport

    Notes
    -----
    One audit is one draw: the *true* risk exceeds ``delta`` in at most a fraction ``epsilon`` of calibration
    draws. The held-out risk estimates it from the test sequences: for a certificate whose true risk sits just
    below ``delta`` (a tight one), it lands above ``delta`` in up to about half the draws without any
    violation. A CRC certificate (``method="crc"``) bounds only the expected risk, so its true risk exceeds
    ``delta`` in up to about half of them too. :func:`validity` repeats it.

    Examples
    --------
    >>> import calibrate
    >>> cache = calibrate.synthetic_cache(300, seed=0)
    >>> cal, test = cache.split([0.5, 0.5], seed=0)          # disjoint sequences
    >>> cert = calibrate.fit(cal, delta=0.1, epsilon=0.05, progress=False)
    >>> print(calibrate.audit(cert, test).summary())
    Audit on 150 held-out sequences (teacher-forced proxy losses) at lambda_hat = 0.99:
      held-out risk 0.0334 (within delta = 0.1)
      average layers 9.23 of 12 (saves 23.0%)
    """
    if not isinstance(cert, Certificate):
        raise TypeError(f"cert must be a calibrate.Certificate, got {type(cert).__name__}")
    table = _certificate_losses(cert, test_cache, decode=decode, progress=progress)
    return _held_out_report(cert, table.n, table.risks, table.avg_layers, test_cache.n_layers, mode="proxy")


def _calibration_data_digest(data) -> str | None:
    """The ``cache_checksum`` of calibration data that is no cache: prompts (a sequence of str) or inputs (a
    tensor of any dtype, or an array, by its values and row shape), both in any order, so that an audit can refuse
    the calibration data as held-out; None for anything else (the callers' own checks name what is wrong with it)."""
    from calibrate._cache_files import _digest, _hash_strings

    if hasattr(data, "detach") or isinstance(data, np.ndarray):  # one digest per row, sorted: the rows in any order
        if hasattr(data, "detach"):  # a torch tensor: its bytes (numpy has no bfloat16)
            import torch

            tensor = data.detach().cpu().contiguous()
            dtype, shape = str(tensor.dtype), tuple(tensor.shape)
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
        else:
            array = np.ascontiguousarray(data)
            dtype, shape, raw = array.dtype.str, array.shape, array.reshape(-1).view(np.uint8)
        rows = raw.reshape(shape[0], -1) if shape and shape[0] else raw.reshape(1, -1)
        return "inputs-" + _hash_strings([f"{dtype} {shape[1:]}", *sorted(_digest(r.tobytes()) for r in rows)])
    if isinstance(data, Sequence) and not isinstance(data, str) and all(isinstance(p, str) for p in data):
        return "prompts-" + _hash_strings(sorted(data))  # any sequence (a UserList was taken as held-out)
    return None


def _held_out_iv(certificate: Certificate, data, what: str) -> None:
    """Refuse the certificate's own calibration prompts or inputs (``what``) as held-out data; warn where the
    certificate records none (an older calm-calibrate's, or certify on losses of one's own)."""
    recorded = getattr(certificate, "cache_checksum", None)
    if recorded is None and isinstance(certificate, Certificate):  # else refused by the caller's checks
        warnings.warn(
            f"the certificate records no digest of its calibration {what} (made by an older calm-calibrate, or "
            f"by calibrate.certify on losses of your own): the audit cannot tell whether these {what} are held "
            "out; refit it to record one",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    if recorded is not None and _calibration_data_digest(data) == recorded:
        raise ValueError(
            f"the {what} are the certificate's calibration {what} (the same digest): an audit on them reports an "
            f"in-sample risk as held-out; audit on held-out {what}"
        )


def _held_out_report(
    certificate: Certificate, n: int, risks, avg_layers=None, n_layers: int | None = None, mode: str = "decoded"
) -> AuditReport:
    """The :class:`AuditReport` of held-out ``risks`` (and average exit layers) at every grid value of a certificate.

    Its ``risk`` and ``layers`` are those at ``lambda_hat``; for a "full model only" certificate risk 0 and
    ``n_layers``. Without ``avg_layers`` (knobs other than exit thresholds) the layer fields are NaN.
    """
    risks = np.asarray(risks, dtype=np.float64)
    if avg_layers is None:
        avg_layers, n_layers = np.full(risks.size, np.nan), None
    index = certificate.index
    if index is None:
        risk, layers = 0.0, math.nan if n_layers is None else float(n_layers)
    else:
        risk, layers = float(risks[index]), float(avg_layers[index])
    return AuditReport(certificate, n, risks, avg_layers, risk, layers, mode)


@dataclass(frozen=True, eq=False)
class ValidityReport(Rebuilt):
    """Repeated random calibration/test splits of one cache.

    Attributes
    ----------
    delta, epsilon : float
        Tolerance and failure probability (alpha and delta in LTT/MAPIE).
    test_risks : ndarray, shape (trials,)
        Held-out risk at the certified threshold of each trial (0 when only the full model is certified).
    lambda_hats : ndarray, shape (trials,)
        Certified threshold per trial (``nan`` = full model).
    naive_test_risks : ndarray, shape (trials,)
        Held-out risk of the naive rule "fastest threshold whose calibration risk is <= delta".
    n_cal, n_test : int
        Calibration and test sequences per trial (a learned measure's training sequences are in neither).
    method : str, default="fixed_sequence"
        The method that certified each trial. With ``"crc"`` (conformal risk control) only the expected
        risk is bounded: :attr:`mean_test_risk` is the figure to hold against delta, and the violation
        rate is not bounded by epsilon (about one half when the bound is tight).

    Examples
    --------
    >>> import calibrate
    >>> report = calibrate.validity(calibrate.synthetic_cache(300, seed=0), trials=20, progress=False)
    >>> report.trials, report.n_cal, report.n_test
    (20, 240, 60)
    >>> report.violation_rate, report.naive_violation_rate   # certified vs. "fastest lambda with risk <= delta"
    (0.0, 0.4)
    """

    delta: float
    epsilon: float
    test_risks: np.ndarray
    lambda_hats: np.ndarray
    naive_test_risks: np.ndarray
    n_cal: int
    n_test: int
    method: str = "fixed_sequence"

    def __post_init__(self) -> None:
        read_only_arrays(self, "test_risks", "lambda_hats", "naive_test_risks")

    @property
    def expectation_guarantee(self) -> bool:
        """Whether the trials bound only the expected risk (``method="crc"``), not P(risk > delta)."""
        return self.method == "crc"

    @property
    def trials(self) -> int:
        """Number of random splits."""
        return self.test_risks.size

    @property
    def violation_rate(self) -> float:
        """Share of trials whose held-out risk exceeds delta.

        The guarantee bounds by epsilon the share of trials whose *true* risk exceeds delta. A held-out risk
        estimates it from ``n_test`` sequences, so where the certified risks sit just below delta their noise
        alone puts up to about half the trials above it: a rate above epsilon shows a violation only beyond
        that noise (more test sequences, a smaller ``cal_fraction``, make it smaller). Not bounded for
        ``method="crc"``, see :attr:`mean_test_risk`."""
        return float(np.mean(self.test_risks > self.delta))

    @property
    def mean_test_risk(self) -> float:
        """Mean held-out risk over the trials; what ``method="crc"`` bounds by delta (up to sampling noise)."""
        return float(np.mean(self.test_risks))

    @property
    def naive_violation_rate(self) -> float:
        """The same rate for the uncertified naive rule, for contrast."""
        return float(np.mean(self.naive_test_risks > self.delta))

    @property
    def full_model_rate(self) -> float:
        """Share of trials certifying nothing faster than the full model (a matter of power, not validity)."""
        return float(np.mean(np.isnan(self.lambda_hats)))

    def summary(self) -> str:
        """One line: the violation rate against epsilon (for CRC the mean held-out risk against delta), the
        naive rule's, and how often only the full model."""
        if self.expectation_guarantee:
            risk, delta = beside(self.mean_test_risk, self.delta, ".3f")
            verdict = (
                f"mean held-out risk {risk} (delta = {delta}; conformal risk control bounds the expected risk); "
                f"violation rate {level(self.violation_rate, '.3f')}, which CRC does not bound"
            )
        else:
            rate, epsilon = beside(self.violation_rate, self.epsilon, ".3f")
            verdict = f"violation rate {rate} (epsilon = {epsilon}"
            if self.violation_rate > self.epsilon:  # a rate of held-out estimates: see violation_rate
                verdict += f"; held-out risks of {self.n_test} sequences, whose noise alone can exceed it near delta"
            verdict += ")"
        full_only = int(np.isnan(self.lambda_hats).sum())  # a count: a share rounds 1 of 400 to 0%
        return (
            f"Validity over {_plural(self.trials, 'random split')}: {verdict}; naive rule "
            f"{level(self.naive_violation_rate, '.3f')}; full model only in {full_only} of {self.trials} trials"
        )

    def __repr__(self) -> str:
        if self.expectation_guarantee:
            risk, delta = beside(self.mean_test_risk, self.delta, ".3f")
            return (
                f"ValidityReport(trials={self.trials}, method='crc', mean_test_risk={risk}, delta={delta}, "
                f"naive_violation_rate={level(self.naive_violation_rate, '.3f')})"
            )
        rate, epsilon = beside(self.violation_rate, self.epsilon, ".3f")
        return (
            f"ValidityReport(trials={self.trials}, violation_rate={rate}, epsilon={epsilon}, "
            f"naive_violation_rate={level(self.naive_violation_rate, '.3f')})"
        )

    def plot(self, fig=None):
        """Histogram of held-out risk at the certified threshold and of the naive rule, with delta marked.

        Parameters
        ----------
        fig : matplotlib.figure.Figure, optional
            An empty figure to draw into; default: a new one.

        Returns
        -------
        matplotlib.figure.Figure
            ``fig``, or a new figure, which pyplot keeps open (shown by ``plt.show()`` and in notebooks) until
            ``plt.close(fig)``: close it when drawing many, in a loop or a server.
        """
        from matplotlib.ticker import MaxNLocator

        fig = _figure(fig, (6, 3.6))
        ax = fig.subplots()
        bins = np.linspace(0, max(self.naive_test_risks.max(), self.test_risks.max(), self.delta) * 1.1 + 1e-9, 30)
        above = int((self.test_risks > self.delta).sum()), int((self.naive_test_risks > self.delta).sum())
        ax.hist(self.test_risks, bins=bins, alpha=0.7, label=f"certified ({above[0]} > delta)")
        naive = f"naive: calibration risk <= delta ({above[1]} > delta)"
        ax.hist(self.naive_test_risks, bins=bins, alpha=0.5, label=naive)
        ax.axvline(self.delta, color="k", linestyle="--", label=f"delta = {level(self.delta)}")
        if self.expectation_guarantee:
            mean = beside(self.mean_test_risk, self.delta, ".3f")[0]
            ax.axvline(self.mean_test_risk, color="C0", label=f"certified mean = {mean}")
        guarantee = "CRC: E[risk] <= delta" if self.expectation_guarantee else f"epsilon = {level(self.epsilon)}"
        ax.set(
            xlabel="held-out risk at the chosen threshold (0: full model)",
            ylabel="trials",
            title=f"{_plural(self.trials, 'random split')}, {guarantee}",
        )
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        _tight(fig)
        return fig


#: The options of :func:`calibrate.fit` that :func:`validity` passes on (proxy mode, in memory).
_VALIDITY_OPTIONS = (
    "measure", "consistency", "bound", "method", "lambdas", "decay", "train_fraction", "train_cache",
    "measure_options", "decode",
)  # fmt: skip


def validity(
    cache: LayerCache,
    *,
    trials: int = 50,
    cal_fraction: float = 0.8,
    seed: int = 0,
    delta: float = 0.1,
    epsilon: float = 0.05,
    progress: bool = True,
    **fit_kwargs,
) -> ValidityReport:
    """Repeat random calibration/test splits and count how often the certified risk exceeds delta.

    Parameters
    ----------
    cache : LayerCache
        Data to split by sequence.
    trials : int, default=50
        Number of random splits.
    cal_fraction : float, default=0.8
        Share of sequences used for calibration in each split; the rest is the test set. With a learned
        measure, of the sequences left after its training split (``train_fraction`` of the cache, drawn once
        for all trials).
    seed : int, default=0
        Seed of the splits (trial ``i`` uses a generator derived from ``seed`` and ``i``).
    delta, epsilon : float
        Tolerance and failure probability (alpha and delta in LTT/MAPIE).
    progress : bool, default=True
        Show a progress bar over trials.
    **fit_kwargs
        Options of :func:`calibrate.fit` (measure, consistency, bound, method, lambdas, decay, decode, ...;
        ``decode=calibrate.tokenizer_decode(tokenizer)`` for the textual losses of an extracted cache).

    Returns
    -------
    ValidityReport

    Notes
    -----
    Proxy losses are per sequence, so the loss table is computed once and every trial only permutes its
    rows. A learned measure (the classifier or a halting head) is trained once on a seeded split that is
    kept out of every trial. The test risk is itself an estimate, so the violation rate is a noisy check,
    biased upwards: where the certified true risks sit just below delta, the held-out estimates land above it in
    up to about half the trials (see :attr:`ValidityReport.violation_rate`).
    With ``method="crc"`` the check is the mean held-out risk against delta (:attr:`ValidityReport.mean_test_risk`).

    Examples
    --------
    >>> import calibrate
    >>> cache = calibrate.synthetic_cache(300, seed=0)
    >>> calibrate.validity(cache, trials=20, delta=0.1, epsilon=0.05, progress=False)
    ValidityReport(trials=20, violation_rate=0.000, epsilon=0.05, naive_violation_rate=0.400)
    """
    from calibrate._progress import tqdm
    from calibrate.cache import _in_memory_iv
    from calibrate.fit import _proxy_iv, _proxy_table

    trials = int_at_least(trials, "trials")
    cal_fraction = open_interval(cal_fraction, "cal_fraction")
    seed = seed_iv(seed)
    _in_memory_iv(cache, "cache")
    unknown = sorted(set(fit_kwargs) - set(_VALIDITY_OPTIONS))
    if unknown:
        own = tuple(name for name in inspect.signature(validity).parameters if name not in ("cache", "fit_kwargs"))
        raise TypeError(
            f"validity() got unknown options {unknown}: its own are {own}, and it passes on to fit {_VALIDITY_OPTIONS}"
        )
    # fit's data step runs once (training the classifier, if any, on sequences kept out of every
    # trial); each trial then only permutes the rows of the loss table and certifies.
    bound, method = fit_kwargs.pop("bound", None), fit_kwargs.pop("method", "fixed_sequence")  # fit's defaults
    checked = {
        name: fit_kwargs[name]
        for name in ("measure", "consistency", "measure_options", "lambdas")
        if name in fit_kwargs
    }
    fit_kwargs["measure_options"], _ = _proxy_iv(cache, delta, epsilon, bound, method, **checked)  # as fit checks them
    table, *_ = _proxy_table(cache, seed=seed, **fit_kwargs)
    n_cal = int(round(cal_fraction * table.n))
    if not 0 < n_cal < table.n:
        raise ValueError(f"cal_fraction={cal_fraction} leaves an empty calibration or test set of {table.n} sequences")
    test_risks, lambda_hats, naive = np.zeros(trials), np.full(trials, np.nan), np.zeros(trials)
    caveats = []  # one warning for the study, not one per trial
    for i in tqdm(range(trials), desc="validity", unit="split", disable=not progress):
        perm = np.random.default_rng([seed, i]).permutation(table.n)
        cal, test = table.subset(perm[:n_cal]), table.subset(perm[n_cal:])
        cert, caveat = _certify(cal, None, delta, epsilon, bound, method, "exit_threshold")
        caveats += [caveat] if caveat else []
        if cert.index is not None:
            test_risks[i] = test.risks[cert.index]
            lambda_hats[i] = cert.lambda_hat
        ok = np.flatnonzero(cal.risks <= delta)
        naive[i] = test.risks[ok[-1]] if ok.size else 0.0
    if caveats:
        first = f"{len(caveats)} warnings over {trials} trials, the first: {caveats[0]}"
        warnings.warn(first, UserWarning, stacklevel=caller_stacklevel())
    name = _risk_control_iv(delta, epsilon, bound, method)[3]  # the name a certificate records
    return ValidityReport(float(delta), float(epsilon), test_risks, lambda_hats, naive, n_cal, table.n - n_cal, name)

"""The frozen result of a calibration: which threshold is certified, under which guarantee."""

from __future__ import annotations

import html
import json
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from calibrate._atomic import atomic_file
from calibrate._certificate_checks import _evidence_iv, _floats, _frozen, _knob_grid_iv
from calibrate._format import beside, level
from calibrate._frozen import construct
from calibrate._validation import (
    caller_stacklevel,
    exit_layers_iv,
    int_in,
    open_interval,
    parse_json,
    to_float,
)
from calibrate.crc import _NO_GUARANTEE
from measures.learned import plain_state as _plain

__all__ = ["Certificate", "MODES", "KNOBS"]

#: What the losses behind a certificate were computed from.
MODES = {
    "proxy": (
        "losses from the teacher-forced simulation along the full-model output (cache only): it certifies "
        "the simulated early outputs, not free-running generation"
    ),
    "decoded": (
        "losses from actually decoding the calibration prompts (or running the model on the calibration inputs) "
        "at each tested value of the knob"
    ),
    "user": "losses supplied by the caller for each threshold",
}
#: Speed knobs a certificate can certify; a runtime refuses a certificate for another knob.
KNOBS = ("exit_threshold", "token_keep", "fff_depth")
#: Per-threshold fields that may hold NaN (not tested, or no p-value for CRC), ``null`` in JSON.
_NAN_FIELDS = ("risks", "p_values", "avg_layers")


def _spend_iv(certificate, knob: str, model: str, source: str) -> None:
    """Refuse, with the reason, a certificate that is not a ``knob`` certificate of the model ``model`` (an id)."""
    if not isinstance(certificate, Certificate):
        raise TypeError(f"certificate must be a calibrate.Certificate, got {type(certificate).__name__}")
    if certificate.knob != knob:
        raise ValueError(
            f"this certificate certifies the knob {certificate.knob!r}; "
            f"this needs a {knob!r} certificate (from {source})"
        )
    if certificate.model is None:  # e.g. calibrate.certify on losses computed by hand
        package = source.rsplit(".", 1)[0]
        raise ValueError(
            f"this certificate names no model, so nothing ties it to this one; certify with {source}, or record the "
            f"model the losses came from: dataclasses.replace(certificate, model={package}.model_id(model))"
        )
    if certificate.model != model:
        made, here = (identity.rsplit("/", 1) for identity in (certificate.model, model))
        if made[0] != here[0] or len(made) != 2:
            why = ""
        elif made[1].split("+")[0] == here[1].split("+")[0] and "+" not in made[1]:
            why = " (the same weights, recorded by a calm-calibrate older than model ids with the generation config)"
        elif made[1].split("+")[0] == here[1].split("+")[0]:
            why = " (the same weights under another generation config: EOS ids or logits processors)"
        else:
            why = (
                " (the same architecture and sizes, computing otherwise: other weights (another checkpoint, a "
                "fine-tuned copy), the same weights in another dtype (load the model in the dtype it was certified "
                "in: --dtype on the command line), or another configuration such as rope_scaling)"
            )
        raise ValueError(
            f"this certificate was made for the model {certificate.model!r}, not {model!r}{why}; certify the model "
            "you run"
        )


def _budget(certificate, max_new_tokens: int | None) -> Any:
    """New tokens per prompt: ``max_new_tokens``, else the certificate's calibration budget, else 32.

    Decoding and audits emit what deployment does, so by default as many tokens as the certificate was
    calibrated with (its guarantee is for that budget). ``max_new_tokens`` passes through as given (its own
    check names a bad one), whatever ``certificate`` is.
    """
    if max_new_tokens is not None:
        return max_new_tokens
    return (certificate.max_new_tokens if isinstance(certificate, Certificate) else None) or 32


def _confidence(epsilon: float) -> str:
    """``1 - epsilon`` rounded down, or written so where floats round it to 1 (``epsilon=1e-20``: ">= 1" would
    claim certainty)."""
    return level(1 - epsilon, side="down") if 1 - epsilon < 1 else f"1 - {level(epsilon)}"


def _budget_warning(certificate, max_new_tokens: int, doing: str = "decoding") -> None:
    """Warn when decoding (or auditing: ``doing``) with another budget of new tokens than a certificate's
    calibration outputs had: longer outputs are uncertified, and so are shorter ones, except for the
    ``"sequence"`` loss (a mismatch in a cut output is one in the whole, so its risk can only fall)."""
    if certificate is None or certificate.lambda_hat is None:  # the full model: exact at any length
        return
    budget = certificate.max_new_tokens
    if budget is None or max_new_tokens == budget:
        return
    if max_new_tokens < budget and certificate.consistency == "sequence":  # its risk only falls on cut outputs
        return
    if max_new_tokens > budget:
        said = "says nothing about longer outputs"
    else:
        said = f"says nothing about outputs cut shorter (their {certificate.consistency} loss is another quantity)"
    warnings.warn(
        f"{doing} up to max_new_tokens={max_new_tokens} new tokens, but the certificate's calibration outputs had "
        f"at most {budget}: what it certifies {said} (certify with the budget you deploy)",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


def _names_a_file(source: Any) -> bool:
    try:
        return Path(source).is_file()
    except (OSError, ValueError):  # a name too long, a NUL character
        return False


def _version() -> str:
    from calibrate import __version__

    return __version__


@dataclass(frozen=True)
class Certificate:
    """A certified speed knob (by default an early-exit threshold) and the evidence behind it.

    ``lambda_hat`` is the fastest certified threshold, or ``None`` when only the full model is certified
    ("run the full model"). The guarantee, over draws of the calibration set, is

        P( risk(lambda_hat) <= delta ) >= 1 - epsilon

    for the FWER-controlling methods (``method="crc"`` gives ``E[risk(lambda_hat)] <= delta`` instead).
    ``delta`` is the tolerance on the loss and ``epsilon`` the failure probability (CALM's letters;
    Learn-Then-Test and MAPIE write alpha for the tolerance and delta for the failure probability).

    Attributes
    ----------
    lambda_hat : float or None
        Fastest certified value of the knob, ``None`` = full model only.
    delta, epsilon : float
        Tolerance in (0, 1) and failure probability in (0, 1).
    n : int
        Number of calibration examples.
    lambdas : tuple of float, shape (n_lambdas,)
        Tested grid, safest first.
    risks, p_values : tuple of float, shape (n_lambdas,)
        Empirical risk and p-value of each grid value (``nan`` p-values for CRC; ``nan`` risks and p-values
        for grid values never tested, see :attr:`tested`).
    certified : tuple of bool, shape (n_lambdas,)
        Hypotheses rejected by the FWER procedure (risk certified <= delta).
    bound, method, mode : str
        p-value bound, multiple-testing method and loss mode (one of :data:`MODES`).
    knob : str
        Which knob is certified, one of :data:`KNOBS`.
    measure, consistency : str or None
        Confidence measure and consistency loss (for exit thresholds).
    decay : mapping or None
        ``{"max_len": N, "tau": tau}`` when the decaying threshold was used.
    avg_layers : tuple of float or None
        Token-averaged exit layer per grid value on the calibration set (``nan`` where not tested).
    n_layers : int or None
        Number of layers of the model.
    max_new_tokens : int or None
        Generation budget of the calibration outputs (new tokens per output; from the cache's generation
        settings, or the decoding budget in decoded mode). The certificate covers outputs decoded with this
        budget (with the ``"sequence"`` loss, any budget up to it): the runtime, audit, LAT and FFF warn at
        another budget. None when unknown.
    reason : str
        Why the result is what it is (e.g. why nothing was certified).
    measure_state : mapping or None
        Parameters of a learned measure (the exit classifier), needed to reproduce it at run time; for
        a softmax measure computed as a bound from the cache's top-k log-probabilities (the entropy
        confidence without a stored ``entropy`` array), ``{"from_topk": k}``: audits need a test cache of
        that kind and the runtime refuses it; for a state saturation computed from the cache's float16 hidden
        states (not stored), ``{"from_hidden": "float16"}``: the runtime rounds its states so, and audits need a
        test cache of that kind. None otherwise.
    n_train : int
        Sequences used to train a learned measure (disjoint from the ``n`` calibration sequences).
    cache_checksum, model : str or None
        Identity of the calibration data and of the model. The data's is the calibration cache's checksum
        (proxy mode), or a digest of the calibration prompts or inputs (``"prompts-..."``, ``"inputs-..."``)
        for certificates whose losses were decoded (also ``fit(cache, mode="decoded")``, of the cache's
        prompts it decoded), in any order; the audits refuse data with the same identity as held-out, and warn
        where a certificate records none (an older calm-calibrate's).
    heads : mapping or None
        What each layer predicts with (``ExitHeads.describe()`` from the cache metadata: architecture,
        layer count, width, vocabulary size, adapters, the generation config's digest); the runtime refuses
        heads that differ, and warns of a certificate that records no generation config (an older one's).
    version : str
        Library version that produced the certificate.

    Notes
    -----
    Every field is checked on construction: a ValueError names the field (a TypeError, for a ``delta`` or
    ``epsilon`` that is not a number or a count that is not an int).
    ``decay``, ``measure_state`` and ``heads`` are held as read-only copies (mappings, nested lists as tuples) of
    JSON data, so a certificate's equality and hash never change; :meth:`to_dict` gives them back as plain dicts
    and lists.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate import Certificate, certify
    >>> rng = np.random.default_rng(0)
    >>> losses = (rng.random((2000, 7)) < np.linspace(0.0, 0.3, 7)).astype(float)
    >>> cert = certify(losses, lambdas=np.linspace(0.9, 0.3, 7), delta=0.1, epsilon=0.05)
    >>> cert.lambda_hat, cert.risk_hat
    (0.8, 0.0535)
    >>> cert.certified
    (True, True, False, False, False, False, False)
    >>> Certificate.from_json(cert.to_json()) == cert        # JSON round trip (to_json(path) writes a file)
    True
    >>> Certificate.from_dict(cert.to_dict()).lambda_hat
    0.8
    """

    lambda_hat: float | None
    delta: float
    epsilon: float
    n: int
    lambdas: tuple[float, ...]
    risks: tuple[float, ...]
    p_values: tuple[float, ...]
    certified: tuple[bool, ...]
    bound: str | None
    method: str
    mode: str
    knob: str = "exit_threshold"
    measure: str | None = None
    consistency: str | None = None
    decay: Mapping[str, Any] | None = None
    avg_layers: tuple[float, ...] | None = None
    n_layers: int | None = None
    max_new_tokens: int | None = None
    reason: str = ""
    measure_state: Mapping[str, Any] | None = field(default=None, repr=False)
    n_train: int = 0
    cache_checksum: str | None = None
    model: str | None = None
    heads: Mapping[str, Any] | None = field(default=None, repr=False)
    version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        self._fields_iv()
        k = len(self.lambdas)
        for name in ("risks", "p_values", "certified"):
            if len(getattr(self, name)) != k:
                raise ValueError(
                    f"Certificate.{name} must have {k} entries (one per lambda), got {len(getattr(self, name))}"
                )
        if self.avg_layers is not None and len(self.avg_layers) != k:
            raise ValueError(f"Certificate.avg_layers must have {k} entries, got {len(self.avg_layers)}")
        if self.mode not in MODES:
            raise ValueError(f"Certificate.mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.knob not in KNOBS:
            raise ValueError(f"Certificate.knob must be one of {KNOBS}, got {self.knob!r}")
        _knob_grid_iv(self.knob, self.lambdas, "Certificate.lambdas: ")
        if self.lambda_hat is not None and self.index is None:
            raise ValueError(f"Certificate.lambda_hat={self.lambda_hat} is not a grid value")

    def _fields_iv(self) -> None:
        """Check every field's type and range (naming it) and store normalised, read-only values."""
        from calibrate.bounds import P_VALUES
        from calibrate.exits import Decay

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("delta", "epsilon"):
            put(name, open_interval(getattr(self, name), f"Certificate.{name}"))
        for name in ("n", "n_train"):  # counts of examples: floats count them exactly up to 2**53
            put(name, int_in(getattr(self, name), f"Certificate.{name}", 0, 2**53))
        for name in ("n_layers", "max_new_tokens"):
            if getattr(self, name) is not None:
                put(name, int_in(getattr(self, name), f"Certificate.{name}", 1, 2**31))
        if self.lambda_hat is not None:
            if (
                isinstance(self.lambda_hat, (bool, np.bool_))
                or not isinstance(self.lambda_hat, numbers.Real)
                or not math.isfinite(to_float(self.lambda_hat))
            ):
                raise ValueError(f"Certificate.lambda_hat must be a finite number or None, got {self.lambda_hat!r:.80}")
            put("lambda_hat", float(self.lambda_hat))
        lambdas = _floats(self.lambdas, "lambdas", nan=False)
        if not lambdas or any(a <= b for a, b in zip(lambdas, lambdas[1:])):
            raise ValueError(
                f"Certificate.lambdas must be non-empty and strictly decreasing (safest first), got {lambdas!r:.120}"
            )
        put("lambdas", lambdas)
        for name in ("risks", "p_values"):
            values = _floats(getattr(self, name), name, nan=True)
            if any(not 0.0 <= v <= 1.0 for v in values if not np.isnan(v)):
                raise ValueError(f"Certificate.{name} must lie in [0, 1] (NaN: not tested), got {values!r:.120}")
            put(name, values)
        if self.avg_layers is not None:
            avg_layers = _floats(self.avg_layers, "avg_layers", nan=True)
            exit_layers_iv(np.array(avg_layers), self.n_layers, "Certificate.avg_layers")
            put("avg_layers", avg_layers)
        if not isinstance(self.certified, (list, tuple, np.ndarray)) or not all(
            isinstance(v, (bool, np.bool_)) for v in self.certified
        ):
            raise ValueError(f"Certificate.certified must hold booleans, got {self.certified!r:.120}")
        put("certified", tuple(bool(v) for v in self.certified))
        if self.bound is not None and (not isinstance(self.bound, str) or self.bound not in P_VALUES):
            raise ValueError(f"Certificate.bound must be one of {sorted(P_VALUES)} or None, got {self.bound!r}")
        for name in ("method", "mode", "knob", "reason", "version"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Certificate.{name} must be a str, got {getattr(self, name)!r}")
        for name in ("measure", "consistency", "cache_checksum", "model"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"Certificate.{name} must be a str or None, got {getattr(self, name)!r}")
        for name in ("decay", "measure_state", "heads"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"Certificate.{name} must be a mapping or None, got {value!r:.80}")
        if self.decay is not None:
            try:
                missing = sorted({"max_len", "tau"} - set(self.decay))  # what was certified is stated, no default
                if missing:
                    raise ValueError(f"missing {missing}")
                Decay(**self.decay)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"Certificate.decay must be {{'max_len': int, 'tau': float}}, got {dict(self.decay)!r}: {exc}"
                ) from None
        for name in ("decay", "measure_state", "heads"):
            value = getattr(self, name)  # a level below the certificate's object in its JSON
            put(name, None if value is None else _frozen(value, f"Certificate.{name}", depth=2))

    # ---- derived values -------------------------------------------------------------------------
    @property
    def index(self) -> int | None:
        """Position of ``lambda_hat`` in the grid, ``None`` for the full model."""
        if self.lambda_hat is None:
            return None
        hits = np.flatnonzero(np.asarray(self.lambdas) == self.lambda_hat)
        return int(hits[0]) if hits.size else None

    @property
    def tested(self) -> tuple[bool, ...]:
        """Whether each grid value was evaluated (its risk is a number), shape ``(n_lambdas,)``.

        All True except in decoded mode, which decodes thresholds lazily in fixed-sequence order and never
        decodes those after the first failing one.
        """
        return tuple(not np.isnan(r) for r in self.risks)

    @property
    def full_model_only(self) -> bool:
        """True when nothing faster than the full model is certified."""
        return self.lambda_hat is None

    @property
    def risk_hat(self) -> float | None:
        """Empirical calibration risk at ``lambda_hat`` (``None`` for the full model, whose loss is 0)."""
        return None if self.index is None else self.risks[self.index]

    @property
    def p_value(self) -> float | None:
        """p-value of the null ``risk(lambda_hat) > delta``."""
        return None if self.index is None else self.p_values[self.index]

    @property
    def expected_layers(self) -> float | None:
        """Token-averaged exit layer at ``lambda_hat`` on the calibration set (``n_layers`` for the full model)."""
        if self.index is None:
            return None if self.n_layers is None else float(self.n_layers)
        return None if self.avg_layers is None else self.avg_layers[self.index]

    @property
    def layer_savings(self) -> float | None:
        """Fraction of layers skipped at ``lambda_hat``, in ``[0, 1)``: ``1 - expected_layers / n_layers``."""
        if self.n_layers is None or self.expected_layers is None:
            return None
        return 1.0 - self.expected_layers / self.n_layers

    @property
    def guarantee(self) -> str:
        """The guarantee in words, with its assumptions."""
        if self.method == "crc" and _NO_GUARANTEE in self.reason:
            core = "none: conformal risk control needs monotone losses and these are not (see the note)"
        elif self.method == "crc":
            core = (
                f"E[risk(lambda_hat)] <= {level(self.delta)} "
                "(conformal risk control: in expectation only, monotone losses)"
            )
        else:
            core = (
                f"P(risk(lambda_hat) <= {level(self.delta)}) >= {_confidence(self.epsilon)} over "
                f"calibration draws ({self.method}, {self.bound} p-values)"
            )
        return f"{core}; assumes test data exchangeable with the {self.n} calibration examples; {MODES[self.mode]}"

    # ---- tables and text ------------------------------------------------------------------------
    def _runs_whole(self) -> bool:
        """Whether the certified value of a ``token_keep`` or ``fff_depth`` knob is the unchanged model: a keep
        ratio of 1, or the depth of the deepest tree (read from the id :func:`calibrate.fff.model_id` records).
        The first grid value need not be either (``lat.fit(speedups=[2.0])``, ``fff.fit(depths=[4, 3])``)."""
        if self.knob == "token_keep":
            return self.lambda_hat == 1.0
        pattern = r"fff/\d+x/D(\d{1,4}(?:-\d{1,4})*)/.*"  # a depth of 5,000 digits is no id of fff's: unknown
        match = re.fullmatch(pattern, self.model or "") if self.knob == "fff_depth" else None
        return match is not None and self.lambda_hat == max(map(int, match[1].split("-")))

    def to_frame(self):
        """The grid as a :class:`pandas.DataFrame`, a row per value safest first: lambda, tested, risk,
        p_value, certified, avg_layers (when known) and selected (the row of ``lambda_hat``)."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "lambda": self.lambdas,
                "tested": self.tested,
                "risk": self.risks,
                "p_value": self.p_values,
                "certified": self.certified,
            }
        )
        if self.avg_layers is not None:
            frame["avg_layers"] = self.avg_layers
        frame["selected"] = False
        if self.index is not None:
            frame.loc[self.index, "selected"] = True
        return frame

    def summary(self) -> str:
        """A few lines a person can read: what is certified, at what cost, under which guarantee."""
        head = f"Certificate ({self.knob}, mode={self.mode}, n={self.n})"
        if self.measure:
            head += f": measure={self.measure}, consistency={self.consistency}"
        if self.method == "crc":
            lines = [
                head,
                f"  delta (tolerance) = {level(self.delta)} on the expected risk (conformal risk control: no epsilon)",
            ]
        else:
            lines = [
                head,
                f"  delta (tolerance) = {level(self.delta)}, epsilon (failure probability) = {level(self.epsilon)}",
            ]
        if self.lambda_hat is None:
            full = {"token_keep": "keep every token", "fff_depth": "evaluate the whole tree"}.get(
                self.knob, "run every layer"
            )
            lines.append(f"  certified: full model only ({full})")
        else:
            chosen = (
                "the fastest conformal risk control keeps"
                if self.method == "crc"
                else f"{sum(self.certified)} of {len(self.lambdas)} thresholds certified"
            )
            lines.append(
                f"  certified lambda_hat = {self.lambda_hat:.6g} (risk {beside(self.risk_hat, self.delta)[0]}"
                + ("" if np.isnan(self.p_value) else f", p = {level(self.p_value, '.3g')}")
                + f"), {chosen}"
            )
        if self.decay is not None:
            line = (
                f"  decaying threshold lambda_t = clip(0.9 lambda + 0.1 exp(-{self.decay['tau']:g} t / "
                f"{self.decay['max_len']}), 0, 1) at output position t = 0, 1, ..."
            )
            if self.lambda_hat is not None:
                from calibrate.exits import Decay

                first, last = Decay(**self.decay).thresholds(self.lambda_hat, [0, 2**62])
                line += (
                    f"; at lambda_hat every threshold is {first:.4g}" if first == last
                    else f"; at lambda_hat from {first:.4g} at the first token towards {last:.4g} (its limit)"
                )  # fmt: skip
            lines.append(line)
        same = " (the full model's: no speed-up)" if self._runs_whole() else ""
        if self.knob == "fff_depth" and self.lambda_hat is not None:
            k = self.lambda_hat
            shallower = f"; trees shallower than {k:g} run whole" if k > 0 else ""
            lines.append(
                f"  certified evaluation depth {k:g}{same}: {k + 1:g} neuron{'s' if k > 0 else ''} per path of each "
                f"tree (a tree of depth D evaluates D + 1 when whole{shallower})"
            )
        if self.knob == "token_keep" and self.lambda_hat is not None:
            lines.append(
                f"  certified target speed-up {1 / self.lambda_hat:.4g}x of the prefill{same} (the cost model's "
                "prediction, capped per prompt at what its length allows; lambda = 1 / speed-up)"
            )
        if self.expected_layers is not None and self.n_layers:
            lines.append(
                f"  expected layers {self.expected_layers:.2f} of {self.n_layers} "
                f"(saves {100 * self.layer_savings:.1f}% of layers)"
            )
        elif self.expected_layers is not None:
            lines.append(f"  expected layers {self.expected_layers:.2f}")
        if self.max_new_tokens is not None:
            deploy = "<= that" if self.consistency == "sequence" else "= that: shorter outputs are not certified"
            lines.append(f"  outputs of at most {self.max_new_tokens} new tokens (deploy with max_new_tokens {deploy})")
        n_tested = sum(self.tested)
        if n_tested < len(self.lambdas):
            lines.append(
                f"  tested {n_tested} of {len(self.lambdas)} thresholds in fixed-sequence order; the rest were not "
                "evaluated (NaN risk and p-value)"
            )
        if self.reason:
            lines.append(f"  note: {self.reason}")
        lines.append(f"  guarantee: {self.guarantee}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        lam = "None (full model)" if self.lambda_hat is None else f"{self.lambda_hat:.6g}"
        of = "" if self.n_layers is None else f"/{self.n_layers}"
        extra = "" if self.expected_layers is None else f", expected_layers={self.expected_layers:.2f}{of}"
        epsilon = "" if self.method == "crc" else f", epsilon={level(self.epsilon)}"  # CRC's guarantee has none
        return (
            f"Certificate(lambda_hat={lam}, delta={level(self.delta)}{epsilon}, n={self.n}, "
            f"measure={self.measure!r}, mode={self.mode!r}, bound={self.bound!r}, method={self.method!r}{extra})"
        )

    def _repr_html_(self) -> str:
        body = html.escape(self.summary()).replace("\n", "<br>")
        return f"<div><pre style='white-space:pre-wrap'>{body}</pre></div>"

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` inverts it exactly."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # tuples as lists, mappings as dicts

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Certificate":
        """Build a certificate from :meth:`to_dict` output.

        Unknown or missing fields, and fields of the wrong type or range, raise ``ValueError`` naming them;
        so do a ``lambda_hat`` that is not certified and numbers that claim more than they support (flags
        that the stored p-values, or p-values that the stored risks, ``n`` and ``delta``, do not give: an
        edited file). The flags of a custom :class:`~calibrate.fwer.FWERProcedure` (a ``method`` other than the
        built-in ones) are held to ``p <= epsilon`` only: its rule is code, which the file does not carry.
        ``null`` entries of the per-threshold numbers are NaN.
        ``max_new_tokens``, which certificates of earlier versions lack, may be missing (then None).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping (Certificate.to_dict()), got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(data) - names, names - set(data) - {"max_new_tokens"}
        if unknown or missing:
            written = data.get("version")
            other = (
                f" (written by calm-calibrate {written}; this is {_version()})"
                if isinstance(written, str) and written != _version()
                else ""
            )
            raise ValueError(f"certificate fields: unknown {sorted(unknown)}, missing {sorted(missing)}{other}")
        kwargs = dict(data)
        for name in _NAN_FIELDS:
            if isinstance(kwargs[name], (list, tuple)):
                kwargs[name] = tuple(np.nan if v is None else v for v in kwargs[name])
        try:
            cert = cls(**kwargs)
        except TypeError as exc:  # a field of the wrong type: stored data, so a ValueError as for the rest
            raise ValueError(str(exc)) from None
        # In memory a certificate may name any grid value (decoding probes each one); a stored one is spent
        # as it says, so it must name a certified one.
        if cert.index is not None and not cert.certified[cert.index]:
            raise ValueError(f"lambda_hat={cert.lambda_hat} is a grid value that the certificate does not certify")
        _evidence_iv(cert)
        return cert

    def _json_data(self) -> dict[str, Any]:
        """:meth:`to_dict` with ``NaN`` entries (thresholds never tested) as ``None``."""
        data = self.to_dict()
        for name in _NAN_FIELDS:
            if data[name] is not None:
                data[name] = [None if np.isnan(v) else v for v in data[name]]
        return data

    def _canonical(self) -> str:
        """The JSON form with sorted keys: what equality and the hash compare."""
        return json.dumps(self._json_data(), sort_keys=True)

    def __eq__(self, other: object) -> bool:
        """Field by field, an untested entry (``NaN``) equal to another: a JSON round trip compares equal."""
        if not isinstance(other, Certificate):
            return NotImplemented
        return self._canonical() == other._canonical()

    def __hash__(self) -> int:
        return hash(self._canonical())

    def __reduce__(self):
        """Pickle and copy through :meth:`to_dict` and the constructor (:meth:`from_dict` would refuse a certificate
        set to decode at an untested threshold)."""
        return (construct, (type(self), self.to_dict()))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to JSON (``NaN`` entries as ``null``); write atomically when ``path`` is given."""
        text = json.dumps(self._json_data(), indent=2, allow_nan=False)
        if path is not None:
            with atomic_file(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "Certificate":
        """Read a certificate from a JSON string or a path to a JSON file."""
        if isinstance(source, Mapping):
            raise TypeError("from_json reads a JSON string or file; build a certificate from a dict with from_dict")
        text = source.lstrip("\ufeff \t\r\n") if isinstance(source, str) else ""  # a BOM, blank lines
        if isinstance(source, str) and not text:
            raise ValueError("certificate is empty (expected a JSON string or a path to a JSON file)")
        data, parsed = None, False
        if isinstance(source, str) and not _names_a_file(source):  # a file may be named like "{run}.json"
            try:
                data, parsed = parse_json(text, "certificate"), True
            except ValueError:
                if text.startswith(("{", "[")):
                    raise
        if not parsed:
            path = Path(source)
            try:
                is_dir, found = path.is_dir(), path.is_file()
            except (OSError, ValueError):  # a name too long, a NUL character
                is_dir = found = False
            if is_dir:
                raise ValueError(f"certificate must be a JSON file, got the directory {path}")
            if not found:
                raise ValueError(f"certificate file not found: {str(path)!r:.200}")
            raw = path.read_bytes()
            try:  # UTF-8, with or without a byte-order mark, or UTF-16/32 as some editors and shells write
                decoded = raw.decode(json.detect_encoding(raw))
            except UnicodeDecodeError as exc:
                raise ValueError(f"certificate file {path} is not UTF-8 (or UTF-16/32) JSON text: {exc}") from None
            data = parse_json(decoded, f"certificate file {path}")  # a truncated file: named
        if not isinstance(data, dict):
            raise ValueError(f"certificate JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

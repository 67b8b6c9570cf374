"""Certify the evaluation depth of fast feedforward layers (knob ``fff_depth``).

A model holding :class:`~calibrate.fff.FFF` layers is run on calibration inputs at every evaluation
depth from the full tree (safest) down to 0 (one neuron per layer, fastest); each depth's per-example
losses against the full-depth model form a :class:`~calibrate.losses.LossTable` whose ``lambdas`` are the
depths (strictly decreasing), and :func:`calibrate.certify` picks the smallest depth whose risk is within
``delta`` with probability ``1 - epsilon``. :func:`apply` then runs the model at the certified depth.

For classifiers (``model(x)`` returns logits ``(n, n_classes)``) the losses are ``"label"`` (the label
differs from the full-depth model's) or ``"risk_label"`` (the full-depth model is right about the
reference label and the shallower one is wrong). For language models (pass ``tokenizer=`` and prompts
as the inputs) the prompts are decoded greedily, depth by depth from the full tree down, and the losses are
a consistency of :data:`calibrate.losses.CONSISTENCIES` (default ``"token"``) against the full-depth outputs
(decoded mode, as :func:`calibrate.fit_decoded`: :func:`fit` stops at the first depth that fails, deeper
ones stay untested; :func:`depth_losses` decodes every depth); a model whose MLP blocks are FFFs comes from
:func:`calibrate.fff.distill`.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from calibrate._certify import _risk_control_iv, certify
from calibrate._digest import decoding_digest, tokenizer_eos_warning
from calibrate._validation import caller_stacklevel, int_at_least, int_in, label_count_iv
from calibrate.audit import AuditReport, _calibration_data_digest, _held_out_iv, _held_out_report
from calibrate.certificate import Certificate, _budget, _budget_warning, _spend_iv
from calibrate.fff.layer import _DEPTHS, FFF
from calibrate.losses import LossTable
from calibrate.models import _eval_mode

__all__ = ["CONSISTENCIES", "apply", "at_depth", "audit", "depth_losses", "fff_layers", "fit", "model_id"]

#: Losses of a classifier at a depth against the full-depth model.
CONSISTENCIES = ("label", "risk_label")


def fff_layers(model: nn.Module) -> list[FFF]:
    """The :class:`FFF` layers of ``model`` (itself included), in module order; ValueError when there are none.

    Parameters
    ----------
    model : torch.nn.Module
        A module holding :class:`FFF` layers, or an :class:`FFF` itself.

    Returns
    -------
    list of FFF
        Every :class:`FFF` among ``model.modules()``, in that order.

    Raises
    ------
    ValueError
        When ``model`` is not a torch module or holds no :class:`FFF` layer.
    """
    layers = [m for m in model.modules() if isinstance(m, FFF)] if isinstance(model, nn.Module) else []
    if not layers:
        raise ValueError(f"model must be a torch module holding calibrate.fff.FFF layers, got {type(model).__name__}")
    return layers


def _max_depth(model: nn.Module) -> int:
    """The depth of ``model``'s deepest FFF layer: at that evaluation depth every layer runs its whole tree."""
    return max(layer.depth for layer in fff_layers(model))


def _set_depth(layers: list[FFF], depth: int | None) -> None:
    """Evaluation depth ``depth`` for every layer, capped at each layer's own depth (None: the whole tree)."""
    for layer in layers:
        layer.eval_depth = None if depth is None else min(int(depth), layer.depth)


def model_id(model: nn.Module, *, fresh: bool = False) -> str:
    """Identity of a model with FFF layers: their count and depths, and a digest of what the model computes
    at full depth (weights, buffers, each submodule's settings such as an FFF's activation) and, for a language
    model, of the generation config that shapes its greedy decoding. The evaluation depth, the knob an
    ``fff_depth`` certificate sets, is left out (other identities, such as the early-exit runtime's, include it).
    Certificates record it with ``fresh=True`` (every tensor hashed again).

    Parameters
    ----------
    model : torch.nn.Module
        A module holding :class:`FFF` layers (see :func:`fff_layers`).
    fresh : bool, default=False
        Hash every tensor again instead of reusing the digest remembered since the last change seen.

    Returns
    -------
    str
        ``"fff/<n_layers>x/D<depths>/<digest>"``, the distinct tree depths joined by ``-``.

    Raises
    ------
    ValueError
        When ``model`` holds no :class:`FFF` layer.
    """
    depths = sorted({layer.depth for layer in fff_layers(model)})
    with at_depth(model, None):
        return f"fff/{len(fff_layers(model))}x/D{'-'.join(map(str, depths))}/{decoding_digest(model, fresh=fresh)}"


@contextmanager
def at_depth(model: nn.Module, depth: int | None) -> Iterator[nn.Module]:
    """Run every FFF layer of ``model`` at evaluation depth ``depth`` (None: full) inside the block.

    Only the calling thread (or asyncio task, and tasks it creates) sees the depth: another thread running the
    same model meanwhile keeps each layer's ``eval_depth`` (set by :func:`apply`), and so does work the block
    hands to other threads (``loop.run_in_executor``, a streamer's generation thread, ``nn.DataParallel``;
    ``asyncio.to_thread`` and ``contextvars.copy_context().run`` carry the depth): run that work in an
    ``at_depth`` block of its own thread, or :func:`apply` the depth. A layer shallower than ``depth`` runs
    its whole tree, so in a model whose trees differ in depth, ``D`` (the deepest layer's depth) is the full
    model.

    Parameters
    ----------
    model : torch.nn.Module
        A module holding :class:`FFF` layers (see :func:`fff_layers`); not modified.
    depth : int or None
        Evaluation depth in ``0..D``: each layer evaluates ``min(depth, layer.depth) + 1`` neurons along its
        path. None: every layer's whole tree.

    Yields
    ------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        When ``depth`` is neither None nor an int.
    ValueError
        When ``depth`` lies outside ``0..D``, or ``model`` holds no :class:`FFF` layer.
    """
    layers = fff_layers(model)
    if depth is not None:
        depth = int_in(depth, "depth", 0, _max_depth(model), " (None: full)")
    here = {layer: None if depth is None else min(depth, layer.depth) for layer in layers}
    token = _DEPTHS.set({**_DEPTHS.get(), **here})
    try:
        yield model
    finally:
        try:
            _DEPTHS.reset(token)
        except ValueError:  # a generator holding the block, finished in another thread (another context)
            warnings.warn(
                "an fff.at_depth block ended in another thread than the one that entered it, which keeps running "
                f"the model at depth {depth}; keep a block within one thread",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )


def apply(model: nn.Module, certificate: Certificate) -> nn.Module:
    """Set every FFF layer of ``model`` to the certificate's depth (in place; returns ``model``).

    Parameters
    ----------
    model : torch.nn.Module
        The model the certificate was fitted on (same :func:`model_id`); each layer's ``eval_depth`` is set
        to the certified depth, capped at its own depth.
    certificate : Certificate
        An ``fff_depth`` certificate of :func:`calibrate.fff.fit`. Without a certified depth
        (``lambda_hat`` None) every layer runs its whole tree.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        For a certificate of another knob or another model (the message says which).
    """
    _set_depth(fff_layers(model), _certified_depth(model, certificate))
    return model


def _certified_depth(model: nn.Module, certificate: Certificate) -> int | None:
    _spend_iv(certificate, "fff_depth", model_id(model), "calibrate.fff.fit")
    lam = certificate.lambda_hat
    return None if lam is None else int(round(lam))


def _depths_iv(depths, top: int) -> np.ndarray:
    values = np.arange(top, -1, -1) if depths is None else np.asarray(depths)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"depths must be a non-empty sequence of ints, got {depths!r}")
    values = values.astype(np.int64)  # np.diff of unsigned ints wraps around
    if values[0] > top or values.min() < 0 or np.any(np.diff(values) >= 0):
        raise ValueError(
            f"depths must decrease strictly from at most {top} (the full tree) to >= 0, got {values.tolist()}"
        )
    return values


@torch.no_grad()
def _labels(model: nn.Module, inputs: torch.Tensor, depth: int | None, batch_size: int) -> np.ndarray:
    with _eval_mode(model), at_depth(model, depth):  # no dropout, whatever mode the model was left in
        batches = (inputs[s : s + batch_size] for s in range(0, len(inputs), batch_size))
        out = [_logits_iv(model(batch)).argmax(dim=-1).cpu() for batch in batches]
    return torch.cat(out).numpy()


def _logits_iv(logits: torch.Tensor) -> torch.Tensor:
    """A classifier's ``(n, n_classes)`` outputs, ``n_classes >= 2`` (labels are their argmax)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"the model must return a tensor of (n, n_classes) logits, got {type(logits).__name__}; for a language "
            "model pass tokenizer= and the prompts as texts"
        )
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"the model must return (n, n_classes) logits with n_classes >= 2 (a label is their argmax), got shape "
            f"{tuple(logits.shape)}; for a one-logit binary classifier return torch.cat([-z, z], dim=-1)"
        )
    return logits


def depth_losses(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[str],
    *,
    depths: Sequence[int] | None = None,
    consistency: str | None = None,
    references: Sequence[int] | Sequence[str] | None = None,
    batch_size: int | None = None,
    tokenizer=None,
    max_new_tokens: int = 32,
) -> LossTable:
    """Per-example losses of ``model`` at each evaluation depth against its full depth.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier holding FFF layers: ``model(x)`` gives logits ``(n, n_classes)``; or, with
        ``tokenizer``, a Hugging Face language model holding FFF layers. Run in eval mode (no dropout;
        its own mode is restored afterwards).
    inputs : torch.Tensor or sequence of str
        ``(n, ...)`` calibration inputs, one example each; prompts for a language model.
    depths : sequence of int, optional
        Depths to test, strictly decreasing from at most the full tree (default: every depth, full to 0).
    consistency : str, optional
        Classifiers: ``"label"`` (default; disagreement with the full-depth label) or ``"risk_label"``
        (against int ``references``). Language models: one of :data:`calibrate.losses.CONSISTENCIES`
        (default ``"token"``; ``risk_*`` against reference texts).
    references : sequence of int or str, optional
        Reference labels, or reference texts for a language model's ``risk_*`` losses.
    batch_size : int, optional
        Inputs per forward call (default 1024), or prompts per ``generate`` call (default 8).
    tokenizer : transformers.PreTrainedTokenizerBase, optional
        The language model's tokenizer: ``inputs`` are then prompts, decoded greedily at every depth.
    max_new_tokens : int, default=32
        Most tokens generated per prompt (language models).

    Returns
    -------
    LossTable
        ``(n, len(depths))`` losses, ``lambdas`` = the depths, mode ``"decoded"`` (the model really ran).
    """
    if tokenizer is not None:
        decoder, depths = _lm_decoder(
            model, tokenizer, inputs, references, consistency, depths, max_new_tokens, batch_size
        )
        template = _lm_template(model, decoder, depths, 0.1, 0.05, "hoeffding_bentkus")  # carries the depth only
        columns = [decoder.losses(dataclasses.replace(template, lambda_hat=float(k)))[0] for k in depths]
        return LossTable(np.column_stack(columns), depths.astype(np.float64), "decoded", decoder.consistency)
    if callable(getattr(model, "can_generate", None)) and model.can_generate():
        raise ValueError(
            f"the model ({type(model).__name__}) is a language model: pass tokenizer= and the prompts as texts "
            "(without a tokenizer, inputs are a classifier's examples)"
        )
    consistency = "label" if consistency is None else consistency
    batch_size = 1024 if batch_size is None else batch_size
    if consistency not in CONSISTENCIES:
        raise ValueError(f"consistency must be one of {CONSISTENCIES}, got {consistency!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1 or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty torch.Tensor of examples (n, ...)")
    batch_size = int_at_least(batch_size, "batch_size")
    depths = _depths_iv(depths, _max_depth(model))
    refs = None
    if consistency == "risk_label":
        label_count_iv(references, len(inputs), "input")
        refs = np.asarray(references)
        with torch.no_grad(), _eval_mode(model):  # as the labels: no dropout, no BatchNorm statistics updated
            n_classes = int(_logits_iv(model(inputs[:1])).shape[-1])  # the labels are argmaxes over the outputs
        if refs.ndim != 1 or not np.issubdtype(refs.dtype, np.integer) or refs.min() < 0 or refs.max() >= n_classes:
            raise ValueError(
                f"references must be a 1-d sequence of int labels in [0, {n_classes}) (the model's outputs), got "
                f"shape {refs.shape}, dtype {refs.dtype}"
                + (f", range [{refs.min()}, {refs.max()}]" if refs.ndim == 1 and refs.dtype.kind in "iu" else "")
            )
    full = _labels(model, inputs, None, batch_size)
    columns = []
    for k in depths:
        labels = _labels(model, inputs, int(k), batch_size)
        wrong = labels != full if refs is None else (labels != refs) & (full == refs)
        columns.append(wrong.astype(np.float64))
    return LossTable(np.column_stack(columns), depths.astype(np.float64), "decoded", consistency)


def fit(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[str],
    delta: float = 0.1,
    epsilon: float = 0.05,
    *,
    depths: Sequence[int] | None = None,
    consistency: str | None = None,
    references: Sequence[int] | Sequence[str] | None = None,
    bound: str | None = None,
    method: str = "fixed_sequence",
    batch_size: int | None = None,
    tokenizer=None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> Certificate:
    """Certify the smallest FFF evaluation depth whose risk stays within ``delta`` (knob ``fff_depth``).

    Parameters
    ----------
    model, inputs, depths, consistency, references, batch_size, tokenizer, max_new_tokens
        As in :func:`depth_losses`.
    delta : float, default=0.1
        Tolerance on the loss, in (0, 1) (alpha in LTT/MAPIE).
    epsilon : float, default=0.05
        Failure probability, in (0, 1) (delta in LTT/MAPIE).
    bound, method
        p-value (default ``"hoeffding_bentkus"``, none with ``method="crc"``) and family-wise procedure
        (see :func:`calibrate.certify`). Language models are tested by fixed-sequence testing only, decoding
        a depth only when the walk reaches it.
    progress : bool, default=True
        Show a progress bar over the depths (language models).

    Returns
    -------
    Certificate
        ``knob="fff_depth"``; ``lambda_hat`` is the certified depth (None: the full tree only);
        ``model`` is :func:`model_id`. :func:`apply` runs the model at that depth.

    Examples
    --------
    >>> import torch
    >>> from calibrate import fff
    >>> _ = torch.manual_seed(0)
    >>> model = fff.FFF(16, 4, depth=6).eval()
    >>> cert = fff.fit(model, torch.randn(2000, 16), delta=0.3, epsilon=0.05)
    >>> cert.knob, cert.lambdas[:3]
    ('fff_depth', (6.0, 5.0, 4.0))
    >>> depth = fff.apply(model, cert).eval_depth   # every FFF layer now runs at the certified depth
    """
    if tokenizer is not None:
        from calibrate._decoded_checks import _risk_iv
        from calibrate._decoded_walk import _certify_lazily

        delta, epsilon, bound = _risk_iv(delta, epsilon, bound, consistency or "token", method)
        decoder, depths = _lm_decoder(
            model, tokenizer, inputs, references, consistency, depths, max_new_tokens, batch_size
        )
        tokenizer_eos_warning(model, tokenizer)
        template = _lm_template(model, decoder, depths, delta, epsilon, bound)
        template = dataclasses.replace(template, cache_checksum=_calibration_data_digest(list(inputs)))
        return _certify_lazily(decoder, template, progress)
    consistency = "label" if consistency is None else consistency
    _risk_control_iv(delta, epsilon, bound, method)  # before the model runs
    table = depth_losses(
        model, inputs, depths=depths, consistency=consistency, references=references, batch_size=batch_size
    )
    cert = certify(table, delta=delta, epsilon=epsilon, bound=bound, method=method, knob="fff_depth")
    return dataclasses.replace(
        cert,
        model=model_id(model, fresh=True),
        consistency=consistency,
        cache_checksum=_calibration_data_digest(inputs),
    )


def _lm_decoder(model, tokenizer, prompts, references, consistency, depths, max_new_tokens, batch_size):
    """The decoded-mode decoder of :mod:`calibrate.decoded`, generating with every FFF at a certificate's depth."""
    from calibrate._decoded_checks import _decoder_iv

    depths = _depths_iv(depths, _max_depth(model))
    consistency = "token" if consistency is None else consistency
    decoder, _, _ = _decoder_iv(
        model, tokenizer, prompts, references, consistency, depths.astype(np.float64), max_new_tokens,
        8 if batch_size is None else batch_size, None, None,
    )  # fmt: skip

    def run_batch(input_ids, attention_mask, certificate: Certificate) -> tuple[list[np.ndarray], None]:
        depth = None if certificate.lambda_hat is None else int(round(certificate.lambda_hat))
        with at_depth(model, depth), torch.no_grad():
            outputs, _ = decoder._early_exit(input_ids, attention_mask, None)  # the plain model, greedy
        return outputs, None

    decoder.run_batch = run_batch
    if len({layer.depth for layer in fff_layers(model)}) == 1:  # the deepest depth is then the full tree
        decoder.full_at = float(_max_depth(model))
    return decoder, depths


def _lm_template(model, decoder, depths: np.ndarray, delta: float, epsilon: float, bound: str) -> Certificate:
    """An untested decoded-mode ``fff_depth`` certificate over ``depths``."""
    untested = (math.nan,) * depths.size
    return Certificate(
        lambda_hat=None, delta=delta, epsilon=epsilon, n=decoder.n, lambdas=tuple(float(k) for k in depths),
        risks=untested, p_values=untested, certified=(False,) * depths.size, bound=bound, method="fixed_sequence",
        mode="decoded", consistency=decoder.consistency, knob="fff_depth", model=model_id(model, fresh=True),
        max_new_tokens=decoder.max_new_tokens,
    )  # fmt: skip


def audit(
    certificate: Certificate,
    model: nn.Module,
    inputs: torch.Tensor | Sequence[str],
    *,
    references: Sequence[int] | Sequence[str] | None = None,
    batch_size: int | None = None,
    tokenizer=None,
    max_new_tokens: int | None = None,
) -> AuditReport:
    """Held-out risk of an ``fff_depth`` certificate at every depth of its grid.

    Parameters
    ----------
    certificate : Certificate
        From :func:`fit` on this model.
    model, inputs, references, batch_size, tokenizer
        As in :func:`depth_losses` (held-out inputs or prompts).
    max_new_tokens : int, optional
        Most tokens generated per prompt (language models); default the certificate's ``max_new_tokens``,
        else 32.

    Returns
    -------
    AuditReport
        ``risks`` per depth, ``risk`` at the certified depth (0 for the full tree); layer fields NaN.
    """
    _certified_depth(model, certificate)  # the right knob and model
    _held_out_iv(certificate, inputs, "inputs" if tokenizer is None else "prompts")
    budget = _budget(certificate, max_new_tokens)
    if tokenizer is not None:
        _budget_warning(certificate, budget, "auditing")
    table = depth_losses(
        model,
        inputs,
        depths=[int(round(d)) for d in certificate.lambdas],
        consistency=certificate.consistency,
        references=references,
        batch_size=batch_size,
        tokenizer=tokenizer,
        max_new_tokens=budget,
    )
    return _held_out_report(certificate, table.n, table.risks)

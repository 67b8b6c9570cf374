"""Fast feedforward layers (Belcak & Wattenhofer, 2023; UltraFastBERT): a binary tree of neurons, one path per input.

A tree of depth ``D`` has ``2**(D + 1) - 1`` neurons (nodes), node ``n`` with input weights ``w_in[n]``
(and bias ``b_in[n]``) and output weights ``w_out[n]``. Per input ``x``, descend from the root::

    z_n = x . w_in[n] + b_in[n];   y += act(z_n) * w_out[n];   n <- 2n + 1 if z_n <= 0 else 2n + 2

so ``D + 1`` neurons are evaluated, and ``y = b_out + sum over the path``. Evaluation depth ``k <= D``
stops after the first ``k + 1`` nodes of the path: cost ``(k + 1) / (D + 1)`` of the full path, the knob
that :mod:`calibrate.fff.calibration` certifies (it sets ``FFF.eval_depth``).

Three formulations of the same tree:

- **hard descent** (inference, :func:`fff_forward`): per level one gather of the current node's weights
  per input (vectorised over inputs, any device), or a compiled CPU kernel (numba, parallel over inputs);
- **masked** (training, :meth:`FFF.masked_forward`): every neuron of the first ``k + 1`` levels computed,
  all but the path's masked to zero: the same function as hard descent, gradients for the path's neurons,
  no speed-up;
- **soft** (training, :meth:`FFF.soft_forward`, the FFF paper's soft tree): node ``n`` is reached with
  probability ``p_n`` (``p_root = 1``, ``p_{2n+2} = p_n sigmoid(z_n)``, ``p_{2n+1} = p_n (1 - sigmoid(z_n))``)
  and contributes ``p_n act(z_n) w_out[n]``; the hardening loss is the reach-weighted entropy of the
  decisions, ``mean_x sum_n p_n H(sigmoid(z_n)) / (D + 1)``; as it falls the soft tree approaches hard
  descent.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibrate._atomic import atomic_safetensors, finite_tensors_iv
from calibrate._digest import weights_digest
from calibrate._threads import njit, parallel_allowed, serial
from calibrate._validation import int_at_least, int_in, parse_json

__all__ = ["ACTIVATIONS", "BACKENDS", "FFF", "fff_forward", "fff_reference"]

#: Activations of the neurons.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
#: Hard-descent implementations: "torch" (gather per level), "numba" (compiled CPU kernel, float32/64).
BACKENDS = ("auto", "torch", "numba")
_ACT_ID = {"gelu": 0, "relu": 1, "silu": 2}
#: The settings :meth:`FFF.save` writes (as JSON in one metadata key, "fff").
_SAVED_KEYS = ("in_features", "out_features", "depth", "activation", "bias", "weights_digest")
#: Evaluation depths set by :func:`calibrate.fff.at_depth` for the current thread (or task) only: layer -> depth.
_DEPTHS: contextvars.ContextVar[Mapping[FFF, int | None]] = contextvars.ContextVar("fff_depths", default={})


def _depth_iv(depth, max_depth: int) -> int:
    if depth is None:
        return max_depth
    return int_in(depth, "depth", 0, max_depth, " (None: the whole path)")


def _forward_iv(layer: FFF, x, depth, backend: str) -> tuple[int, torch.Tensor]:
    """``(depth, x)`` of a hard-descent call (:func:`fff_forward`, :meth:`FFF.forward`), checked: a known
    backend, then :func:`_layer_input_iv`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _layer_input_iv(layer, x, depth)


def _layer_input_iv(layer: FFF, x, depth) -> tuple[int, torch.Tensor]:
    """``(depth, x)`` checked: a depth of the tree, inputs of the layer's width, dtype and device."""
    k = _depth_iv(depth, layer.depth)
    x = _input_iv(x, layer.in_features)
    if x.dtype != layer.w_in.dtype or x.device != layer.w_in.device:
        raise ValueError(
            f"the inputs are {x.dtype} on {x.device} but the layer is {layer.w_in.dtype} on {layer.w_in.device}; "
            "convert one"
        )
    return k, x


def _input_iv(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or infinite values")
    return x


class FFF(nn.Module):
    """A fast feedforward layer: a balanced binary tree of ``2**(depth + 1) - 1`` neurons, one path per input.

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths, >= 1.
    depth : int
        Tree depth ``D`` >= 0: ``D + 1`` neurons per path (UltraFastBERT-1x11: ``D = 11``, 12 of 4095).
    activation : {"gelu", "relu", "silu"}, default="gelu"
        Neuron activation.
    bias : bool, default=True
        Learn ``b_in`` (per node) and ``b_out``.
    generator : torch.Generator or None, default=None
        Draws the initial weights (uniform, ``w_in`` and ``b_in`` within ``1 / sqrt(in_features)``, ``w_out``
        within ``1 / sqrt(depth + 1)``, in that order: ``w_in``, ``w_out``, ``b_in``); None: torch's global
        generator.

    Attributes
    ----------
    w_in : nn.Parameter
        ``(nodes, in_features)``.
    b_in : nn.Parameter or None
        ``(nodes,)``.
    w_out : nn.Parameter
        ``(nodes, out_features)``.
    b_out : nn.Parameter or None
        ``(out_features,)``.
    eval_depth : int or None
        Evaluation depth used when :meth:`forward` gets none (None: the whole path); set for every thread
        by :func:`calibrate.fff.apply` (or by assigning it), and inside a :func:`calibrate.fff.at_depth`
        block for that block's thread only.

    Raises
    ------
    TypeError
        For a size or depth that is not an int.
    ValueError
        For a size or depth out of range, or a tree too large to index.
    MemoryError
        When the tree's weights (``4 (2**(depth + 1) - 1) (in_features + out_features + 1)`` bytes) cannot be
        allocated.

    Examples
    --------
    >>> import torch
    >>> from calibrate.fff import FFF, fff_forward
    >>> _ = torch.manual_seed(0)
    >>> layer = FFF(8, 4, depth=3)
    >>> x = torch.randn(5, 8)
    >>> layer(x).shape, layer.n_nodes
    (torch.Size([5, 4]), 15)
    >>> torch.allclose(fff_forward(layer, x), layer.masked_forward(x), atol=1e-6)   # hard descent = masked
    True
    >>> layer(x, depth=0).shape                                         # the root neuron only
    torch.Size([5, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        activation: str = "gelu",
        bias: bool = True,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, value, low in (
            ("in_features", in_features, 1),
            ("out_features", out_features, 1),
            ("depth", depth, 0),
        ):
            int_at_least(value, name, low)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.in_features, self.out_features, self.depth = int(in_features), int(out_features), int(depth)
        self.activation = activation
        self.eval_depth = None
        nodes = 2 ** (self.depth + 1) - 1
        if nodes * (self.in_features + self.out_features) >= 2**62:
            raise ValueError(
                f"depth={self.depth} is too deep: the tree would have 2**{self.depth + 1} - 1 neurons, more weights "
                "than torch can index"
            )
        size = (
            f"{nodes:,} neurons, "
            f"{4 * nodes * (self.in_features + self.out_features + 1) / 2**30:.3g} GiB of float32 weights"
        )
        bound_in, bound_out = 1 / math.sqrt(in_features), 1 / math.sqrt(self.depth + 1)
        try:
            w_in, w_out = torch.empty(nodes, in_features), torch.empty(nodes, out_features)
        except RuntimeError as exc:  # torch's allocator: "can't allocate memory"
            raise MemoryError(f"FFF(depth={self.depth}) cannot be allocated: its tree has {size}") from exc
        self.w_in = nn.Parameter(w_in.uniform_(-bound_in, bound_in, generator=generator))
        self.w_out = nn.Parameter(w_out.uniform_(-bound_out, bound_out, generator=generator))
        if bias:
            self.b_in = nn.Parameter(torch.empty(nodes).uniform_(-bound_in, bound_in, generator=generator))
            self.b_out = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)

    _eval_depth: int | None = None

    def __setstate__(self, state: dict) -> None:
        if "eval_depth" in state:  # a whole module pickled before eval_depth became a property
            state["_eval_depth"] = state.pop("eval_depth")
        super().__setstate__(state)

    @property
    def eval_depth(self) -> int | None:
        """Evaluation depth of :meth:`forward` without ``depth`` (None: the whole path): the enclosing
        :func:`~calibrate.fff.at_depth` block's in this thread, else the one set on the layer."""
        depths = _DEPTHS.get()
        return depths[self] if self in depths else self._eval_depth

    @eval_depth.setter
    def eval_depth(self, depth: int | None) -> None:
        self._eval_depth = None if depth is None else _depth_iv(depth, self.depth)

    @property
    def n_nodes(self) -> int:
        """Neurons in the tree, ``2**(depth + 1) - 1``."""
        return self.w_in.shape[0]

    def cost(self, depth: int | None = None) -> int:
        """Multiply-adds per input of hard descent to ``depth``: ``(depth + 1) * (in_features + out_features)``."""
        return (_depth_iv(depth, self.depth) + 1) * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        """The settings, with the evaluation depth where it cuts the tree short (so model digests differ by it)."""
        depth = self.eval_depth
        short = "" if depth is None or depth >= self.depth else f", eval_depth={depth}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}{short}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}"
        )

    def forward(self, x: torch.Tensor, depth: int | None = None, *, backend: str = "auto") -> torch.Tensor:
        """Hard descent: ``(..., in_features) -> (..., out_features)``, the first ``depth + 1`` nodes of each path.

        ``depth`` None means ``eval_depth`` (None: the whole path). With gradients enabled and the layer
        in training mode, or any of its weights or ``x`` requiring grad (an eval-mode layer under a
        fine-tuned model), this is :meth:`masked_forward` (the same function, differentiable, no speed-up);
        otherwise :func:`fff_forward` with ``backend``, which has no gradient. Run inference under
        ``torch.no_grad()`` or ``torch.inference_mode()`` (as ``generate`` and this library do) to get
        the fast descent.
        """
        depth = self.eval_depth if depth is None else depth
        if torch.is_grad_enabled() and (  # asked only then: inference under no_grad pays nothing for the question
            self.training or any(p.requires_grad for p in self.parameters()) or getattr(x, "requires_grad", False)
        ):
            k, x = _forward_iv(self, x, depth, backend)
            return self._masked(x, k)
        return fff_forward(self, x, depth, backend=backend)

    def masked_forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Every neuron of the first ``depth + 1`` levels, all but the path's masked: differentiable, no speed-up."""
        return self._masked(_input_iv(x, self.in_features), _depth_iv(depth, self.depth))

    def _masked(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """:meth:`masked_forward` of checked inputs ``x`` and depth ``k``."""
        lead, flat = x.shape[:-1], x.reshape(-1, self.in_features)
        nodes = 2 ** (k + 1) - 1
        z = flat @ self.w_in[:nodes].T  # (N, nodes)
        if self.b_in is not None:
            z = z + self.b_in[:nodes]
        mask = torch.zeros_like(z, dtype=torch.bool)
        node = torch.zeros(flat.shape[0], dtype=torch.long, device=x.device)
        rows = torch.arange(flat.shape[0], device=x.device)
        for _ in range(k + 1):
            mask[rows, node] = True
            node = 2 * node + 1 + (z.detach()[rows, node] > 0).long()
        y = (ACTIVATIONS[self.activation](z) * mask) @ self.w_out[:nodes]  # (N, out)
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(*lead, self.out_features)

    def soft_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The soft tree over the whole depth: the output ``(..., out_features)`` and the hardening loss (scalar).

        The hardening loss is the reach-weighted binary entropy of the decisions per level, averaged over
        inputs, in nats, in ``[0, log 2]``. The leaves count too (their sign chooses no child): it is 0 only
        when every ``z``, the leaves' included, is far from 0, not whenever the output equals hard descent.
        """
        x = _input_iv(x, self.in_features)
        lead, flat = x.shape[:-1], x.reshape(-1, self.in_features)
        z = flat @ self.w_in.T  # (N, nodes)
        if self.b_in is not None:
            z = z + self.b_in
        right = torch.sigmoid(z)  # (N, nodes) probability of going to 2n + 2
        reach = [torch.ones_like(z[:, :1])]  # per level (N, 2**level)
        for level in range(self.depth):
            lo, hi = 2**level - 1, 2 ** (level + 1) - 1
            r = right[:, lo:hi]
            reach.append(torch.stack((reach[-1] * (1 - r), reach[-1] * r), dim=2).flatten(1))  # children in order
        p = torch.cat(reach, dim=1)  # (N, nodes), node order = level order
        y = (p * ACTIVATIONS[self.activation](z)) @ self.w_out
        if self.b_out is not None:
            y = y + self.b_out
        entropy = -(right * torch.log(right.clamp_min(1e-12)) + (1 - right) * torch.log((1 - right).clamp_min(1e-12)))
        per_input = (p * entropy).sum(dim=1)
        hardening = (per_input.mean() if per_input.numel() else per_input.sum()) / (self.depth + 1)  # empty: 0
        return y.reshape(*lead, self.out_features), hardening

    # ---- persistence --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the weights, the layer's sizes and a digest of the weights to a safetensors file (atomically)."""
        path = Path(path)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        values = (self.in_features, self.out_features, self.depth, self.activation, self.b_in is not None)
        meta = {key: str(value) for key, value in zip(_SAVED_KEYS, values)}
        meta["weights_digest"] = weights_digest(self, fresh=True)
        # one key: safetensors writes several in a random order (other bytes each time)
        atomic_safetensors(tensors, path, {"fff": json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> FFF:
        """Read a layer written by :meth:`save`; unreadable files, missing or misshapen tensors and weights that do not
        match their stored digest fail naming them (files saved before digests were recorded load unchecked)."""
        from safetensors import SafetensorError, safe_open

        if Path(path).is_dir():  # safetensors says "No such device (os error 19)"
            raise ValueError(
                f"{path} is a directory, not an FFF layer file (FFF.save); a language model's FFF blocks load with "
                "load_blocks"
            )
        if not Path(path).is_file():
            raise ValueError(f"{path} is not an FFF layer file (FFF.save): it does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
        try:
            if "fff" in meta:  # files saved before the settings went into one key have them as keys of their own
                meta = parse_json(meta["fff"], "its setting 'fff'")
                unknown = sorted(set(meta) - set(_SAVED_KEYS)) if isinstance(meta, dict) else []
                if unknown or (isinstance(meta, dict) and "weights_digest" not in meta):  # it always wrote one
                    raise ValueError(
                        f"settings {unknown} unknown to this calm-calibrate (a file of a newer version? upgrade it)"
                        if unknown
                        else "no weights_digest, which FFF.save writes"
                    )
            with torch.device("meta"):  # nothing allocated before the shapes are checked: depth is only a number
                layer = cls(
                    int(meta["in_features"]),
                    int(meta["out_features"]),
                    int(meta["depth"]),
                    meta["activation"],
                    meta["bias"] == "True",
                )
        except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not an FFF file written by FFF.save (metadata {meta!r:.300}): {exc}") from None
        expected = {name: tuple(p.shape) for name, p in layer.named_parameters()}
        got = {name: tuple(t.shape) for name, t in state.items()}
        if got != expected:
            raise ValueError(f"{path} holds tensors {got}, expected {expected}")
        if not all(t.is_floating_point() for t in state.values()):
            dtypes = {name: str(t.dtype) for name, t in state.items()}
            raise ValueError(f"{path} holds tensors of dtypes {dtypes}; an FFF layer's weights are floating point")
        finite_tensors_iv(state, path)
        dtype = state["w_in"].dtype  # the stored precision
        layer.load_state_dict({name: t.to(dtype) for name, t in state.items()}, assign=True)
        # A file saved before the settings went into one key may have no digest (it loads unchecked).
        if "weights_digest" in meta and meta["weights_digest"] != weights_digest(layer):
            raise ValueError(
                f"{path}: the weights do not match their stored digest ({meta['weights_digest']!r}): a corrupt or "
                "edited file"
            )
        return layer


# --------------------------------------------------------------------------------------------------
# Hard descent
# --------------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=True)
def _descend_kernel(x, w_in, b_in, w_out, b_out, k, act, out):  # pragma: no cover - compiled
    n, d = x.shape
    m = w_out.shape[1]
    for t in numba.prange(n):
        for j in range(m):
            out[t, j] = b_out[j]
        node = 0
        for _ in range(k + 1):
            z = b_in[node]
            for j in range(d):
                z += x[t, j] * w_in[node, j]
            if act == 0:
                a = 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
            elif act == 1:
                a = max(z, 0.0)
            else:
                a = z / (1.0 + math.exp(-z))
            for j in range(m):
                out[t, j] += a * w_out[node, j]
            node = 2 * node + 1 + (1 if z > 0 else 0)


#: The descent without threads: in a forked process, or while another thread runs the parallel one
#: (:func:`calibrate._threads.parallel_allowed`).
_descend_serial = serial(_descend_kernel, fastmath=True)


def _numba_ok(layer: FFF, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and layer.w_in.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


@torch.no_grad()
def fff_forward(layer: FFF, x: torch.Tensor, depth: int | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Hard descent of ``layer`` on ``x`` ``(..., in_features)``, evaluating the first ``depth + 1`` nodes per path.

    Parameters
    ----------
    layer : FFF
    x : torch.Tensor
        Inputs, any leading shape, finite.
    depth : int, optional
        Evaluation depth ``k`` in ``0..layer.depth`` (None: the whole path).
    backend : {"auto", "torch", "numba"}, default="auto"
        ``"torch"``: one gather of the current nodes' weights per level, vectorised over inputs (any
        device and dtype). ``"numba"``: a compiled kernel, parallel over inputs (CPU, float32/float64).
        ``"auto"``: numba where it applies, else torch.

    Returns
    -------
    torch.Tensor
        ``(..., out_features)``, no gradient.

    Examples
    --------
    >>> import torch
    >>> from calibrate.fff import FFF, fff_forward, fff_reference
    >>> _ = torch.manual_seed(0)
    >>> layer = FFF(8, 4, depth=3)
    >>> x = torch.randn(2, 5, 8)                        # any leading shape
    >>> fff_forward(layer, x).shape
    torch.Size([2, 5, 4])
    >>> y = fff_forward(layer, x, depth=1, backend="torch")   # 2 of the 4 neurons of each path
    >>> torch.allclose(y, fff_reference(layer, x, depth=1), atol=1e-6)
    True
    >>> layer.cost(1), layer.cost()                     # multiply-adds per input at depth 1 and whole
    (24, 48)
    """
    k, x = _forward_iv(layer, x, depth, backend)
    lead, flat = x.shape[:-1], x.reshape(-1, layer.in_features)
    use_numba = backend == "numba" or (backend == "auto" and _numba_ok(layer, x))
    if use_numba:
        if not _numba_ok(layer, x):
            raise ValueError("backend='numba' needs CPU tensors of float32 or float64")
        zeros_in = np.zeros(layer.n_nodes, dtype=flat.numpy().dtype)
        zeros_out = np.zeros(layer.out_features, dtype=zeros_in.dtype)
        b_in = zeros_in if layer.b_in is None else layer.b_in.detach().numpy()
        b_out = zeros_out if layer.b_out is None else layer.b_out.detach().numpy()
        out = np.empty((flat.shape[0], layer.out_features), dtype=zeros_in.dtype)
        with parallel_allowed() as parallel:
            (_descend_kernel if parallel else _descend_serial)(
                flat.contiguous().numpy(),
                layer.w_in.detach().numpy(),
                b_in,
                layer.w_out.detach().numpy(),
                b_out,
                k,
                _ACT_ID[layer.activation],
                out,
            )
        return torch.from_numpy(out).reshape(*lead, layer.out_features)
    act = ACTIVATIONS[layer.activation]
    node = torch.zeros(flat.shape[0], dtype=torch.long, device=x.device)
    y = flat.new_zeros(flat.shape[0], layer.out_features)
    for _ in range(k + 1):
        z = torch.einsum("nd,nd->n", flat, layer.w_in[node])  # (N,)
        if layer.b_in is not None:
            z = z + layer.b_in[node]
        y += act(z)[:, None] * layer.w_out[node]
        node = 2 * node + 1 + (z > 0).long()
    if layer.b_out is not None:
        y += layer.b_out
    return y.reshape(*lead, layer.out_features)


@torch.no_grad()
def fff_reference(layer: FFF, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """The plain per-input loop of the definition (slow; the reference the fast paths are tested against).

    Parameters
    ----------
    layer : FFF
        The layer whose weights are read (its ``eval_depth`` is ignored).
    x : torch.Tensor
        Floating-point, finite, shape ``(..., in_features)``.
    depth : int, optional
        Evaluation depth in ``0..layer.depth``: ``depth + 1`` neurons along each input's path. Default: the
        whole path (``layer.depth``).

    Returns
    -------
    torch.Tensor
        Shape ``(..., out_features)``, the dtype and device of ``x`` (the layer's).

    Raises
    ------
    TypeError
        When ``x`` is not a floating-point tensor, or ``depth`` is neither None nor an int.
    ValueError
        When ``x`` does not have ``in_features`` features, holds NaN or infinite values, or is not in the
        layer's dtype and on its device, or ``depth`` lies outside ``0..layer.depth``.

    Examples
    --------
    >>> import torch
    >>> from calibrate.fff import FFF, fff_reference
    >>> layer = FFF(2, 1, depth=1, activation="relu", bias=False)   # nodes 0 (root), 1 (left), 2 (right)
    >>> with torch.no_grad():
    ...     _ = layer.w_in.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    ...     _ = layer.w_out.copy_(torch.tensor([[1.0], [10.0], [100.0]]))
    >>> x = torch.tensor([[2.0, 3.0], [-2.0, 3.0]])
    >>> fff_reference(layer, x)       # row 0: root z = 2 > 0, right node z = -3: 2; row 1: root 0, left 3 * 10
    tensor([[ 2.],
            [30.]])
    >>> fff_reference(layer, x, depth=0)                # the root neuron only
    tensor([[2.],
            [0.]])
    """
    k, x = _layer_input_iv(layer, x, depth)
    act = ACTIVATIONS[layer.activation]
    flat = x.reshape(-1, layer.in_features)
    out = []
    for row in flat:
        y = (
            torch.zeros(layer.out_features, dtype=x.dtype, device=x.device)
            if layer.b_out is None
            else layer.b_out.clone()
        )
        node = 0
        for _ in range(k + 1):
            z = row @ layer.w_in[node] + (0 if layer.b_in is None else layer.b_in[node])
            y = y + act(z) * layer.w_out[node]
            node = 2 * node + 1 + int(z > 0)
        out.append(y)
    if not out:  # an empty batch
        return x.new_zeros(*x.shape[:-1], layer.out_features)
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features)

"""Per-layer exit adapters fitted on frozen hidden states, so that early layers agree with the last one.

With the plain logit lens (the model's final norm + LM head applied to a middle layer), small models'
middle layers rarely predict what the last layer predicts (SmolLM2-135M: ~19% at layer 20 of 30; DESIGN
section 13), so a certificate can only allow late exits. An affine adapter per layer in front of the
shared norm and head, ``logits_i = head(norm(A_i h_i + b_i))``, fixes much of that at no cost to the
model: only the adapters are fitted, on hidden states stored in a cache (``extract(..., store_hidden=True)``).

Fitting is closed-form weighted ridge regression of the last layer's state on each layer's state,
``(A_i, b_i) = argmin sum_t ||A_i h_{t,i} + b_i - h_{t,L}||^2 / rms(h_{t,L})^2 + alpha ||A_i||^2``: the
relative error, so that tokens with huge final states do not dominate (the final norm, RMSNorm or
LayerNorm, is invariant to the scale of its input). Seconds on a CPU, no vocabulary-sized products. Adapters are
saved with safetensors (no pickle) next to the heads' description.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch
from torch import nn

from calibrate._atomic import atomic_safetensors, finite_tensors_iv
from calibrate._validation import caller_stacklevel, finite_positive, int_at_least, parse_json
from calibrate.cache import _in_memory_iv
from calibrate.heads import ExitHeads, _cache_model_iv, _hash_adapters

__all__ = ["layer_agreement", "load_adapters", "save_adapters", "train_adapters"]


def _hidden_iv(cache, heads: ExitHeads | None = None) -> np.ndarray:
    _in_memory_iv(cache, "cache")
    if not cache.has("hidden"):
        raise ValueError("cache stores no hidden states; extract it with store_hidden=True")
    if cache.n_tokens == 0:
        raise ValueError("cache holds no tokens")
    hidden = cache.arrays["hidden"]
    if heads is not None and (heads.n_layers, heads.hidden_size) != tuple(hidden.shape[1:]):
        raise ValueError(
            f"the heads have n_layers={heads.n_layers}, hidden_size={heads.hidden_size} but the cache's hidden states "
            f"have shape (n_tokens, {hidden.shape[1]}, {hidden.shape[2]})"
        )
    if heads is not None:
        _cache_model_iv(heads, cache)
    return hidden


def train_adapters(model: nn.Module, cache, *, ridge: float = 1e-2, progress: bool = True) -> ExitHeads:
    """Fit one affine adapter per layer (closed-form ridge) on a cache's frozen hidden states.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the cache was extracted from (its final norm and LM head are shared, not copied).
    cache : LayerCache
        Training tokens with hidden states ``(n_tokens, L, d)`` (``store_hidden=True``). Use a split
        disjoint from the calibration and test splits.
    ridge : float, default=1e-2
        Ridge penalty relative to the mean eigenvalue of each layer's second-moment matrix (> 0).
    progress : bool, default=True
        Show a progress bar over layers.

    Returns
    -------
    ExitHeads
        ``ExitHeads.from_model(model, adapters=True)`` with the fitted adapters (layers ``0..L-2``; the
        last layer has none, so the full model's prediction is unchanged).

    Raises
    ------
    ValueError
        When the cache has no hidden states or its shape does not fit the model, the cache records another
        model than ``model`` (``model_digest``), or ``ridge`` is not finite and > 0.
    TypeError
        When ``ridge`` is not a real number (a bool or a str), or ``cache`` is not a LayerCache in memory (a
        chunked cache: read it with ``cache.take(indices)``).
    """
    from calibrate._progress import tqdm

    ridge = finite_positive(ridge, "ridge")
    heads = ExitHeads.from_model(model, adapters=True)
    hidden = _hidden_iv(cache, heads)
    n, n_layers, d = hidden.shape
    # Weighted least squares with weights 1 / rms(h_L)^2: scale every row of both sides by 1 / rms(h_L).
    target = hidden[:, -1, :].astype(np.float64)
    row_scale = 1.0 / (np.sqrt(np.mean(target**2, axis=1, keepdims=True)) + 1e-12)  # (n, 1)
    target *= row_scale
    weights, biases = [], []
    for i in tqdm(range(n_layers - 1), desc="adapters", unit="layer", disable=not progress):
        x = np.concatenate([hidden[:, i, :].astype(np.float64), np.ones((n, 1))], axis=1) * row_scale  # (n, d + 1)
        gram = x.T @ x
        penalty = ridge * np.trace(gram[:d, :d]) / d
        gram[np.arange(d), np.arange(d)] += penalty  # the bias is not penalised
        coef = np.linalg.solve(gram, x.T @ target)  # (d + 1, d)
        weights.append(coef[:d].T)
        biases.append(coef[d])
    with torch.no_grad():
        if n_layers > 1:
            heads.adapter_weight.copy_(torch.from_numpy(np.stack(weights)))
            heads.adapter_bias.copy_(torch.from_numpy(np.stack(biases)))
    return heads


@torch.no_grad()
def layer_agreement(heads: ExitHeads, cache, *, batch_size: int = 256) -> np.ndarray:
    """Fraction of tokens whose layer-``i`` prediction under ``heads`` equals the full model's token.

    Parameters
    ----------
    heads : ExitHeads
        What each layer predicts (e.g. plain or with adapters from :func:`train_adapters`).
    cache : LayerCache
        Tokens with hidden states and ``full_tokens``; use a split the adapters were not fitted on.
    batch_size : int, default=256
        Tokens per forward of the vocabulary-sized head (memory ``batch_size * L * V`` floats).

    Returns
    -------
    ndarray of float64, shape (n_layers,)
        Agreement in ``[0, 1]`` per layer (1-based layer ``i`` at index ``i - 1``).

    Raises
    ------
    ValueError
        When the cache has no hidden states, their shape does not fit ``heads``, or the cache records another
        model than the one ``heads`` were made from (``model_digest``).
    TypeError
        When ``cache`` is not a LayerCache in memory (a chunked cache: read it with ``cache.take(indices)``).
    """
    batch_size = int_at_least(batch_size, "batch_size")
    hidden = _hidden_iv(cache, heads)
    full = torch.from_numpy(np.asarray(cache.arrays["full_tokens"], dtype=np.int64))
    device, dtype = heads._placement()
    hits = torch.zeros(hidden.shape[1], dtype=torch.float64)
    for start in range(0, hidden.shape[0], batch_size):
        h = torch.from_numpy(np.asarray(hidden[start : start + batch_size], dtype=np.float32)).to(device, dtype)
        top1 = heads(h).argmax(dim=-1).cpu()  # (b, L)
        hits += (top1 == full[start : start + batch_size, None]).sum(dim=0)
    return (hits / hidden.shape[0]).numpy()


def save_adapters(heads: ExitHeads, path: str | os.PathLike) -> None:
    """Write the adapters of ``heads`` to a safetensors file (atomically), with ``heads.describe()`` and the
    dtype of the model's output layer as metadata.

    Parameters
    ----------
    heads : ExitHeads
        Heads with adapters (e.g. from :func:`train_adapters`); they are saved in their own dtype (the LM
        head's): ``weight`` ``(L - 1, d, d)`` and ``bias`` ``(L - 1, d)``.
    path : str or os.PathLike
        The file to write; an existing file is replaced.

    Raises
    ------
    ValueError
        When ``heads`` has no adapters, or they hold NaN or infinite values.
    OSError
        When the file cannot be written.
    """
    if not heads.has_adapters:
        raise ValueError("heads has no adapters to save")
    tensors = {
        "weight": heads.adapter_weight.detach().cpu().contiguous(),
        "bias": heads.adapter_bias.detach().cpu().contiguous(),
    }
    metadata = {"heads": json.dumps(heads.describe(fresh=True)), "model_dtype": str(heads._placement()[1])}
    atomic_safetensors(tensors, path, metadata)



def load_adapters(model: nn.Module, path: str | os.PathLike) -> ExitHeads:
    """Heads of ``model`` with the adapters saved by :func:`save_adapters`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model the adapters were trained for (:data:`calibrate.heads.SUPPORTED_ARCHITECTURES`); not modified.
    path : str or os.PathLike
        A file written by :func:`save_adapters`.

    Returns
    -------
    ExitHeads
        ``ExitHeads.from_model(model, adapters=True)`` with the saved adapters copied in (on the device and
        in the dtype of the model's LM head).

    Raises
    ------
    ValueError
        When the file is missing or not a safetensors file, or was saved for another architecture, layer
        count, width or vocabulary (naming the field), or for a model of the same dtype with other weights,
        or holds tensors of other shapes, or its weights do not match the stored digest. A model in another
        dtype than the saved weights gets them rounded (its weights cannot be compared with the saved model's).

    Warns
    -----
    UserWarning
        When the file records no model dtype (written before it did): its model cannot be checked.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            saved = parse_json((fh.metadata() or {}).get("heads", "{}"), "its metadata 'heads'")
            saved_dtype = (fh.metadata() or {}).get("model_dtype")  # None: written before it was recorded
            weight, bias = fh.get_tensor("weight"), fh.get_tensor("bias")
    except (SafetensorError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable adapter file: {exc}") from None
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path} is not an adapter file written by save_adapters: its metadata 'heads' is not a JSON object"
        )
    heads = ExitHeads.from_model(model, adapters=True)
    expected = heads.describe()
    for key in ("architecture", "n_layers", "hidden_size", "vocab_size"):
        if saved.get(key) != expected[key]:
            raise ValueError(f"{path} holds adapters for {key}={saved.get(key)!r}, this model has {expected[key]!r}")
    if saved_dtype == str(heads._placement()[1]) and saved.get("model_digest") != expected["model_digest"]:
        raise ValueError(
            f"{path} holds adapters trained for another model of this shape (model_digest {saved.get('model_digest')!r}"
            f", this model {expected['model_digest']!r}): they would cost the early exits they were trained for; "
            "train adapters for this model (calibrate.train_adapters)"
        )
    for name, stored, param in (("weight", weight, heads.adapter_weight), ("bias", bias, heads.adapter_bias)):
        if stored.shape != param.shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(stored.shape)}, this model needs {tuple(param.shape)}"
            )
    finite_tensors_iv({"weight": weight, "bias": bias}, path)
    # Checked on the stored values: copying into a bf16/fp16 model rounds them, and the digest with them.
    if "adapters_digest" not in saved:
        raise ValueError(f"{path}: no adapters_digest in its metadata: not an adapter file written by save_adapters")
    if _hash_adapters(weight, bias) != saved["adapters_digest"]:
        raise ValueError(f"{path}: adapter weights do not match their stored digest (corrupt or edited file?)")
    if saved_dtype is None:
        warnings.warn(
            f"{path} records no model dtype (written by an older calm-calibrate): the model its adapters were trained "
            "for cannot be checked against this one",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    with torch.no_grad():
        heads.adapter_weight.copy_(weight)
        heads.adapter_bias.copy_(bias)
    return heads

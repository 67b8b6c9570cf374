"""Replace a language model's MLP blocks by fast feedforward layers distilled from them.

Layer by layer, on frozen inputs: the original model reads a text corpus once while forward hooks record,
at every chosen decoder layer, the MLP block's input (after its norm) and output per token. For each
layer an ``FFF(d, d, depth)`` learns the output from the input by mean squared error, first as the FFF
paper's soft tree with a hardening term whose weight grows linearly to ``hardening`` (``soft_share`` of
the steps), then by the masked formulation (the hard path, as it runs), and replaces the MLP in a copy of
the model. The error is measured on tokens of held-out texts, by hard descent.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibrate._atomic import sync_dir, sync_tree, temporary_dir
from calibrate._digest import hash_tensors
from calibrate._validation import (
    caller_stacklevel,
    finite_at_least,
    finite_positive,
    int_at_least,
    parse_json,
    seed_iv,
    torch_seed,
)
from calibrate.audit import _tight
from calibrate.fff.layer import FFF
from calibrate.heads import decoder_layers, forward_hooks
from calibrate.models import _eval_mode

__all__ = ["DistillResult", "distill", "load_blocks", "mlp_activations", "save_blocks"]

#: File name of a decoder layer's FFF block in a directory written by :func:`save_blocks`.
_BLOCK_FILE = "layer-{:05d}.safetensors"
#: What :func:`save_blocks` records of the model beside its blocks, so that :func:`load_blocks` refuses another one.
_SOURCE_FILE = "source.json"


def _source(model: nn.Module, layers: Sequence[int]) -> dict:
    """The architecture, layer count and width of ``model``, 16 evenly spaced values of its token embeddings
    (float32; loading into a model of another dtype compares them to its precision), its dtype and a digest of
    its weights but the MLPs of ``layers`` (the blocks' places; compared in the same dtype)."""
    emb = model.get_input_embeddings().weight.detach().reshape(-1)
    sample = emb[:: max(1, emb.numel() // 16)][:16].float().cpu().tolist()
    blocks = decoder_layers(model)
    mlps = [getattr(blocks[i], "mlp", None) for i in layers]  # a layer without one: load_blocks names it
    replaced = {id(p) for mlp in mlps if mlp is not None for p in mlp.parameters()}
    kept = [(name, p) for name, p in model.named_parameters() if id(p) not in replaced]
    return {"model_type": model.config.model_type, "n_layers": len(blocks), "hidden_size": model.config.hidden_size,
            "embedding_sample": sample, "dtype": str(kept[0][1].dtype), "weights": hash_tensors(kept),
            "layers": sorted(int(i) for i in layers)}  # fmt: skip


def _source_iv(model: nn.Module, root: Path, layers: Sequence[int]) -> None:
    """Refuse ``model`` unless it is the model whose blocks (for decoder ``layers``) ``root`` holds (by
    :func:`_source`); warn when the directory records none (written before it did)."""
    path = root / _SOURCE_FILE
    if not path.is_file():
        warnings.warn(
            f"{root} records no source model ({_SOURCE_FILE}): it cannot be checked against this one",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
        return
    try:
        saved = parse_json(path.read_text(encoding="utf-8"), str(path))
        keys = ("model_type", "n_layers", "hidden_size", "embedding_sample", "dtype", "weights")
        saved = {key: saved[key] for key in keys} | {"layers": saved.get("layers", list(layers))}  # older: unlisted
        sample = saved["embedding_sample"]
        if not isinstance(sample, list) or not all(isinstance(v, (int, float)) for v in sample):
            raise TypeError("embedding_sample must be a list of numbers")
        if not isinstance(saved["layers"], list) or not all(isinstance(i, int) for i in saved["layers"]):
            raise TypeError("layers must be a list of ints")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a source record of calibrate.fff.save_blocks ({exc!r:.120})") from None
    if sorted(saved["layers"]) != sorted(layers):  # a block file lost or added: the model would be half replaced
        missing = sorted(set(saved["layers"]) - set(layers))
        names = [f"layer-{i:05d}.safetensors" for i in missing]
        raise ValueError(
            f"{root} holds the blocks of layers {sorted(layers)}, but {_SOURCE_FILE} records {sorted(saved['layers'])}"
            + (f": missing {', '.join(names)}" if names else "")
        )
    here = _source(model, [i for i in layers if i < len(decoder_layers(model))])
    if len(here["embedding_sample"]) != len(sample):
        raise ValueError(f"{path} records {len(sample)} embedding values, the model {len(here['embedding_sample'])}")
    for key in ("model_type", "n_layers", "hidden_size"):
        if here[key] != saved[key]:
            raise ValueError(
                f"the blocks in {root} were distilled from a model with {key}={saved[key]!r}, not {here[key]!r}"
            )
    same_dtype = here["dtype"] == saved["dtype"]  # else the weights compare only by the embedding sample
    if not np.allclose(here["embedding_sample"], saved["embedding_sample"], rtol=1e-2, atol=1e-6) or (
        same_dtype and here["weights"] != saved["weights"]
    ):
        raise ValueError(
            f"the blocks in {root} were distilled from another model of this shape (its weights differ, e.g. a "
            "fine-tuned copy): load them into the model they were distilled from"
        )


@dataclasses.dataclass(frozen=True, repr=False)
class DistillResult:
    """A model whose MLP blocks are FFFs, and how well each reproduces the block it replaced.

    Attributes
    ----------
    model : torch.nn.Module
        A copy of the original model with ``FFF`` layers in place of the chosen MLP blocks (eval mode).
    layers : tuple of int
        The replaced decoder layers, 0-based.
    depth : int
        Depth of every FFF (``depth + 1`` of ``2**(depth + 1) - 1`` neurons evaluated per token).
    errors : tuple of float
        Per replaced layer, on held-out tokens: ``||FFF(x) - MLP(x)||^2 / ||MLP(x) - mean||^2`` (0 is
        exact; 1 is no better than the mean output).
    baseline_errors : tuple of float
        The same error for a dense MLP of the FFF's evaluated width (``depth + 1`` hidden neurons) trained
        the same number of steps: the honest baseline at equal inference cost.
    n_train, n_heldout : int
        Recorded tokens used to train and to measure.
    """

    model: nn.Module
    layers: tuple[int, ...]
    depth: int
    errors: tuple[float, ...]
    baseline_errors: tuple[float, ...]
    n_train: int
    n_heldout: int

    def __repr__(self) -> str:
        return (
            f"DistillResult(layers={len(self.layers)}, depth={self.depth}, mean error={np.mean(self.errors):.3f} "
            f"(narrow dense {np.mean(self.baseline_errors):.3f}), tokens={self.n_train}+{self.n_heldout})"
        )

    def plot(self, ax=None):
        """Per-layer held-out error of the FFFs and of the narrow dense baseline.

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Where to draw; default: a new figure.

        Returns
        -------
        matplotlib.figure.Figure
            The figure of ``ax``; without ``ax`` a new one, which pyplot keeps open (shown by ``plt.show()`` and in
            notebooks) until ``plt.close(fig)``: close it when drawing many, in a loop or a server.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(len(self.layers))
        ax.bar(x - 0.2, self.errors, 0.4, label=f"FFF depth {self.depth}")
        ax.bar(x + 0.2, self.baseline_errors, 0.4, label=f"dense, {self.depth + 1} neurons")
        ax.set(xticks=x, xticklabels=[str(i) for i in self.layers], xlabel="decoder layer",
               ylabel="relative squared error", title="MLP blocks distilled into FFFs (held-out tokens)")  # fmt: skip
        ax.legend(fontsize=8)
        _tight(ax.figure)
        return ax.figure


def _mlp_of(layer: nn.Module, index: int) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"decoder layer {index} has no .mlp block (supported: GPT-2, Llama, Qwen2 and relatives)")
    return mlp


def _layers_iv(layers, n_layers: int) -> list[int]:
    """``layers`` as distinct 0-based decoder layer indices in ``0..n_layers-1`` (None: all)."""
    if layers is None:
        return list(range(n_layers))
    values = list(layers)
    if (
        not values
        or any(isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) for i in values)
        or len(set(values)) != len(values)
        or min(values) < 0
        or max(values) >= n_layers
    ):
        raise ValueError(f"layers must be distinct decoder layers in 0..{n_layers - 1}, got {values}")
    return [int(i) for i in values]


@torch.no_grad()
def mlp_activations(
    model: nn.Module, tokenizer, texts: Sequence[str], layers: Sequence[int], *, max_tokens: int = 128
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The inputs and outputs of the MLP blocks of ``layers`` on every token of ``texts``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model whose decoder layers have an ``.mlp`` block.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer; each text is read on its own (no padding), cut to ``max_tokens`` tokens.
    texts : sequence of str
        The corpus.
    layers : sequence of int
        Decoder layers (0-based).
    max_tokens : int, default=128
        Most tokens read per text.

    Returns
    -------
    dict
        ``layer -> (inputs, outputs)``, float32 tensors of shape ``(n_tokens, d)``, tokens in text order (a text
        without tokens, e.g. a blank line, adds none).
    """
    blocks = decoder_layers(model)
    layers = _layers_iv(layers, len(blocks))
    max_tokens = int_at_least(max_tokens, "max_tokens")
    recorded: dict[int, tuple[list, list]] = {i: ([], []) for i in layers}

    def hook_for(i: int):
        def hook(module, args, output):
            recorded[i][0].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
            recorded[i][1].append(output.detach().reshape(-1, output.shape[-1]).float().cpu())

        return hook

    device = next(model.parameters()).device
    with forward_hooks([(_mlp_of(blocks[i], i), hook_for(i)) for i in layers]), _eval_mode(model):
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(device)
            if ids.shape[1]:  # a blank line of a corpus: the model cannot run on no token
                model(input_ids=ids)
    empty = torch.empty(0, model.config.hidden_size)
    return {i: (torch.cat([empty, *x]), torch.cat([empty, *y])) for i, (x, y) in recorded.items()}


def _linear(d_in: int, d_out: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear(d_in, d_out)`` initialised as torch does (``reset_parameters``), drawing from ``generator``."""
    linear = nn.utils.skip_init(nn.Linear, d_in, d_out)
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(d_in)
    nn.init.uniform_(linear.bias, -bound, bound, generator=generator)
    return linear


def _train(module: nn.Module, x, y, *, steps, batch_size, lr, hardening, soft_share, generator) -> nn.Module:
    """Mean squared error training; an FFF runs soft (hardening ramp) then masked, any other module as is."""
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    soft_steps = int(round(soft_share * steps)) if isinstance(module, FFF) else 0
    module.train()
    for step in range(steps):
        batch = torch.randint(0, len(x), (batch_size,), generator=generator)
        if step < soft_steps:
            out, hard = module.soft_forward(x[batch])
            loss = F.mse_loss(out, y[batch]) + hardening * step / max(1, soft_steps - 1) * hard
        else:
            loss = F.mse_loss(module(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
    return module.eval()


@torch.no_grad()
def _relative_error(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    residual = ((module(x) - y) ** 2).sum()
    return float(residual / ((y - y.mean(dim=0)) ** 2).sum().clamp_min(1e-12))


def distill(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    depth: int = 8,
    layers: Sequence[int] | None = None,
    steps: int = 500,
    batch_size: int = 512,
    lr: float = 3e-3,
    hardening: float = 3.0,
    soft_share: float = 0.7,
    heldout: float = 0.2,
    max_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> DistillResult:
    """Distil the MLP blocks of ``layers`` into FFFs of ``depth``, layer by layer on frozen inputs.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model (GPT-2, Llama family incl. SmolLM2, Qwen2); not modified (a copy is).
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    texts : sequence of str
        The corpus; the first ``max(1, round(heldout * len(texts)))`` texts of ``default_rng(seed).permutation``
        measure the errors, the others train.
    depth : int, default=8
        Tree depth of every FFF (>= 0).
    layers : sequence of int, optional
        Decoder layers whose MLP is replaced (default: all).
    steps, batch_size, lr : int, int, float
        Adam steps (cosine schedule), tokens per step and learning rate, per layer.
    hardening : float, default=3.0
        Final weight of the hardening term of the soft phase.
    soft_share : float, default=0.7
        Share of the steps trained as the soft tree, in [0, 1]; the rest train the hard path.
    heldout : float, default=0.2
        Share of the texts held out, in (0, 1).
    max_tokens : int, default=128
        Most tokens read per text.
    seed : int, default=0
        Seed of the text split, the initialisation and the batches.
    progress : bool, default=True
        Show a progress bar over the layers.

    Returns
    -------
    DistillResult
        The copy with FFFs (run it, certify its depth with :func:`calibrate.fff.fit`), and per-layer errors
        next to a dense MLP of the same evaluated width.
    """
    from calibrate._progress import tqdm

    layers = _layers_iv(layers, len(decoder_layers(model)))
    depth = int_at_least(depth, "depth", 0)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_tokens", max_tokens)):
        int_at_least(value, name)
    lr = finite_positive(lr, "lr")
    hardening = finite_at_least(hardening, "hardening", why=" (the weight of a loss)")
    seed = seed_iv(seed)
    if not 0 < heldout < 1 or not 0 <= soft_share <= 1:
        raise ValueError(f"heldout must lie in (0, 1) and soft_share in [0, 1], got {heldout} and {soft_share}")
    texts = list(texts)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_held = max(1, int(round(heldout * len(texts))))
    if len(texts) - n_held < 1:
        raise ValueError(f"texts must hold at least 2 texts (training and held-out), got {len(texts)}")
    train_texts = [texts[i] for i in order[n_held:]]
    held_texts = [texts[i] for i in order[:n_held]]
    train = mlp_activations(model, tokenizer, train_texts, layers, max_tokens=max_tokens)
    held = mlp_activations(model, tokenizer, held_texts, layers, max_tokens=max_tokens)
    for split, name in ((train, "training"), (held, "held-out")):
        if split[layers[0]][0].shape[0] == 0:
            raise ValueError(f"the {name} texts (split by heldout={heldout}, seed={seed}) have no token: empty texts?")

    student = copy.deepcopy(model).eval()
    student_blocks = decoder_layers(student)
    dtype = next(model.parameters()).dtype
    errors, baselines = [], []
    kw = dict(steps=steps, batch_size=batch_size, lr=lr, hardening=hardening, soft_share=soft_share)
    for i in tqdm(layers, desc="distil MLP blocks", unit="layer", disable=not progress):
        (x, y), (hx, hy) = train[i], held[i]
        d_in, d_out = x.shape[1], y.shape[1]
        layer_seed = torch_seed(seed * 1009 + i)
        init = torch.Generator().manual_seed(layer_seed)  # not torch's global one, which other threads draw from
        layer = FFF(d_in, d_out, depth, generator=init)
        narrow = nn.Sequential(_linear(d_in, depth + 1, init), nn.GELU(), _linear(depth + 1, d_out, init))
        generator = torch.Generator().manual_seed(layer_seed)
        layer = _train(layer, x, y, generator=generator, **kw)
        narrow = _train(narrow, x, y, generator=generator, **kw)
        errors.append(_relative_error(layer, hx, hy))
        baselines.append(_relative_error(narrow, hx, hy))
        student_blocks[i].mlp = layer.to(dtype=dtype, device=next(model.parameters()).device)
    return DistillResult(
        student, tuple(layers), depth, tuple(errors), tuple(baselines),
        int(train[layers[0]][0].shape[0]), int(held[layers[0]][0].shape[0]),
    )  # fmt: skip


def save_blocks(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the FFF blocks of ``model`` (e.g. a :class:`DistillResult`'s ``model``), one safetensors file per layer.

    The rest of the model is the original, saved as usual (``save_pretrained``); :func:`load_blocks` puts
    the blocks back into it, and only into it: ``source.json`` records the model's architecture, layer count,
    width and a sample of its token embeddings. The directory is written aside and renamed into place.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model some of whose decoder layers have an :class:`FFF` as ``.mlp``.
    directory : str or path-like
        Where to write ``layer-00000.safetensors``-style files; must not exist.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    ValueError
        When no decoder layer of ``model`` holds an FFF block.
    FileExistsError
        When ``directory`` exists.
    """
    blocks = {i: layer.mlp for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, FFF)}
    if not blocks:
        raise ValueError("model has no FFF block in place of a decoder layer's MLP (see calibrate.fff.distill)")
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target} exists; save the blocks to a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(target)
    try:
        for i, block in blocks.items():
            block.save(tmp / _BLOCK_FILE.format(i))
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source(model, list(blocks))) + "\n", encoding="utf-8")
        sync_tree(tmp)  # every file on the disk before the rename publishes them
        try:
            tmp.rename(target)
        except OSError as exc:  # another writer's directory got there first
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{target} exists; save the blocks to a new directory") from None
        sync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_blocks(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the FFF blocks written by :func:`save_blocks` into ``model`` in place of its MLPs (in place).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The original model the blocks were distilled from (same layer count and width).
    directory : str or path-like
        A directory written by :func:`save_blocks`.

    Returns
    -------
    torch.nn.Module
        ``model``, its blocks on the model's device and in its dtype.

    Raises
    ------
    ValueError
        When the directory holds no block file, ``model`` is not the model the blocks were distilled from
        (another architecture, layer count, width or token embeddings than ``source.json`` records), or a
        block is unreadable, names a layer the model lacks or has another width than the model's (the message
        names the file); the model is then left unchanged.

    Warns
    -----
    UserWarning
        When the directory records no source model (written without ``source.json``): nothing is compared.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no FFF blocks directory at {root}")
    files = {int(m[1]): p for p in root.iterdir() if (m := re.fullmatch(r"layer-(\d{5})\.safetensors", p.name))}
    if not files:
        raise ValueError(f"{root} holds no FFF block (layer-NNNNN.safetensors files from calibrate.fff.save_blocks)")
    _source_iv(model, root, sorted(files))
    layers = decoder_layers(model)
    param = next(model.parameters())
    width = model.config.hidden_size
    blocks = {}
    for i, file in sorted(files.items()):  # read and check every block before the model is touched
        if i >= len(layers):
            raise ValueError(f"{file} is for decoder layer {i}, but the model has {len(layers)} layers")
        block = FFF.load(file)
        if (block.in_features, block.out_features) != (width, width):
            raise ValueError(
                f"{file} maps {block.in_features} -> {block.out_features} features, the model's MLPs {width} -> {width}"
            )
        _mlp_of(layers[i], i)  # the layer has an MLP block to replace
        blocks[i] = block
    for i, block in blocks.items():
        layers[i].mlp = block.to(dtype=param.dtype, device=param.device).eval()
    return model

"""Exit heads: what a layer "predicts", shared by extraction, measures and the runtime.

A layer's prediction is ``head(scale * norm(adapter_i(h_i))) + bias``: by default the model's own final
norm and LM head (the "logit lens"), shared by every layer, optionally preceded by one affine adapter per
layer (identity-initialised, trained later on frozen states; DESIGN section 13). The same
:class:`ExitHeads` object is used to build the layer cache and to decode, so the two can never disagree.

Layer states are the **raw residual stream** at the output of each decoder layer (before the final norm),
numbered 0..L-1 in code (1..L in the docs). Hugging Face ``hidden_states`` differ in two ways:

- entry 0 is the embedding output, so layer ``i`` is entry ``i + 1`` (off by one);
- the last entry is already passed through the final norm for every supported architecture that has one
  (GPT-2 ``ln_f``, Llama/Mistral/Qwen ``norm``, T5 ``final_layer_norm``, mBART ``layer_norm``): the
  ``capture_outputs`` decorator of transformers 5 replaces it with ``last_hidden_state``, and transformers 4
  appended it after the norm. The raw last state is lost there, so :func:`record_layer_states` reads the
  layers' outputs with forward hooks instead; :meth:`ExitHeads.from_hidden_states` handles the Hugging
  Face tuple for callers that have only that.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch
from torch import nn

from calibrate._digest import _state, generation_digest, model_digest
from calibrate._validation import int_at_least, int_in

__all__ = ["SUPPORTED_ARCHITECTURES", "ExitHeads", "decoder_layers", "forward_hooks", "record_layer_states"]


@dataclass(frozen=True)
class _Arch:
    """Where an architecture keeps its decoder layers, final norm and head (attribute paths)."""

    layers: str
    norm: str | None
    head: str = "lm_head"
    #: The config field that counts the decoder layers.
    count: str = "num_hidden_layers"
    #: Name of an additive logits bias buffer on the model (BART's ``final_logits_bias``).
    bias: str | None = None
    #: Whether the norm may be missing (BART has none, mBART has one).
    optional_norm: bool = False
    #: T5 rescales the normalised state by d_model**-0.5 before a tied head.
    t5_scale: bool = False


_LLAMA = _Arch(layers="model.layers", norm="model.norm")
_BART = _Arch(
    layers="model.decoder.layers",
    norm="model.decoder.layer_norm",
    count="decoder_layers",
    bias="final_logits_bias",
    optional_norm=True,
)

#: ``config.model_type`` -> layout. Extend with care: the head must reproduce the model's logits
#: exactly (tests/test_extract.py checks every entry).
_ARCHITECTURES: dict[str, _Arch] = {
    "gpt2": _Arch(layers="transformer.h", norm="transformer.ln_f"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "t5": _Arch(layers="decoder.block", norm="decoder.final_layer_norm", count="num_decoder_layers", t5_scale=True),
    "bart": _BART,
    "mbart": _BART,
}

#: Model types (``model.config.model_type``) that :meth:`ExitHeads.from_model` understands.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _arch_iv(model) -> tuple[str, _Arch]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type is None:
        raise TypeError(
            f"model must be a Hugging Face PreTrainedModel (an nn.Module with .config.model_type), "
            f"got {type(model).__name__}"
        )
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    arch = _ARCHITECTURES[model_type]
    try:
        layers = _get(model, arch.layers)
        _get(model, arch.head)
    except AttributeError as exc:
        raise ValueError(
            f"{type(model).__name__} (model type {model_type!r}) has no {arch.layers!r} and {arch.head!r}: "
            "load the model with its language-modelling head (AutoModelForCausalLM or AutoModelForSeq2SeqLM)"
        ) from exc
    counted = getattr(config, arch.count, None)
    if counted is not None and counted != len(layers):  # a forward runs the config's count (Llama) or every layer
        raise ValueError(
            f"{type(model).__name__} holds {len(layers)} decoder layers ({arch.layers}) but its config says "
            f"{arch.count}={counted}: set the one to the other (a model pruned or cut by hand)"
        )
    return model_type, arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order (``model.transformer.h``, ``model.model.layers``, ...).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a supported architecture (:data:`SUPPORTED_ARCHITECTURES`) with its LM head.

    Returns
    -------
    torch.nn.ModuleList
        The ``L`` decoder layers; for encoder-decoder models only the decoder's.

    Raises
    ------
    ValueError
        When the architecture is not supported (the message lists the supported ones).
    """
    _, arch = _arch_iv(model)
    return _get(model, arch.layers)


@contextlib.contextmanager
def forward_hooks(hooks: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register ``hook(module, args, output)`` on each module for the block, seeing this thread's forward passes only.

    Another thread running the same model meanwhile (serving it, or extracting too) calls the hooks as well;
    they ignore it, so each caller records its own forward passes. The hooks are removed on exit, also on errors.

    Parameters
    ----------
    hooks : sequence of (torch.nn.Module, callable)
        Each module and its hook, called as ``hook(module, args, output)`` after the module's forward call
        (:meth:`torch.nn.Module.register_forward_hook`); its return value is ignored, so it cannot replace the
        output.

    Yields
    ------
    None
        The hooks are registered for the block.
    """
    owner = threading.get_ident()

    def this_thread(hook: Callable) -> Callable:
        def filtered(module, args, output):
            if threading.get_ident() == owner:
                hook(module, args, output)

        return filtered

    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(this_thread(hook)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_layer_states(model: nn.Module, *, position: int | None = -1) -> Iterator[list[list[torch.Tensor]]]:
    """Record the raw output of every decoder layer at one position, for every forward call.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a supported architecture.
    position : int or None, default=-1
        Sequence position kept from each layer output ``(batch, seq, d)``; ``-1`` is the position whose
        next token the forward call predicts; None keeps every position.

    Yields
    ------
    list of list of torch.Tensor
        ``states[i][c]`` is layer ``i``'s output at ``position`` in the ``c``-th forward call, shape
        ``(batch, d)``, or ``(batch, seq, d)`` when ``position`` is None (detached, on the model's
        device). During greedy ``generate`` call ``c`` is the one that predicts generated token ``c``.

    Notes
    -----
    The hooks read the residual stream as each layer returns it, before the final norm, so the last
    layer's state is raw (unlike ``hidden_states[-1]`` of Hugging Face outputs). Only the calling thread's
    forward calls are recorded (:func:`forward_hooks`); the hooks are removed on exit, also on errors.
    """
    layers = decoder_layers(model)
    states: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook_for(i: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            states[i].append((out if position is None else out[:, position]).detach())

        return hook

    with forward_hooks([(layer, hook_for(i)) for i, layer in enumerate(layers)]):
        yield states


#: ``config.model_type`` values whose position ids start at ``pad_token_id + 1`` (RoBERTa's embeddings).
_POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm")


#: ``config.model_type`` values with relative position buckets: no position table, no limit (t5-small's
#: config.json still holds ``"n_positions": 512``, which Hugging Face's generate does not enforce).
_RELATIVE_POSITIONS = ("t5", "mt5", "umt5", "longt5")


def _context_positions(config) -> tuple[str, int] | None:
    """``(config field, positions a sequence may use)`` for absolute positions; None for relative ones (T5).

    RoBERTa numbers positions from ``pad_token_id + 1``: ``max_position_embeddings - pad_token_id - 1``
    tokens fit (512 of roberta-base's 514).
    """
    if getattr(config, "model_type", None) in _RELATIVE_POSITIONS:
        return None
    name = next((n for n in ("n_positions", "max_position_embeddings") if getattr(config, n, None)), None)
    if name is None:
        return None
    context = int(getattr(config, name))
    if getattr(config, "model_type", None) in _POSITIONS_AFTER_PAD:
        context -= int(getattr(config, "pad_token_id", None) or 0) + 1
    return name, context


def _hash_adapters(weight: torch.Tensor, bias: torch.Tensor) -> str:
    """blake2b digest (32 hex digits) of adapter weights and biases taken as float32, on any device or dtype."""
    h = hashlib.blake2b(digest_size=16)
    for p in (weight, bias):
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ExitHeads(nn.Module):
    """Map a layer's hidden state to next-token logits: shared final norm + LM head, optional adapters.

    ``logits_i = lm_head(scale * norm(A_i h_i + b_i)) + bias`` for layer ``i`` (0-based), where ``norm``,
    ``lm_head``, ``scale`` and ``bias`` are the model's own and ``(A_i, b_i)`` an affine adapter (identity
    when ``adapters=False``). The last layer never has an adapter, so its logits are the model's.

    Build one with :meth:`from_model`. The model's norm and head are shared, not copied, and are not
    submodules: ``parameters()`` and ``state_dict()`` hold only the adapters (small to save and train).

    Parameters
    ----------
    norm : torch.nn.Module or None
        The model's final norm (None: identity, e.g. BART).
    lm_head : torch.nn.Module
        The model's output projection, ``(..., d) -> (..., V)``.
    n_layers : int
        Number of decoder layers ``L`` (>= 1).
    hidden_size : int
        Width ``d`` of the residual stream.
    vocab_size : int
        Number of logits ``V`` the head returns.
    scale : float, default=1.0
        Factor applied after the norm (T5 with tied embeddings: ``d_model ** -0.5``).
    logits_bias : torch.Tensor, optional
        Added to the logits, shape ``(V,)`` or ``(1, V)`` (BART's ``final_logits_bias``); shared, not copied.
    adapters : bool, default=False
        Put a trainable affine adapter ``(d, d)`` + ``(d,)`` in front of the norm for layers
        ``0..L-2``, initialised to the identity (so the logits equal the plain logit lens until trained).
    architecture : str, default="custom"
        Model type, for messages and the cache metadata.
    normalized_last_hidden_state : bool, default=False
        Whether Hugging Face ``hidden_states[-1]`` of this model is already normalised
        (see :meth:`from_hidden_states`).

    Raises
    ------
    TypeError
        When a size is not an int.
    ValueError
        When a size is not positive.

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from calibrate.heads import ExitHeads
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> heads = ExitHeads.from_model(model)
    >>> heads
    ExitHeads(architecture='gpt2', n_layers=2, hidden_size=16, vocab_size=50, adapters=False)
    >>> out = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    >>> logits = heads.from_hidden_states(out.hidden_states)      # (1, 3, L, V)
    >>> torch.allclose(logits[:, :, -1], out.logits, atol=1e-6)
    True
    """

    def __init__(
        self,
        norm: nn.Module | None,
        lm_head: nn.Module,
        *,
        n_layers: int,
        hidden_size: int,
        vocab_size: int,
        scale: float = 1.0,
        logits_bias: torch.Tensor | None = None,
        adapters: bool = False,
        architecture: str = "custom",
        normalized_last_hidden_state: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("n_layers", n_layers), ("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            int_at_least(value, name)
        if not isinstance(adapters, bool):
            raise TypeError(f"adapters must be a bool, got {adapters!r}")
        if not callable(lm_head):
            raise TypeError(f"lm_head must be a callable module, got {type(lm_head).__name__}")
        # A tuple keeps the model's modules out of this module's parameters and state_dict.
        self._shared = (norm, lm_head, logits_bias)
        self._model: tuple[nn.Module, ...] = ()  # the model of from_model, for describe()'s weights digest
        self.n_layers = n_layers
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.scale = float(scale)
        self.architecture = architecture
        self.normalized_last_hidden_state = bool(normalized_last_hidden_state)
        param = next(iter(lm_head.parameters()), None) if isinstance(lm_head, nn.Module) else None
        kw = {} if param is None else {"dtype": param.dtype, "device": param.device}
        if adapters and n_layers > 1:
            eye = torch.eye(hidden_size, **kw).expand(n_layers - 1, hidden_size, hidden_size)
            self.adapter_weight = nn.Parameter(eye.clone())  # (L-1, d_out, d_in)
            self.adapter_bias = nn.Parameter(torch.zeros(n_layers - 1, hidden_size, **kw))  # (L-1, d)
        else:
            self.adapter_weight = None
            self.adapter_bias = None

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, *, adapters: bool = False) -> ExitHeads:
        """The model's own final norm and LM head, shared by every decoder layer.

        Parameters
        ----------
        model : transformers.PreTrainedModel
            GPT-2, Llama/Mistral/Qwen2/Qwen3 (``*ForCausalLM``), T5, BART or mBART
            (``*ForConditionalGeneration``); see :data:`SUPPORTED_ARCHITECTURES`.
        adapters : bool, default=False
            Add identity-initialised affine adapters for layers ``0..L-2``.

        Returns
        -------
        ExitHeads

        Raises
        ------
        ValueError
            When the architecture is not supported, naming it and the supported ones.
        TypeError
            When ``model`` is not a Hugging Face model.

        Notes
        -----
        ============================  ===============================  ==============  ==========================
        model type                    final norm                       head            extra
        ============================  ===============================  ==============  ==========================
        gpt2                          ``transformer.ln_f``             ``lm_head``
        llama, mistral, qwen2, qwen3  ``model.norm``                   ``lm_head``
        t5                            ``decoder.final_layer_norm``     ``lm_head``     ``* d_model**-0.5`` if tied
        bart, mbart                   ``model.decoder.layer_norm``     ``lm_head``     ``+ final_logits_bias``
                                      (mBART only; BART has none)
        ============================  ===============================  ==============  ==========================
        """
        model_type, arch = _arch_iv(model)
        config = model.config
        layers = _get(model, arch.layers)
        lm_head = _get(model, arch.head)
        norm = None
        if arch.norm is not None:
            try:
                norm = _get(model, arch.norm)
            except AttributeError:
                if not arch.optional_norm:
                    raise
        scale = 1.0
        if arch.t5_scale:
            # transformers >= 5 stores the choice as `scale_decoder_outputs`; 4.x reads tie_word_embeddings.
            tied = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
            if tied:
                scale = config.d_model**-0.5
        bias = getattr(model, arch.bias, None) if arch.bias else None
        hidden_size = getattr(lm_head, "in_features", None) or config.hidden_size
        vocab_size = getattr(lm_head, "out_features", None) or config.vocab_size
        heads = cls(
            norm,
            lm_head,
            n_layers=len(layers),
            hidden_size=int(hidden_size),
            vocab_size=int(vocab_size),
            scale=scale,
            logits_bias=bias,
            adapters=adapters,
            architecture=model_type,
            normalized_last_hidden_state=norm is not None,
        )
        heads._model = (model,)  # a tuple: not a submodule; describe() digests its weights
        return heads

    # ---- forward --------------------------------------------------------------------------------

    @property
    def has_adapters(self) -> bool:
        """Whether the heads have per-layer adapters."""
        return self.adapter_weight is not None

    def _adapt(self, hidden: torch.Tensor, layer: int | None) -> torch.Tensor:
        """Layer ``layer``'s adapter in front of the shared norm + head (identity without adapters and for the
        last layer); ``layer=None``: every layer's, ``hidden`` of shape ``(..., L, d)``."""
        if self.adapter_weight is None:
            return hidden
        if layer is not None:
            if layer == self.n_layers - 1:
                return hidden
            # in the adapters' dtype: T5 loaded in float16 has float32 states (its MLP outputs kept in float32)
            return hidden.to(self.adapter_weight.dtype) @ self.adapter_weight[layer].T + self.adapter_bias[layer]
        # hidden: (..., L, d); the last layer passes through unchanged.
        head = hidden[..., :-1, :].to(self.adapter_weight.dtype)  # (..., L-1, d)
        adapted = torch.einsum("...ld,led->...le", head, self.adapter_weight) + self.adapter_bias
        return torch.cat([adapted, hidden[..., -1:, :]], dim=-2)

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the model's output layer, in which states are fed to the heads (CPU float32 for a
        head without parameters)."""
        head = self._shared[1]
        param = next(iter(head.parameters()), None) if isinstance(head, nn.Module) else None
        return (torch.device("cpu"), torch.float32) if param is None else (param.device, param.dtype)

    def _project(self, normed: torch.Tensor) -> torch.Tensor:
        _, lm_head, bias = self._shared
        if self.scale != 1.0:
            normed = normed * self.scale
        logits = lm_head(normed)
        if bias is not None:
            logits = logits + bias.to(logits.device).reshape(-1)
        return logits

    def forward(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Next-token logits of raw layer states.

        Parameters
        ----------
        hidden : torch.Tensor
            Raw residual states (before the final norm): shape ``(..., L, d)`` for every layer at once
            when ``layer`` is None, else ``(..., d)`` for layer ``layer``.
        layer : int, optional
            0-based layer index in ``[0, L)``.

        Returns
        -------
        torch.Tensor
            Logits ``(..., L, V)`` or ``(..., V)``, in the head's dtype.

        Raises
        ------
        ValueError
            When ``layer`` is out of range or the shapes do not match.
        """
        if layer is not None:
            int_in(layer, "layer", 0, self.n_layers - 1, f" (0-based, n_layers={self.n_layers})")
        elif hidden.ndim < 2 or hidden.shape[-2] != self.n_layers:
            raise ValueError(
                f"hidden must have shape (..., n_layers={self.n_layers}, d) when layer is None, got "
                f"{tuple(hidden.shape)}"
            )
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden must have last dimension hidden_size={self.hidden_size}, got {tuple(hidden.shape)}"
            )
        norm = self._shared[0]
        x = self._adapt(hidden, layer)
        if norm is not None:
            x = norm(x)
        return self._project(x)

    def from_hidden_states(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits of every layer from a Hugging Face ``hidden_states`` tuple.

        Parameters
        ----------
        hidden_states : sequence of torch.Tensor
            ``L + 1`` tensors ``(batch, seq, d)``: the embedding output, then one per layer, the last one
            already normalised when ``normalized_last_hidden_state`` is true (as the model returns it with
            ``output_hidden_states=True``; ``decoder_hidden_states`` for encoder-decoder models).

        Returns
        -------
        torch.Tensor, shape (batch, seq, L, V)
            Logits of each layer; the last layer's equal the model's own logits.

        Raises
        ------
        ValueError
            When the tuple does not have ``n_layers + 1`` entries.
        """
        if len(hidden_states) != self.n_layers + 1:
            raise ValueError(
                f"hidden_states must have n_layers + 1 = {self.n_layers + 1} entries (embedding output first), "
                f"got {len(hidden_states)}"
            )
        layers = torch.stack(tuple(hidden_states[1:]), dim=-2)  # (B, S, L, d): drop the embedding output
        if not self.normalized_last_hidden_state:
            return self(layers)
        norm = self._shared[0]
        # Layers 0..L-2 are raw; the last one went through the final norm inside the model already.
        x = self._adapt(layers, None)
        normed = torch.cat([norm(x[..., :-1, :]), x[..., -1:, :]], dim=-2)
        return self._project(normed)

    def describe(self, *, fresh: bool = False) -> dict:
        """A JSON-serialisable description, stored in the cache metadata and the certificate.

        With adapters, ``"adapters_digest"`` is a blake2b digest of their float32 weights, so heads with
        other trained adapters are told apart; it is hashed again only when they changed (replaced, edited in
        place, moved, cast, or through ``.data`` at one of 16 sampled values each), or always with
        ``fresh=True``, as for what is written down for good (files, caches, certificates; so is then the model
        digest). For heads made by
        :meth:`from_model`, ``"model_digest"`` is a SHA-256 digest of what the model computes: every weight
        and buffer and each submodule's settings (computed now, ~0.3 s for a 135M model in float32, then
        reused until a tensor changes), so a certificate is refused on other weights of the same architecture
        and sizes (e.g. a fine-tuned copy, or the model cast to another dtype) or on the same weights
        computing otherwise (e.g. another rope scaling); None for heads built otherwise. ``"generation"``
        digests the model's generation-config settings that shape greedy decoding (EOS and pad ids, logits
        processors such as ``repetition_penalty``), on which extracted and decoded outputs depend; None likewise.
        """
        return {
            "kind": "adapters" if self.has_adapters else "logit_lens",
            "adapters_digest": self._adapters_digest(fresh) if self.has_adapters else None,
            "model_digest": model_digest(self._model[0], fresh=fresh) if self._model else None,
            "generation": generation_digest(self._model[0]) if self._model else None,
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "scale": self.scale,
            "logits_bias": self._shared[2] is not None,
            "norm": self._shared[0] is not None,
        }

    def _adapters_digest(self, fresh: bool) -> str:
        """:func:`_hash_adapters` of the adapters, recomputed when they changed or ``fresh``: the runtime checks
        it at every call, and hashing copies every adapter to the CPU."""
        state = _state([("weight", self.adapter_weight), ("bias", self.adapter_bias)])
        memo = self.__dict__.get("_adapters_memo")
        if fresh or memo is None or memo[0] != state:
            memo = (state, _hash_adapters(self.adapter_weight, self.adapter_bias))
            self.__dict__["_adapters_memo"] = memo
        return memo[1]

    def extra_repr(self) -> str:
        return (
            f"architecture={self.architecture!r}, n_layers={self.n_layers}, hidden_size={self.hidden_size}, "
            f"vocab_size={self.vocab_size}, adapters={self.has_adapters}"
        )

    def __repr__(self) -> str:
        return f"ExitHeads({self.extra_repr()})"


def _heads_iv(heads, model: nn.Module) -> ExitHeads:
    """``heads`` for reading ``model``'s layers: the model's own (:meth:`ExitHeads.from_model`) when None.

    One check for every caller that runs ``model`` through ``heads`` (:func:`calibrate.extract`, the runtime's
    ``generate``), so that they accept and refuse the same heads.

    Raises
    ------
    TypeError
        When ``heads`` is neither None nor an :class:`ExitHeads`.
    ValueError
        When ``heads`` were made by :meth:`ExitHeads.from_model` from another model than ``model`` (another
        ``model_digest``: other weights, even of the same architecture and sizes), or from ``model`` before its LM
        head was resized or replaced (``resize_token_embeddings``), or hold adapters in another dtype or on another
        device than the model's output layer.
    """
    if heads is None:
        return ExitHeads.from_model(model)
    if not isinstance(heads, ExitHeads):
        raise TypeError(f"heads must be an ExitHeads (or None for the model's own), got {type(heads).__name__}")
    if heads._model and heads._model[0] is not model and model_digest(heads._model[0]) != model_digest(model):
        made, here = (_dtypes(m) for m in (heads._model[0], model))
        why = (
            f"the model they were made from runs in {made}, this one in {here}, whether or not the weights are "
            "the same: make them from this model (heads=None; adapters: save_adapters, then "
            "calibrate.adapters.load_adapters(model, FILE))"
            if made != here
            else "other weights"
        )
        raise ValueError(
            f"heads were made (ExitHeads.from_model) from another model than the one decoding ({why}): "
            "a layer would be read through another model's norm and LM head"
        )
    head = _get(model, _arch_iv(model)[1].head) if heads._model and heads._model[0] is model else None
    rows = getattr(getattr(head, "weight", None), "shape", (heads.vocab_size,))[0]  # tied embeddings: the same module
    if head is not None and (head is not heads._shared[1] or rows != heads.vocab_size):
        raise ValueError(
            "heads were made (ExitHeads.from_model) before the model's LM head was resized or replaced "
            "(resize_token_embeddings?): a layer would be read through the old head; make the heads again (or load "
            "the adapters again)"
        )
    device, dtype = heads._placement()
    if heads.has_adapters and (heads.adapter_weight.dtype, heads.adapter_weight.device) != (dtype, device):
        raise ValueError(
            f"the heads' adapters are {heads.adapter_weight.dtype} on {heads.adapter_weight.device} but the model runs "
            f"in {dtype} on {device}: load the adapters after moving the model "
            "(calibrate.adapters.load_adapters(model, path)); a certificate holds for the dtype it was calibrated in"
        )
    return heads


def _dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as extraction records it in a cache's meta, e.g. ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _dtypes(model: nn.Module) -> str:
    """The dtypes of a model's parameters, e.g. ``"float16"``, or ``"float16 and float32"`` where some modules are
    kept in float32 (T5 loaded in float16)."""
    return " and ".join(sorted({_dtype_name(p.dtype) for p in model.parameters()}))


def _cache_model_iv(heads: ExitHeads, cache) -> None:
    """Refuse ``heads`` made from another model than the one ``cache`` was extracted from (their ``model_digest``
    differs; not checked when either records none), whose hidden states and tokens they would misread."""
    recorded = (cache.user_meta.get("heads") or {}).get("model_digest")
    current = heads.describe()["model_digest"]
    if recorded is not None and current is not None and recorded != current:
        made_from = heads._model[0] if heads._model else None  # extraction records its model's first parameter's
        dtype = next(made_from.parameters()).dtype if made_from is not None else heads._placement()[1]
        extracted, here = cache.user_meta.get("dtype"), _dtype_name(dtype)
        hint = (
            f" (the cache was extracted in {extracted}, the heads' model runs in {here}: load it in {extracted})"
            if isinstance(extracted, str) and extracted != here
            else ""
        )
        raise ValueError(
            f"the heads come from another model than the cache (model_digest {current!r}, the cache's {recorded!r})"
            f"{hint}: its hidden states and full-model tokens are that model's; extract the cache with the heads' "
            "model"
        )

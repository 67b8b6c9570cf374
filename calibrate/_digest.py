"""Short digests of a torch module: of its weights (files, resume identities) and of what it computes
(certificates record it and runtimes refuse another model's)."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import weakref
from typing import Any

#: (module, kind) -> (state key, digest): the last digest of each module's parameters or buffers, reused while
#: none of them changed.
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Values per tensor read into the state key, at evenly spaced positions.
_SAMPLE = 16


def _state(tensors: list) -> tuple:
    """What changes whenever one of the named ``tensors`` does: its object, in-place version counter (none for a
    tensor made in inference mode), storage, dtype, device, shape, and a sample of its values (an in-place edit
    through ``p.data`` bumps no version counter)."""
    import torch

    if not tensors:
        return ()
    with torch.no_grad():
        sample = torch.cat(
            [t.detach().reshape(-1)[:: max(1, t.numel() // _SAMPLE)][:_SAMPLE].float().cpu() for _, t in tensors]
        )
    return (
        *(
            (name, id(t), -1 if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))
            for name, t in tensors
        ),
        sample.numpy().tobytes(),
    )


def _tensors_digest(module, kind: str, fresh: bool) -> str:
    """SHA-256 over the name, dtype, shape and bytes of each of ``module``'s parameters or buffers (``kind``),
    memoised on :func:`_state` unless ``fresh``."""
    # Every registration of a buffer: dynamic rope re-registers inv_freq as original_inv_freq's object.
    tensors = list(module.named_parameters() if kind == "parameters" else module.named_buffers(remove_duplicate=False))
    if kind == "buffers":
        tensors = _initial_rope(module, tensors)
    state = _state(tensors)
    last = _LAST.setdefault(module, {}).get(kind)
    if not fresh and last is not None and last[0] == state:
        return last[1]
    digest = hash_tensors(tensors)
    _LAST[module][kind] = (state, digest)
    return digest


def _initial_rope(module, buffers: list) -> list:
    """``module``'s ``buffers`` with each rotary ``inv_freq`` that calls rewrite replaced by its ``original_inv_freq``
    (the same values until a call changes them): Hugging Face's longrope and dynamic rope rewrite ``inv_freq`` on
    each call from the original and the call's longest position, so the last call's frequencies are no property
    of the model. Other rope types' ``inv_freq`` is hashed as it is (an edit of it changes what the model computes)."""
    named = dict(buffers)
    out = []
    for name, tensor in buffers:
        head, dot, leaf = name.rpartition(".")
        original = f"{head}{dot}{leaf.removesuffix('inv_freq')}original_inv_freq"
        if leaf.endswith("inv_freq") and not leaf.endswith("original_inv_freq") and original in named:
            rope_type = getattr(module.get_submodule(head), "rope_type", None)
            if isinstance(rope_type, dict):  # per layer type, whose buffers are named f"{layer_type}_inv_freq"
                rope_type = rope_type.get(leaf.removesuffix("_inv_freq"))
            if isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope"):
                tensor = named[original]
        out.append((name, tensor))
    return out


def _unwrapped(module):
    """The module that ``torch.compile`` wrapped in ``module`` (the same weights, named under ``_orig_mod.``), else
    ``module``."""
    inner = getattr(module, "_orig_mod", None) if type(module).__name__ == "OptimizedModule" else None
    return module if inner is None else inner


def hash_tensors(tensors) -> str:
    """16 hex digits of SHA-256 over the name, dtype, shape and bytes of each ``(name, tensor)`` (no memo)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1).contiguous()
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        h.update((flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)).cpu().numpy().data)
    return h.hexdigest()[:16]


def weights_digest(module, *, fresh: bool = False) -> str:
    """16 hex digits of SHA-256 over every parameter's name, dtype, shape and bytes (needs torch).

    Any change of any weight changes it, on any device (the bytes are hashed on the CPU). Hashing runs at
    about 2 GB/s (0.3 s for SmolLM2-135M in float32); unless ``fresh``, it runs only when a parameter changed
    since the module's last digest: in place, replaced, moved, cast, or (through ``p.data``, which bumps no
    version counter) at one of 16 sampled positions per parameter. Pass ``fresh=True`` where the digest is
    written down for good (files, resume identities). What ``torch.compile`` returns has its original's digest.
    """
    return _tensors_digest(_unwrapped(module), "parameters", fresh)


#: Configuration keys that do not change what a loaded model computes: training-only, bookkeeping, output options.
_NOT_COMPUTED = re.compile(
    r"dropout|pdrop|initializer|^_|transformers_version|architectures|dtype$|use_cache|^output_|return_dict|label2id|id2label"
)


def _config_settings(module) -> str:
    """A Hugging Face model's configuration (the non-default keys) that shapes what it computes, as JSON; "" for
    other modules. Flags kept as plain attributes (GPT-2's ``scale_attn_by_inverse_layer_idx``, T5's relative
    attention distance, BART's ``scale_embedding``) are in no weight, buffer or ``extra_repr``."""
    to_diff_dict = getattr(getattr(module, "config", None), "to_diff_dict", None)
    if not callable(to_diff_dict):
        return ""
    kept = {key: value for key, value in to_diff_dict().items() if not _NOT_COMPUTED.search(key)}
    return json.dumps(kept, sort_keys=True, default=str)


#: Options of a Hugging Face generation config that process the logits before a greedy choice, with the values
#: that process nothing. ``model.generate`` and the runtime apply them to the emitting layer's logits.
PROCESSING_OPTIONS = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []),
    "sequence_bias": (None, {}),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None, {}),
}


def _generation_config(source):
    """``source`` if it is a ``GenerationConfig``, else the generation config of a model (None without one)."""
    return source if callable(getattr(source, "to_diff_dict", None)) else getattr(source, "generation_config", None)


def token_id_set(value) -> list[int]:
    """The ids of a config's token-id setting given as one id or a list of them, sorted, without None."""
    return sorted({int(i) for i in (value if isinstance(value, (list, tuple)) else [value]) if i is not None})


def generation_settings(source, *, eos_token_id=None) -> dict[str, Any] | None:
    """What of a Hugging Face generation config shapes greedy decoding: its EOS ids (one id or a list of it
    alike), pad and decoder-start ids, and the :data:`PROCESSING_OPTIONS` set to a value that processes the
    logits (``repetition_penalty=1.0`` is no setting). Decoded outputs, and so a certificate's losses, depend
    on them; sampling, beam and length settings do not.

    ``source`` is a ``GenerationConfig`` or a model with one (None for a module without); ``eos_token_id``
    given (None: the config's) replaces the config's, as a decoding call's argument does.
    """
    config = _generation_config(source)
    if config is None or not callable(getattr(config, "to_diff_dict", None)):
        return None
    eos = getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id
    kept = {key: getattr(config, key, None) for key in ("pad_token_id", "decoder_start_token_id")}
    kept["eos_token_id"] = token_id_set(eos)
    for key, idle in PROCESSING_OPTIONS.items():
        if getattr(config, key, None) not in idle:
            kept[key] = plain_setting(getattr(config, key))
    return kept


def plain_setting(value) -> Any:
    """A generation setting as JSON holds it, all it says kept: an object by its ``to_dict()`` (a watermarking
    config's ``str`` names no parameter), a dict with other keys than strings as its sorted ``[key, value]`` pairs
    (``sequence_bias={(40,): 5.0}``, which ``json.dumps`` refused)."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, dict):
        value = to_dict()
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: plain_setting(v) for key, v in value.items()}
        return sorted(([plain_setting(key), plain_setting(v)] for key, v in value.items()), key=repr)
    if isinstance(value, (list, tuple)):
        return [plain_setting(v) for v in value]
    return value


def search_settings(config) -> list[str]:
    """The settings of a generation config (None: none) under which ``model.generate(do_sample=False)`` searches
    otherwise than greedily (beam search, DoLa, contrastive search), as ``name=value`` texts."""
    found = [f"num_beams={config.num_beams}"] if (getattr(config, "num_beams", None) or 1) > 1 else []
    if getattr(config, "dola_layers", None) is not None:
        found.append(f"dola_layers={config.dola_layers!r}")
    if (getattr(config, "penalty_alpha", None) or 0) > 0 and (getattr(config, "top_k", None) or 0) > 1:
        found.append(f"penalty_alpha={config.penalty_alpha} with top_k={config.top_k}")
    return found


def tokenizer_eos_warning(model, tokenizer) -> None:
    """Warn when the model's generation config has no EOS id and ``tokenizer`` has one: calibration (extraction of
    a cache, decoded mode) stops the outputs there, as ``runtime.generate(..., tokenizer=tokenizer)`` does, but the
    certificate records the config, so a deployment without the tokenizer (``model.generate``, ``custom_generate``,
    ``runtime.generate`` without it) decodes past it unchecked."""
    from calibrate._validation import caller_stacklevel

    config = getattr(model, "generation_config", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if config is not None and getattr(config, "eos_token_id", None) is None and eos is not None:
        warnings.warn(
            f"the model's generation config has no eos_token_id, so the outputs stop at the tokenizer's ({eos}), as "
            "runtime.generate(..., tokenizer=tokenizer) decodes; decoding without the tokenizer (model.generate, "
            f"custom_generate) runs past it, which the certificate does not cover: set "
            f"model.generation_config.eos_token_id = {eos} before calibrating (a held-out cache for a certificate "
            "made so is extracted as its calibration cache was)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def stop_strings_iv(source) -> None:
    """ValueError when the generation config of ``source`` (a model or a ``GenerationConfig``) sets ``stop_strings``:
    the library decodes (and extracts) to EOS ids and ``max_new_tokens``, so it would emit past them."""
    config = _generation_config(source)
    stops = getattr(config, "stop_strings", None)
    if stops:
        raise ValueError(
            f"the generation config sets stop_strings={stops!r}, and early-exit decoding and extraction stop at EOS "
            "ids and max_new_tokens only (model.generate stops at the strings): unset it "
            "(model.generation_config.stop_strings = None) and cut the decoded texts at the strings"
        )


def generation_digest(source) -> str | None:
    """16 hex digits over :func:`generation_settings` of a model or generation config (None without one)."""
    kept = generation_settings(source)
    if kept is None:
        return None
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def decoding_digest(module, *, fresh: bool = False) -> str:
    """:func:`model_digest`, followed for a model with a generation config by ``+`` and its
    :func:`generation_digest`: what a model id records when the certified outputs are decoded."""
    generation = generation_digest(module)
    return model_digest(module, fresh=fresh) + ("" if generation is None else f"+{generation}")


def model_digest(module, *, fresh: bool = False) -> str:
    """16 hex digits identifying what ``module`` computes: its weights (:func:`weights_digest`), its buffers
    (rotary frequencies as initialised, which rope scaling changes; BatchNorm statistics), each submodule's type and
    settings (``extra_repr``: an activation, an epsilon; not a dropout rate, which inference does not use) and, for
    a Hugging Face model, its configuration (without dropout rates, bookkeeping and output options).

    Certificates and model ids record it: a runtime refuses other weights, and also the same weights computing
    something else (e.g. another activation, or another rope scaling). ``fresh`` hashes every tensor again
    (:func:`weights_digest`), as for what is written down for good.
    """
    from torch.nn.modules.dropout import _DropoutNd

    module = _unwrapped(module)  # torch.compile computes what its original does
    settings = "\n".join(
        f"{name}|{type(m).__name__}|{'' if isinstance(m, _DropoutNd) else m.extra_repr()}"
        for name, m in module.named_modules()
    )
    h = hashlib.sha256()
    tensors = (weights_digest(module, fresh=fresh), _tensors_digest(module, "buffers", fresh))
    for part in (*tensors, settings, _config_settings(module)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]

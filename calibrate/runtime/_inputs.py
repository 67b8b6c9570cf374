"""Input validation of the early-exit runtime: each ``_*_iv`` helper checks and normalises what a run needs.

:func:`_generate_iv` gathers their results into a :class:`_Run`, which the loop trusts; this module imports torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from calibrate._digest import generation_settings, search_settings, token_id_set
from calibrate._validation import caller_stacklevel, int_at_least
from calibrate.certificate import Certificate, _budget_warning
from calibrate.concat import _heads_difference
from calibrate.exits import Decay
from calibrate.fit import _FROM_FLOAT16_STATES
from calibrate.heads import ExitHeads, _context_positions, _heads_iv, decoder_layers
from calibrate.runtime._layers import LayerAdapter, adapter_for
from calibrate.runtime._measures import RUNTIME_MEASURES, RuntimeMeasure, _classifier_features_iv, build_measure
from calibrate.runtime._result import EarlyExitConfig
from measures.confidence import _SOFTMAX_MEASURES, _source


@dataclass(frozen=True)
class _Encoder:
    """Encoder input of an encoder-decoder model: its padding mask, and its token ids or output states."""

    mask: torch.Tensor  # (B, S_enc) 1 = token, 0 = padding
    ids: torch.Tensor | None  # (B, S_enc), None when the encoder already ran
    states: torch.Tensor | None  # (B, S_enc, d) encoder output (custom_generate), else None


@dataclass(frozen=True)
class _Run:
    """Everything the loop needs, validated."""

    adapter: LayerAdapter
    heads: ExitHeads
    measure: RuntimeMeasure | None
    config: EarlyExitConfig
    inputs: tuple[torch.Tensor, torch.Tensor]  # decoder prompt ids and mask, (B, P) each
    encoder: _Encoder | None = None


def _token_ids(value, name: str = "eos_token_id") -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise TypeError(
            f"{name} must be a token id (int) or a list of them, got {value!r:.60}; for a token string use "
            "tokenizer.convert_tokens_to_ids"
        )
    return [int(v) for v in values]


def _certificate_iv(certificate, n_layers: int, heads: ExitHeads) -> tuple[float | None, str | None, Decay | None]:
    if certificate is None:
        return None, None, None
    if not isinstance(certificate, Certificate):
        raise TypeError(f"certificate must be a calibrate.Certificate or None, got {type(certificate).__name__}")
    if certificate.knob != "exit_threshold":
        raise ValueError(
            f"certificate.knob is {certificate.knob!r}, but the early-exit runtime spends only 'exit_threshold' "
            "certificates"
        )
    if certificate.n_layers is not None and certificate.n_layers != n_layers:
        raise ValueError(
            f"the certificate was made for a model with n_layers={certificate.n_layers}, this model has {n_layers} "
            "decoder layers"
        )
    _heads_identity_iv(certificate.heads, heads)
    if certificate.lambda_hat is None:  # "full model only": nothing to measure
        return None, None, None
    _runtime_measure_iv(certificate)
    decay = certificate.decay
    if decay is not None and not isinstance(decay, Decay):
        decay = Decay(**dict(decay))
    return float(certificate.lambda_hat), certificate.measure, decay


def _runtime_measure_iv(certificate: Certificate) -> None:
    """The certificate's measure is one the runtime computes, as it was calibrated (not a top-k bound, not a
    classifier on top-k features)."""
    if certificate.measure not in RUNTIME_MEASURES:
        raise ValueError(
            f"certificate.measure must be one of {RUNTIME_MEASURES} for the runtime, got {certificate.measure!r}"
        )
    from_topk = (certificate.measure_state or {}).get("from_topk") if certificate.measure in _SOFTMAX_MEASURES else None
    if from_topk is not None:
        raise ValueError(
            f"the certificate's {certificate.measure!r} confidence is {_source(from_topk)}; the runtime computes "
            "its value on the full softmax, which differs on the same tokens: calibrate on a cache that stores "
            f"{certificate.measure!r} (calibrate.extract does), or in decoded mode"
        )
    state = dict(certificate.measure_state or {})
    if certificate.measure == "state_saturation" and state not in ({}, _FROM_FLOAT16_STATES):
        raise ValueError(
            f"the certificate's state_saturation has measure_state {state!r}, which the runtime does not know (None: "
            f"the model's states, {_FROM_FLOAT16_STATES}: states rounded as a cache stores them)"
        )
    if certificate.measure == "classifier" and isinstance(certificate.measure_state, Mapping):
        _classifier_features_iv(certificate.measure_state.get("features", "hidden"))  # a bad state: refused later


def _call_settings_iv(model, certificate, source=None, *, eos_token_id=None, width: int = 0) -> None:
    """Refuse decoding settings of this call that differ from the model's generation config, under which the
    certificate was calibrated (one that records it: exit thresholds in ``heads``, token elimination in its
    model id): a ``generation_config`` into which ``model.generate`` merged the call's arguments (``source``,
    for prompts ``width`` tokens wide), or EOS ids passed to the call.

    Compared as they act on what is emitted: the pad id only fills rows after their EOS, and ``min_length``
    (which ``generate`` sets to the prompt width plus ``min_new_tokens``) as the least number of new tokens.
    """
    calibrated = generation_settings(model)
    if certificate is not None and certificate.heads is not None and not _records_generation(certificate):
        warnings.warn(
            "the certificate records the exit heads but not the generation config it was calibrated under (made by "
            "an older calm-calibrate): EOS ids and logits processors such as repetition_penalty cannot be checked "
            "against it, and decoding under others is not what it certifies; refit it to record them",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    if not _records_generation(certificate) or calibrated is None:
        return
    eos = None if eos_token_id is None else _token_ids(eos_token_id)
    here = generation_settings(model if source is None else source, eos_token_id=eos)
    calibrated, here = (_as_emitted(settings, width) for settings in (calibrated, here))
    differ = sorted(key for key in calibrated.keys() | here.keys() if calibrated.get(key) != here.get(key))
    if differ:
        changes = ", ".join(f"{key}={here.get(key)!r} (the config's: {calibrated.get(key)!r})" for key in differ)
        raise ValueError(
            f"this call decodes with other settings than the model's generation config, under which the certificate "
            f"was calibrated: {changes}; what is decoded differs and the certificate says nothing of it: drop them, "
            "or calibrate with them set in model.generation_config"
        )


def _records_generation(certificate) -> bool:
    """Whether ``certificate`` records the generation config it was calibrated under (in ``heads`` for exit
    thresholds, in the model id for token elimination)."""
    return certificate is not None and (certificate.knob == "token_keep" or "generation" in (certificate.heads or {}))


def _as_emitted(settings: dict, width: int) -> dict:
    """:func:`generation_settings` as they act on the tokens emitted after a prompt ``width`` tokens wide."""
    least = max(settings.get("min_new_tokens") or 0, (settings.get("min_length") or 0) - width)
    kept = {k: v for k, v in settings.items() if k not in ("pad_token_id", "min_length", "min_new_tokens")}
    for key in ("forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens"):  # an id or a list of them alike
        if kept.get(key) is not None:
            kept[key] = token_id_set(kept[key])
    return kept | ({"least_new_tokens": least} if least > 0 else {})


def _heads_identity_iv(recorded, heads: ExitHeads) -> None:
    """Refuse exit heads that differ from those the certificate was calibrated with (``certificate.heads``).

    Only the keys both descriptions have are compared, so certificates written by another library
    version (fewer or more keys) stay usable; None (old or synthetic certificates) checks nothing.
    """
    if recorded is None:
        return
    current = heads.describe()
    differ = _heads_difference(current, recorded)
    if differ:
        details = "; ".join(f"{key}: certificate {recorded[key]!r}, heads {current[key]!r}" for key in differ)
        if set(differ) <= {"kind", "adapters_digest"} and recorded.get("kind") == "logit_lens":
            advice = (
                "the certificate was calibrated with the model's own heads: pass heads=None (command line: no "
                "--adapters)"
            )
        elif differ == ["generation"]:  # the same model, decoding with other logits processors or special tokens
            advice = (
                "the model's generation config (EOS or pad ids, logits processors such as repetition_penalty or "
                "min_length) differs from the one the certificate was calibrated with, and with it what is decoded: "
                "restore it, or calibrate with the one deployed"
            )
        elif set(differ) <= {"kind", "adapters_digest"}:  # the same model, other adapters (or none)
            advice = (
                "the certificate was calibrated with other exit heads: pass those (heads="
                "calibrate.adapters.load_adapters(model, FILE); command line: --adapters FILE)"
            )
        else:
            advice = (
                "the model differs from the one the certificate was calibrated with (other weights or config, another "
                "dtype (load it in the dtype it was calibrated in: --dtype on the command line), resized embeddings, "
                "another model): calibrate a certificate for the model as it is deployed"
            )
        raise ValueError(f"certificate.heads does not describe the exit heads used here ({details}): {advice}")


def _special_tokens_iv(model, tokenizer, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int | None]:
    """EOS ids and pad id: the arguments, else the generation config, else the tokenizer (as extraction).

    The pad id falls back to the first EOS id; it is None when there is neither (no row ever ends).
    """
    if tokenizer is not None and not (hasattr(tokenizer, "eos_token_id") and hasattr(tokenizer, "pad_token_id")):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (with eos_token_id and pad_token_id) or None, "
            f"got {type(tokenizer).__name__}"
        )
    gen = getattr(model, "generation_config", None)
    for source in (gen, tokenizer):
        if eos_token_id is None:
            eos_token_id = getattr(source, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(source, "pad_token_id", None)
    eos = tuple(_token_ids(eos_token_id))
    pad = _token_ids(pad_token_id, "pad_token_id")[:1] or list(eos[:1])
    return eos, pad[0] if pad else None


def _ids_iv(
    ids,
    mask,
    model,
    device,
    *,
    left_padded: bool,
    special_tokens: tuple[tuple[int, ...], int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` (ids the ``model`` embeds) and its ``attention_mask`` as long tensors on ``device``.

    Without a mask: with ``special_tokens`` (EOS ids, pad id), the mask ``model.generate`` infers for
    decoder-only prompts, ``input_ids != pad`` when the pad id occurs in ``input_ids`` and is no EOS id;
    else all ones.
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (torch.long, torch.int):
        what = (
            f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        )
        raise TypeError(
            f"input_ids must be an integer (int64 or int32) torch.Tensor of shape (batch, length), got {what}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one row and one token, got shape {tuple(ids.shape)}")
    ids = ids.to(device=device, dtype=torch.long)
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    outside = (ids < 0) | (ids >= rows) if rows is not None else None
    if outside is not None and bool(outside.any()):
        row, col = (int(v) for v in outside.nonzero()[0])
        raise ValueError(
            f"input_ids must be token ids in [0, {rows}) (the model's embedding rows), got {int(ids[row, col])} in row "
            f"{row} at position {col}; a tokenizer with added tokens needs "
            "model.resize_token_embeddings(len(tokenizer))"
        )
    if mask is None and special_tokens is not None:
        eos, pad = special_tokens
        if pad is not None and pad not in eos and bool((ids == pad).any()):
            inferred = (ids != pad).long()
            try:
                return ids, _mask_iv(inferred, ids.shape, device, left_padded=left_padded)
            except ValueError as exc:
                raise ValueError(
                    f"no attention_mask was given, so it was inferred as input_ids != pad_token_id={pad} (as "
                    f"model.generate does) and then: {exc}; if pad_token_id={pad} is also a real token of the prompts, "
                    "pass the tokenizer's attention_mask"
                ) from None
    return ids, _mask_iv(mask, ids.shape, device, left_padded=left_padded)


def _mask_iv(mask, shape: tuple[int, ...], device, *, left_padded: bool) -> torch.Tensor:
    """A 0/1 ``attention_mask`` of ``shape`` (default all ones), every row with a token, as a long tensor."""
    if mask is None:
        return torch.ones(shape, dtype=torch.long, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        what = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask must be a torch.Tensor of shape {tuple(shape)} (that of input_ids), got {what}"
        )
    mask = mask.to(device=device)
    if not bool(((mask == 0) | (mask == 1)).all()):  # before the cast, which rounds a float 0.5 to 0
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = mask.to(dtype=torch.long)
    if left_padded and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "input_ids must be left-padded (attention_mask zeros before ones in every row), as for model.generate: "
            "set tokenizer.padding_side = 'left'"
        )
    if not bool(mask.any(dim=1).all()):
        empty = torch.nonzero(~mask.bool().any(dim=1)).reshape(-1).tolist()
        raise ValueError(f"rows {empty[:10]} of input_ids have no token (attention_mask all 0)")
    return mask


def _decoder_start_iv(model) -> int:
    """``decoder_start_token_id`` of the generation config, else its ``bos_token_id`` (as ``model.generate``)."""
    gen = model.generation_config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else gen.bos_token_id
    ids = _token_ids(start, "decoder_start_token_id")
    if len(ids) != 1:
        raise ValueError(
            "encoder-decoder decoding starts from one token: model.generation_config.decoder_start_token_id (or "
            f"bos_token_id) must be one int, got {start!r}"
        )
    return ids[0]


def _context_iv(model, adapter: LayerAdapter, prompt_mask: torch.Tensor, encoder: _Encoder | None, max_new_tokens):
    """Refuse sequences longer than the model's positions or sliding window (nothing is truncated)."""
    config = model.config
    longest = int(prompt_mask.sum(dim=1).max())
    used = longest + max_new_tokens - 1  # positions the decoder sees: the last new token is never fed back
    name, context = _context_positions(config) or (None, None)
    if context is not None and used > context:
        what = "the decoder prompt (start token)" if encoder is not None else "the longest prompt"
        raise ValueError(
            f"{what} ({longest} tokens) + max_new_tokens={max_new_tokens} needs {used} positions (the last new "
            f"token is never fed back), more than the model's context config.{name}={context}; shorten it or "
            "lower max_new_tokens (nothing is truncated)"
        )
    if context is not None and encoder is not None and encoder.ids is not None and encoder.ids.shape[1] > context:
        raise ValueError(
            f"input_ids has {encoder.ids.shape[1]} columns, more than the encoder's context config.{name}={context}; "
            "shorten the inputs (nothing is truncated)"
        )
    window = adapter.sliding_window
    if window is not None and used > window:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} needs {used} positions, more "
            f"than the sliding window {window}; sliding-window attention is not implemented by the runtime"
        )


def _hf_equality_warnings(model, dtype: torch.dtype, *, beams: bool) -> None:
    """Warn of model settings under which the tokens can differ from ``model.generate(do_sample=False)``'s:
    beam search in its generation config (``beams``; decoding is greedy), eager attention in half precision
    (the runtime attends with ``scaled_dot_product_attention``, which rounds otherwise)."""
    search = search_settings(getattr(model, "generation_config", None))
    if beams and search:
        warnings.warn(
            f"the model's generation config asks for another search than greedy ({', '.join(search)}); early-exit "
            "decoding is greedy, as model.generate(..., num_beams=1, dola_layers=None, penalty_alpha=None) is",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    if getattr(model.config, "_attn_implementation", None) == "eager" and dtype in (torch.float16, torch.bfloat16):
        warnings.warn(
            f"the model attends eagerly in {dtype}; the runtime uses scaled_dot_product_attention, which rounds "
            "otherwise in half precision, so its full-model tokens can differ from model.generate's: load the "
            "model with attn_implementation='sdpa' (the default) for equality",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def _generate_iv(
    model,
    input_ids,
    attention_mask,
    certificate,
    max_new_tokens,
    heads,
    exit_layer,
    special_tokens,
    encoder_states: torch.Tensor | None = None,
) -> _Run:
    layers = decoder_layers(model)  # raises for architectures the heads do not know
    adapter = adapter_for(model, layers)  # raises for architectures the runtime does not decode
    n_layers = len(layers)
    max_new_tokens = int_at_least(max_new_tokens, "max_new_tokens")
    device = adapter.device
    # Prompts: the decoder's (left-padded; positions count real tokens), and the encoder's input if any.
    encoder = None
    if not adapter.encoder_decoder:
        prompt_ids, prompt_mask = _ids_iv(
            input_ids, attention_mask, model, device, left_padded=True, special_tokens=special_tokens
        )
    elif encoder_states is None:  # generate(): input_ids feed the encoder, padded on either side
        ids, mask = _ids_iv(input_ids, attention_mask, model, device, left_padded=False)
        encoder = _Encoder(mask, ids, None)
        prompt_ids = torch.full((ids.shape[0], 1), _decoder_start_iv(model), dtype=torch.long, device=device)
        prompt_mask = torch.ones_like(prompt_ids)
    else:  # custom_generate: model.generate ran the encoder; input_ids are the decoder prompt it prepared
        prompt_ids, prompt_mask = _ids_iv(input_ids, None, model, device, left_padded=True)
        states = encoder_states.to(device=device, dtype=adapter.dtype)
        if states.ndim != 3 or states.shape[0] != prompt_ids.shape[0] or states.shape[2] != adapter.hidden_size:
            raise ValueError(
                f"encoder_outputs must hold a state of shape (batch={prompt_ids.shape[0]}, length, "
                f"{adapter.hidden_size}), got {tuple(states.shape)}"
            )
        encoder = _Encoder(_mask_iv(attention_mask, states.shape[:2], device, left_padded=False), None, states)
    _context_iv(model, adapter, prompt_mask, encoder, max_new_tokens)
    # Heads and exit rule.
    heads = _heads_iv(heads, model)
    if heads.n_layers != n_layers or heads.hidden_size != adapter.hidden_size:
        raise ValueError(
            f"heads has n_layers={heads.n_layers}, hidden_size={heads.hidden_size} but the model has "
            f"{n_layers} decoder layers of width {adapter.hidden_size}"
        )
    lambda_hat, measure_name, decay = _certificate_iv(certificate, n_layers, heads)
    _budget_warning(certificate, max_new_tokens)
    if exit_layer is not None:
        if certificate is not None:
            raise ValueError("pass either certificate or exit_layer, not both")
        exit_layer = int_at_least(exit_layer, "exit_layer")
        if exit_layer > n_layers:
            raise ValueError(f"exit_layer must lie in [1, n_layers={n_layers}], got {exit_layer}")
    measure = None
    if measure_name is not None:
        measure = build_measure(
            measure_name,
            state=certificate.measure_state,
            n_layers=n_layers,
            hidden_size=adapter.hidden_size,
            vocab_size=heads.vocab_size,
            device=device,
        )
    eos, pad_token_id = special_tokens
    run_config = EarlyExitConfig(
        max_new_tokens=max_new_tokens,
        n_layers=n_layers,
        lambda_hat=lambda_hat,
        measure=measure_name,
        decay=decay,
        exit_layer=exit_layer,
        eos_token_ids=eos,
        pad_token_id=0 if pad_token_id is None else pad_token_id,  # None: no EOS, so no filler is written
    )
    return _Run(adapter, heads, measure, run_config, (prompt_ids, prompt_mask), encoder)

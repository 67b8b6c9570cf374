"""The Hugging Face side of the runtime: :func:`custom_generate` for ``model.generate(custom_generate=...)``.

Also the logits processors ``model.generate`` builds (:func:`_greedy_processors`); this module imports torch.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from calibrate._digest import search_settings, stop_strings_iv, token_id_set
from calibrate.certificate import Certificate
from calibrate.heads import ExitHeads
from calibrate.models import _eval_mode, _in_training
from calibrate.runtime._inputs import _call_settings_iv, _generate_iv, _hf_equality_warnings, _records_generation
from calibrate.runtime._loop import _decode
from calibrate.runtime._result import EarlyExitOutput

if TYPE_CHECKING:
    from transformers import LogitsProcessorList

__all__ = ["custom_generate"]


def _greedy_processors(
    model,
    prompt: torch.Tensor,
    encoder_ids: torch.Tensor,
    max_new_tokens: int,
    special_tokens,
    *,
    attention_mask: torch.Tensor | None,
    config=None,
) -> LogitsProcessorList | None:
    """The logits processors ``model.generate(do_sample=False)`` builds from the model's generation config, or None.

    E.g. a repetition penalty, n-gram blocking, a minimum length, forced BOS/EOS tokens, suppressed tokens.
    They are built by Hugging Face's own preparation steps (private methods of ``GenerationMixin``), so that
    they are exactly the ones ``model.generate`` applies, for the decoder prompt ``prompt`` ``(B, P)``, the
    encoder input ``encoder_ids`` (the prompt for decoder-only models), ``max_new_tokens``, the
    ``special_tokens`` (EOS ids, pad id) of the run and a decoder-only prompt's ``attention_mask`` ``(B, P)``
    (None for an encoder-decoder model, as generate has no decoder mask): the repetition penalty skips the
    left padding it marks. Token elimination's decoding uses them too. ``config`` replaces the model's generation
    config (one into which ``generate`` merged a call's arguments).
    """
    config = getattr(model, "generation_config", None) if config is None else config
    if config is None:
        return None
    eos, pad = special_tokens
    config = copy.deepcopy(config)
    config.update(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=list(eos) or None, pad_token_id=pad
    )
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=prompt.device)
    model._prepare_generated_length(
        config,
        has_default_max_length=True,
        has_default_min_length=True,
        model_input_name="input_ids",
        input_ids_length=prompt.shape[1],
        inputs_tensor=encoder_ids,
    )
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=prompt.shape[1], encoder_input_ids=encoder_ids,
        device=prompt.device, model_kwargs={"attention_mask": attention_mask},
    )
    return processors if len(processors) else None


def _added_by_call_iv(model, run, config, logits_processor, stopping_criteria, pad_id) -> None:
    """Refuse logits processors and stopping criteria of a call other than those ``generate`` builds from its
    generation config (``logits_processor=``, ``prefix_allowed_tokens_fn=``, ``stopping_criteria=``, whose objects
    ``generate`` adds, or puts in place of its own of the same type): they change what is emitted outside the
    generation config the certificate records. Each must equal one built here, of its type set alike
    (:func:`_settings`); a time limit is taken in either form, as ``max_time`` is.
    """
    from transformers import MaxTimeCriteria, StoppingCriteriaList

    prompt, mask = run.inputs[0], run.inputs[1] if run.encoder is None else None
    eos = token_id_set(config.eos_token_id)
    built = list(
        _greedy_processors(
            model, prompt, prompt, run.config.max_new_tokens, (eos, pad_id), attention_mask=mask, config=config
        ) or ()
    )  # fmt: skip
    built += model._get_stopping_criteria(generation_config=config, stopping_criteria=StoppingCriteriaList())
    extra = []
    for item in [*(logits_processor or ()), *(stopping_criteria or ())]:
        if isinstance(item, MaxTimeCriteria):
            continue
        match = next((i for i, b in enumerate(built) if _same_settings(item, b, run.encoder is not None)), None)
        if match is None:
            extra.append(type(item).__name__)
        else:
            del built[match]
    if extra:
        raise ValueError(
            f"this call decodes with {sorted(extra)} other than those generate builds from the generation config "
            "the certificate was calibrated under (logits_processor=, prefix_allowed_tokens_fn= or "
            "stopping_criteria=): what is decoded differs and the certificate says nothing of it; drop them, or "
            "decode without the certificate"
        )


#: Processors that hold the encoder's input ids, which custom_generate does not see for an encoder-decoder model
#: (a decoder-only model's are its prompt): compared without them there.
_ENCODER_READING = ("EncoderRepetitionPenaltyLogitsProcessor", "EncoderNoRepeatNGramLogitsProcessor")

#: Attributes a processor fills on its first call (sequence bias, bad words): a cache, not a setting.
_PREPARED = ("length_1_bias", "multi_token_biases", "prepared_bias_variables")


def _same_settings(a, b, encoder_decoder: bool) -> bool:
    """Whether two logits processors or stopping criteria are of one type set alike (:func:`_settings`)."""
    return type(a) is type(b) and _equal(_settings(a, encoder_decoder), _settings(b, encoder_decoder))


def _settings(item, encoder_decoder: bool) -> dict:
    """What a logits processor or stopping criterion is set to: its attributes, less what restates the call's
    inputs (an encoder-decoder's encoder ids; a generator seeded from the input at each step) or what its first
    call prepared, and with forms that say the same made one (no padding to skip as None; EOS ids as a set)."""
    encoder = encoder_decoder and type(item).__name__ in _ENCODER_READING
    skipped = _PREPARED + (("encoder_input_ids", "generated_ngrams", "batch_size") if encoder else ())
    kept = {}
    for key, value in vars(item).items():
        if isinstance(value, torch.Generator) or key in skipped:
            continue
        if key == "prompt_ignore_length" and isinstance(value, torch.Tensor) and not value.any():
            value = None
        elif key == "eos_token_id" and isinstance(value, torch.Tensor):
            value = sorted(set(value.reshape(-1).tolist()))
        kept[key] = value
    return kept


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x.cpu(), y.cpu())
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y, strict=True))
    try:
        return bool(x == y)
    except (TypeError, ValueError, RuntimeError):  # objects without a plain equality
        return x is y


#: Generation outputs besides the sequences, which custom_generate does not produce.
_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def custom_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    certificate: Certificate | None = None,
    heads: ExitHeads | None = None,
    exit_layer: int | None = None,
    **model_kwargs,
) -> EarlyExitOutput | torch.Tensor:
    """Early-exit decoding as a Hugging Face decoding method: ``model.generate(..., custom_generate=custom_generate)``.

    Works for decoder-only and encoder-decoder models alike: for the latter ``generate`` runs the encoder
    and passes its output and the decoder prompt, which this function decodes (the encoder is not run
    again).

    Parameters
    ----------
    model, input_ids
        Passed by ``generate``: the model and the left-padded prompts (decoder-only) or the decoder prompt
        ``(batch, 1)`` holding ``decoder_start_token_id`` (encoder-decoder).
    logits_processor, stopping_criteria, generation_config
        Prepared by ``generate``; the processors are applied to the emitted logits (of whatever layer
        exits) and the stopping criteria (EOS, max length, a time limit) end rows, as in greedy ``_sample``: an
        ended row is padded when one criterion stops at EOS, else it decodes on until every row has ended.
    synced_gpus, streamer
        Not supported (``synced_gpus=True`` or a streamer raise).
    certificate, heads, exit_layer
        As in :func:`generate`; ``generate`` forwards them because they are in this signature, e.g.
        ``model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
        custom_generate=custom_generate, certificate=cert)``.
    **model_kwargs
        ``attention_mask`` is used (the encoder's for encoder-decoder models), and so is ``encoder_outputs``
        (the encoder output ``generate`` computed: the encoder does not run twice); ``position_ids``,
        ``use_cache``, ``cache`` and ``logits_to_keep`` prepared by ``generate`` are ignored (positions come
        from the mask, the cache is our own).

    Returns
    -------
    torch.LongTensor or EarlyExitOutput
        As Hugging Face's decoding methods: the sequences ``(batch, length)``, or with
        ``return_dict_in_generate=True`` an :class:`EarlyExitOutput` (``.sequences`` and the exit layer of
        every token).

    Raises
    ------
    ValueError
        As :func:`generate`; also for sampling, beam, DoLa or contrastive search settings, ``stop_strings`` and
        unsupported model kwargs, and, with a certificate, for settings passed to ``generate`` that change what
        greedy decoding emits (EOS ids, logits processors such as ``repetition_penalty``, processors or stopping
        criteria passed as objects) against the model's generation config.
    """
    if synced_gpus or streamer is not None:
        raise ValueError("custom_generate (early exit) supports neither synced_gpus nor a streamer")
    outputs = [k for k in _OUTPUTS if generation_config is not None and getattr(generation_config, k, False)]
    if outputs:
        raise ValueError(
            f"custom_generate (early exit) returns sequences and exit layers only; {outputs} are not supported"
        )
    search = search_settings(generation_config)
    if generation_config is not None and (generation_config.do_sample or search):
        raise ValueError(
            "early-exit decoding is greedy: pass do_sample=False and num_beams=1 to generate (no dola_layers or "
            f"penalty_alpha), got do_sample={generation_config.do_sample}"
            + "".join(f", {setting}" for setting in search)
        )
    stop_strings_iv(generation_config)
    known = {
        "position_ids",
        "use_cache",
        "cache",
        "past_key_values",
        "logits_to_keep",
        "attention_mask",
        "encoder_outputs",
    }
    unknown = sorted(k for k, v in model_kwargs.items() if k not in known and v is not None)
    if unknown:
        raise ValueError(f"custom_generate (early exit) does not support the model kwargs {unknown}")
    attention_mask = model_kwargs.get("attention_mask")
    encoder_outputs = model_kwargs.get("encoder_outputs")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if attention_mask is None and not encoder_decoder:  # generate drops a mask of ones: nothing to infer again
        attention_mask = torch.ones_like(input_ids)
    if encoder_decoder and encoder_outputs is None:
        raise ValueError(
            "custom_generate needs the encoder_outputs that model.generate prepares for encoder-decoder models"
        )
    if encoder_decoder and _in_training(model):  # as its owner left it, whatever another thread's decoding set
        raise ValueError(
            "the model (or a module of it) is in training mode, so model.generate ran its encoder with dropout (it "
            "does not switch to eval mode); call model.eval() first, or decode with calibrate.runtime.generate, which "
            "runs in eval mode"
        )
    if generation_config is None or generation_config.max_length is None:
        raise ValueError("custom_generate needs the generation_config prepared by model.generate (with max_length)")
    max_new_tokens = int(generation_config.max_length) - int(input_ids.shape[1])
    if max_new_tokens < 1:
        raise ValueError(
            f"generation_config.max_length={generation_config.max_length} leaves no room after the prompt width "
            f"{input_ids.shape[1]}; pass max_new_tokens (>= 1) to model.generate"
        )
    pad = generation_config._pad_token_tensor
    pad_id = None if pad is None else int(pad.reshape(-1)[0])
    run = _generate_iv(
        model,
        input_ids,
        attention_mask,
        certificate,
        max_new_tokens,
        heads,
        exit_layer,
        ((), pad_id),  # EOS is handled by the stopping criteria
        encoder_states=None if encoder_outputs is None else encoder_outputs[0],  # (B, S_enc, d)
    )
    _call_settings_iv(model, certificate, generation_config, width=int(input_ids.shape[1]))  # the call's merged in
    if encoder_decoder and certificate is not None and certificate.lambda_hat is not None and input_ids.shape[1] != 1:
        raise ValueError(
            f"decoder_input_ids of {input_ids.shape[1]} tokens: the certificate was calibrated decoding from the "
            "decoder start token alone (a longer decoder prompt skips forced BOS ids and shifts min_length); "
            "decode from the start token, or without the certificate"
        )
    if _records_generation(certificate):
        _added_by_call_iv(model, run, generation_config, logits_processor, stopping_criteria, pad_id)
    _hf_equality_warnings(model, run.adapter.dtype, beams=False)  # generate's own num_beams is checked above
    with _eval_mode(model):
        out = _decode(run, *run.inputs, logits_processor=logits_processor, stopping_criteria=stopping_criteria)
    return out if generation_config.return_dict_in_generate else out.sequences

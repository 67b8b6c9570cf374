"""Input checks of :func:`calibrate.extraction.extract`: the prompts, options and model turned into one run's setup
(token ids, padding and EOS ids, vocab pieces, metadata), and the context check that decoded and lat share too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from calibrate._digest import (
    PROCESSING_OPTIONS,
    plain_setting,
    stop_strings_iv,
    tokenizer_eos_warning,
    weights_digest,
)
from calibrate._validation import caller_stacklevel, int_at_least
from calibrate.heads import _context_positions, _dtype_name, _heads_iv, decoder_layers
from calibrate.runtime._layers import _placement_iv


def _extract_iv(
    model, tokenizer, prompts, max_new_tokens, batch_size, heads, store_hidden, top_k, progress, shard_dir,
    references, ids
):
    layers = decoder_layers(model)  # raises for unsupported architectures
    stop_strings_iv(model)  # the runtime, which spends the certificate, would run past them
    tokenizer_eos_warning(model, tokenizer)
    guidance = getattr(model.generation_config, "guidance_scale", None)
    if guidance not in (None, 1.0):  # its processor runs the model again at each step, past the recording hooks
        raise ValueError(
            f"extract does not record generation with guidance_scale={guidance} (classifier-free guidance runs the "
            "model twice per token): calibrate in decoded mode (calibrate.fit(..., mode='decoded')), which decodes "
            "with it"
        )
    prompts, references = prompts_iv(prompts, references)
    if ids is None:
        ids = [str(i) for i in range(len(prompts))]
    elif isinstance(ids, str) or not isinstance(ids, Sequence) or len(ids) != len(prompts):
        raise ValueError(f"ids must be a sequence with one str per prompt ({len(prompts)}), got {ids!r:.80}")
    ids = list(ids)
    if not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("ids must be distinct str")
    max_new_tokens = int_at_least(max_new_tokens, "max_new_tokens")
    batch_size = int_at_least(batch_size, "batch_size")
    top_k = int_at_least(top_k, "top_k")
    for name, value in (("store_hidden", store_hidden), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    _placement_iv(model)
    heads = _heads_iv(heads, model)  # as the runtime's generate: None, or heads of this model
    if heads.n_layers != len(layers):
        raise ValueError(f"heads has n_layers={heads.n_layers} but the model has {len(layers)} decoder layers")
    if top_k > heads.vocab_size:
        raise ValueError(f"top_k must be <= vocab_size={heads.vocab_size}, got {top_k}")
    if shard_dir is not None:
        if not isinstance(shard_dir, (str, os.PathLike)):
            raise TypeError(f"shard_dir must be a str or os.PathLike, got {type(shard_dir).__name__}")
        if not os.fspath(shard_dir):
            raise ValueError("shard_dir must name a directory, got ''")
        if "://" in os.fspath(shard_dir):  # Path() would make "s3://b/c" the local directory "s3:/b/c"
            raise ValueError(f"shard_dir must be a local directory, got the URL {os.fspath(shard_dir)!r}")
        shard_dir = Path(shard_dir)
        if shard_dir.exists() and not shard_dir.is_dir():
            raise ValueError(f"shard_dir {shard_dir} exists and is not a directory")

    if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (callable, with pad_token_id), got {tokenizer!r:.80}"
        )
    config = model.config
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
    pad_id, pad_source = gen.pad_token_id, "the model's generation_config.pad_token_id"
    if pad_id is None and tokenizer.pad_token_id is not None:
        pad_id, pad_source = tokenizer.pad_token_id, "the tokenizer's pad_token_id"
    elif pad_id is None:
        pad_id, pad_source = (eos_ids[0] if eos_ids else 0), "the EOS id (no pad id is set)"
    pad_id = int(pad_id[0] if isinstance(pad_id, (list, tuple)) else pad_id)
    token_ids = prompt_ids(tokenizer, prompts)
    rows = model.get_input_embeddings().num_embeddings
    if not 0 <= pad_id < rows:  # padded batches, and generate's finished rows, would index past the embedding
        raise ValueError(
            f"the pad id {pad_id} ({pad_source}) is not among the model's {rows} embedding rows: set "
            "model.generation_config.pad_token_id to a valid id (e.g. the EOS id), or after adding a pad token to "
            "the tokenizer call model.resize_token_embeddings(len(tokenizer))"
        )
    for name, seq in zip(ids, token_ids):
        if any(not 0 <= t < rows for t in seq):
            raise ValueError(
                f"prompt {name} tokenises to ids outside the model's {rows} embedding rows ({max(seq)}): a tokenizer "
                "with added tokens needs model.resize_token_embeddings(len(tokenizer))"
            )
    _context_iv(config, encoder_decoder, token_ids, max_new_tokens, names=ids)
    _warn_padding_read(model, token_ids, batch_size)
    vocab = _vocab(tokenizer, heads.vocab_size)
    settings = {
        "decoding": "greedy",
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "padding_side": "right" if encoder_decoder else "left",
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "eos_included": True,
        "top_k": top_k,
        "store_hidden": store_hidden,
        "model_generation_config": json.loads(json.dumps(plain_setting(gen.to_diff_dict()), default=str)),
    }
    import transformers

    meta = {
        "model": getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or None,
        "architecture": config.model_type,
        "is_encoder_decoder": encoder_decoder,
        "dtype": _dtype_name(next(model.parameters()).dtype),
        "generation": settings,
        "heads": heads.describe(fresh=True),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    return {
        "prompts": prompts,
        "references": references,
        "ids": ids,
        "input_ids": token_ids,
        "heads": heads,
        "top_k": top_k,
        "store_hidden": store_hidden,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "encoder_decoder": encoder_decoder,
        "eos_ids": eos_ids,
        "pad_id": pad_id,
        "vocab": vocab,
        "meta": meta,
        "shard_dir": shard_dir,
        "weights": weights_digest(model, fresh=True),  # a resumed run must be the same weights, not just the same path
    }


#: Generation-config options whose logits processors read the padded prompt (Hugging Face's generate passes the
#: whole padded input); of an encoder-decoder model only the encoder's are padded.
_READ_PADDING = (
    "repetition_penalty", "no_repeat_ngram_size", "min_length", "exponential_decay_length_penalty",
    "encoder_repetition_penalty", "encoder_no_repeat_ngram_size",
)  # fmt: skip


def _warn_padding_read(model, token_ids: Sequence[Sequence[int]], batch_size: int) -> None:
    """Warn when a batch of ``token_ids`` needs padding and the model reads it: a logits processor of its generation
    config, or longrope, whose frequencies follow the batch's longest row. Then a prompt's greedy output (the full
    model's too) depends on the batch it is padded in."""
    gen = getattr(model, "generation_config", None)
    names = _READ_PADDING[4:] if getattr(model.config, "is_encoder_decoder", False) else _READ_PADDING
    found = [
        f"its generation config's {n}={getattr(gen, n)!r} (a logits processor)"
        for n in names
        if getattr(gen, n, None) not in PROCESSING_OPTIONS[n]
    ]
    rope = getattr(model.config, "rope_parameters", None) or {}
    if "longrope" in (rope.get("rope_type"), *(v.get("rope_type") for v in rope.values() if isinstance(v, dict))):
        found.append("rope_type='longrope' (frequencies by the batch's longest row)")
    batches = (token_ids[s : s + batch_size] for s in range(0, len(token_ids), batch_size))
    if found and any(len({len(t) for t in batch}) > 1 for batch in batches):
        warnings.warn(
            f"the model reads the padding of a batch's prompts through {', '.join(found)}, as in Hugging Face's "
            "generate: a prompt's output, the full model's too, can depend on the batch it is padded in; "
            "batch_size=1 gives what each prompt decoded alone gives",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def prompts_iv(prompts, references=None) -> tuple[list[str], list[str | None] | None]:
    """``(prompts, references)`` as lists, checked: a non-empty sequence of str, and None or one str or None per
    prompt (every path that takes prompts: extraction, decoded mode, LAT)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of str (one per example), got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"prompts must hold str, got {type(prompts[bad]).__name__} at index {bad}")
    if references is None:
        return prompts, None
    if isinstance(references, str) or not isinstance(references, Sequence) or len(references) != len(prompts):
        raise ValueError(
            f"references must be a sequence with one str or None per prompt ({len(prompts)}), got {references!r:.80}"
        )
    references = list(references)
    bad = next((i for i, r in enumerate(references) if r is not None and not isinstance(r, str)), None)
    if bad is not None:
        raise ValueError(
            f"references must hold str or None, got {type(references[bad]).__name__} {references[bad]!r:.40} at index "
            f"{bad}"
        )
    return prompts, references


def prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids as the model reads them: with the tokenizer's special tokens, but one BOS where the
    text already begins with it (a chat template writes it: ``apply_chat_template(tokenize=True)`` gives one)."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    out = []
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        if isinstance(bos, str) and bos and prompt.startswith(bos) and bos_id is not None and ids[:2] == [bos_id] * 2:
            del ids[0]  # the tokenizer's own, in front of the template's
        out.append(ids)
    return out


def _context_iv(
    config,
    encoder_decoder: bool,
    ids: list[list[int]],
    max_new_tokens: int,
    *,
    teacher_forced: bool = False,
    names: Sequence | None = None,
) -> None:
    """Refuse empty prompts and prompts that do not fit the context (never truncate silently), naming them by
    ``names`` (their sequence ids; default: their places in ``ids``).

    Generation feeds back every new token but the last; ``teacher_forced`` feeds all ``max_new_tokens``
    (a prompt and its continuation in one forward pass). ``max_new_tokens=0`` with
    ``encoder_decoder=False`` checks the inputs of an encoder (a classifier).
    """
    names = list(range(len(ids))) if names is None else names
    empty = [names[i] for i, seq in enumerate(ids) if not seq]
    if empty:
        raise ValueError(f"prompts {empty[:10]} tokenise to no token; a prompt needs at least one")
    positions = _context_positions(config)
    if positions is None:  # relative positions (T5): no fixed context
        return
    name, context = positions
    fed = max_new_tokens if teacher_forced else max(max_new_tokens - 1, 0)
    if encoder_decoder:
        if 1 + fed > context:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} needs {1 + fed} decoder positions (the start token and every new "
                f"token but the last), more than the decoder context config.{name}={context}"
            )
        too_long = [(i, len(seq)) for i, seq in enumerate(ids) if len(seq) > context]
        need = "tokens"
    else:
        too_long = [(i, len(seq)) for i, seq in enumerate(ids) if len(seq) + fed > context]
        need = f"tokens + {fed} of max_new_tokens={max_new_tokens} fed back" if max_new_tokens else "tokens"
    if too_long:
        shown = ", ".join(f"prompt {names[i]} ({n} tokens)" for i, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        fix = "shorten them or lower max_new_tokens" if max_new_tokens and not encoder_decoder else "shorten them"
        raise ValueError(
            f"{len(too_long)} prompt(s) do not fit the model's context config.{name}={context} ({need}): "
            f"{shown}{more}; {fix} (nothing is truncated)"
        )


def _vocab(tokenizer, vocab_size: int) -> list[str]:
    """``tokenizer.decode([i], skip_special_tokens=True)`` for every id of the model's vocabulary (``""`` for
    special tokens, as in the output texts, and past the tokenizer's)."""
    n = min(vocab_size, len(tokenizer))
    pieces = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
    return [str(p) for p in pieces] + [""] * (vocab_size - n)

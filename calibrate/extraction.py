"""Extract a layer cache from a Hugging Face model: greedy generation plus what every layer predicted.

:func:`extract` runs the model's own greedy ``generate`` (so the cached full-model tokens are exactly what
``model.generate(do_sample=False)`` returns) while forward hooks record the raw residual state of every
decoder layer at every generated position. Each state then goes through the :class:`~calibrate.heads.ExitHeads`
(the model's final norm + LM head by default) and the cache stores, per generated token and layer, the top-k
log-probabilities and ids, the softmax gap and maximum and the entropy confidence computed from the **full**
distribution, the state saturation ``cos(h_i, h_{i-1})``, optionally the float16 states (DESIGN section 4).

With ``shard_dir`` every batch is saved as its own small cache ``shard_dir/batch_00000`` (atomically), so a
crash or Ctrl-C loses at most the batch in progress and a rerun skips the batches already written.

This module imports torch and transformers; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate._cache_files import _library_version, _save_iv
from calibrate._digest import weights_digest
from calibrate._validation import caller_stacklevel, int_at_least
from calibrate.cache import LayerCache, concat_caches, open_cache
from calibrate.heads import ExitHeads, _context_positions, decoder_layers, record_layer_states
from calibrate.models import _eval_mode
from measures.confidence import state_saturation

__all__ = ["extract", "extract_main", "read_prompts", "rehead"]

#: Name of shard ``i`` under ``shard_dir``.
_SHARD_NAME = "batch_{:05d}"
#: Bytes of float32 logits processed at once by the heads (tokens x layers x vocabulary).
_LOGITS_BYTES = 64 << 20
#: Prompts per batch unless told otherwise (also how shards split a prompt file: into whole batches).
_DEFAULT_BATCH_SIZE = 8


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def extract(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = _DEFAULT_BATCH_SIZE,
    heads: ExitHeads | None = None,
    store_hidden: bool = False,
    top_k: int = 8,
    progress: bool = True,
    shard_dir: str | os.PathLike | None = None,
    references: Sequence[str | None] | None = None,
    ids: Sequence[str] | None = None,
) -> LayerCache:
    """Generate greedily with a Hugging Face model and cache every layer's prediction for every token.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only (GPT-2, Llama, Mistral, Qwen2, Qwen3) or encoder-decoder (T5, BART, mBART) model
        with its LM head; see :data:`calibrate.heads.SUPPORTED_ARCHITECTURES`. It is run in eval mode
        (its mode is restored afterwards) on its own device.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer. Prompts are tokenised one by one (with the tokenizer's special tokens) and padded
        here: on the left for decoder-only models, on the right for encoder-decoder models.
    prompts : sequence of str, shape (n_sequences,)
        The prompts, used as they are (apply a chat template before if the model needs one).
    max_new_tokens : int, default=32
        Most tokens generated per prompt.
    batch_size : int, default=8
        Prompts per ``generate`` call (and per shard).
    heads : ExitHeads, optional
        What a layer predicts. Default: ``ExitHeads.from_model(model)`` (final norm + LM head shared by
        every layer).
    store_hidden : bool, default=False
        Also store the raw layer states as float16, ``(n_tokens, n_layers, d)``, e.g. to train a
        classifier measure. They are the largest field by far.
    top_k : int, default=8
        Predictions kept per token and layer (``<= vocab_size``).
    progress : bool, default=True
        Show a tqdm progress bar over the prompts.
    shard_dir : str or os.PathLike, optional
        Save every batch as a cache ``shard_dir/batch_00000``, ``batch_00001``, ... and skip the batches
        already there (resume after a crash). A shard written for other prompts or settings is refused.
    references : sequence of str or None, shape (n_sequences,), optional
        Reference texts stored in the sequence table (None = missing).
    ids : sequence of str, shape (n_sequences,), optional
        Sequence ids, unique; default ``"0"``, ``"1"``, ... in prompt order.

    Returns
    -------
    LayerCache
        One sequence per prompt (ids ``ids``, by default ``"0"``, ``"1"``, ... in prompt order) with the arrays
        ``full_tokens`` (T,), ``topk_ids`` and ``topk_logprobs`` (T, L, k), the scores ``softmax_gap``,
        ``softmax_max``, ``entropy`` and ``state_saturation`` (T, L), and ``hidden`` (T, L, d) when
        ``store_hidden``; the vocab ``[tokenizer.decode([i], skip_special_tokens=True) for i in range(vocab_size)]``
        (the default text of the textual losses where its joined pieces give the output texts); metadata
        (model, tokenizer, generation settings, heads, software versions).

    Raises
    ------
    TypeError
        When ``max_new_tokens``, ``batch_size`` or ``top_k`` is not an int.
    ValueError
        When an argument is invalid (``max_new_tokens``, ``batch_size``, ``top_k`` not positive
        included), the architecture unsupported, a prompt is empty or does not fit the model's context
        with ``max_new_tokens`` (the message names the prompts; nothing is truncated), or ``shard_dir``
        holds shards of another run.
    TypeError
        When ``prompts`` is not a sequence of str, ``heads`` not an ExitHeads, ``store_hidden`` or
        ``progress`` not a bool, or ``shard_dir`` not a path.

    Warns
    -----
    UserWarning
        When the model's generation config changes greedy choices (e.g. ``repetition_penalty``, forced
        tokens), so the last layer's top-1 differs from the full-model token somewhere.

    Notes
    -----
    - **Tokens.** The generation is ``model.generate(input_ids, attention_mask, do_sample=False,
      num_beams=1, max_new_tokens=max_new_tokens)`` with the model's own generation config otherwise;
      ``full_tokens`` are exactly its new tokens. ``num_beams=1`` overrides a beam-search default.
    - **EOS.** A sequence ends at its first EOS token (any of ``generation_config.eos_token_id``), which
      is **kept** as its last token, as ``generate`` returns it for a single prompt; the padding after
      it is dropped. A sequence without EOS has ``max_new_tokens`` tokens. Every sequence has >= 1 token.
    - **Positions.** Token ``t`` of a sequence is the one predicted from the state at the position
      before it; layer ``i``'s state there is the raw output of decoder layer ``i`` (before the final
      norm), read by forward hooks (Hugging Face ``hidden_states`` are off by one and normalise the last
      layer; see :mod:`calibrate.heads`).
    - **Measures.** ``softmax_gap`` = p1 - p2, ``softmax_max`` = p1 and ``entropy`` = 1 - H / log V of
      the full softmax of each layer's logits (float32), so the entropy is exact, not the top-k bound of
      :func:`measures.confidence.from_topk`; ``state_saturation`` is
      :func:`measures.confidence.state_saturation` of the float32 states (0 at layer 1).
    - **Numerics.** Padding changes floating-point sums slightly, so a batched run can, on a near tie,
      pick another token than the same prompt alone; the cache holds what the batched run generated.

    Examples
    --------
    >>> import torch
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    >>> from calibrate import extract
    >>> words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
    >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    >>> tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    >>> _ = torch.manual_seed(0)
    >>> config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, eos_token_id=1, pad_token_id=0)
    >>> model = GPT2LMHeadModel(config)
    >>> cache = extract(model, tokenizer, ["w1 w2 w3", "w4"], max_new_tokens=4, top_k=2, progress=False)
    >>> cache.n_sequences, cache.n_layers, cache.top_k, cache.vocab_size
    (2, 2, 2, 32)
    """
    setup = _extract_iv(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        heads,
        store_hidden,
        top_k,
        progress,
        shard_dir,
        references,
        ids,
    )
    from tqdm.auto import tqdm

    n = len(setup["prompts"])
    starts = list(range(0, n, setup["batch_size"]))
    parts: list[LayerCache] = []
    with _eval_mode(model), tqdm(total=n, unit="prompt", desc="extract", disable=not progress) as bar:
        for index, start in enumerate(starts):
            stop = min(n, start + setup["batch_size"])
            identity = _batch_identity(setup, start, stop)
            fingerprint = _digest(identity)
            where = None if setup["shard_dir"] is None else setup["shard_dir"] / _SHARD_NAME.format(index)
            if where is not None and where.exists():
                part = _open_shard(where, fingerprint, identity)
            else:
                part = _extract_batch(model, tokenizer, setup, start, stop)
                if where is not None:
                    shard = {"index": index, "start": start, "stop": stop, "fingerprint": fingerprint}
                    part = _with_meta(part, shard={**shard, "identity": identity})
                    part.save(where)
            parts.append(part)
            bar.update(stop - start)
    cache = concat_caches(parts)
    _warn_disagreement(cache)
    return cache


def rehead(cache: LayerCache, heads: ExitHeads) -> LayerCache:
    """The same sequences as ``cache``, with what each layer predicts recomputed through other ``heads``.

    This gives a train cache (extracted through the plain head) as if it had been extracted through
    adapted heads, without running the model again: the learned measures can then train on it with the
    labels (agreement of each layer's prediction with the full model) that the calibration split and the
    runtime use. Use adapters fitted on *other* prompts: through adapters fitted on the cache itself its
    layers agree with the full model in-sample (far more than on new prompts), and a measure trained on
    those labels exits far too early (``calibrate demo`` cross-fits two halves instead).

    Parameters
    ----------
    cache : LayerCache
        With hidden states (``extract(..., store_hidden=True)``).
    heads : ExitHeads
        What each layer predicts now; its layer count and width must match the hidden states.

    Returns
    -------
    LayerCache
        Full-model tokens, texts, hidden states and saturation unchanged; top-k ids and log-probabilities,
        softmax gap/max and entropy recomputed; ``meta["heads"] = heads.describe()``.

    Raises
    ------
    ValueError
        When the cache has no hidden states, their shape does not match ``heads``, or the cache records another
        model than the one ``heads`` were made from (``model_digest``).

    Notes
    -----
    The cache stores hidden states in float16, so the recomputed log-probabilities differ from those of
    an extraction through ``heads`` by that rounding (a top-1 token may differ where two are nearly tied).
    """
    if not isinstance(cache, LayerCache):
        raise TypeError(f"cache must be a LayerCache, got {type(cache).__name__}")
    if not isinstance(heads, ExitHeads):
        raise TypeError(f"heads must be a calibrate.ExitHeads, got {type(heads).__name__}")
    if not cache.has("hidden"):
        raise ValueError("cache stores no hidden states; extract it with store_hidden=True")
    if (heads.n_layers, heads.hidden_size) != (cache.n_layers, cache.hidden_size):
        raise ValueError(
            f"the heads have n_layers={heads.n_layers}, hidden_size={heads.hidden_size} but the cache's hidden "
            f"states have n_layers={cache.n_layers}, hidden_size={cache.hidden_size}"
        )
    if heads.vocab_size != cache.vocab_size:
        raise ValueError(f"the heads have vocab_size={heads.vocab_size} but the cache has {cache.vocab_size}")
    recorded = (cache.user_meta.get("heads") or {}).get("model_digest")
    current = heads.describe()["model_digest"]
    if recorded is not None and current is not None and recorded != current:
        raise ValueError(
            f"the heads come from another model than the cache (model_digest {current!r}, the cache's {recorded!r}): "
            "its hidden states and full-model tokens are that model's; extract the cache with the heads' model"
        )
    param = next(heads.parameters(), None)
    device, dtype = ("cpu", torch.float32) if param is None else (param.device, param.dtype)
    states = torch.from_numpy(np.asarray(cache.arrays["hidden"], dtype=np.float32)).to(device, dtype)
    measures = _layer_measures(heads, states, cache.top_k)
    replaced = ("topk_ids", "topk_logprobs", "softmax_gap", "softmax_max", "entropy")
    scores = {name: measures[name].cpu().numpy() for name in replaced[2:]}
    scores.update({name: a for name, a in cache.arrays.items() if name not in (*replaced, "full_tokens", "hidden")})
    table = cache.sequences
    return LayerCache.from_arrays(
        full_tokens=cache.arrays["full_tokens"],
        topk_ids=measures["topk_ids"].cpu().numpy(),
        topk_logprobs=measures["topk_logprobs"].cpu().numpy(),
        lengths=cache.lengths,
        scores=scores,
        hidden=cache.arrays["hidden"],
        prompts=table["prompt"].tolist(),
        outputs=table["output"].tolist(),
        references=[r if isinstance(r, str) else None for r in table["reference"].tolist()],
        ids=table["id"].tolist(),
        vocab=cache.vocab,
        vocab_size=cache.vocab_size,
        meta={**{k: v for k, v in cache.user_meta.items() if k != "shard"}, "heads": heads.describe(fresh=True)},
    )


def read_prompts(path: str | os.PathLike) -> tuple[list[str], list[str | None]]:
    """Read prompts from a text file (one per line) or a JSONL file (``{"prompt": ..., "reference": ...}``).

    Parameters
    ----------
    path : str or os.PathLike
        A UTF-8 file. It is JSONL when its name ends in ``.jsonl``, or when it does not end in ``.txt`` (in
        either case) and its first non-blank line starts with ``{``; each line then holds an object with a str
        ``"prompt"`` and optionally a ``"reference"``: a str, null, or an int (a class label, for
        ``risk_label``; kept as its decimal string). Otherwise every non-blank line is one prompt
        (without its line break). Lines end
        at LF or CR LF only: other separators (U+2028, form feed, ...) stay in the prompt. Blank lines
        are skipped in both formats.

    Returns
    -------
    prompts : list of str
    references : list of str or None
        None where a line has no reference (always None for plain text).

    Raises
    ------
    ValueError
        When the file holds no prompt or a JSONL line is invalid (the message gives the line number).
    FileNotFoundError
        When the file does not exist.
    """
    file = Path(path)
    # Lines end at "\n" (or "\r\n") only: str.splitlines would also split at U+2028, "\x0c", "\x1c", ...
    try:
        text = file.read_bytes().decode("utf-8-sig")  # a BOM is no text
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ValueError(f"{file}: no prompt (the file is empty or blank)")
    suffix = file.suffix.lower()  # PROMPTS.TXT as prompts.txt
    is_jsonl = suffix == ".jsonl" or (
        suffix != ".txt" and numbered[0][1].lstrip().startswith("{")
    )
    prompts: list[str] = []
    references: list[str | None] = []
    for number, line in numbered:
        if not is_jsonl:
            prompts.append(line)
            references.append(None)
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{file}:{number}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(  # noqa: TRY004 - malformed file content, not a wrong argument type
                f'{file}:{number}: each JSONL line must be an object with a str "prompt", got {line[:80]!r}'
            )
        reference = row.get("reference")
        if isinstance(reference, int) and not isinstance(reference, bool):
            reference = str(reference)  # a class label
        if reference is not None and not isinstance(reference, str):
            raise ValueError(
                f'{file}:{number}: "reference" must be a str, an int label or null, got {type(reference).__name__}'
            )
        prompts.append(row["prompt"])
        references.append(reference)
    return prompts, references


def extract_main(
    model_dir: str | os.PathLike,
    prompts_file: str | os.PathLike,
    output: str | os.PathLike,
    *,
    shard_dir: str | os.PathLike | None = None,
    keep_shards: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    shard: tuple[int, int] | None = None,
    **kw: Any,
) -> LayerCache:
    """Load a model and tokenizer from a local directory, extract a cache for a prompts file, save it.

    The body of ``calibrate extract --model DIR --prompts FILE -o CACHE``.

    Parameters
    ----------
    model_dir : str or os.PathLike
        A directory written by ``save_pretrained`` (model and tokenizer). Nothing is downloaded.
    prompts_file : str or os.PathLike
        Prompts, one per line, or JSONL with ``"prompt"`` and optional ``"reference"`` (:func:`read_prompts`).
    output : str or os.PathLike
        Directory of the cache to write.
    shard_dir : str or os.PathLike, optional
        Where the per-batch caches ``batch_00000``, ... go. Default: ``<output>.shards`` beside ``output``;
        rerunning the same command after a crash resumes from them. With ``shard``, they go to the
        subdirectory ``shard_dir/shard-0000i-of-0000N`` (named like the shard's output), so that the
        workers can share one ``shard_dir``.
    keep_shards : bool, default=False
        Keep the batch caches after the cache has been saved. By default this run's batch directories
        are deleted, then their directory if that leaves it empty; other files in it are kept.
    overwrite : bool, default=False
        Replace an existing cache at ``output``.
    device : str, optional
        Torch device to run on, e.g. ``"cuda"``; default: where ``from_pretrained`` puts the model (CPU).
    dtype : str, optional
        Torch dtype to load the weights in, e.g. ``"bfloat16"``; default: the checkpoint's.
    shard : (int, int), optional
        ``(i, N)``: extract only the ``i``-th (0-based) of ``N`` contiguous slices of the prompts into
        ``output/shard-0000i-of-0000N`` and write ``output/manifest.json`` (:mod:`calibrate.shards`), so
        that ``N`` workers fill one cache that ``open_cache(output)`` reads as a whole. Sequence ids stay
        the prompt indices of the whole file. A shard already written for the same prompts is kept.
    **kw
        Passed to :func:`extract` (``max_new_tokens``, ``batch_size``, ``top_k``, ``store_hidden``, ``progress``).

    Returns
    -------
    LayerCache
        The saved cache (with ``shard``: this shard's).

    Raises
    ------
    FileExistsError
        When ``output`` exists and ``overwrite`` is False (checked before loading the model).
    ValueError
        As :func:`extract` and :func:`read_prompts`; or when ``model_dir`` holds no model.
    """
    from calibrate import shards
    from calibrate.models import load_local

    if not os.fspath(output):  # Path("") would be the working directory
        raise ValueError("output must name a directory, got ''")
    root = Path(output)
    target = root if shard is None else root / shards.shard_name(*shard)
    prompts, references = read_prompts(prompts_file)
    ids = [str(i) for i in range(len(prompts))]
    sharding = None
    if shard is not None:
        index, count = shard
        start, stop = shards.shard_bounds(len(prompts), index, count, batch_size=kw.get("batch_size", _DEFAULT_BATCH_SIZE))
        shards._check_manifest(root, count)  # another run's shard count: refused before any work
        plain = (str, int, float, bool, type(None))
        request = {k: v for k, v in kw.items() if k != "progress" and isinstance(v, plain)}
        sharding = {
            "index": index, "count": count, "start": start, "stop": stop, "n_prompts": len(prompts),
            "prompts": shards._prompts_digest(prompts, references),
            "request": {"model_dir": str(Path(model_dir).resolve()), "dtype": dtype, **request},
        }  # fmt: skip
        if target.exists() and not overwrite and open_cache(target, verify=False).user_meta.get("sharding") == sharding:
            shards.write_manifest(root, count)
            return open_cache(target)  # this shard is complete: nothing to redo
        prompts, ids = prompts[start:stop], ids[start:stop]
        references = None if references is None else references[start:stop]
    _save_iv(target, overwrite)  # an existing output that --overwrite may not replace: refused before any work
    model, tokenizer = load_local(model_dir, device=device, dtype=dtype)
    if shard_dir is None:
        shard_dir = target.with_name(target.name + ".shards")
    elif shard is not None:
        shard_dir = Path(shard_dir) / target.name
    cache = extract(model, tokenizer, prompts, references=references, ids=ids, shard_dir=shard_dir, **kw)
    if sharding is not None:
        cache = cache.with_meta({**cache.user_meta, "sharding": sharding})
    cache.save(target, overwrite=overwrite)
    if sharding is not None:
        shards.write_manifest(root, sharding["count"])
    if not keep_shards:
        _remove_batches(Path(shard_dir), math.ceil(cache.n_sequences / cache.user_meta["generation"]["batch_size"]))
    return cache


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _extract_iv(
    model, tokenizer, prompts, max_new_tokens, batch_size, heads, store_hidden, top_k, progress, shard_dir, references, ids
):
    layers = decoder_layers(model)  # raises for unsupported architectures
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of str (one per sequence), got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts must hold str, got {type(p).__name__} at index {i}")
    if references is not None:
        if isinstance(references, str) or not isinstance(references, Sequence) or len(references) != len(prompts):
            raise ValueError(
                f"references must be a sequence with one entry per prompt ({len(prompts)}), got {references!r:.80}"
            )
        references = list(references)
        bad = next((r for r in references if r is not None and not isinstance(r, str)), None)
        if bad is not None:
            raise ValueError(f"references must hold str or None, got {type(bad).__name__} {bad!r:.40}")
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
    if heads is None:
        heads = ExitHeads.from_model(model)
    elif not isinstance(heads, ExitHeads):
        raise TypeError(f"heads must be an ExitHeads (or None for the model's own), got {type(heads).__name__}")
    if heads.n_layers != len(layers):
        raise ValueError(f"heads has n_layers={heads.n_layers} but the model has {len(layers)} decoder layers")
    if top_k > heads.vocab_size:
        raise ValueError(f"top_k must be <= vocab_size={heads.vocab_size}, got {top_k}")
    if shard_dir is not None:
        if not isinstance(shard_dir, (str, os.PathLike)):
            raise TypeError(f"shard_dir must be a str or os.PathLike, got {type(shard_dir).__name__}")
        if not os.fspath(shard_dir):
            raise ValueError("shard_dir must name a directory, got ''")
        shard_dir = Path(shard_dir)
        if shard_dir.exists() and not shard_dir.is_dir():
            raise ValueError(f"shard_dir {shard_dir} exists and is not a directory")

    if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (callable, with pad_token_id), got {tokenizer!r:.80}")
    config = model.config
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
    pad_id = gen.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    pad_id = int(pad_id[0] if isinstance(pad_id, (list, tuple)) else pad_id)
    token_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    rows = model.get_input_embeddings().num_embeddings
    for i, seq in enumerate(token_ids):
        if any(not 0 <= t < rows for t in seq):
            raise ValueError(
                f"prompt {i} tokenises to ids outside the model's {rows} embedding rows ({max(seq)}): a tokenizer "
                "with added tokens needs model.resize_token_embeddings(len(tokenizer))"
            )
    _context_iv(config, encoder_decoder, token_ids, max_new_tokens)
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
        "model_generation_config": json.loads(json.dumps(gen.to_diff_dict(), default=str)),
    }
    import transformers

    meta = {
        "model": getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or None,
        "architecture": config.model_type,
        "is_encoder_decoder": encoder_decoder,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
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


def _context_iv(
    config, encoder_decoder: bool, ids: list[list[int]], max_new_tokens: int, *, teacher_forced: bool = False
) -> None:
    """Refuse empty prompts and prompts that do not fit the context (never truncate silently).

    Generation feeds back every new token but the last; ``teacher_forced`` feeds all ``max_new_tokens``
    (a prompt and its continuation in one forward pass). ``max_new_tokens=0`` with
    ``encoder_decoder=False`` checks the inputs of an encoder (a classifier).
    """
    empty = [i for i, seq in enumerate(ids) if not seq]
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
        shown = ", ".join(f"prompt {i} ({n} tokens)" for i, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        fix = "shorten them or lower max_new_tokens" if max_new_tokens else "shorten them"
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


# --------------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------------


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, S)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, S)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        input_ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask


def _topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` along the last axis with ties in the order greedy decoding breaks them: the lowest id first.

    ``torch.topk`` orders equal values arbitrarily, while ``argmax`` (Hugging Face's greedy step and the
    runtime's) takes the lowest id; in bfloat16 and float16, tied top logits are common. When more than ``k``
    values tie for the maximum, ``argmax``'s id may be missing from topk's: it then takes the first place.
    """
    values, ids = torch.topk(logp, k, dim=-1)
    by_id = torch.argsort(ids, dim=-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices  # ties keep ascending ids
    values, ids = values.gather(-1, by_value), ids.gather(-1, by_value)
    if bool((values[..., -1] == values[..., 0]).any()):  # all k tie somewhere: argmax's id may be missing
        best = logp.argmax(dim=-1, keepdim=True)
        missing = (ids != best).all(dim=-1, keepdim=True)
        ids[..., :1] = torch.where(missing, best, ids[..., :1])  # the same (maximal) value
    return values, ids


@torch.no_grad()
def _layer_measures(heads: ExitHeads, states: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-k log-probs/ids and the softmax measures of every layer; states (n, L, d) -> (n, L, ...)."""
    n, n_layers, _ = states.shape
    vocab_size = heads.vocab_size
    per_token = max(1, n_layers * vocab_size * 4)
    chunk = max(1, _LOGITS_BYTES // per_token)
    out: dict[str, list[torch.Tensor]] = {
        name: [] for name in ("topk_ids", "topk_logprobs", "softmax_gap", "softmax_max", "entropy")
    }
    for lo in range(0, n, chunk):
        logits = heads(states[lo : lo + chunk]).float()  # (c, L, V)
        logp = torch.log_softmax(logits, dim=-1)  # (c, L, V)
        values, indices = _topk(logp, max(k, 2))  # (c, L, max(k, 2)), best first
        p12 = values[..., :2].exp()  # (c, L, 2)
        p = logp.exp()
        h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)  # (c, L) entropy, nats
        out["topk_ids"].append(indices[..., :k])
        out["topk_logprobs"].append(values[..., :k].clamp(max=0.0))
        out["softmax_gap"].append((p12[..., 0] - p12[..., 1]).clamp(0.0, 1.0))
        out["softmax_max"].append(p12[..., 0].clamp(0.0, 1.0))
        out["entropy"].append((1.0 - h / math.log(vocab_size)).clamp(0.0, 1.0))
    return {name: torch.cat(parts) for name, parts in out.items()}


@torch.no_grad()
def _extract_batch(model, tokenizer, setup: dict, start: int, stop: int) -> LayerCache:
    """Generate for prompts[start:stop] and build their cache."""
    heads = setup["heads"]
    device = next(model.parameters()).device
    # 1. Pad the batch: left for decoder-only (new tokens follow the prompt), right for encoders.
    input_ids, attention_mask = _pad(setup["input_ids"][start:stop], setup["pad_id"], left=not setup["encoder_decoder"])
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # (B, S)
    # 2. Greedy generation by the model itself, recording every decoder layer's raw output at the last
    #    position of every forward call (call c predicts generated token c).
    with record_layer_states(model) as recorded:  # recorded[i][c]: (B, d)
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=setup["max_new_tokens"],
            pad_token_id=setup["pad_id"],
        )
    new = sequences[:, 1:] if setup["encoder_decoder"] else sequences[:, input_ids.shape[1] :]  # (B, N)
    n_steps = new.shape[1]
    if any(len(r) != n_steps for r in recorded):
        raise RuntimeError(
            f"recorded {[len(r) for r in recorded]} forward calls per layer for {n_steps} generated tokens; "
            "the model's generate does not run one forward per token (unsupported generation config?)"
        )
    # 3. Each row ends at its first EOS (kept) or after all steps.
    is_eos = torch.zeros_like(new, dtype=torch.bool)
    for e in setup["eos_ids"]:
        is_eos |= new == e
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full_like(new[:, 0], n_steps))  # (B,)
    valid = torch.arange(n_steps, device=new.device)[None, :] < first[:, None]  # (B, N)
    # 4. Token-major states of the valid positions, rows in sequence order.
    states = torch.stack([torch.stack(r, dim=1) for r in recorded], dim=2)  # (B, N, L, d)
    states = states[valid]  # (T, L, d)
    tokens = new[valid]  # (T,)
    # 5. What each layer predicts, through the heads; saturation from the float32 states.
    measures = _layer_measures(heads, states, setup["top_k"])
    states32 = states.float().cpu().numpy()
    scores = {name: measures[name].cpu().numpy() for name in ("softmax_gap", "softmax_max", "entropy")}
    scores["state_saturation"] = state_saturation(states32)
    lengths = first.cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    token_ids = tokens.cpu().numpy()
    outputs = [
        tokenizer.decode(token_ids[offsets[b] : offsets[b + 1]].tolist(), skip_special_tokens=True)
        for b in range(len(lengths))
    ]
    references = None if setup["references"] is None else setup["references"][start:stop]
    return LayerCache.from_arrays(
        full_tokens=token_ids,
        topk_ids=measures["topk_ids"].cpu().numpy(),
        topk_logprobs=measures["topk_logprobs"].cpu().numpy(),
        lengths=lengths,
        scores=scores,
        hidden=states.to(torch.float16).cpu().numpy() if setup["store_hidden"] else None,
        prompts=setup["prompts"][start:stop],
        outputs=outputs,
        references=references,
        ids=setup["ids"][start:stop],
        vocab=setup["vocab"],
        vocab_size=heads.vocab_size,
        meta=setup["meta"],
    )


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


def _digest(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=16).hexdigest()


def _batch_identity(setup: dict, start: int, stop: int) -> dict[str, str]:
    """A digest per part of what identifies a batch: its place and prompts (references, ids, token ids), the
    model's weights, the vocab pieces, the library version and the run's settings. The model and tokenizer
    names are left out: they are paths as typed, and the weights, vocab and token ids identify both."""
    settings = {k: v for k, v in setup["meta"].items() if k not in ("model", "tokenizer")}
    parts = {
        "batch": [start, stop],
        "prompts": setup["prompts"][start:stop],
        "references": None if setup["references"] is None else setup["references"][start:stop],
        "ids": setup["ids"][start:stop],
        "token ids": setup["input_ids"][start:stop],
        "model weights": setup["weights"],
        "vocab": setup["vocab"],
        "library version": _library_version(),
        **{f"setting {k!r}": v for k, v in settings.items()},
    }
    return {name: _digest(value) for name, value in parts.items()}


def _open_shard(where: Path, fingerprint: str, identity: dict[str, str]) -> LayerCache:
    try:
        part = open_cache(where)
    except ValueError as exc:
        raise ValueError(f"shard {where} cannot be read ({exc}); delete it to recompute that batch") from exc
    shard = part.meta.get("shard", {})
    if shard.get("fingerprint") != fingerprint:
        found = shard.get("identity") or {}
        differ = [name for name in identity if found.get(name) != identity[name]]
        raise ValueError(
            f"shard {where} was written by another run (its {', '.join(differ) or 'identity'} differ): its shard_dir "
            f"{where.parent} holds that run's batches; use another shard_dir, or delete {where.parent} to start over"
        )
    return part


def _remove_batches(shard_dir: Path, n_batches: int) -> None:
    """Delete the batch caches ``batch_00000`` ... of a run from ``shard_dir`` (and the temporary directories of
    their saves that a killed run left, ``.batch_00000.*.tmp``), then ``shard_dir`` if it is empty."""
    for index in range(n_batches):
        name = _SHARD_NAME.format(index)
        for where in (shard_dir / name, *shard_dir.glob(f".{name}.*.tmp")):
            shutil.rmtree(where, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (other files are not ours to delete), or gone already
        shard_dir.rmdir()


def _with_meta(cache: LayerCache, shard: dict | None, meta: dict | None = None) -> LayerCache:
    """The same cache with its metadata replaced (``shard`` set, or removed when None)."""
    meta = dict(meta if meta is not None else cache.user_meta)
    meta.pop("shard", None)
    if shard is not None:
        meta["shard"] = shard
    return cache.with_meta(meta)


def _warn_disagreement(cache: LayerCache) -> None:
    top1 = cache.arrays["topk_ids"][:, -1, 0]
    disagree = int(np.count_nonzero(top1 != cache.arrays["full_tokens"]))
    if disagree:
        warnings.warn(
            f"the last layer's top-1 differs from the generated token at {disagree} of {cache.n_tokens} positions: "
            "the model's generation config changes greedy choices (repetition_penalty, forced or suppressed "
            "tokens, min_new_tokens, ...); losses against the last layer and against full_tokens will differ",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )

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
import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch

from calibrate._cache_files import _save_iv
from calibrate._digest import weights_digest
from calibrate._extract_checks import _extract_iv, prompt_ids
from calibrate._extract_steps import (
    _SHARD_NAME,
    _batch_identity,
    _digest,
    _extract_batch,
    _layer_measures,
    _open_shard,
    _remove_batches,
    _warn_disagreement,
    _with_meta,
)
from calibrate._storage import Remote, location
from calibrate.cache import LayerCache, _from_arrays, open_cache
from calibrate.concat import concat_caches
from calibrate.heads import ExitHeads, _cache_model_iv, _heads_iv
from calibrate.models import _eval_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["extract", "extract_main", "read_prompts", "rehead"]

#: Prompts per batch unless told otherwise (also how shards split a prompt file: into whole batches).
_DEFAULT_BATCH_SIZE = 8


#: The settings of :func:`extract` a shard records (its heads are compared by :func:`_kept_shard_iv`).
_SHARD_SETTINGS = ("max_new_tokens", "batch_size", "store_hidden", "top_k")


def extract(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
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
        Its tokenizer. Prompts are tokenised one by one (with the tokenizer's special tokens, but one BOS
        where the text begins with it, as a chat template writes it) and padded here: on the left for
        decoder-only models, on the right for encoder-decoder models.
    prompts : sequence of str, shape (n_sequences,)
        The prompts, used as they are (apply a chat template before if the model needs one).
    max_new_tokens : int, default=32
        Most tokens generated per prompt.
    batch_size : int, default=8
        Prompts per ``generate`` call (and per shard).
    heads : ExitHeads, optional
        What a layer predicts. Default: ``ExitHeads.from_model(model)`` (final norm + LM head shared by
        every layer). Heads made by ``ExitHeads.from_model`` from another model (other weights, even of the
        same sizes) are refused, as the runtime's ``generate`` refuses them.
    store_hidden : bool, default=False
        Also store the raw layer states as float16, ``(n_tokens, n_layers, d)``, e.g. to train a
        classifier measure. They are the largest field by far. A model whose states exceed float16's
        range (magnitudes above 65504, as T5-family models can) is refused with the layer named.
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
        with ``max_new_tokens`` (the message names the prompts; nothing is truncated), ``heads`` were made
        from another model, ``shard_dir`` holds shards of another run, ``store_hidden`` states overflow
        float16, or the model is spread over several devices, has offloaded embeddings or runs under
        ``torch.autocast``; when the model's ``generate`` does not run one forward call per generated token
        (a generation setting extraction does not switch off), after generating the first batch.
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
      num_beams=1, max_new_tokens=max_new_tokens, return_dict_in_generate=False)`` with the model's own
      generation config otherwise; ``full_tokens`` are exactly its new tokens. ``num_beams=1`` overrides a
      beam-search default (and its constraints), ``return_dict_in_generate=False`` a config that asks for a dict
      (and its scores); DoLa and contrastive search are switched off (greedy, as the runtime decodes), and so
      are prompt lookup, early-exit self-speculation and chunked prefill (the recording needs one forward call
      per generated token; they do not change greedy tokens).
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
      :func:`measures.confidence.state_saturation` of the states at the precision the runtime computes it
      from: float64 states as they are, the others in float32 (0 at layer 1).
    - **Numerics.** Padding changes floating-point sums slightly, so a batched run can, on a near tie,
      pick another token than the same prompt alone; the cache holds what the batched run generated. Beyond
      ties, a batch's tokens depend on its other prompts where the model reads the padding: logits processors
      of its generation config that read the prompt, and longrope rotary scaling, whose frequencies follow the
      batch's longest row (both warned of; ``batch_size=1`` gives each prompt alone).

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
    from calibrate._progress import tqdm

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
                    try:
                        part.save(where)
                    except FileExistsError:  # another run into this shard_dir wrote the batch meanwhile
                        part = _open_shard(where, fingerprint, identity)  # the same batch, or refused as another's
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
    an extraction through ``heads`` by that rounding (a top-1 token may differ where two are nearly tied), and
    so from what the runtime computes at the model's precision (softmax scores by up to about 1e-4: a proxy
    certificate's threshold at a recomputed score can exit a layer apart; decoded mode certifies exactly).
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
    _cache_model_iv(heads, cache)
    device, dtype = heads._placement()  # the output layer's: heads without adapters have no parameters of their own
    states = torch.from_numpy(np.asarray(cache.arrays["hidden"], dtype=np.float32)).to(device, dtype)
    measures = _layer_measures(heads, states, cache.top_k)
    replaced = ("topk_ids", "topk_logprobs", "softmax_gap", "softmax_max", "entropy")
    scores = {name: measures[name].cpu().numpy() for name in replaced[2:]}
    scores.update({name: a for name, a in cache.arrays.items() if name not in (*replaced, "full_tokens", "hidden")})
    table = cache.sequences
    described = heads.describe(fresh=True)
    recorded = cache.user_meta.get("heads") or {}
    if "generation" in recorded:  # the outputs were decoded under the cache's generation config, not today's
        described["generation"] = recorded["generation"]
    return _from_arrays(  # the last layer's head is the model's own: as the cache's
        copy=True,
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
        meta={**{k: v for k, v in cache.user_meta.items() if k != "shard"}, "heads": described},
    )


def _same_settings(recorded, sharding: dict) -> bool:
    """Whether a finished shard's record ``recorded`` shares with this run's ``sharding`` what a kept shard must:
    all of it less the weights digest and the model's path (the weights are compared by :func:`_kept_shard_iv`,
    wherever they were loaded from), and less the tokenisation digest where an older version recorded none."""

    def settings(record: dict) -> dict:
        request = record.get("request")
        if isinstance(request, dict):
            request = {k: v for k, v in request.items() if k != "model_dir"}
        skip = ("weights",) if "prompt_ids" in recorded else ("weights", "prompt_ids")
        return {**{k: v for k, v in record.items() if k not in skip}, "request": request}

    return isinstance(recorded, dict) and settings(recorded) == settings(sharding)


def _kept_shard_iv(target: Path, meta: dict, model, heads) -> None:
    """Refuse to keep the finished shard ``target`` (its metadata ``meta``, of the same prompts and request) for a
    run of other model weights or other heads: a rerun of one path may find other weights there.

    Raises
    ------
    FileExistsError
        When the shard's weights digest (:func:`calibrate._digest.weights_digest`, as the per-batch resume
        compares) or heads (``ExitHeads.describe()``) differ from this run's, naming what differs.
    TypeError, ValueError
        As :func:`extract` for ``heads``.
    """
    recorded = meta["sharding"].get("weights")  # None: an older version wrote the shard; its heads' model_digest
    differ = []  # (a digest of every weight too) decides below
    if recorded is not None and recorded != (current := weights_digest(model, fresh=True)):
        differ.append(f"model weights (weights digest {current!r} now, the shard's {recorded!r})")
    described, stored = _heads_iv(heads, model).describe(fresh=True), meta.get("heads") or {}
    # Other weights give the model's own heads another model_digest too: not said twice.
    keys = [k for k in described if stored.get(k) != described[k] and not (differ and k == "model_digest")]
    if keys:
        shown = ", ".join(f"{key} {described[key]!r} now, the shard's {stored.get(key)!r}" for key in keys)
        differ.append(f"heads ({shown})")
    if differ:
        raise FileExistsError(
            f"{target} is a finished shard of the same prompts and settings but of other {' and '.join(differ)}: "
            "it is not reused; pass overwrite=True (--overwrite on the command line) to extract it again"
        )


def read_prompts(path: str | os.PathLike) -> tuple[list[str], list[str | None]]:
    """Read prompts from a text file (one per line) or a JSONL file (``{"prompt": ..., "reference": ...}``).

    Parameters
    ----------
    path : str or os.PathLike
        A UTF-8 file. It is JSONL when its name ends in ``.jsonl``, or when it does not end in ``.txt`` (in
        either case) and its first non-blank line starts with ``{``; each line then holds an object with a str
        ``"prompt"`` and optionally a ``"reference"``: a str, null, or an int (a class label, for
        ``risk_label``; kept as its decimal string); a ``.json`` file must be JSONL so (a JSON array is
        refused). Otherwise every non-blank line is one prompt
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
        When the file holds no prompt, a JSONL line is invalid (the message gives the line number), or a
        ``.json`` file is not JSONL.
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
    if suffix == ".json" and not is_jsonl:  # a JSON array: its lines would become prompts ("[", '{"prompt": ...},')
        raise ValueError(
            f"{file}: a .json file is read as JSONL (one object per line, the first starting with '{{'); write one "
            '{"prompt": ..., "reference": ...} object per line (.jsonl), or one prompt per line (.txt)'
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
        Directory of the cache to write, or an fsspec URL (``s3://bucket/cache``, ...; not with ``shard``).
    shard_dir : str or os.PathLike, optional
        Local directory where the per-batch caches ``batch_00000``, ... go (needed with a URL ``output``).
        Default: ``<output>.shards`` beside ``output``; rerunning the same command after a crash resumes from
        them. With ``shard``, they go to the subdirectory ``shard_dir/shard-0000i-of-0000N`` (named like the
        shard's output), so that the workers can share one ``shard_dir``.
    keep_shards : bool, default=False
        Keep the batch caches after the cache has been saved. By default this run's batch directories
        are deleted, then their directory if that leaves it empty (and, with ``shard`` and the default
        ``shard_dir``, ``OUTPUT.shards`` once the last shard leaves it empty); other files in it are kept.
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
        the prompt indices of the whole file. A shard already written for the same prompts and settings, from
        the same weights (digest of the model loaded now) through the same heads, is kept; one of other weights
        or heads is refused (FileExistsError) unless ``overwrite``.
    **kw
        Passed to :func:`extract` (``max_new_tokens``, ``batch_size``, ``top_k``, ``store_hidden``, ``progress``).

    Returns
    -------
    LayerCache
        The saved cache (with ``shard``: this shard's).

    Raises
    ------
    FileExistsError
        When ``output`` exists and ``overwrite`` is False (checked before loading the model), or, with
        ``shard``, holds this shard extracted from other weights or through other heads.
    ValueError
        As :func:`extract` and :func:`read_prompts`; or when ``model_dir`` holds no model.
    """
    from calibrate import shards
    from calibrate.models import _load_tokenizer, load_local

    if not os.fspath(output):  # Path("") would be the working directory
        raise ValueError("output must name a directory, got ''")
    root = location(output)  # Path(output) made "s3://b/c" the local directory "s3:/b/c"
    if isinstance(root, Remote):
        if shard is not None:
            raise ValueError(f"shard writes a manifest beside local shards: give a local output, got {output!r}")
        if shard_dir is None:
            raise ValueError(
                f"a URL output ({output}) needs a local shard_dir (--shard-dir) for the batches, from which a rerun "
                "resumes until the cache is uploaded"
            )
    target = root if shard is None else root / shards.shard_name(*shard)
    prompts, references = read_prompts(prompts_file)
    ids = [str(i) for i in range(len(prompts))]
    sharding = None
    if shard is not None:
        index, count = shard
        batch_size = kw.get("batch_size", _DEFAULT_BATCH_SIZE)
        start, stop = shards.shard_bounds(len(prompts), index, count, batch_size=batch_size)
        shards._check_manifest(root, count)  # another run's shard count: refused before any work
        defaults = inspect.signature(extract).parameters  # a setting left at its default is recorded as one given
        request = {name: kw.get(name, defaults[name].default) for name in _SHARD_SETTINGS}
        request = {k: v.item() if isinstance(v, np.generic) else v for k, v in request.items()}  # JSON: numpy ints
        token_ids = prompt_ids(_load_tokenizer(model_dir, "model_dir"), prompts)  # every shard's, as extract's
        sharding = {
            "index": index, "count": count, "start": start, "stop": stop, "n_prompts": len(prompts),
            "prompts": shards._prompts_digest(prompts, references), "prompt_ids": shards._token_ids_digest(token_ids),
            "request": {"model_dir": str(Path(model_dir).resolve()), "dtype": dtype, **request},
        }  # fmt: skip
        found = open_cache(target, verify=False).user_meta if target.exists() and not overwrite else {}
        recorded = found.get("sharding")
        if _same_settings(recorded, sharding):
            model, _ = load_local(model_dir, device=device, dtype=dtype)  # the path may hold other weights now
            _kept_shard_iv(target, found, model, kw.get("heads"))
            shards.write_manifest(root, count)
            return open_cache(target)  # this shard is complete: nothing to redo
        prompts, ids = prompts[start:stop], ids[start:stop]
        references = None if references is None else references[start:stop]
    _save_iv(target, overwrite)  # an existing output that --overwrite may not replace: refused before any work
    made_dir = None  # the batch directory this run names itself: removed when empty, as the batches are
    if shard_dir is None:  # beside the output, never in it (a sharded output holds only shards and their manifest)
        base = Path(os.path.abspath(root))  # "." has no name
        shard_dir = made_dir = base.with_name(base.name + ".shards")
    if shard is not None:
        shard_dir = Path(shard_dir) / target.name
    if isinstance(target, Path) and Path(shard_dir).resolve().is_relative_to(target.resolve()):
        raise ValueError(  # the batches would stand where the cache is saved: it could not be, after all the work
            f"shard_dir ({shard_dir}) must lie outside the output ({target}), which the cache replaces whole"
        )
    model, tokenizer = load_local(model_dir, device=device, dtype=dtype)
    cache = extract(model, tokenizer, prompts, references=references, ids=ids, shard_dir=shard_dir, **kw)
    if sharding is not None:
        # extract digested these weights (fresh) a moment ago: the memoised digest is theirs
        sharding = {**sharding, "weights": weights_digest(model)}
        cache = cache.with_meta({**cache.user_meta, "sharding": sharding})
    try:
        cache.save(target, overwrite=overwrite)
    except FileExistsError:  # another run of this shard (a requeued job) saved it meanwhile?
        found = open_cache(target, verify=False).user_meta if sharding is not None else {}
        if sharding is None or not _same_settings(found.get("sharding"), sharding):
            raise
        _kept_shard_iv(target, found, model, kw.get("heads"))  # as a rerun keeps it: the same heads too
        cache = open_cache(target)
    if sharding is not None:
        shards.write_manifest(root, sharding["count"])
    if not keep_shards:
        _remove_batches(Path(shard_dir), math.ceil(cache.n_sequences / cache.user_meta["generation"]["batch_size"]))
        if shard is not None and made_dir is not None:
            with contextlib.suppress(OSError):  # other shards' batches are still there: the last one removes it
                made_dir.rmdir()
    return cache

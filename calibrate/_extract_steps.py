"""One extraction batch (padding, greedy generation, what every layer predicts) and the bookkeeping of the per-batch
caches in ``shard_dir`` (their identity, reading them back, deleting them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from calibrate._cache_files import _library_version
from calibrate._validation import caller_stacklevel
from calibrate.cache import LayerCache, _from_arrays, open_cache
from calibrate.heads import ExitHeads, decoder_layers, forward_hooks, record_layer_states
from calibrate.runtime._result import generated_lengths
from measures.confidence import state_saturation

#: Name of shard ``i`` under ``shard_dir``.
_SHARD_NAME = "batch_{:05d}"
#: Bytes of float32 logits processed at once by the heads (tokens x layers x vocabulary).
_LOGITS_BYTES = 64 << 20


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
    widths: list[int] = []  # positions each forward call feeds the decoder: one per call after the first, or all

    def width(module, args, out) -> None:
        widths.append((out[0] if isinstance(out, (tuple, list)) else out).shape[1])

    layer_1 = decoder_layers(model)[0]
    with record_layer_states(model) as recorded, forward_hooks([(layer_1, width)]):  # recorded[i][c]: (B, d)
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            num_beams=1,
            dola_layers=None,  # greedy, as the runtime decodes (DoLa and contrastive search: warned of there)
            penalty_alpha=None,
            # one token per forward call: prompt lookup and early-exit self-speculation feed several candidates
            # (lossless when greedy, but the hooks would keep the last candidate's state); constraints need beams
            prompt_lookup_num_tokens=None,
            assistant_early_exit=None,
            prefill_chunk_size=None,  # the prompt in one call
            force_words_ids=None,
            constraints=None,
            max_new_tokens=setup["max_new_tokens"],
            pad_token_id=setup["pad_id"],
            return_dict_in_generate=False,  # the token ids, whatever the model's generation config asks for
        )
    new = sequences[:, 1:] if setup["encoder_decoder"] else sequences[:, input_ids.shape[1] :]  # (B, N)
    n_steps = new.shape[1]
    fed = [w for c, w in enumerate(widths) if c and w not in (1, widths[0] + c)]  # one new, or all (use_cache=False)
    if fed:
        raise ValueError(
            f"a forward call of the model's generate fed {fed[0]} positions at once after the prompt; extraction "
            "records one generated token per call (an assisted or speculative decoding setting in the model's "
            "generation config?)"
        )
    if any(len(r) != n_steps for r in recorded):
        raise ValueError(
            f"recorded {[len(r) for r in recorded]} forward calls per layer for {n_steps} generated tokens; "
            "the model's generate does not run one forward per token (unsupported generation config?)"
        )
    # 3. Each row ends at its first EOS (kept) or after all steps.
    first = generated_lengths(new, setup["eos_ids"])  # (B,)
    valid = torch.arange(n_steps, device=new.device)[None, :] < first[:, None]  # (B, N)
    # 4. Token-major states of the valid positions, rows in sequence order.
    states = torch.stack([torch.stack(r, dim=1) for r in recorded], dim=2)  # (B, N, L, d)
    states = states[valid]  # (T, L, d)
    tokens = new[valid]  # (T,)
    _finite_states_iv(states, valid, setup["ids"][start:stop])
    # 5. What each layer predicts, through the heads; saturation from the states at the precision the runtime
    #    computes it from (float64 states as they are, the others in float32).
    measures = _layer_measures(heads, states, setup["top_k"])
    scores = {name: measures[name].cpu().numpy() for name in ("softmax_gap", "softmax_max", "entropy")}
    host = states if states.dtype == torch.float64 else states.float()
    scores["state_saturation"] = state_saturation(host.cpu().numpy())
    lengths = first.cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    token_ids = tokens.cpu().numpy()
    outputs = [
        tokenizer.decode(token_ids[offsets[b] : offsets[b + 1]].tolist(), skip_special_tokens=True)
        for b in range(len(lengths))
    ]
    references = None if setup["references"] is None else setup["references"][start:stop]
    return _from_arrays(  # extraction names its own cause of disagreement (_warn_disagreement)
        copy=True,
        full_tokens=token_ids,
        topk_ids=measures["topk_ids"].cpu().numpy(),
        topk_logprobs=measures["topk_logprobs"].cpu().numpy(),
        lengths=lengths,
        scores=scores,
        hidden=_stored_hidden(states) if setup["store_hidden"] else None,
        prompts=setup["prompts"][start:stop],
        outputs=outputs,
        references=references,
        ids=setup["ids"][start:stop],
        vocab=setup["vocab"],
        vocab_size=heads.vocab_size,
        meta=setup["meta"],
    )


def _finite_states_iv(states: torch.Tensor, valid: torch.Tensor, ids: list[str]) -> None:
    """ValueError naming the first layer and the prompts (by ``ids``, one per batch row) whose states ``(T, L, d)``
    (the valid positions of ``valid`` ``(B, N)``) hold NaN or inf: the model itself went non-finite (a measure
    named a block of tokens of a "hidden" array that was never asked for)."""
    bad = ~states.isfinite().all(dim=2)  # (T, L)
    if not bad.any():
        return
    layer = int(bad.any(dim=0).int().argmax()) + 1
    row_of = torch.nonzero(valid)[:, 0]  # (T,): the batch row of each valid position
    prompts = [ids[r] for r in sorted(set(row_of[bad.any(dim=1)].tolist()))]
    raise ValueError(
        f"the model's hidden states hold NaN or inf from layer {layer} on, for prompts {prompts[:10]}"
        f"{' ...' if len(prompts) > 10 else ''}: the model itself is not finite there (weights, or a half "
        "precision that overflows: load it in float32 or bfloat16)"
    )


def _stored_hidden(states: torch.Tensor) -> np.ndarray:
    """``states`` (T, L, d) as the cache stores them: float16; a ValueError naming the first layer whose finite
    states overflow float16 (T5-family models can), which the cache would store as inf."""
    stored = states.to(torch.float16)
    overflow = stored.isinf() & states.isfinite()  # (T, L, d)
    if overflow.any():
        layer = int(overflow.any(dim=2).any(dim=0).int().argmax()) + 1
        peak = float(states[overflow].abs().max())
        raise ValueError(
            f"hidden states of layer {layer} reach {peak:.4g}, beyond the range of float16 (65504) in which the cache "
            "stores them: store_hidden=True (and so the classifier and halting measures, which the runtime scores "
            "on float16 states too) cannot serve this model; extract with store_hidden=False and use a softmax or "
            "saturation measure"
        )
    return stored.cpu().numpy()


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
    shard = part.meta.get("shard")
    shard = shard if isinstance(shard, dict) else {}  # damaged or another tool's: another run's batch
    if shard.get("fingerprint") != fingerprint:
        found = shard.get("identity") if isinstance(shard.get("identity"), dict) else {}
        differ = [name for name in identity if found.get(name) != identity[name]]
        raise ValueError(
            f"shard {where} was written by another run (its {', '.join(differ) or 'identity'} differ): its shard_dir "
            f"{where.parent} holds that run's batches; use another shard_dir, or delete {where.parent} to start over"
        )
    return part


def _remove_batches(shard_dir: Path, n_batches: int) -> None:
    """Delete the batch caches ``batch_00000`` ... of a run from ``shard_dir`` (and the temporary directories of
    their saves that a killed run left, ``.batch_00000.*.tmp``), then ``shard_dir`` if it is empty."""
    names = {_SHARD_NAME.format(index) for index in range(n_batches)}
    try:
        entries = [entry.name for entry in os.scandir(shard_dir)]  # one listing (a glob per batch was quadratic)
    except OSError:  # gone already
        entries = []
    for entry in entries:
        temporary = entry.startswith(".") and entry.endswith(".tmp") and entry[1:].split(".", 1)[0] in names
        if entry in names or temporary:
            shutil.rmtree(shard_dir / entry, ignore_errors=True)
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

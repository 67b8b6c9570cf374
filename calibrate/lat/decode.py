"""Greedy decoding with token elimination in the prefill (Latency-Adjustable Transformer).

:func:`generate` runs the prompt through the model layer by layer (the runtime's layer adapters, not the
model's ``forward``). In a layer ``l`` after which the schedule keeps fewer vectors, the attention is
computed explicitly, each word vector is scored by its contribution (:mod:`calibrate.lat.scores`) and
only the best ``keep[l + 1]`` rows are gathered before the output projection and the feed-forward block:
later layers really run on shorter sequences. Always kept: the first real token of each row (BOS), the
last prompt token (it predicts the first new token) and, given a tokenizer, its special tokens. Positions keep their
original indices (RoPE and learned absolute positions alike).

Each layer's key/value cache holds the vectors that entered that layer; generated tokens then run every
layer and attend, at each layer, to the prompt vectors that entered it and to the tokens generated so far.

T5 thins out its encoder instead (:mod:`calibrate.lat.encoders`); the full decoder then cross-attends to
the survivors of the last encoder layer.

With ``speedup=1`` (or a "full model only" certificate) nothing is removed and the tokens equal
``model.generate(do_sample=False)``, including the logits processors of the model's generation config.
This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch
from torch import nn

from calibrate._digest import decoding_digest, stop_strings_iv
from calibrate._validation import int_at_least
from calibrate.certificate import Certificate, _budget, _budget_warning, _spend_iv
from calibrate.heads import ExitHeads, decoder_layers
from calibrate.lat.encoders import ENCODER_DECODER_ARCHITECTURES, encode, encoder_for
from calibrate.lat.schedule import KeepSchedule, _speedup_iv, layer_costs
from calibrate.lat.scores import SCORES, _always_kept, _gather, survivors, value_norms
from calibrate.models import _eval_mode
from calibrate.runtime._hf import _greedy_processors
from calibrate.runtime._inputs import (
    _call_settings_iv,
    _context_iv,
    _decoder_start_iv,
    _generate_iv,
    _ids_iv,
    _special_tokens_iv,
)
from calibrate.runtime._layers import Step, adapter_for, additive_mask
from calibrate.runtime._loop import _decode
from calibrate.runtime._result import generated_lengths

__all__ = ["LAT_ARCHITECTURES", "EliminationOutput", "generate", "model_id"]

#: ``config.model_type`` values whose prompts :func:`generate` can thin out.
LAT_ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "qwen3", *ENCODER_DECODER_ARCHITECTURES)


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, as the reports are
class EliminationOutput:
    """Result of :func:`generate`.

    Attributes
    ----------
    sequences : torch.Tensor
        ``(B, P + T)``: the (left-padded) prompt, then the generated tokens (pad after EOS); for T5 the
        decoder's sequence, from its start token (``P = 1``).
    prompt_length : int
        ``P``, columns of the prompt (T5: 1).
    speedup : float
        The knob (1 = the unmodified model).
    schedules : tuple of KeepSchedule
        One per row, for its own prompt length.
    processed : torch.Tensor
        ``(B, L)`` long: word vectors of each row that entered each layer in the prefill (T5: the encoder),
        i.e. the schedule, raised where a row has more always-kept tokens.
    kept : tuple of torch.Tensor
        Per layer, ``(B, W_l)`` long: the input columns that entered it, ``-1`` for filler.
    eos_ids : tuple of int
        The end-of-sequence ids decoding stopped at (a row ends at its first one).
    predicted_speedup : float
        Predicted prefill speed-up of the batch: full multiply-adds over those of the vectors each row
        processed (always-kept tokens included), summed over rows.
    """

    sequences: torch.Tensor
    prompt_length: int
    speedup: float
    schedules: tuple[KeepSchedule, ...]
    processed: torch.Tensor
    kept: tuple[torch.Tensor, ...]
    eos_ids: tuple[int, ...] = ()
    predicted_speedup: float = 1.0

    @property
    def new_tokens(self) -> torch.Tensor:
        """Generated tokens ``(B, T)``."""
        return self.sequences[:, self.prompt_length :]

    @property
    def n_generated(self) -> torch.Tensor:
        """Tokens generated per row, EOS included, shape ``(B,)``."""
        return generated_lengths(self.new_tokens, self.eos_ids)

    def __repr__(self) -> str:
        b, t = self.new_tokens.shape
        return (
            f"EliminationOutput(batch={b}, new_tokens={t}, speedup={self.speedup:g}, "
            f"mean vectors per layer={self.processed.float().mean():.1f} of {self.processed[:, 0].float().mean():.1f})"
        )


def model_id(model: nn.Module, *, fresh: bool = False) -> str:
    """A short identity of a model: architecture, sizes and a digest of what it computes (all weights and
    buffers, e.g. rotary frequencies, and each submodule's settings) and, for a generator, of the generation
    config that shapes its greedy decoding (EOS ids, logits processors).

    A token-elimination certificate records it (computed with ``fresh=True``: every tensor hashed again, not
    the digest remembered since the last change the quick check saw) and :func:`generate` refuses a
    certificate of another model.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face model with a ``config`` (``model_type``, ``hidden_size``, ``vocab_size`` and its layer
        sizes, as :func:`calibrate.lat.layer_costs` reads them).
    fresh : bool, default=False
        Hash every tensor again instead of reusing the digest remembered since the last change seen.

    Returns
    -------
    str
        ``"<model_type>/L<n_layers>/d<hidden_size>/V<vocab_size>/<digest>"``.
    """
    config = model.config
    costs = layer_costs(config)
    digest = decoding_digest(model, fresh=fresh)
    return f"{config.model_type}/L{costs.n_layers}/d{config.hidden_size}/V{config.vocab_size}/{digest}"


def _settings(score: str, min_keep: int, keep_ids) -> dict:
    """The decoding settings a ``token_keep`` certificate records (its ``measure_state``) and generate applies."""
    min_keep = int_at_least(min_keep, "min_keep")
    return {"score": score, "min_keep": min_keep, "keep_ids": sorted(int(i) for i in keep_ids)}


def _special_ids(tokenizer, vocab_size: int) -> list[int]:
    """The tokenizer's special ids (None: none) that are token ids of the model (below ``vocab_size``): a special
    token added without resizing the embeddings never reaches it (input ids are checked)."""
    special = (getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else []
    return [i for i in special if 0 <= i < vocab_size]


def _recorded_settings(state, vocab_size: int) -> dict:
    """A ``token_keep`` certificate's ``measure_state``: exactly :func:`_settings`' keys, checked."""
    state = dict(state)
    keep_ids = state.get("keep_ids")
    ok = (
        set(state) == {"score", "min_keep", "keep_ids"}
        and state["score"] in SCORES
        and isinstance(state["min_keep"], int)
        and not isinstance(state["min_keep"], bool)
        and state["min_keep"] >= 1
        and isinstance(keep_ids, (list, tuple))
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in keep_ids)
    )
    if not ok:
        raise ValueError(
            f"the certificate's measure_state must be the settings lat.fit records ({{'score': one of {SCORES}, "
            f"'min_keep': int >= 1, 'keep_ids': token ids below {vocab_size}}}), got {dict(state)!r:.200}"
        )
    return {**state, "keep_ids": sorted(keep_ids)}


def _knob_iv(model, speedup, certificate, score: str, min_keep: int, tokenizer) -> tuple[float, str, int, list[int]]:
    """``(speedup, score, min_keep, always-kept ids)`` to run with: the arguments, or what a ``token_keep``
    certificate of ``model`` was made with (its settings win over the arguments')."""
    special = _special_ids(tokenizer, model.config.vocab_size)
    speedup, chosen = _speedup_iv(speedup), _settings(score, min_keep, special)
    if certificate is not None:
        if speedup != 1.0:
            raise ValueError("give speedup= or certificate=, not both")
        _spend_iv(certificate, "token_keep", model_id(model), "calibrate.lat.fit")
        lam = certificate.lambda_hat
        if lam is not None and not 0.0 < lam <= 1.0:
            raise ValueError(f"a token_keep certificate's lambda_hat is 1 / speed-up, in (0, 1]; got {lam!r}")
        speedup = 1.0 if lam is None else 1.0 / float(lam)
        if certificate.measure_state is not None:  # what it was calibrated with, alone (a hand-made one: the arguments)
            chosen = _recorded_settings(certificate.measure_state, model.config.vocab_size)
    if chosen["score"] not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {chosen['score']!r}")
    return speedup, chosen["score"], chosen["min_keep"], chosen["keep_ids"]


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    speedup: float = 1.0,
    certificate: Certificate | None = None,
    max_new_tokens: int | None = None,
    score: str = "attention",
    tokenizer=None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    min_keep: int = 2,
) -> EliminationOutput:
    """Greedy decoding whose prefill removes the least contributing word vectors layer by layer.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model or T5 (``config.model_type`` in :data:`LAT_ARCHITECTURES`).
    input_ids : torch.Tensor
        ``(B, P)`` prompt ids, left-padded (T5: the encoder's input, padded on either side).
    attention_mask : torch.Tensor, optional
        ``(B, P)`` 0/1; default as :func:`calibrate.runtime.generate` (for decoder-only prompts,
        ``input_ids != pad_token_id`` where the pad id occurs and is no EOS id, as ``model.generate``;
        else all ones).
    speedup : float, default=1.0
        Predicted prefill speed-up to aim for, finite and >= 1 (1 = the unmodified model). Each row gets
        :meth:`KeepSchedule.from_speedup` for its own prompt length; a row too short to reach it gets its
        most aggressive schedule.
    certificate : Certificate, optional
        A ``token_keep`` certificate of this model (from :func:`calibrate.lat.fit`): decode with its
        certified speed-up and with the settings it was certified with (score, ``min_keep``, always-kept
        token ids), whatever ``speedup``, ``tokenizer`` and the defaults say.
    max_new_tokens : int, optional
        Most tokens generated per row; default the certificate's ``max_new_tokens`` (the budget it was
        calibrated with), else 32.
    score : {"attention", "value"}, default="attention"
        Contribution score (:func:`calibrate.lat.scores.contribution_scores`): attention received, or
        value-weighted.
    tokenizer : transformers tokenizer, optional
        Its special tokens are always kept (without it, only the first and, in decoders, the last prompt
        tokens are), and its
        EOS/pad ids are used when the model's generation config has none.
    eos_token_id, pad_token_id : optional
        Override the generation config (EOS ids only without a certificate: a certificate was calibrated
        under the config's, and other ones are refused).
    min_keep : int, default=2
        Vectors every layer keeps at least.

    Returns
    -------
    EliminationOutput

    Raises
    ------
    ValueError
        For a speed-up below 1, NaN or infinite; an unsupported architecture (the message names the
        supported ones); a certificate for another knob or another model;
        invalid ids or mask; a prompt plus ``max_new_tokens`` longer than the model's context.
    TypeError
        When ``speedup``, ``certificate``, ``input_ids`` or ``max_new_tokens`` has the wrong type.

    Warns
    -----
    UserWarning
        When ``max_new_tokens`` differs from the certificate's ``max_new_tokens`` (the budget it was calibrated
        with), except shorter outputs for the ``"sequence"`` loss.
    """
    config = model.config
    if config.model_type not in LAT_ARCHITECTURES:
        raise ValueError(
            f"token elimination does not support model_type {config.model_type!r}; supported: {LAT_ARCHITECTURES}"
        )
    speedup, score, min_keep, special = _knob_iv(model, speedup, certificate, score, min_keep, tokenizer)
    max_new_tokens = int_at_least(_budget(certificate, max_new_tokens), "max_new_tokens")
    _budget_warning(certificate, max_new_tokens)
    _call_settings_iv(model, certificate, eos_token_id=eos_token_id)
    stop_strings_iv(model)
    tokens = _special_tokens_iv(model, tokenizer, eos_token_id, pad_token_id)
    run = _generate_encoder_decoder if config.model_type in ENCODER_DECODER_ARCHITECTURES else _generate_decoder_only
    with _eval_mode(model):  # as calibrated: a model left in training mode would decode with dropout
        return run(model, input_ids, attention_mask, speedup, max_new_tokens, score, special, min_keep, tokens)


def _generate_decoder_only(
    model, input_ids, attention_mask, speedup, max_new_tokens, score, special, min_keep, tokens
) -> EliminationOutput:
    """:func:`generate` for decoder-only models, after its checks."""
    config = model.config
    adapter = adapter_for(model, decoder_layers(model))
    heads = ExitHeads.from_model(model)
    ids, mask = _ids_iv(input_ids, attention_mask, model, adapter.device, left_padded=True, special_tokens=tokens)
    _context_iv(model, adapter, mask, None, max_new_tokens)  # too long for the positions: refused
    eos_ids, pad_id = tokens[0], 0 if tokens[1] is None else tokens[1]  # None: no EOS, no filler written
    B, P = ids.shape
    L, T = adapter.n_layers, max_new_tokens
    schedules, keep = _schedules(config, mask, speedup, min_keep)  # keep: (B, L)

    # 1. Prefill with elimination; each layer's keys/values stay in the cache.
    cache = adapter.new_cache(B, P + T)
    always = _always_kept(ids, mask, special, last=True)  # (B, P)
    h_last, key_valid, kept, processed = _prefill(adapter, ids, mask, keep, always, score, cache)
    logits = heads(h_last[:, -1], layer=L - 1).float()  # (B, V)

    # 2. Decode: every layer; at layer i the new token attends to the prompt vectors that entered it and new tokens.
    processors = _greedy_processors(model, ids, ids, T, tokens, attention_mask=mask)  # as model.generate builds them
    sequences = torch.full((B, P + T), pad_id, dtype=torch.long, device=ids.device)
    sequences[:, :P] = ids
    eos = torch.tensor(eos_ids, dtype=torch.long, device=ids.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    first_new_position = mask.sum(dim=1)  # (B,)
    t = 0
    while True:
        if processors is not None:
            logits = processors(sequences[:, : P + t], logits)  # (B, V)
        token = torch.where(unfinished, logits.argmax(dim=-1), torch.full_like(unfinished, pad_id, dtype=torch.long))
        sequences[:, P + t] = token
        if eos.numel():
            unfinished &= ~torch.isin(token, eos)
        t += 1
        if t == T or not bool(unfinished.any()):
            break
        pos = (first_new_position + t - 1)[:, None]  # (B, 1)
        h = adapter.embed(token[:, None], pos)  # (B, 1, d)
        pos_data = adapter.positional(h, Step(None, 0, pos, None))
        for i in range(L):
            width = key_valid[i].shape[1]
            col = width + t - 1
            if bool(key_valid[i].all()):
                step_mask = None
            else:
                visible = torch.ones((B, col + 1), dtype=torch.bool, device=ids.device)
                visible[:, :width] = key_valid[i]
                step_mask = additive_mask(visible[:, None, None, :], adapter.dtype)  # (B, 1, 1, col+1)
            h = adapter.layer(i, h, Step(None, col, pos, step_mask), cache, pos_data)  # (B, 1, d)
        logits = heads(h[:, -1], layer=L - 1).float()
    return EliminationOutput(
        sequences=sequences[:, : P + t],
        prompt_length=P,
        speedup=speedup,
        schedules=schedules,
        processed=processed,
        kept=kept,
        eos_ids=eos_ids,
        predicted_speedup=_predicted(layer_costs(config), processed),
    )


def _schedules(
    config, mask: torch.Tensor, speedup: float, min_keep: int
) -> tuple[tuple[KeepSchedule, ...], torch.Tensor]:
    """One schedule per row for its own length (``mask`` ``(B, P)``), and their keep counts ``(B, L)``."""
    lengths = [int(n) for n in mask.sum(dim=1).tolist()]
    by_length = {n: KeepSchedule.from_speedup(config, n, speedup, min_keep=min_keep, clip=True) for n in set(lengths)}
    schedules = tuple(by_length[n] for n in lengths)
    return schedules, torch.tensor([s.keep for s in schedules], device=mask.device)


def _generate_encoder_decoder(
    model, input_ids, attention_mask, speedup, max_new_tokens, score, special, min_keep, tokens
) -> EliminationOutput:
    """T5: the encoder thins out its input (:func:`calibrate.lat.encoders.encode`), then the runtime's greedy
    loop decodes with the full decoder, cross-attending to the survivors of the last encoder layer."""
    encoder = encoder_for(model)
    device = next(model.parameters()).device
    ids, mask = _ids_iv(input_ids, attention_mask, model, device, left_padded=False)
    schedules, keep = _schedules(model.config, mask, speedup, min_keep)
    always = _always_kept(ids, mask, special, last=False)
    states, valid, kept, processed = encode(encoder, ids, mask, keep, always, score)  # (B, W, d), (B, W)
    start = torch.full((ids.shape[0], 1), _decoder_start_iv(model), dtype=torch.long, device=device)
    run = _generate_iv(model, start, valid.long(), None, max_new_tokens, None, None, tokens, encoder_states=states)
    processors = _greedy_processors(model, start, ids, max_new_tokens, tokens, attention_mask=None)  # no decoder mask
    out = _decode(run, *run.inputs, logits_processor=processors)
    return EliminationOutput(
        sequences=out.sequences,
        prompt_length=1,
        speedup=speedup,
        schedules=schedules,
        processed=processed,
        kept=kept,
        eos_ids=tokens[0],
        predicted_speedup=_predicted(layer_costs(model.config), processed),
    )


def _predicted(costs, processed: torch.Tensor) -> float:
    """Full-prefill multiply-adds over those of ``processed`` ``(B, L)``, summed over rows."""
    counts = processed.cpu().numpy()
    full = sum(costs.prefill([row[0]] * costs.n_layers) for row in counts)
    return float(full / sum(costs.prefill(row) for row in counts))


def _prefill(adapter, ids, mask, keep, always, score, cache, tail: int = 0):
    """Run the prompt through every layer, thinning it out where ``keep`` ``(B, L)`` drops.

    ``ids`` ``(B, P)`` may end with ``tail`` teacher-forced continuation columns (training,
    :mod:`calibrate.lat.tuning`): they run every layer, attend to each layer's survivors as generated
    tokens do, are never removed and do not count as queries in the contribution scores.

    Returns the final states ``(B, tail + 1, d)`` of the last prompt token and the continuation, per layer
    the validity ``(B, W_l)`` of the cached keys, per layer the prompt columns that entered it (``-1``
    filler), and the counts ``(B, L)`` of prompt vectors.
    """
    B, P = ids.shape
    L = adapter.n_layers
    # Per row: states, original positions, real (not filler) and always-kept flags, prompt columns.
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, P), as Hugging Face generate
    valid = mask.bool()  # (B, P)
    columns = torch.arange(P, device=ids.device).expand(B, P)  # (B, P)
    always = always | (columns >= P - tail)
    h = adapter.embed(ids, positions)  # (B, P, d)
    key_valid, kept, processed = [], [], []
    step = None  # the mask and position data change only where vectors are removed
    for i in range(L):
        prompt = valid & (columns < P - tail)  # (B, W) real prompt vectors
        if step is None:
            # (B, W, W) real query -> real key it sees; filler queries see only themselves (mask below)
            sees = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :] & valid[:, :, None]
            if bool(valid.all()):  # no filler: columns are in position order, the plain causal mask holds
                step = Step(None, 0, positions, None, causal=True)
            else:  # filler queries see themselves (no empty softmax row)
                diagonal = torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
                step = Step(None, 0, positions, additive_mask(sees | diagonal, adapter.dtype)[:, None])
            pos_data = adapter.positional(h, step)
        count = prompt.sum(dim=1)  # (B,)
        target = torch.maximum(keep[:, i + 1], (always & prompt).sum(dim=1)) if i + 1 < L else count
        eliminate = bool((target < count).any())
        adapter.query_weight = prompt.float() if eliminate else None  # real prompt queries count
        attended = adapter.attend(i, h, step, cache, pos_data)  # (B, W, H*hd), keys/values of all W written
        key_valid.append(valid)
        kept.append(torch.where(prompt, columns, -1))
        processed.append(count)
        if eliminate:
            received, values = adapter.attention  # (B, H, W) attention each vector received, values
            adapter.attention = adapter.query_weight = None
            norms = value_norms(values, adapter.out_weight(i)) if score == "value" else None
            scored = sees & prompt[:, :, None]  # what the prompt's queries see
            index, valid = survivors(received, scored, norms, always, valid, target + tail, filler_first=True)
            h, attended = _gather(h, index), _gather(attended, index)  # (B, W', ...)
            positions, always, columns = (x.gather(1, index) for x in (positions, always, columns))
            step = None
        h = adapter.finish(i, h, attended)  # (B, W', d)
    return h[:, -(tail + 1) :], key_valid, tuple(kept), torch.stack(processed, dim=1)

"""The early-exit decoding loop: prefill, then per token each layer for the rows still active, exits, emit.

:func:`_decode` runs a validated ``_Run`` (see ``_inputs``); this module imports torch.
"""

from __future__ import annotations

import torch

from calibrate.runtime._inputs import _Run
from calibrate.runtime._layers import KVCache, Step, additive_mask
from calibrate.runtime._result import EarlyExitOutput


def _take(pos_data, index: torch.Tensor):
    """Rows ``index`` of the per-step position data (RoPE cos/sin, T5's bias), or None."""
    return None if pos_data is None else tuple(x[index] for x in pos_data)


class _Exits:
    """Exit bookkeeping of one step for ``n`` rows: who exited where, and what each row emits."""

    def __init__(self, n: int, run: _Run, device) -> None:
        self.layer = torch.full((n,), run.config.n_layers, dtype=torch.long, device=device)  # (n,) 1-based
        self.state = torch.empty((n, run.adapter.hidden_size), dtype=run.adapter.state_dtype, device=device)  # (n, d)
        needs_logits = run.measure is not None and run.measure.needs_logits
        shape = (n, run.heads.vocab_size)
        self.logits = torch.empty(shape, dtype=torch.float32, device=device) if needs_logits else None  # (n, V)

    def test(
        self, run: _Run, i: int, lam: float, h: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor | None:
        """Rows (of ``h``, the active rows' states after layer ``i``) whose token exits at layer ``i``.

        ``prev`` ``(m, d)`` are their inputs of layer ``i``, ``rows`` ``(m,)`` their indices in the batch.
        """
        cfg = run.config
        if cfg.full_model or i == cfg.n_layers - 1:
            return None
        if cfg.exit_layer is not None:
            return torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if i + 1 == cfg.exit_layer else None
        logits = run.heads(h, layer=i).float() if run.measure.needs_logits else None  # (m, V)
        passed = run.measure(i, h, prev, logits, rows).double() >= lam  # (m,)
        if logits is not None:
            self._pending_logits = logits[passed]
        return passed

    def record(self, run: _Run, i: int, rows: torch.Tensor, h: torch.Tensor) -> None:
        """Rows ``rows`` (local indices) exit at layer ``i`` with states ``h`` ``(m, d)``."""
        self.layer[rows] = i + 1
        self.state[rows] = run.heads._adapt(h, i).to(self.state.dtype)  # float16 adapters of float32 T5 states
        if self.logits is not None and run.config.exit_layer is None:
            self.logits[rows] = self._pending_logits

    def emit(self, run: _Run, rest: torch.Tensor | None, h_rest: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, V)`` float32: exited rows from their exit layer, rows ``rest`` from layer ``L``."""
        if rest is None:
            rest = slice(None)
        self.state[rest] = h_rest
        if self.logits is None:
            return run.heads(self.state, layer=run.config.n_layers - 1).float()  # one head call for all rows
        self.logits[rest] = run.heads(h_rest, layer=run.config.n_layers - 1).float()
        return self.logits


@torch.no_grad()
def _decode(
    run: _Run,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    logits_processor=None,
    stopping_criteria=None,
) -> EarlyExitOutput:
    adapter, cfg = run.adapter, run.config
    device, dtype = adapter.device, adapter.dtype
    B, P = input_ids.shape  # the decoder prompt: the prompt, or the start token of an encoder-decoder model
    L, T = cfg.n_layers, cfg.max_new_tokens

    # 1. Buffers: output ids (pad after EOS), exit layers, pre-allocated keys/values of every layer.
    sequences = torch.full((B, P + T), cfg.pad_token_id, dtype=torch.long, device=device)  # (B, P+T)
    sequences[:, :P] = input_ids
    exit_layers = torch.zeros((B, T), dtype=torch.long, device=device)  # (B, T)
    cache: KVCache = adapter.new_cache(B, P + T)
    if run.encoder is not None:  # encoder-decoder: the encoder runs once, each layer's cross-attention K/V once
        adapter.encode(cache, run.encoder.mask, ids=run.encoder.ids, states=run.encoder.states)
    eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long, device=device)  # (n_eos,)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)  # (B,)
    # Rows a stopping criterion ended get padding only when one criterion stops at EOS, as in HF's _sample;
    # otherwise (max length, stop strings, a user's criterion) they keep decoding until every row has ended.
    pad_finished = stopping_criteria is None or any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    thresholds: list[float] = []

    # 2. Positions and keys visible to each row: left padding is masked, positions count real tokens
    #    (as Hugging Face generate does: cumsum(mask) - 1).
    keys_visible = torch.ones((B, P + T), dtype=torch.bool, device=device)  # (B, P+T)
    keys_visible[:, :P] = attention_mask.bool()
    padded = not bool(attention_mask.all())
    positions = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, P)
    first_new_position = attention_mask.sum(dim=1)  # (B,) position of the first generated token

    # 3. Prefill: the whole prompt runs every layer; keep the last position's input and layer outputs.
    causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()  # (P, P)
    diagonal = torch.eye(P, dtype=torch.bool, device=device)  # padding queries see themselves: no empty row
    allowed = (causal[None] & keys_visible[:, None, :P]) | diagonal[None]  # (B, P, P)
    step = Step(None, 0, positions, additive_mask(allowed, dtype)[:, None])  # mask (B, 1, P, P)
    h = adapter.embed(input_ids, positions)  # (B, P, d)
    pos_data = adapter.positional(h, step)  # RoPE cos/sin, T5's relative position bias, or None
    last = [h[:, -1]]
    for i in range(L):
        h = adapter.layer(i, h, step, cache, pos_data)  # (B, P, d)
        last.append(h[:, -1])
    last_states = torch.stack(last, dim=1)  # (B, L+1, d): embedding, then the output of layers 1..L
    if run.measure is not None:
        run.measure.prefill(last_states[:, 1:])  # e.g. the sequence halting head's depth distribution

    # 4. The first token's exit, decided on the last position layer by layer, as in the cache.
    lam = cfg.threshold(0)
    exits = _Exits(B, run, device)
    open_rows = torch.arange(B, device=device)  # rows whose first token has not exited yet
    for i in range(L):
        h_open = last_states[open_rows, i + 1]  # (m, d)
        passed = exits.test(run, i, lam, h_open, last_states[open_rows, i], open_rows) if open_rows.numel() else None
        if passed is not None and bool(passed.any()):
            exits.record(run, i, open_rows[passed], h_open[passed])
            open_rows = open_rows[~passed]
    logits = exits.emit(run, open_rows, last_states[open_rows, L])  # (B, V)
    t = 0
    rows = torch.arange(B, device=device)
    layer_of = exits.layer

    while True:
        # 5. Emit token t of the unfinished rows (logits processors as in HF greedy search), record exits.
        if logits_processor is not None:  # processors may be batch-aware: give them every row
            every = logits.new_zeros((B, logits.shape[1])).index_copy_(0, rows, logits)  # (B, V)
            logits = logits_processor(sequences[:, : P + t], every)[rows]  # (n, V)
        token = logits.argmax(dim=-1)  # (n,)
        sequences[rows, P + t] = token
        exit_layers[rows, t] = layer_of
        thresholds.append(lam)
        # 6. Rows that produced EOS (or meet a stopping criterion) finish; stop when all have.
        if stopping_criteria is not None:
            unfinished &= ~stopping_criteria(sequences[:, : P + t + 1], None).to(device)
        elif eos.numel():
            unfinished[rows] &= ~torch.isin(token, eos)
        t += 1
        if t == T or not bool(unfinished.any()):
            break

        # 7. Next step: the unfinished rows feed their last token at cache column P + t - 1.
        if pad_finished:  # else every row decodes on: rows stays arange(B)
            rows = torch.nonzero(unfinished).reshape(-1)  # (n,) global row indices
        n = rows.numel()
        global_rows = None if n == B else rows
        col = P + t - 1
        every = (first_new_position + t - 1)[:, None]  # (B, 1): finished rows' too, which generate feeds on
        pos = every[rows]  # (n, 1)
        mask = additive_mask(keys_visible[rows, None, None, : col + 1], dtype) if padded else None  # (n, 1, 1, col+1)
        step = Step(global_rows, col, pos, mask)
        h = adapter.embed(sequences[rows, col : col + 1], pos)  # (n, 1, d)
        if n == B:
            pos_data = adapter.positional(h, step)
        else:  # from every row's position: longrope and dynamic rope pick their frequencies by the call's largest
            pos_data = _take(adapter.positional(h.new_empty((B, *h.shape[1:])), Step(None, col, every, None)), rows)
        lam = cfg.threshold(t)
        exits = _Exits(n, run, device)

        # 8. Layers: active rows run the layer (gathered when not all), exited rows only propagate
        #    their frozen exit state into the layer's keys/values.
        active: torch.Tensor | None = None  # local indices of the active rows; None = all n rows
        done: torch.Tensor | None = None  # local indices of the rows that exited
        for i in range(L):
            if done is not None:
                adapter.propagate(i, h[done], step.subset(done, rows[done]), cache, _take(pos_data, done))
            if active is None:
                prev, h = h, adapter.layer(i, h, step, cache, pos_data)  # (n, 1, d)
                h_act = h
            elif active.numel():
                prev = h[active]  # (m, 1, d)
                h_act = adapter.layer(i, prev, step.subset(active, rows[active]), cache, _take(pos_data, active))
                h[active] = h_act
            else:
                continue
            batch_rows = rows if active is None else rows[active]  # (m,) the active rows' batch indices
            passed = exits.test(run, i, lam, h_act[:, -1], prev[:, -1], batch_rows)  # (m,) or None
            if passed is None or not bool(passed.any()):
                continue
            local = torch.arange(n, device=device) if active is None else active
            exits.record(run, i, local[passed], h_act[passed, -1])
            done = local[passed] if done is None else torch.cat([done, local[passed]])
            active = local[~passed]

        # 9. Logits of every unfinished row: exited rows through their exit layer, the rest through layer L.
        logits = exits.emit(run, active, h[:, -1] if active is None else h[active, -1])  # (n, V)
        layer_of = exits.layer

    n_steps = t
    return EarlyExitOutput(
        sequences=sequences[:, : P + n_steps],
        exit_layers=exit_layers[:, :n_steps],
        prompt_length=P,
        n_layers=L,
        thresholds=tuple(thresholds),
        measure=cfg.measure,
        config=cfg,
    )

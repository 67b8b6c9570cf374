"""Offline tuning for token elimination (``calibrate.lat.finetune``)."""

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
from _tiny_hf import BOS, left_pad, tiny_model, tiny_tokenizer

from calibrate import lat
from calibrate.heads import ExitHeads, decoder_layers
from calibrate.lat.decode import _prefill, _schedules
from calibrate.lat.scores import _always_kept
from calibrate.runtime._layers import adapter_for

ROWS = [[BOS] + [4 + (k * j + k) % 60 for j in range(10 + 3 * k)] for k in range(1, 5)]


@pytest.mark.parametrize("score", ["attention", "value"])
def test_teacher_forced_tail_equals_step_by_step_decoding(score):
    """The training forward (prompt thinned out, continuation fed back) predicts what generate emits."""
    model = tiny_model("llama", seed=11, n_layers=6)
    ids, mask = left_pad(ROWS)
    out = lat.generate(model, ids, mask, speedup=2.5, max_new_tokens=6, score=score, eos_token_id=[])
    y = out.new_tokens  # (B, 6), no EOS stop
    adapter = adapter_for(model, decoder_layers(model))
    _, keep = _schedules(model.config, mask, 2.5, 2)
    tail = y.shape[1] - 1
    always = torch.cat([_always_kept(ids, mask, [], last=True), torch.ones_like(y[:, :tail], dtype=torch.bool)], 1)
    full_ids, full_mask = torch.cat([ids, y[:, :tail]], 1), torch.cat([mask, torch.ones_like(y[:, :tail])], 1)
    cache = adapter.new_cache(len(ROWS), full_ids.shape[1])
    with torch.no_grad():
        h, _, kept, processed = _prefill(adapter, full_ids, full_mask, keep, always, score, cache, tail=tail)
    assert torch.equal(processed, out.processed)  # the tail does not count, nor change who survives
    for a, b in zip(out.kept, kept):
        assert [sorted(c for c in row if c >= 0) for row in a.tolist()] == [
            sorted(c for c in row if c >= 0) for row in b.tolist()
        ]
    logits = ExitHeads.from_model(model)(h, layer=5)  # (B, 6, V)
    assert torch.equal(logits.argmax(dim=-1), y)


def test_finetune_lowers_the_loss_and_returns_a_tuned_copy():
    model = tiny_model("llama", seed=12, n_layers=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = tiny_tokenizer()
    prompts = [" ".join(f"w{(7 * i + 3 * j) % 60}" for j in range(14 + i % 6)) for i in range(24)]
    result = lat.finetune(
        model, tokenizer, prompts, speedup_range=(2.0, 3.0), steps=40, batch_size=8, lr=3e-3, max_new_tokens=6
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    tuned = result.model
    assert type(tuned) is type(model) and not any(p.requires_grad for p in tuned.parameters())
    assert set(tuned.state_dict()) == set(before)  # adapters merged: a plain model again
    assert result.losses.shape == result.speedups.shape == (40,)
    assert ((result.speedups >= 2.0) & (result.speedups <= 3.0)).all() and result.speedups.std() > 0
    assert result.losses[-10:].mean() < 0.7 * result.losses[:10].mean()
    # the tuned model at speed-up 2.5 agrees more with the unmodified model's continuations
    ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts])

    def disagreement(m, speedup):
        full = lat.generate(model, ids, mask, max_new_tokens=6, tokenizer=tokenizer, eos_token_id=[]).new_tokens
        return (
            (
                lat.generate(
                    m, ids, mask, speedup=speedup, max_new_tokens=6, tokenizer=tokenizer, eos_token_id=[]
                ).new_tokens
                != full
            )
            .float()
            .mean()
        )

    assert disagreement(tuned, 2.5) < disagreement(model, 2.5)
    assert lat.model_id(tuned) != lat.model_id(model)
    assert "FinetuneResult(steps=40" in repr(result)
    ax = result.plot().axes[0]  # a figure, as every result's plot returns
    assert len(ax.collections) == 1 and ax.get_legend_handles_labels()[1] == ["running mean (2 steps)"]


def test_finetune_bad_input():
    model = tiny_model("llama", seed=1, n_layers=2)
    tokenizer = tiny_tokenizer()
    prompts = ["w1 w2 w3"] * 4
    with pytest.raises(ValueError, match=r"does not support model_type 'gpt2'.*llama"):
        lat.finetune(tiny_model("gpt2", seed=1), tokenizer, prompts)
    for bad in [(0.5, 2.0), (3.0, 2.0), (1.0,), (1.0, float("nan"))]:
        with pytest.raises(ValueError, match="speedup"):
            lat.finetune(model, tokenizer, prompts, speedup_range=bad)
    with pytest.raises(ValueError, match="steps"):
        lat.finetune(model, tokenizer, prompts, steps=0)
    with pytest.raises(ValueError, match="alpha"):
        lat.finetune(model, tokenizer, prompts, alpha=0.0)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        lat.finetune(model, tokenizer, prompts, targets=("c_attn",), steps=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts"):
        lat.finetune(model, tokenizer, [])
    long = " ".join(["w1"] * 60)  # 60 tokens + 5 teacher-forced ones > the 64 positions
    with pytest.raises(
        ValueError, match=r"tokens \+ 5 of max_new_tokens=5 fed back\): prompt 1 .*nothing is truncated"
    ):
        lat.finetune(model, tokenizer, ["w1 w2", long], steps=1, max_new_tokens=5)
    a, b = (lat.finetune(model, tokenizer, prompts, steps=1, max_new_tokens=2, seed=2**64) for _ in range(2))
    # torch takes seeds below 2**64; larger ones are drawn down, reproducibly
    np.testing.assert_array_equal(a.losses, b.losses)
    rates = dict(lr=Fraction(1, 100), alpha=np.float32(16), anchor=Fraction(1, 2))  # taken as the floats they are
    exact = lat.finetune(model, tokenizer, prompts, steps=1, max_new_tokens=2, **rates)  # was a TypeError mid-training
    np.testing.assert_array_equal(exact.losses, lat.finetune(model, tokenizer, prompts, steps=1, max_new_tokens=2,
                                                             lr=0.01, alpha=16.0, anchor=0.5).losses)  # fmt: skip
    result = lat.finetune(model, tokenizer, prompts, steps=50, max_new_tokens=2, max_seconds=1e-9)
    assert len(result.losses) == 1  # stopped by the time limit
    np.testing.assert_array_equal(result.speedups >= 1.0, True)


def test_lora_adapter_adds_alpha_over_rank_times_b_a_and_merges_the_same():
    from calibrate.lat.tuning import _LoRALinear

    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(5, 4)
    x = torch.randn((7, 5), generator=g)
    lora = _LoRALinear(base, rank=2, alpha=6.0, generator=g)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at the start: the base layer exactly
    with torch.no_grad():
        lora.b.copy_(torch.randn((4, 2), generator=g))
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ lora.a.T) @ lora.b.T  # alpha / r = 3
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.weight, base.weight + 3.0 * lora.b @ lora.a)
    merged = lora.merged()
    torch.testing.assert_close(merged(x), expected)


def test_finetune_draws_each_batch_without_replacement_and_refuses_a_bad_anchor(monkeypatch):
    import calibrate.lat.tuning as tuning

    model = tiny_model("llama", seed=1, n_layers=2)
    tokenizer = tiny_tokenizer()
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]  # distinct prompts
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="anchor must be a finite number >= 0"):
            lat.finetune(model, tokenizer, prompts, anchor=bad)
    with pytest.raises(ValueError, match=r"score must be one of \('attention', 'value'\), got 'norm'"):
        lat.finetune(model, tokenizer, prompts, score="norm")
    with pytest.raises(ValueError, match="targets must be a non-empty sequence of projection names, got 'q_proj'"):
        lat.finetune(model, tokenizer, prompts, targets="q_proj")
    for bad, error in ((0, ValueError), (-1.0, ValueError), ("1", TypeError), (True, TypeError)):  # True: 1 s
        with pytest.raises(error, match="max_seconds must be a finite number > 0"):
            lat.finetune(model, tokenizer, prompts, max_seconds=bad)
    result = lat.finetune(model, tokenizer, prompts, steps=1, max_new_tokens=2, max_seconds=np.float32(60))
    assert len(result.losses) == 1  # a numpy scalar (was "must be a number > 0, got np.float32(60.0)")
    # the first step's loss is the drawn speed-up's plus anchor times speed-up 1's (same seed: same batch and draw)
    first = [
        lat.finetune(model, tokenizer, prompts, steps=1, anchor=a, max_new_tokens=2, progress=False).losses[0]
        for a in (0.0, 1.0, 2.0)
    ]
    assert first[1] > first[0] and first[2] - first[1] == pytest.approx(first[1] - first[0], rel=1e-4)
    batches = []
    original = tuning._target_loss

    def spy(adapter, heads, ids, mask, *args):
        batches.append(ids.tolist())
        return original(adapter, heads, ids, mask, *args)

    monkeypatch.setattr(tuning, "_target_loss", spy)
    lat.finetune(model, tokenizer, prompts, steps=8, batch_size=6, anchor=0.0, max_new_tokens=2, progress=False)
    assert len(batches) == 8
    for rows in batches:  # all six prompts in every batch, each once
        assert len({tuple(r) for r in rows}) == 6


def test_finetune_result_repr_gives_the_mean_loss_of_the_first_and_last_tenth():
    from calibrate.lat.tuning import FinetuneResult

    result = FinetuneResult(model=None, losses=np.arange(20.0), speedups=np.ones(20), trainable=3, seconds=2.0)
    assert repr(result) == "FinetuneResult(steps=20, trainable=3, seconds=2, loss first/last tenth=0.5000/18.5000)"
    for arr in (result.losses, result.speedups, copy.deepcopy(result).losses):  # frozen, arrays included
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1.0


def test_target_loss_is_the_mean_cross_entropy_over_real_target_tokens_only():
    """Targets of different lengths are right-padded in a batch: the loss averages the real target tokens only
    (nats per target token, as FinetuneResult.losses documents), never the padding after a short target."""
    import torch.nn.functional as F

    from calibrate.lat.tuning import _target_loss

    model = tiny_model("llama", seed=5, n_layers=3).eval()
    prompts = ROWS[:3]
    targets = [[7, 9, 11, 13, 15], [21, 1], [30, 31, 32]]  # lengths 5, 2 (ends at EOS) and 3
    ids, mask = left_pad(prompts)
    y = torch.zeros((3, 5), dtype=torch.long)
    y_mask = torch.zeros((3, 5), dtype=torch.long)
    for r, t in enumerate(targets):
        y[r, : len(t)], y_mask[r, : len(t)] = torch.tensor(t), 1
    adapter, heads = adapter_for(model, decoder_layers(model)), ExitHeads.from_model(model)
    with torch.no_grad():
        loss = _target_loss(adapter, heads, ids, mask, y, y_mask, 1.0, [], "attention")
        total, count = 0.0, 0
        for p, t in zip(prompts, targets):  # each row alone, unpadded, through the plain model (speed-up 1)
            logits = model(input_ids=torch.tensor([p + t[:-1]])).logits[0, len(p) - 1 :]
            total += float(F.cross_entropy(logits.float(), torch.tensor(t), reduction="sum"))
            count += len(t)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)

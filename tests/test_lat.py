"""Token elimination: contribution scores, keep schedules, and decoding that physically thins the prompt."""

import copy
import dataclasses
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _tiny_hf import BOS, EOS, PAD, tiny_model

import calibrate
from calibrate import lat
from calibrate._format import level
from calibrate.certificate import Certificate
from calibrate.heads import ExitHeads, decoder_layers
from calibrate.lat.decode import _prefill
from calibrate.lat.schedule import KeepSchedule, layer_costs
from calibrate.lat.scores import _always_kept
from calibrate.runtime._layers import adapter_for

SMOLLM2 = SimpleNamespace(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
)


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


def _causal_padded(n: int, width: int, pads: list[int]) -> torch.Tensor:
    """``(n, W, W)`` real query -> real key under a causal mask, row ``b`` left-padded by ``pads[b]``."""
    allowed = torch.zeros((n, width, width), dtype=torch.bool)
    for b, p in enumerate(pads):
        for i in range(p, width):
            allowed[b, i, p : i + 1] = True
    return allowed


def _random_probs(allowed: torch.Tensor, heads: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((allowed.shape[0], heads, *allowed.shape[1:]), generator=g) * 2
    probs = logits.masked_fill(~allowed[:, None], -math.inf).softmax(dim=-1)
    return torch.nan_to_num(probs)  # padding queries: all-masked rows


def test_scores_equal_a_plain_loop():
    allowed = _causal_padded(3, 7, [0, 2, 5])
    probs = _random_probs(allowed, heads=4, seed=0)
    padding = ~allowed.any(dim=2)  # padding queries; a model's attention gives them some row anyway:
    probs = torch.where(padding[:, None, :, None], torch.full_like(probs, 1 / 7), probs)  # must count for nothing
    norms = torch.rand((3, 4, 7), generator=torch.Generator().manual_seed(1)) + 0.1
    real = allowed.any(dim=2).float()
    for weighted in (False, True):
        got = lat.contribution_scores(lat.attention_received(probs, real), allowed, norms if weighted else None)
        expected = torch.zeros((3, 7))
        for b in range(3):
            for j in range(7):
                received, uniform = 0.0, 0.0
                for i in range(7):
                    if not allowed[b, i, j]:
                        continue
                    uniform += 1.0 / float(allowed[b, i].sum())
                    for h in range(4):
                        received += float(probs[b, h, i, j]) * (float(norms[b, h, j]) if weighted else 1.0) / 4
                expected[b, j] = received / uniform if uniform else 0.0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_uniform_causal_attention_scores_flat():
    allowed = _causal_padded(2, 9, [0, 3])
    uniform = allowed.float() / allowed.float().sum(dim=-1, keepdim=True).clamp_min(1)
    received = lat.attention_received(uniform[:, None].expand(2, 3, 9, 9), allowed.any(dim=2))
    scores = lat.contribution_scores(received, allowed)
    torch.testing.assert_close(scores[0], torch.ones(9))
    torch.testing.assert_close(scores[1, 3:], torch.ones(6))
    assert scores[1, :3].eq(0).all()  # padding keys: nobody sees them
    # without the normalisation the raw column sums favour early tokens (the bias it removes)
    raw = uniform[0].sum(dim=0)
    assert raw[0] > 2 * raw[-1]


def test_counting_attention_with_a_key_only_mask_over_several_chunks():
    """Encoders pass a key-padding mask (n, 1, 1, S_k): every chunk of queries must see it."""
    from calibrate.runtime._layers import additive_mask, attend_and_count

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((2, 4, 11, 8), generator=g) for _ in range(3))
    valid = torch.ones((2, 11), dtype=torch.bool)
    valid[1, 7:] = False
    mask = additive_mask(valid[:, None, None, :], torch.float32)
    out, received = attend_and_count(q, k, v, mask, 0.3, valid.float(), chunk=3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expected)
    probs = ((q @ k.transpose(-1, -2)) * 0.3 + mask).softmax(-1)
    torch.testing.assert_close(received, torch.einsum("nhqk,nq->nhk", probs, valid.float()))


def test_value_norms_equal_a_loop():
    """Grouped-query attention: 4 query heads over 2 key/value heads (head h reads h // 2), hd = 3."""
    g = torch.Generator().manual_seed(2)
    values, w = torch.randn((2, 2, 5, 3), generator=g), torch.randn((12, 6), generator=g)
    got = lat.value_norms(values, w)
    assert got.shape == (2, 4, 5)
    for b in range(2):
        for h in range(4):
            for j in range(5):
                expected = torch.linalg.vector_norm(values[b, h // 2, j] @ w[3 * h : 3 * h + 3])
                torch.testing.assert_close(got[b, h, j], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="out_weight"):
        lat.value_norms(values, torch.randn((10, 6)))


def test_value_norms_of_values_the_output_projection_erases_are_zero_not_nan():
    """A value in the null space of its head's output block writes nothing: norm ~0 (rounding must not give NaN)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn((8, 3, 2), generator=g)  # 8 heads, hd = 3, d = 2: a 1-d null space per head
    null = torch.linalg.cross(w[:, :, 0], w[:, :, 1], dim=-1)  # (8, 3)
    values = null[None, :, None, :] * torch.randn((1, 8, 40, 1), generator=g)  # (1, KVH = 8, 40, 3)
    got = lat.value_norms(values, w.reshape(24, 2))
    assert torch.isfinite(got).all() and got.max() < 1e-2


def test_value_norms_refuse_query_heads_that_do_not_share_the_key_value_heads():
    values = torch.zeros((1, 2, 4, 3))  # 2 key/value heads, hd = 3
    with pytest.raises(ValueError, match="H a multiple of the 2 key/value heads and hd=3, got \\(9, 6\\)"):
        lat.value_norms(values, torch.zeros((9, 6)))  # 3 query heads


def test_keys_no_real_query_sees_score_zero_whatever_they_received():
    allowed = _causal_padded(1, 5, [2])  # keys 0, 1: padding
    received = torch.ones((1, 3, 5))  # a model may give padding keys some attention anyway
    scores = lat.contribution_scores(received, allowed)
    assert scores[0, :2].eq(0).all() and torch.isfinite(scores).all()
    expected = torch.tensor([1 / 3 + 1 / 2 + 1, 1 / 3 + 1 / 2, 1 / 3])  # 1 / uniform share of the real keys
    torch.testing.assert_close(scores[0, 2:], 1 / expected)


def test_survivors_keep_the_best_real_vectors_in_column_order_with_the_filler_on_the_right_side():
    from calibrate.lat.scores import survivors

    allowed = torch.ones((2, 5, 5), dtype=torch.bool)  # every query sees every key (even row 1's filler)
    received = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [0.4, 0.1, 0.8, 0.2, 5.0]])[:, None, :].expand(2, 2, 5)
    always = torch.zeros((2, 5), dtype=torch.bool)
    always[:, 0] = True  # kept whatever its score
    valid = torch.tensor([[True] * 5, [True] * 4 + [False]])  # row 1's last column: filler, however high it scores
    target = torch.tensor([3, 2])
    index, kept = survivors(received, allowed, None, always, valid, target, filler_first=False)
    assert index[0].tolist() == [0, 1, 3] and kept[0].all()
    assert index[1, :2].tolist() == [0, 2] and kept[1].tolist() == [True, True, False]
    index, kept = survivors(received, allowed, None, always, valid, target, filler_first=True)
    assert index[0].tolist() == [0, 1, 3] and kept[0].all()
    assert index[1, 1:].tolist() == [0, 2] and kept[1].tolist() == [False, True, True]


@pytest.mark.parametrize("filler_first", [True, False])
def test_tied_scores_keep_the_same_vectors_however_a_row_is_padded(filler_first):
    """Ties go to the earlier column: torch.topk broke them by the row's width, so a batch's padding changed which
    vectors a prompt kept (and what it generated)."""
    from calibrate.lat.scores import survivors

    n = 13
    scores = torch.tensor([1.0, 0.5, 0.25, 0.25, 0.75, 0.25, 0.25, 0.5, 0.25, 0.0, 0.25, 0.5, 2.0])
    for pad in range(0, 40):
        width = n + pad
        real = torch.arange(width) >= pad if filler_first else torch.arange(width) < n  # left or right padding
        received = torch.zeros(1, 1, width)
        received[0, 0, real] = scores
        allowed = (real[:, None] & real[None, :])[None]
        index, kept = survivors(received, allowed, None, torch.zeros(1, width, dtype=torch.bool), real[None],
                                torch.tensor([7]), filler_first=filler_first)  # fmt: skip
        columns = index[kept] - (pad if filler_first else 0)  # the 7th is one of six tied at 0.25: the first
        assert columns.tolist() == [0, 1, 2, 4, 7, 11, 12], f"padded by {pad}: kept {columns.tolist()}"


def test_a_nan_score_counts_as_zero_when_choosing_survivors():
    from calibrate.lat.scores import survivors

    allowed = torch.ones((1, 4, 4), dtype=torch.bool)
    received = torch.tensor([[[0.1, 0.6, 0.3, math.nan]]])  # e.g. a half-precision overflow in one key's column
    always = torch.tensor([[True, False, False, False]])
    index, kept = survivors(received, allowed, None, always, torch.ones((1, 4), dtype=torch.bool), torch.tensor([3]),
                            filler_first=False)  # fmt: skip
    assert index[0].tolist() == [0, 1, 2] and kept.all()


def test_always_kept_first_real_token_specials_and_the_last_column_of_decoders_only():
    ids = torch.tensor([[0, 0, 7, 5, 9, 6], [7, 5, 9, 6, 8, 0]])  # row 0 left-padded, row 1 right-padded
    mask = (ids != 0).long()
    decoder = _always_kept(ids, mask, [9], last=True)
    encoder = _always_kept(ids, mask, [9], last=False)
    assert decoder.tolist() == [[False, False, True, False, True, True], [True, False, True, False, False, False]]
    assert encoder.tolist() == [[False, False, True, False, True, False], [True, False, True, False, False, False]]


def test_contribution_scores_refuse_mismatched_shapes():
    allowed = torch.ones((2, 3, 5), dtype=torch.bool)
    for received in (torch.ones((2, 4, 6)), torch.ones((3, 4, 5)), torch.ones((2, 5))):
        with pytest.raises(ValueError, match=r"received must be \(n, H, S_k\) and allowed \(n, S_q, S_k\)"):
            lat.contribution_scores(received, allowed)


def test_chunked_counting_attention_equals_sdpa_and_the_probabilities():
    """The adapters' explicit attention: same output as the fused kernel, received = sum of the probabilities."""
    from calibrate.runtime._layers import Step

    model = tiny_model("llama", seed=8, n_layers=2)
    adapter = adapter_for(model, decoder_layers(model))
    ids, mask = _batch(PROMPTS[:3])
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    valid = mask.bool()
    sees = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    allowed = sees | torch.eye(ids.shape[1], dtype=torch.bool)
    from calibrate.runtime._layers import additive_mask

    h = adapter.embed(ids, positions)
    for step in (
        Step(None, 0, positions, additive_mask(allowed, h.dtype)[:, None]),
        Step(None, 0, positions[:1], None, causal=True),
    ):
        x = h[: step.positions.shape[0]]
        pos_data = adapter.positional(x, step)
        fused = adapter.attend(0, x, step, adapter.new_cache(x.shape[0], ids.shape[1]), pos_data)
        real = valid[: x.shape[0]]
        adapter.query_weight, adapter.count_chunk = real.float(), 4  # several chunks
        explicit = adapter.attend(0, x, step, adapter.new_cache(x.shape[0], ids.shape[1]), pos_data)
        received, values = adapter.attention
        adapter.query_weight = adapter.attention = None
        adapter.count_chunk = 128
        torch.testing.assert_close(explicit[real], fused[real], rtol=1e-4, atol=1e-5)  # filler outputs unused
        # received equals the column sums of explicitly computed probabilities
        attn = model.model.layers[0].self_attn
        xn = model.model.layers[0].input_layernorm(x)
        q, k, _ = adapter._qkv(attn, xn, pos_data, query=True)
        scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * adapter.scales[0]
        m = (
            step.mask
            if step.mask is not None
            else additive_mask(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril(), x.dtype)
        )
        probs = (scores + m).softmax(-1)
        expected = (probs * real[:, None, :, None]).sum(dim=2)  # real queries only
        torch.testing.assert_close(received, expected, rtol=1e-4, atol=1e-5)
        assert values.shape[1] == adapter.n_kv_heads


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def _macs(config, keep) -> float:
    """Prefill multiply-adds written out per layer: projections, attention pairs, output and MLP of survivors."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    hd, ff = d // heads, config.intermediate_size
    total = 0.0
    for i, n in enumerate(keep):
        m = keep[i + 1] if i + 1 < len(keep) else n
        total += n * d * hd * (heads + 2 * kv) + n * n * 2 * heads * hd + m * (heads * hd * d + 3 * d * ff)
    return total


@pytest.mark.parametrize("prompt_len", [3, 64, 512, 2048])
def test_schedule_properties(prompt_len):
    previous = None
    for speedup in (1.0, 1.1, 1.5, 2.0, 3.0):
        try:
            s = KeepSchedule.from_speedup(SMOLLM2, prompt_len, speedup)
        except ValueError as exc:
            assert (
                "the most is" in str(exc) and speedup > KeepSchedule.from_speedup(SMOLLM2, prompt_len, 1.0).max_speedup
            )
            continue
        keep = np.array(s.keep)
        assert keep.size == 30 and keep[0] == prompt_len and keep.min() >= min(2, prompt_len)
        assert np.all(np.diff(keep) <= 0)
        assert s.predicted_speedup >= speedup - 1e-9
        assert s.predicted_speedup == pytest.approx(_macs(SMOLLM2, [prompt_len] * 30) / _macs(SMOLLM2, s.keep))
        if previous is not None:
            assert np.all(keep <= previous)  # a faster knob never keeps more
        previous = keep
    assert KeepSchedule.from_speedup(SMOLLM2, prompt_len, 1.0).keep == (prompt_len,) * 30


@pytest.mark.parametrize("speedup", [1.2, 1.7, 2.5])
def test_schedule_is_the_least_aggressive_that_reaches_the_knob(speedup):
    """Predicted speed-up just above the knob (the counts are integers), never far above."""
    s = KeepSchedule.from_speedup(SMOLLM2, 512, speedup)
    assert speedup <= s.predicted_speedup <= speedup * 1.01


def test_unreachable_speedup_is_refused_with_the_maximum():
    best = KeepSchedule.from_speedup(SMOLLM2, 16, 1.0).max_speedup
    with pytest.raises(ValueError, match=f"the most is {best:.4g}"):
        KeepSchedule.from_speedup(SMOLLM2, 16, best * 1.5)
    clipped = KeepSchedule.from_speedup(SMOLLM2, 16, best * 1.5, clip=True)
    assert clipped.keep == (16,) * 5 + (2,) * 25  # eliminations after every 5th of 30 layers
    assert clipped.predicted_speedup == pytest.approx(best)


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf"), -1.0])
def test_bad_speedup_named(bad):
    with pytest.raises(ValueError, match="speedup"):
        KeepSchedule.from_speedup(SMOLLM2, 64, bad)
    with pytest.raises(TypeError, match="speedup"):
        KeepSchedule.from_speedup(SMOLLM2, 64, True)


def test_layer_costs_of_gpt2_config():
    from transformers import GPT2Config

    c = layer_costs(GPT2Config(n_layer=12, n_embd=768, n_head=12))
    assert (c.n_layers, c.qkv, c.attn, c.out, c.mlp) == (12, 3 * 768 * 768, 2 * 768, 768 * 768, 2 * 768 * 3072)
    assert layer_costs({"n_layer": 12, "n_embd": 768, "n_head": 12}) == c  # a config.json as read: its message
    with pytest.raises(ValueError, match="model_config must give positive hidden_size"):  # said these keys were absent
        layer_costs({"n_layer": 12, "n_embd": 768})
    for bad in ([100] * 2, [100] * 13, [100] * 11 + [-1], [[100] * 12]):  # one count per layer, none negative
        with pytest.raises(ValueError, match="keep must hold n_layers=12 counts >= 0"):
            c.prefill(bad)


def test_layer_costs_read_head_dim_and_gated_t5():
    """An explicit head width (Qwen3's head_dim, T5's d_kv) differs from d / H; a gated T5 has 3 MLP matrices."""
    from transformers import T5Config

    d, heads, kv, hd, ff = 64, 4, 2, 32, 128
    qwen3 = {"model_type": "qwen3", "hidden_size": d, "num_hidden_layers": 3, "num_attention_heads": heads,
             "num_key_value_heads": kv, "head_dim": hd, "intermediate_size": ff}  # fmt: skip
    c = layer_costs(qwen3)
    assert (c.qkv, c.attn, c.out, c.mlp) == (d * (heads + 2 * kv) * hd, 2 * heads * hd, heads * hd * d, 3 * d * ff)
    gated = T5Config(d_model=d, d_kv=8, num_heads=heads, num_layers=3, d_ff=ff, feed_forward_proj="gated-gelu")
    t5 = layer_costs(gated)
    assert (t5.qkv, t5.attn, t5.out, t5.mlp) == (d * 3 * heads * 8, 2 * heads * 8, heads * 8 * d, 3 * d * ff)
    plain = layer_costs(T5Config(d_model=d, d_kv=8, num_heads=heads, num_layers=3, d_ff=ff))  # relu: 2 matrices
    assert plain.mlp == 2 * d * ff
    as_file = {k: v for k, v in gated.to_dict().items() if k != "is_gated_act"}  # config.json holds no is_gated_act
    assert layer_costs(as_file) == t5  # its MLP was costed as 2 matrices
    with pytest.raises(ValueError, match="model_config must give positive .*heads=0"):
        layer_costs({"hidden_size": d, "num_hidden_layers": 3, "num_attention_heads": 0})
    assert c.prefill([0, 0, 0]) == 0.0  # counts >= 0: an empty prompt costs nothing


def test_elimination_points_every_round_l_over_6_layers():
    """Ten layers: ``e = round(10 / 6) = 2``, so the clipped schedule keeps everything through layer 2 (0-based 1)."""
    config = SimpleNamespace(model_type="llama", hidden_size=64, num_hidden_layers=10, num_attention_heads=4,
                             intermediate_size=128)  # fmt: skip
    best = KeepSchedule.from_speedup(config, 40, 1.0).max_speedup
    clipped = KeepSchedule.from_speedup(config, 40, 100.0, clip=True)
    assert clipped.keep == (40, 40) + (2,) * 8 and clipped.max_speedup == best
    for speedup in (1.3, 2.0):  # counts change at the elimination points 2, 4, 6, 8 only
        keep = KeepSchedule.from_speedup(config, 40, speedup).keep
        assert keep[0] == keep[1] and all(keep[i] == keep[i + 1] for i in range(2, 10, 2)), keep


def test_a_speedup_just_above_the_maximum_is_refused():
    best = KeepSchedule.from_speedup(SMOLLM2, 16, 1.0).max_speedup
    with pytest.raises(ValueError, match="cannot be reached"):
        KeepSchedule.from_speedup(SMOLLM2, 16, best * 1.001)
    assert KeepSchedule.from_speedup(SMOLLM2, 16, best).predicted_speedup == pytest.approx(best)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


PROMPTS = [
    [BOS] + [4 + (7 * j) % 60 for j in range(20)],
    [BOS] + [4 + (3 * j + 1) % 60 for j in range(13)],
    [BOS] + [4 + (5 * j + 2) % 60 for j in range(17)],
    [BOS] + [4 + (11 * j + 3) % 60 for j in range(9)],
]


@pytest.mark.parametrize("setting", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 1}])
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_generation_config_processors_apply_like_hf(arch, setting):
    """The model's generation config changes greedy choices in model.generate: token elimination applies the
    same logits processors (speedup 1 equals model.generate; a faster speedup decodes with them too)."""
    model = tiny_model(arch, seed=3, n_layers=3)
    ids, mask = _batch(PROMPTS) if arch == "llama" else (torch.tensor([p[1:] for p in PROMPTS[3:]]), None)
    plain = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    model.generation_config.update(**setting)
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert not torch.equal(expected, plain)  # the setting matters here
    torch.testing.assert_close(lat.generate(model, ids, mask, max_new_tokens=10).sequences, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 4])
def test_speedup_one_equals_hf_generate(arch, batch):
    model = tiny_model(arch, seed=3, n_layers=3)
    ids, mask = _batch(PROMPTS[:batch])
    expected = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=PAD, eos_token_id=EOS
    )
    out = lat.generate(model, ids, mask, speedup=1.0, max_new_tokens=10)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert (out.processed == mask.sum(dim=1, keepdim=True)).all()
    for row, n in zip(out.new_tokens.tolist(), out.n_generated.tolist()):  # up to and including the first EOS
        assert n == (row.index(EOS) + 1 if EOS in row else len(row))
    full_only = Certificate(
        lambda_hat=None,
        delta=0.1,
        epsilon=0.05,
        n=10,
        lambdas=(1.0,),
        risks=(0.0,),
        p_values=(1.0,),
        certified=(False,),
        bound="hoeffding_bentkus",
        method="fixed_sequence",
        mode="decoded",
        knob="token_keep",
        model=lat.model_id(model),
    )
    torch.testing.assert_close(
        lat.generate(model, ids, mask, certificate=full_only, max_new_tokens=10).sequences, expected
    )
    with pytest.raises(ValueError, match="other settings than the model's generation config.*eos_token_id"):
        lat.generate(model, ids, mask, certificate=full_only, max_new_tokens=10, eos_token_id=7)  # decoded silently


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_processed_lengths_follow_the_schedule(arch):
    """Counted with hooks: layer l's query/key/value projection sees keep[l] vectors, its MLP keep[l+1]."""
    model = tiny_model(arch, seed=4, n_layers=4)
    ids, mask = _batch(PROMPTS[:1])
    seen: dict[str, list[int]] = {"attn": [], "mlp": []}
    hooks = []
    for block in decoder_layers(model):
        attn_in = block.self_attn.q_proj if arch == "llama" else block.attn.c_attn
        hooks.append(attn_in.register_forward_hook(lambda m, a, o: seen["attn"].append(a[0].shape[1])))
        hooks.append(block.mlp.register_forward_hook(lambda m, a, o: seen["mlp"].append(a[0].shape[1])))
    try:
        out = lat.generate(model, ids, mask, speedup=2.0, max_new_tokens=3)
    finally:
        for hook in hooks:
            hook.remove()
    keep = out.schedules[0].keep
    assert keep[-1] < keep[0]  # the schedule removes something
    assert seen["attn"][:4] == list(keep)
    assert seen["mlp"][:4] == list(keep[1:]) + [keep[-1]]
    assert seen["attn"][4:] == [1] * (len(seen["attn"]) - 4)  # then one new token per step
    assert out.processed[0].tolist() == list(keep)
    assert out.predicted_speedup >= 2.0


def _reference_first_logits(model, ids, kept) -> torch.Tensor:
    """The model's own decoder layers (Hugging Face attention code) run on the kept columns of each layer.

    Running a whole layer on the vectors entering it and then dropping the ones the next layer does not
    get equals eliminating between attention and MLP (the MLP acts per vector).
    """
    base = model.model
    positions = torch.arange(ids.shape[1])[None]
    h = base.embed_tokens(ids)
    cols = torch.arange(ids.shape[1])
    for i, layer in enumerate(base.layers):
        take = kept[i][0][kept[i][0] >= 0]
        index = torch.searchsorted(cols, take)
        h, cols = h[:, index], take
        pos = positions[:, take]
        allowed = pos[0][None, :] <= pos[0][:, None]
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(h.dtype).min)[None, None]
        h = layer(h, attention_mask=mask, position_embeddings=base.rotary_emb(h, position_ids=pos))
    return model.lm_head(base.norm(h[:, -1]))


def test_eliminated_prefill_equals_the_model_on_the_kept_tokens():
    """Original positions (RoPE) and per-layer survivors: the same logits as HF's own layers on the kept columns."""
    model = tiny_model("llama", seed=5, n_layers=4)
    ids, mask = _batch(PROMPTS[:1])
    adapter = adapter_for(model, decoder_layers(model))
    schedule = KeepSchedule.from_speedup(model.config, ids.shape[1], 2.5)
    keep = torch.tensor([schedule.keep])
    for score in lat.SCORES:
        cache = adapter.new_cache(1, ids.shape[1])
        h_last, _, kept, processed = _prefill(
            adapter, ids, mask, keep, _always_kept(ids, mask, [], last=True), score, cache
        )
        assert processed[0].tolist() == list(schedule.keep)
        assert kept[-1][0, -1] == ids.shape[1] - 1 and kept[-1][0, (kept[-1][0] >= 0).nonzero()[0]] == 0
        got = ExitHeads.from_model(model)(h_last[:, -1], layer=3)
        torch.testing.assert_close(got, _reference_first_logits(model, ids, kept), rtol=1e-4, atol=1e-4)


def test_elimination_changes_outputs_and_keeps_special_tokens():
    model = tiny_model("llama", seed=6, n_layers=4)
    ids, mask = _batch(PROMPTS)
    ids[0, 10] = EOS  # a special token inside the prompt
    full = lat.generate(model, ids, mask, max_new_tokens=8)
    fast = lat.generate(
        model,
        ids,
        mask,
        speedup=3.0,
        max_new_tokens=8,
        tokenizer=SimpleNamespace(all_special_ids=[PAD, EOS, BOS], eos_token_id=EOS, pad_token_id=PAD),
    )
    assert (fast.processed[:, -1] < full.processed[:, -1]).all()
    pad0 = int((mask[0] == 0).sum())
    for layer in fast.kept:
        assert 10 in layer[0].tolist() and pad0 in layer[0].tolist()  # the EOS and the BOS survive
    assert not torch.equal(fast.new_tokens, full.new_tokens)  # elimination is not a no-op on random weights


def test_fit_refuses_an_unsupported_model_before_any_work():
    """With too few prompts to decode, lat.fit returned a certificate for BART that lat.generate then refused."""
    from _tiny_hf import tiny_tokenizer

    prompts = [" ".join(f"w{(i * j + 3) % 60}" for j in range(8)) for i in range(20)]
    with pytest.raises(ValueError, match=r"token elimination does not support model_type 'bart'.*gpt2.*bert"):
        lat.fit(tiny_model("bart", seed=1), tiny_tokenizer(), prompts, delta=0.1, epsilon=0.05, progress=False)


def test_a_special_token_outside_the_vocabulary_is_not_recorded():
    """A special token added without resizing (id = vocab_size) was recorded among the always-kept ids; lat.fit's
    own decoding then refused its certificate's settings."""
    from _tiny_hf import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    model = tiny_model("llama", seed=1, n_layers=2)
    assert max(tokenizer.all_special_ids) == model.config.vocab_size
    prompts = [" ".join(f"w{(i * j + 3) % 60}" for j in range(8)) for i in range(60)]
    cert = lat.fit(model, tokenizer, prompts, 0.5, 0.1, speedups=[1.0, 1.5], max_new_tokens=3, progress=False)
    assert max(cert.measure_state["keep_ids"]) < model.config.vocab_size
    ids = torch.tensor([tokenizer(prompts[0])["input_ids"]])
    assert torch.equal(  # the same ids kept as a call with the tokenizer
        lat.generate(model, ids, certificate=cert, max_new_tokens=3).sequences,
        lat.generate(model, ids, tokenizer=tokenizer, speedup=1 / cert.lambda_hat, max_new_tokens=3).sequences,
    )


def test_bad_input():
    model = tiny_model("llama", seed=1, n_layers=2)
    ids, mask = _batch(PROMPTS[:1])
    for bad in (0.9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speedup"):
            lat.generate(model, ids, mask, speedup=bad)
    with pytest.raises(ValueError, match=r"does not support model_type 'bart'.*gpt2.*t5"):
        lat.generate(tiny_model("bart", seed=1), ids, mask)
    with pytest.raises(ValueError, match="score"):
        lat.generate(model, ids, mask, score="acc")
    cert = {
        "lambda_hat": 0.5,
        "delta": 0.1,
        "epsilon": 0.05,
        "n": 10,
        "lambdas": (1.0, 0.5),
        "risks": (0.0, 0.0),
        "p_values": (0.0, 0.0),
        "certified": (True, True),
        "bound": "hoeffding_bentkus",
        "method": "fixed_sequence",
        "mode": "decoded",
    }
    with pytest.raises(ValueError, match="knob 'exit_threshold'"):
        lat.generate(model, ids, mask, certificate=Certificate(**cert, knob="exit_threshold"))
    with pytest.raises(ValueError, match=r"made for the model .*other weights .* in another dtype \(load the model"):
        other = lat.model_id(tiny_model("llama", seed=2, n_layers=2))
        lat.generate(model, ids, mask, certificate=Certificate(**cert, knob="token_keep", model=other))
    penalised = copy.deepcopy(model)  # the same weights decoding otherwise: its id changes with it
    penalised.generation_config.repetition_penalty = 1.3
    assert lat.model_id(penalised) != lat.model_id(model)
    with pytest.raises(ValueError, match=r"made for the model .*\(the same weights under another generation config"):
        lat.generate(model, ids, mask, certificate=Certificate(**cert, knob="token_keep",
                                                               model=lat.model_id(penalised)))  # fmt: skip
    sampled = copy.deepcopy(model)
    sampled.generation_config.temperature = 0.5  # greedy decoding ignores it
    assert lat.model_id(sampled) == lat.model_id(model)
    with pytest.raises(ValueError, match="not both"):
        lat.generate(model, ids, mask, speedup=2.0, certificate=Certificate(**cert, knob="token_keep"))


# --------------------------------------------------------------------------------------------------
# Certification
# --------------------------------------------------------------------------------------------------


def test_certify_picks_the_hand_computable_speedup():
    """Fixed loss table: means 0, .02, .04, .09, .3 at speed-ups 1 ... 3; delta .1 with n = 2000 -> 2.0."""
    import calibrate

    speedups = np.array([1.0, 1.5, 2.0, 2.5, 3.0])
    means = [0.0, 0.02, 0.04, 0.09, 0.3]
    n = 2000
    losses = np.zeros((n, 5))
    for k, m in enumerate(means):
        losses[: int(m * n), k] = 1.0
    cert = calibrate.certify(losses, 1 / speedups, delta=0.1, epsilon=0.05, knob="token_keep")
    # 0.09 of 2000 is too close to 0.1 for a 5% test; 0.04 is far below
    assert 1 / cert.lambda_hat == pytest.approx(2.0)
    assert (
        "certified target speed-up 2x of the prefill (the cost model's prediction, capped per prompt"
        in cert.summary()
    )


@pytest.fixture(scope="module")
def word_tokenizer():
    from _tiny_hf import tiny_tokenizer

    return tiny_tokenizer()


@pytest.mark.parametrize("eos_from", ["model", "tokenizer"])
def test_fit_decodes_each_speedup_and_generate_spends_it(word_tokenizer, eos_from):
    model = tiny_model("llama", seed=7, n_layers=3)
    if eos_from == "tokenizer":  # the model names no EOS: calibration stops where deployment does, at the tokenizer's
        model.generation_config.eos_token_id = model.config.eos_token_id = None
        with torch.no_grad():
            model.lm_head.weight[EOS] *= 4  # EOS comes often
    prompts = [" ".join(f"w{(5 * i + 3 * j) % 60}" for j in range(10 + i % 7)) for i in range(48)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cert = lat.fit(
            model, word_tokenizer, prompts, delta=0.5, epsilon=0.1, speedups=[1.0, 1.5, 3.0], max_new_tokens=6,
            batch_size=16,
        )  # fmt: skip
    said = [str(w.message) for w in caught if "outputs stop at the tokenizer's" in str(w.message)]
    assert len(said) == (eos_from == "tokenizer")  # a deployment without the tokenizer would run past it
    assert cert.knob == "token_keep" and cert.model == lat.model_id(model) and cert.measure == "attention"
    assert cert.max_new_tokens == 6  # the decoding budget it certifies
    assert cert.lambdas == pytest.approx((1.0, 1 / 1.5, 1 / 3.0)) and cert.risks[0] == 0.0
    # the tested risks are the mean token losses of lat.generate at each speed-up, decoded by hand
    ids = [word_tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    batch = torch.tensor([[PAD] * (width - len(r)) + r for r in ids])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in ids])[:, None]).long()

    def outputs(speedup):
        out = lat.generate(model, batch, mask, speedup=speedup, max_new_tokens=6, tokenizer=word_tokenizer)
        rows = out.new_tokens.numpy()
        return [r[: (np.flatnonzero(r == EOS)[0] + 1) if (r == EOS).any() else r.size] for r in rows]

    full = outputs(1.0)
    for k, s in enumerate((1.0, 1.5, 3.0)):
        if math.isnan(cert.risks[k]):
            continue
        early = outputs(s)
        expected = np.mean(
            [
                (np.count_nonzero(e[: min(e.size, f.size)] != f[: min(e.size, f.size)]) + abs(e.size - f.size))
                / max(e.size, f.size)
                for e, f in zip(early, full)
            ]
        )
        assert cert.risks[k] == pytest.approx(expected, abs=0.03)  # batches of 16 vs 48: padding may flip a near tie
    if cert.lambda_hat is not None:
        out = lat.generate(model, batch[:4], mask[:4], certificate=cert, max_new_tokens=6)
        assert out.speedup == pytest.approx(1 / cert.lambda_hat)


def test_fit_decodes_speedup_one_once(word_tokenizer, monkeypatch):
    """Speed-up 1 is the unmodified model: its outputs are the full model's, decoded once for both."""
    import calibrate.lat.calibration as calibration

    model = tiny_model("llama", seed=7, n_layers=3)
    prompts = [" ".join(f"w{(5 * i + 3 * j) % 60}" for j in range(10)) for i in range(40)]
    speedups = []
    original = calibration.generate

    def counting(model, input_ids, attention_mask=None, *, certificate=None, **kwargs):
        speedups.append(None if certificate is None or certificate.lambda_hat is None else 1 / certificate.lambda_hat)
        return original(model, input_ids, attention_mask, certificate=certificate, **kwargs)

    monkeypatch.setattr(calibration, "generate", counting)
    cert = lat.fit(
        model, word_tokenizer, prompts, delta=0.9, epsilon=0.1, speedups=[1.0, 1.5], max_new_tokens=3, batch_size=40,
        bound=None,
    )  # fmt: skip
    assert cert.risks[0] == 0.0 and not math.isnan(cert.risks[1]) and cert.bound == "hoeffding_bentkus"
    assert speedups == [None, pytest.approx(1.5)]  # the full model, then 1.5 only
    monkeypatch.setattr(calibration, "generate", original)
    ids = torch.tensor([word_tokenizer(prompts[0])["input_ids"]])
    assert cert.lambda_hat is not None and cert.max_new_tokens == 3  # by default that budget (it was 32, warned)
    assert lat.generate(model, ids, certificate=cert).sequences.shape[1] <= ids.shape[1] + 3


def test_fit_bad_grid(word_tokenizer):
    model = tiny_model("llama", seed=7, n_layers=2)
    for bad in ([1.0, 0.5], [2.0, 1.5], [1.0, float("nan")], []):
        with pytest.raises(ValueError, match="speedup"):
            lat.fit(model, word_tokenizer, ["w1 w2 w3"] * 10, speedups=bad)
    with pytest.raises(ValueError, match=r"strictly increasing grid \(safest first\), got \[1.0, 1.5, 1.5\]"):
        lat.fit(model, word_tokenizer, ["w1 w2 w3"] * 10, speedups=[1.0, 1.5, 1.5])  # a repeated value
    for scalar in (2.0, np.float64(2.0), np.array(2.0), "2"):  # "'float' object is not iterable"
        with pytest.raises(ValueError, match="speedups must be a sequence .*; for one value use \\[value\\]"):
            lat.fit(model, word_tokenizer, ["w1 w2 w3"] * 10, speedups=scalar)
    with pytest.raises(ValueError, match=r"score must be one of \('attention', 'value'\), got 'norm'"):
        lat.fit(model, word_tokenizer, ["w1 w2 w3"] * 10, score="norm")


def test_fit_warns_of_speedups_no_prompt_reaches(word_tokenizer):
    from calibrate.lat.schedule import KeepSchedule

    model = tiny_model("llama", seed=7, n_layers=4)
    prompts = [" ".join(f"w{j}" for j in range(n)) for n in (4, 8) * 10]
    reach = KeepSchedule.from_speedup(model.config, len(word_tokenizer(prompts[1])["input_ids"]), 1.0).max_speedup
    kw = dict(delta=0.9, epsilon=0.1, max_new_tokens=2, batch_size=20, progress=False)
    with pytest.warns(UserWarning, match=rf"speedups \[10.0, 100.0\] exceed .* \({reach:.4g}x for the longest"):
        lat.fit(model, word_tokenizer, prompts, speedups=[1.0, reach * 0.99, 10.0, 100.0], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lat.fit(model, word_tokenizer, prompts, speedups=[1.0, reach * 0.99], **kw)  # all reachable: silent


def test_heldout_losses_and_audit_refuse_another_knob(word_tokenizer):
    model = tiny_model("llama", seed=7, n_layers=2)
    cert = calibrate.certify(np.zeros((20, 2)), [1.0, 0.5], delta=0.1, epsilon=0.05)  # knob exit_threshold
    for spend in (lat.heldout_losses, lat.audit):
        with pytest.raises(ValueError, match="must be a 'token_keep' Certificate"):
            spend(cert, model, word_tokenizer, ["w1 w2 w3"], max_new_tokens=2)
    other = dataclasses.replace(cert, knob="token_keep", consistency="label", model="bert/L2/d16/V64/0123")
    for spend in (lat.heldout_losses, lat.audit):  # a classifier's certificate: it blamed the consistency 'label'
        with pytest.raises(ValueError, match="made for the model 'bert/L2/d16/V64/0123'"):
            spend(other, model, word_tokenizer, ["w1 w2 w3"], max_new_tokens=2)
    with pytest.raises(ValueError, match="take exit_threshold certificates, got knob='token_keep'"):
        calibrate.decoded_losses(model, word_tokenizer, ["w1 w2 w3"], other)  # it blamed the measure None


def test_cli_lat_fit_equals_the_function(tmp_path, word_tokenizer, capsys):
    from calibrate.cli import main

    model = tiny_model("llama", seed=7, n_layers=2)
    model.save_pretrained(tmp_path / "model")
    word_tokenizer.save_pretrained(tmp_path / "model")
    prompts = [" ".join(f"w{(7 * i + j) % 60}" for j in range(8 + i % 5)) for i in range(30)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "cert.json"
    argv = [
        "lat-fit",
        "--model",
        str(tmp_path / "model"),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--speedups",
        "1",
        "1.5",
        "--delta",
        "0.4",
        "--epsilon",
        "0.1",
        "--max-new-tokens",
        "4",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    assert "token_keep" in capsys.readouterr().out
    direct = lat.fit(model, word_tokenizer, prompts, delta=0.4, epsilon=0.1, speedups=[1, 1.5], max_new_tokens=4)
    assert Certificate.from_json(out) == direct
    assert main([*argv[:-2], "--score", "acc"]) == 2
    assert "score must be one of" in capsys.readouterr().err
    # audit: decode held-out prompts at every speed-up of the grid; the figure plots risk against speed-up
    held = [" ".join(f"w{(11 * i + 2 * j) % 60}" for j in range(6 + i % 4)) for i in range(12)]
    (tmp_path / "held.txt").write_text("\n".join(held) + "\n")
    figure = tmp_path / "audit.png"
    code = main(
        [
            "audit",
            str(out),
            "--model",
            str(tmp_path / "model"),
            "--prompts",
            str(tmp_path / "held.txt"),
            "--max-new-tokens",
            "4",
            "--figure",
            str(figure),
        ]
    )
    printed = capsys.readouterr().out
    assert direct.max_new_tokens == 4
    report = lat.audit(direct, model, word_tokenizer, held)  # decodes the certificate's 4 tokens, not 32
    assert code == (0 if report.within_tolerance else 1) and figure.stat().st_size > 0
    assert f"held-out risk {level(report.risk, '.4f')}" in printed and "held-out examples" in printed
    assert report.risks[0] == 0.0 and report.n == 12
    for k, lam in enumerate(direct.lambdas):
        at = dataclasses.replace(direct, lambda_hat=lam)
        assert report.risks[k] == pytest.approx(
            lat.heldout_losses(at, model, word_tokenizer, held, max_new_tokens=4).mean()
        )
    at = dataclasses.replace(direct, lambda_hat=direct.lambdas[-1])  # the fastest speed-up
    default = lat.heldout_losses(at, model, word_tokenizer, held)  # the certificate's 4 tokens, not 32
    np.testing.assert_array_equal(default, lat.heldout_losses(at, model, word_tokenizer, held, max_new_tokens=4))
    with pytest.warns(UserWarning, match="max_new_tokens=32 new tokens, but the certificate's calibration outputs"):
        longer = lat.heldout_losses(at, model, word_tokenizer, held, max_new_tokens=32)
    assert not np.array_equal(default, longer)
    line = report.plot().axes[0].lines[1]  # held-out curve
    assert line.get_xdata().tolist() == pytest.approx([1.0, 1.5]) and line.get_ydata().tolist() == pytest.approx(
        report.risks
    )
    assert main(["audit", str(out)]) == 2 and "--model" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("score", ["attention", "value"])
def test_padded_batch_equals_each_row_alone(arch, score):
    """Rows of different lengths and keep counts (filler columns, masked path) decode as they do alone."""
    model = tiny_model(arch, seed=9, n_layers=4)
    ids, mask = _batch(PROMPTS)
    together = lat.generate(model, ids, mask, speedup=2.5, max_new_tokens=6, score=score)
    for b, row in enumerate(PROMPTS):
        alone = lat.generate(model, torch.tensor([row]), speedup=2.5, max_new_tokens=6, score=score)
        pad = ids.shape[1] - len(row)
        assert together.processed[b].tolist() == alone.processed[0].tolist()
        for layer_b, layer_alone in zip(together.kept, alone.kept):
            assert sorted(c - pad for c in layer_b[b].tolist() if c >= 0) == layer_alone[0].tolist()
        assert together.new_tokens[b].tolist() == alone.new_tokens[0].tolist()


def test_certificate_settings_are_applied():
    """The always-kept ids and score the certificate was made with are used without a tokenizer."""
    model = tiny_model("llama", seed=6, n_layers=4)
    ids, mask = _batch(PROMPTS[:1])
    ids[0, 7] = EOS
    cert = Certificate(
        lambda_hat=1 / 3,
        delta=0.1,
        epsilon=0.05,
        n=10,
        lambdas=(1.0, 1 / 3),
        risks=(0.0, 0.0),
        p_values=(0.0, 0.0),
        certified=(True, True),
        bound="hoeffding_bentkus",
        method="fixed_sequence",
        mode="decoded",
        knob="token_keep",
        model=lat.model_id(model),
        measure="value",
        measure_state={"score": "value", "min_keep": 2, "keep_ids": [EOS]},
    )
    out = lat.generate(model, ids, mask, certificate=cert, max_new_tokens=3)
    assert out.speedup == pytest.approx(3.0)
    good = dict(cert.measure_state)
    for bad in ({**good, "keep_ids": ["<eos>"]}, {**good, "keep_ids": [2**70]}, {**good, "keep_ids": 5},
                {"score": "value"}, {**good, "min_keep": 0}, {**good, "minkeep": 2}):  # fmt: skip
        # failed inside torch, or decoded with the caller's settings in place of the missing or misspelt ones
        with pytest.raises(ValueError, match="measure_state must be the settings lat.fit records"):
            lat.generate(model, ids, mask, certificate=dataclasses.replace(cert, measure_state=bad), max_new_tokens=3)
    with pytest.warns(UserWarning, match="max_new_tokens=4 .* at most 3") as caught:  # beyond the certified budget
        lat.generate(model, ids, mask, certificate=dataclasses.replace(cert, max_new_tokens=3), max_new_tokens=4)
    assert caught[0].filename == __file__  # was torch's no_grad wrapper
    assert all(7 in layer[0].tolist() for layer in out.kept)
    by_hand = lat.generate(
        model,
        ids,
        mask,
        speedup=3.0,
        score="value",
        max_new_tokens=3,
        tokenizer=SimpleNamespace(all_special_ids=[EOS], eos_token_id=EOS, pad_token_id=PAD),
    )
    assert [k.tolist() for k in out.kept] == [k.tolist() for k in by_hand.kept]
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        lat.generate(model, ids, mask, certificate=dataclasses.replace(cert, lambda_hat=2.0, lambdas=(2.0, 1.0)))


def test_import_without_torch():
    """Schedules and the cost model need numpy only."""
    import subprocess
    import sys

    code = "import sys, calibrate.lat as l; l.KeepSchedule; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_a_model_left_in_training_mode_eliminates_and_decodes_without_dropout(arch):
    model = tiny_model(arch, seed=0, dropout_rate=0.5, resid_pdrop=0.5, attn_pdrop=0.5, embd_pdrop=0.5)
    ids = torch.tensor([PROMPTS[0]])
    expected = lat.generate(model, ids, speedup=2.0, max_new_tokens=5)
    model.train()
    for _ in range(3):  # with dropout active, the runs would differ
        assert torch.equal(lat.generate(model, ids, speedup=2.0, max_new_tokens=5).sequences, expected.sequences)
    assert model.training

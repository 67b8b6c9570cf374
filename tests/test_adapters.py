"""Exit adapters: the ridge fit recovers a known affine map, agreement, and the safetensors round trip."""

import copy
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from _tiny_hf import tiny_model, tiny_tokenizer

from calibrate import extract, rehead
from calibrate.adapters import _hash_adapters, layer_agreement, load_adapters, save_adapters, train_adapters
from calibrate.cache import LayerCache, open_cache
from calibrate.heads import ExitHeads


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=1, n_layers=4)


@pytest.fixture(scope="module")
def real_cache(model):
    prompts = [" ".join(f"w{(7 * i + j) % 50}" for j in range(3 + i % 4)) for i in range(24)]
    return extract(model, tiny_tokenizer(), prompts, max_new_tokens=8, store_hidden=True, progress=False)


def _cache_with_hidden(hidden: np.ndarray, full: np.ndarray) -> LayerCache:
    n, n_layers, _ = hidden.shape
    topk = np.stack([full, (full + 1) % 64], axis=-1)[:, None, :].repeat(n_layers, axis=1)
    return LayerCache.from_arrays(full_tokens=full, topk_ids=topk, lengths=[n], hidden=hidden, vocab_size=64)


def test_ridge_recovers_a_known_affine_map(model):
    """Layer states built as an invertible affine image of unit-RMS final states: the fit inverts it."""
    rng = np.random.default_rng(0)
    n, d, n_layers = 600, 32, 4
    final = rng.normal(size=(n, d))
    final /= np.sqrt(np.mean(final**2, axis=1, keepdims=True))
    hidden = np.empty((n, n_layers, d))
    maps = []
    for i in range(n_layers - 1):
        a = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
        c = 0.2 * rng.normal(size=d)
        hidden[:, i] = (final - c) @ np.linalg.inv(a).T  # so that a @ h_i + c = final
        maps.append((a, c))
    hidden[:, -1] = final
    hidden = hidden.astype(np.float16).astype(np.float64)  # what the cache stores
    heads = train_adapters(model, _cache_with_hidden(hidden, rng.integers(0, 64, n)), ridge=1e-9)
    for i, (a, c) in enumerate(maps):
        np.testing.assert_allclose(heads.adapter_weight[i].detach().numpy(), a, atol=0.02)
        np.testing.assert_allclose(heads.adapter_bias[i].detach().numpy(), c, atol=0.02)


def test_fit_is_the_documented_weighted_ridge_with_an_unpenalised_bias(model):
    """Noisy states, tokens of very different sizes, a strong penalty: the fit solves the documented objective
    (rows weighted by 1 / rms(h_L)^2, penalty relative to the mean eigenvalue, bias not penalised) exactly."""
    rng = np.random.default_rng(3)
    n, d, n_layers, ridge = 400, 32, 4, 0.5
    final = rng.normal(size=(n, d)) * rng.choice([0.1, 1.0, 30.0], size=(n, 1))
    hidden = np.empty((n, n_layers, d))
    for i in range(n_layers - 1):
        hidden[:, i] = 2.0 * final @ rng.normal(size=(d, d)) / np.sqrt(d) + 5.0 + rng.normal(size=(n, d))
    hidden[:, -1] = final
    hidden = hidden.astype(np.float16).astype(np.float64)  # what the cache stores
    heads = train_adapters(model, _cache_with_hidden(hidden, rng.integers(0, 64, n)), ridge=ridge, progress=False)
    scale = 1.0 / np.sqrt(np.mean(hidden[:, -1] ** 2, axis=1, keepdims=True))
    y = hidden[:, -1] * scale
    for i in range(n_layers - 1):
        x = np.concatenate([hidden[:, i], np.ones((n, 1))], axis=1) * scale
        gram = x.T @ x
        gram += np.diag(np.r_[np.full(d, ridge * np.trace(gram[:d, :d]) / d), 0.0])
        coef = np.linalg.solve(gram, x.T @ y)
        np.testing.assert_allclose(heads.adapter_weight[i].detach().numpy(), coef[:d].T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(heads.adapter_bias[i].detach().numpy(), coef[d], rtol=1e-4, atol=1e-5)


def test_adapters_restore_agreement_of_scrambled_layers(model, real_cache):
    """Middle layers replaced by a random rotation of the last one: the plain lens fails, adapters agree."""
    rng = np.random.default_rng(1)
    hidden = np.array(real_cache.arrays["hidden"], dtype=np.float64)
    d = hidden.shape[2]
    for i in range(hidden.shape[1] - 1):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        hidden[:, i] = 3.0 * hidden[:, -1] @ q.T + 0.5
    scrambled = _cache_with_hidden(hidden, np.asarray(real_cache.arrays["full_tokens"]))
    plain = layer_agreement(ExitHeads.from_model(model), scrambled)
    tuned = layer_agreement(train_adapters(model, scrambled), scrambled)
    assert plain[-1] == tuned[-1] == 1.0  # the last layer is the full model either way
    assert tuned[:-1].min() > 0.95
    assert plain[:-1].max() < 0.6


def test_agreement_matches_the_cache_top1_for_plain_heads(model, real_cache):
    """For the heads the cache was built with, agreement equals the cache's own top-1 statistics."""
    expected = (real_cache.arrays["topk_ids"][:, :, 0] == real_cache.arrays["full_tokens"][:, None]).mean(axis=0)
    got = layer_agreement(ExitHeads.from_model(model), real_cache, batch_size=7)
    np.testing.assert_allclose(got, expected, atol=2.5 / real_cache.n_tokens)  # float16 states may flip a tie


def test_last_layer_unchanged_and_round_trip(model, real_cache, tmp_path, umask_022):
    heads = train_adapters(model, real_cache)
    h = torch.randn(5, heads.n_layers, heads.hidden_size)
    torch.testing.assert_close(heads(h)[:, -1], ExitHeads.from_model(model)(h)[:, -1])
    path = tmp_path / "adapters.safetensors"
    save_adapters(heads, path)
    assert path.stat().st_mode & 0o777 == umask_022  # safetensors alone writes 0o600
    loaded = load_adapters(model, path)
    assert loaded.describe() == heads.describe()
    torch.testing.assert_close(loaded(h), heads(h))
    assert not list(tmp_path.glob(".*tmp"))


def test_load_refuses_other_models_and_corrupt_files(model, real_cache, tmp_path):
    path = tmp_path / "adapters.safetensors"
    save_adapters(train_adapters(model, real_cache), path)
    with pytest.raises(ValueError, match="n_layers=4, this model has 3"):
        load_adapters(tiny_model("llama", n_layers=3), path)
    with pytest.raises(ValueError, match="architecture='llama', this model has 'qwen2'"):
        load_adapters(tiny_model("qwen2", n_layers=4), path)
    with pytest.raises(ValueError, match=r"adapters trained for another model of this shape \(model_digest"):
        load_adapters(tiny_model("llama", seed=2, n_layers=4), path)  # was accepted: its exits were lost
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = json.loads(fh.metadata()["heads"]), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(tmp_path / "older.safetensors"), metadata={"heads": json.dumps(meta)})  # no model_dtype
    with pytest.warns(UserWarning, match="older.safetensors records no model dtype .* cannot be checked"):
        load_adapters(tiny_model("llama", seed=2, n_layers=4), tmp_path / "older.safetensors")  # loaded silently
    del meta["adapters_digest"]
    save_file(tensors, str(tmp_path / "nodigest.safetensors"), metadata={"heads": json.dumps(meta)})
    with pytest.raises(ValueError, match="no adapters_digest in its metadata: not an adapter file written by save_ada"):
        load_adapters(model, tmp_path / "nodigest.safetensors")  # was "do not match their stored digest (corrupt?)"
    diverged = {**tensors, "bias": tensors["bias"].clone()}
    diverged["bias"][1, 2] = float("nan")  # a training run that diverged; the digest recomputed: loaded, heads of NaN
    meta["adapters_digest"] = _hash_adapters(diverged["weight"], diverged["bias"])
    save_file(diverged, str(tmp_path / "nan.safetensors"), metadata={"heads": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"nan.safetensors: tensor 'bias' holds 1 non-finite values \(first nan at"):
        load_adapters(model, tmp_path / "nan.safetensors")
    heads = load_adapters(model, path)
    with torch.no_grad():
        heads.adapter_weight[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="tensor 'weight' holds 1 non-finite values"):  # refused when saved too
        save_adapters(heads, tmp_path / "inf.safetensors")
    assert not (tmp_path / "inf.safetensors").exists()
    for heads, match in (("[1, 2]", "'heads' is not a JSON object"), ("[" * 10**5 + "]" * 10**5, "deeper than 100")):
        save_file(tensors, str(tmp_path / "odd.safetensors"), metadata={"heads": heads})
        with pytest.raises(ValueError, match=match):  # were an AttributeError and a RecursionError
            load_adapters(model, tmp_path / "odd.safetensors")
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # damage the last weights
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest"):
        load_adapters(model, path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable adapter file"):
        load_adapters(model, path)
    with pytest.raises(ValueError, match="not found"):
        load_adapters(model, tmp_path / "missing.safetensors")


def test_float32_adapters_load_into_a_bfloat16_model(model, real_cache, tmp_path):
    heads = train_adapters(model, real_cache)
    path = tmp_path / "adapters.safetensors"
    save_adapters(heads, path)
    half = tiny_model("llama", n_layers=4).to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    loaded = load_adapters(half, path)  # the digest is checked on the stored float32 values, not the rounded ones
    assert loaded.adapter_weight.dtype == torch.bfloat16
    expected = heads.adapter_weight.to(torch.bfloat16).float()
    torch.testing.assert_close(loaded.adapter_weight.float(), expected, rtol=0, atol=0)


def test_the_adapters_digest_is_hashed_once_until_they_change(model, monkeypatch):
    """The runtime checked a certificate's heads by hashing every adapter at every call (2x a request's time)."""
    import calibrate.heads as heads_module

    heads = ExitHeads.from_model(model, adapters=True)
    first = heads.describe()["adapters_digest"]
    calls = []
    real = heads_module._hash_adapters
    monkeypatch.setattr(heads_module, "_hash_adapters", lambda w, b: calls.append(1) or real(w, b))
    assert heads.describe()["adapters_digest"] == first and not calls
    with torch.no_grad():
        heads.adapter_weight[1, 0, 0] += 0.5  # trained or edited in place
    changed = heads.describe()["adapters_digest"]
    assert changed != first and changed == real(heads.adapter_weight, heads.adapter_bias) and len(calls) == 1
    heads.adapter_weight.data[1, 0, 1] += 0.25  # through .data, away from the sampled values: not noticed ...
    assert heads.describe()["adapters_digest"] == changed
    fresh = heads.describe(fresh=True)["adapters_digest"]  # ... but what is written down is hashed anew
    assert fresh != changed and fresh == real(heads.adapter_weight, heads.adapter_bias)


def test_adapters_saved_after_an_edit_through_data_load_back(model, tmp_path):
    """save_adapters wrote the memoised digest of the adapters before the edit: its own file was refused."""
    heads = ExitHeads.from_model(model, adapters=True)
    heads.describe()
    heads.adapter_weight.data[1, 0, 1] += 0.25
    save_adapters(heads, tmp_path / "a.safetensors")
    loaded = load_adapters(model, tmp_path / "a.safetensors")
    assert torch.equal(loaded.adapter_weight, heads.adapter_weight)


def test_load_refuses_tensors_of_other_shapes(model, real_cache, tmp_path):
    import json

    from safetensors.torch import save_file

    heads = train_adapters(model, real_cache)
    path = tmp_path / "adapters.safetensors"
    weight = heads.adapter_weight.detach()[:, :, :-1].contiguous()
    tensors = {"weight": weight, "bias": heads.adapter_bias.detach()}
    save_file(tensors, str(path), metadata={"heads": json.dumps(heads.describe())})
    with pytest.raises(ValueError, match=r"tensor 'weight' has shape \(3, 32, 31\), this model needs \(3, 32, 32\)"):
        load_adapters(model, path)


def test_bad_input(model, real_cache, tmp_path):
    no_hidden = extract(model, tiny_tokenizer(), ["w1 w2"], max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="store_hidden=True"):
        train_adapters(model, no_hidden)
    with pytest.raises(ValueError, match="ridge must be a finite number > 0, got 0.0"):
        train_adapters(model, real_cache, ridge=0.0)
    numpy_scalar = train_adapters(model, real_cache, ridge=np.float32(0.5))  # was refused, as a Fraction was
    fraction = train_adapters(model, real_cache, ridge=Fraction(1, 2))
    torch.testing.assert_close(numpy_scalar.adapter_weight, fraction.adapter_weight)
    with pytest.raises(ValueError, match="n_layers=3, hidden_size=32 but the cache"):
        train_adapters(tiny_model("llama", n_layers=3), real_cache)
    with pytest.raises(TypeError, match="LayerCache"):
        train_adapters(model, "cache")
    lazy = open_cache(real_cache.save(tmp_path / "cache"), chunks=2)  # was "'method' object is not subscriptable"
    for call in (lambda: train_adapters(model, lazy), lambda: layer_agreement(ExitHeads.from_model(model), lazy)):
        with pytest.raises(TypeError, match=r"cache must be a calibrate.LayerCache in memory, got ChunkedCache"):
            call()
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(ExitHeads.from_model(model), "x.safetensors")
    for batch_size, exc in ((0, ValueError), (-1, ValueError), (2.0, TypeError)):  # -1 skipped every batch
        with pytest.raises(exc, match="batch_size must be an int >= 1"):
            layer_agreement(ExitHeads.from_model(model), real_cache, batch_size=batch_size)


def test_a_cache_of_another_model_of_the_same_shape_is_refused(model, real_cache):
    other = tiny_model("llama", seed=2, n_layers=4)  # other weights, same architecture and sizes
    another = "the heads come from another model than the cache"
    with pytest.raises(ValueError, match=another):
        train_adapters(other, real_cache, progress=False)  # was accepted: model's adapters fitted on other states
    with pytest.raises(ValueError, match=another):
        layer_agreement(ExitHeads.from_model(other), real_cache)
    with pytest.raises(ValueError, match=another):
        rehead(real_cache, ExitHeads.from_model(other))
    assert layer_agreement(ExitHeads.from_model(model), real_cache)[-1] == 1.0  # its own model: accepted
    half = copy.deepcopy(model).to(torch.bfloat16)  # the same weights in another dtype: the dtype is named
    with pytest.raises(ValueError, match=r"\(the cache was extracted in float32, the heads' model runs in bfloat16"):
        train_adapters(half, real_cache, progress=False)


def test_rehead_equals_an_extraction_through_the_new_heads(model, real_cache):
    """Re-scoring the plain-head cache through adapters gives what extracting through them gives."""
    heads = train_adapters(model, real_cache)
    prompts = real_cache.sequences["prompt"].tolist()
    direct = extract(model, tiny_tokenizer(), prompts, max_new_tokens=8, heads=heads, store_hidden=True, progress=False)
    redone = rehead(real_cache, heads)
    assert redone.user_meta["heads"] == heads.describe() == direct.user_meta["heads"]
    assert real_cache.user_meta["heads"] != heads.describe()
    np.testing.assert_array_equal(redone.arrays["full_tokens"], direct.arrays["full_tokens"])
    np.testing.assert_array_equal(redone.arrays["hidden"], real_cache.arrays["hidden"])
    np.testing.assert_array_equal(redone.arrays["state_saturation"], real_cache.arrays["state_saturation"])
    assert redone.sequences.equals(real_cache.sequences)
    # float16 states: the top-1 may flip on a near tie, the log-probabilities move by the rounding
    top1 = redone.arrays["topk_ids"][:, :, 0] == direct.arrays["topk_ids"][:, :, 0]
    assert top1.mean() > 0.99
    np.testing.assert_allclose(
        redone.arrays["topk_logprobs"][:, :, 0], direct.arrays["topk_logprobs"][:, :, 0], atol=0.02
    )
    np.testing.assert_allclose(redone.arrays["softmax_gap"], direct.arrays["softmax_gap"], atol=0.02)
    # the adapters changed what the cache says (else the test above would prove nothing)
    assert (redone.arrays["topk_ids"][:, :-1, 0] != real_cache.arrays["topk_ids"][:, :-1, 0]).any()


def test_rehead_keeps_the_generation_config_the_outputs_were_decoded_under(model, real_cache):
    """It recorded today's: a cache decoded with a repetition penalty, re-headed after the penalty was dropped,
    then gave a certificate the runtime took for the model without it."""
    changed = copy.deepcopy(model)
    changed.generation_config.repetition_penalty = 1.4
    redone = rehead(real_cache, ExitHeads.from_model(changed))
    recorded = real_cache.user_meta["heads"]["generation"]
    assert redone.user_meta["heads"]["generation"] == recorded != ExitHeads.from_model(changed).describe()["generation"]


def test_rehead_bad_input(model, real_cache):
    heads = ExitHeads.from_model(model)
    with pytest.raises(ValueError, match="no hidden states"):
        rehead(LayerCache.from_arrays(full_tokens=[1], topk_ids=[[[1, 2]] * 4], lengths=[1], vocab_size=64), heads)
    other = ExitHeads.from_model(tiny_model("llama", seed=1, n_layers=3))
    with pytest.raises(ValueError, match="n_layers=3"):
        rehead(real_cache, other)
    with pytest.raises(TypeError, match="ExitHeads"):
        rehead(real_cache, model)
    # another model of the same shapes (other weights): its heads would re-score states they never saw
    with pytest.raises(ValueError, match=r"the heads come from another model than the cache \(model_digest"):
        rehead(real_cache, ExitHeads.from_model(tiny_model("llama", seed=2, n_layers=4)))


def test_demo_cross_fitting_gives_out_of_sample_labels(model, real_cache):
    """Each half is re-scored through adapters fitted on the other half: no in-sample optimism."""
    from calibrate.demo import _cross_fitted
    from measures.classifier import agreement

    heads = train_adapters(model, real_cache)
    crossed = _cross_fitted(model, real_cache, heads, seed=0)
    assert sorted(crossed.sequences["id"]) == sorted(real_cache.sequences["id"])
    assert crossed.user_meta["heads"] == heads.describe()
    a, b = real_cache.split([0.5, 0.5], seed=0)
    expected = rehead(b, train_adapters(model, a))
    np.testing.assert_array_equal(
        crossed.subset(np.arange(b.n_sequences)).arrays["topk_ids"], expected.arrays["topk_ids"]
    )
    in_sample = agreement(rehead(real_cache, heads))[:, :-1].mean()
    assert agreement(crossed)[:, :-1].mean() < in_sample


def test_load_refuses_adapters_saved_for_another_vocabulary(model, tmp_path):
    """Adapters have no vocabulary-sized tensor, so only the saved description tells another vocabulary apart."""
    path = tmp_path / "adapters.safetensors"
    save_adapters(ExitHeads.from_model(model, adapters=True), path)
    wider = tiny_model("llama", seed=1, n_layers=4)
    wider.resize_token_embeddings(wider.config.vocab_size + 8)
    with pytest.raises(ValueError, match=r"holds adapters for vocab_size=\d+, this model has \d+"):
        load_adapters(wider, path)



def test_the_adapters_digest_tells_apart_adapters_that_differ_in_their_biases_only(model):
    """Certificates and caches tell heads apart by the digest: it covers the biases as well as the weights."""
    from calibrate.heads import _hash_adapters

    heads = ExitHeads.from_model(model, adapters=True)
    first = heads.describe(fresh=True)["adapters_digest"]
    with torch.no_grad():
        heads.adapter_bias[0, 0] += 0.5
    assert heads.describe(fresh=True)["adapters_digest"] != first
    assert _hash_adapters(heads.adapter_weight, heads.adapter_bias) != _hash_adapters(
        heads.adapter_weight, torch.zeros_like(heads.adapter_bias)
    )


def test_rehead_through_plain_heads_of_a_bfloat16_model(model):
    """Heads without adapters have no parameters of their own: rehead sent the states as float32 to a bfloat16
    output layer (a dtype RuntimeError; on a GPU a device one). They follow the output layer now, as
    layer_agreement does."""
    half = tiny_model("llama", seed=1, n_layers=4).to(torch.bfloat16)
    prompts = [" ".join(f"w{(7 * i + j) % 50}" for j in range(3 + i % 4)) for i in range(8)]
    kw = {"max_new_tokens": 4, "store_hidden": True, "progress": False}
    plain = extract(half, tiny_tokenizer(), prompts, **kw)
    heads = ExitHeads.from_model(half, adapters=True)
    with torch.no_grad():
        heads.adapter_bias[0] += 0.5
    adapted = extract(half, tiny_tokenizer(), prompts, heads=heads, **kw)
    back = rehead(adapted, ExitHeads.from_model(half))
    assert (back.arrays["topk_ids"][:, :, 0] == plain.arrays["topk_ids"][:, :, 0]).mean() > 0.95
    assert back.user_meta["heads"] == plain.user_meta["heads"]

"""Early-exit runtime on tiny random decoder-only models built from configs (no download).

The full-model path is compared with Hugging Face greedy ``generate``; the early-exit path with
``_reference_decode``, a plain loop over Hugging Face's own decoder layers and ``DynamicCache`` (batch 1,
no padding) that recomputes the exit rule explicitly and expresses state propagation as "run the skipped
layer on the exit state and throw its output away" (which writes exactly that layer's K/V of the exit
state into the cache). Batched runs are compared with each row run alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny_hf
from _tiny_hf import EOS, PAD, V

from calibrate.certificate import Certificate
from calibrate.exits import Decay
from calibrate.heads import ExitHeads, decoder_layers
from calibrate.runtime import RUNTIME_ARCHITECTURES, EarlyExitOutput, custom_generate, generate

N_LAYERS = 4
PROMPTS = [[4, 9, 17, 30, 5, 11, 8], [7, 12], [40, 41, 42, 43]]


# --------------------------------------------------------------------------------------------------
# Tiny models (tests/_tiny_hf.py, 4 layers)
# --------------------------------------------------------------------------------------------------


def tiny_model(arch: str, seed: int = 0, **kwargs):
    return _tiny_hf.tiny_model(arch, seed, n_layers=N_LAYERS, **kwargs)


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def cert(lambda_hat, measure="state_saturation", *, decay=None, n_layers=N_LAYERS, knob="exit_threshold", state=None):
    lambdas = (1.0, 0.5, 0.0) if lambda_hat is None or lambda_hat in (1.0, 0.5, 0.0) else (1.0, lambda_hat)
    k = len(lambdas)
    return Certificate(
        lambda_hat=lambda_hat,
        delta=0.1,
        epsilon=0.05,
        n=100,
        lambdas=lambdas,
        risks=(0.0,) * k,
        p_values=(0.0,) * k,
        certified=(True,) * k,
        bound="hoeffding_bentkus",
        method="fixed_sequence",
        mode="proxy",
        knob=knob,
        measure=measure,
        consistency="token_agreement",
        decay=decay,
        n_layers=n_layers,
        measure_state=state,
    )


# --------------------------------------------------------------------------------------------------
# Slow reference: Hugging Face layers + DynamicCache, batch 1, the exit rule spelled out
# --------------------------------------------------------------------------------------------------


def _reference_conf(measure, heads, j, states, clf=None):
    """Confidence of layer j (0-based) at the last position, recomputed in float64 from the states."""
    h, prev = states[j + 1][0, -1].double(), states[j][0, -1].double()
    sat = 0.0 if j == 0 else float(torch.nn.functional.cosine_similarity(h, prev, dim=0))
    if measure == "state_saturation":
        return sat
    if measure == "classifier":
        layer = clf["layers"][j]
        if layer["constant"] is not None:
            return layer["constant"]
        x = np.concatenate([states[j + 1][0, -1].numpy(), [sat]])
        z = ((x - np.array(layer["mean"])) / np.array(layer["scale"])) @ np.array(layer["coef"]) + layer["intercept"]
        return 1.0 / (1.0 + math.exp(-z))
    p = torch.softmax(heads(states[j + 1][0, -1], layer=j).double(), dim=-1)
    top = torch.topk(p, 2).values
    if measure == "softmax_max":
        return float(top[0])
    if measure == "softmax_gap":
        return float(top[0] - top[1])
    return float(1.0 + (p * p.log()).sum() / math.log(V))  # entropy


@torch.no_grad()
def _reference_decode(
    model, prompt, n_new, *, heads=None, exit_layer=None, lam=None, measure=None, decay=None, clf=None
):
    from transformers import DynamicCache

    heads = heads or ExitHeads.from_model(model)
    layers = decoder_layers(model)
    L = len(layers)
    gpt2 = model.config.model_type == "gpt2"
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    pos = torch.arange(len(prompt))[None]
    tokens, exits = [], []

    def run_layer(layer, h, pos):
        s = h.shape[1]
        total = pos[0, -1].item() + 1
        mask = torch.zeros(1, 1, s, total)
        mask[..., total - s :] = torch.where(torch.ones(s, s).tril().bool(), 0.0, torch.finfo(torch.float32).min)
        if gpt2:
            return layer(h, cache, mask, use_cache=True)
        rope = model.model.rotary_emb(h, position_ids=pos)
        return layer(h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, position_embeddings=rope)

    for t in range(n_new):
        h = model.transformer.wte(ids) + model.transformer.wpe(pos) if gpt2 else model.model.embed_tokens(ids)
        lam_t = None
        if lam is not None:
            lam_t = (
                lam if decay is None else min(1.0, max(0.0, 0.9 * lam + 0.1 * math.exp(-decay.tau * t / decay.max_len)))
            )
        states, exit_at = [h], None
        for j, layer in enumerate(layers):
            if exit_at is None or t == 0:  # the prompt (t == 0) runs every layer
                states.append(run_layer(layer, states[-1], pos))
                if exit_at is None and j < L - 1:
                    if exit_layer is not None:
                        exit_at = j if j + 1 == exit_layer else None
                    elif lam_t is not None and _reference_conf(measure, heads, j, states, clf) >= lam_t:
                        exit_at = j
            else:  # state propagation: the skipped layer sees the exit state; only its K/V are kept
                run_layer(layer, states[exit_at + 1], pos)
        exit_at = L - 1 if exit_at is None else exit_at
        token = int(heads(states[exit_at + 1][0, -1], layer=exit_at).argmax())
        tokens.append(token)
        exits.append(exit_at + 1)
        if token == EOS:
            break
        ids, pos = torch.tensor([[token]]), pos[:, -1:] + 1
    return tokens, exits


def _hf_generate(model, ids, mask, n_new):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new)


# --------------------------------------------------------------------------------------------------
# Full model == Hugging Face greedy generate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_full_model_equals_hf_generate(arch, batch):
    model = tiny_model(arch)
    ids, mask = left_pad(PROMPTS[:batch])
    expected = _hf_generate(model, ids, mask, 12)
    for certificate in (None, cert(None)):
        out = generate(model, ids, mask, certificate=certificate, max_new_tokens=12)
        assert isinstance(out, EarlyExitOutput)
        torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
        assert out.exit_layers.shape == (batch, expected.shape[1] - ids.shape[1])
        generated = out.new_tokens != PAD
        assert bool((out.exit_layers[generated] == N_LAYERS).all())


def test_full_model_stops_rows_at_eos_like_hf():
    """Rows that emit EOS get padding afterwards, exit layer 0; the loop ends when all rows have."""
    ids, mask = left_pad(PROMPTS)
    found = False
    for seed in range(12):  # find a seed where some but not all rows end early
        model = tiny_model("gpt2", seed=seed)
        expected = _hf_generate(model, ids, mask, 20)
        new = expected[:, ids.shape[1] :]
        if (new == EOS).any():
            found = True
            break
    assert found, "no tiny model emitted EOS; pick other seeds"
    out = generate(model, ids, mask, max_new_tokens=20)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    for row in range(len(PROMPTS)):
        hits = (out.new_tokens[row] == EOS).nonzero()
        if hits.numel():
            stop = int(hits[0]) + 1
            assert bool((out.exit_layers[row, stop:] == 0).all())
            assert int(out.n_generated[row]) == stop


def test_hf_custom_generate_hook():
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    expected = _hf_generate(model, ids, mask, 10)
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, custom_generate=custom_generate
    )
    assert isinstance(out, EarlyExitOutput)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    # The certificate and a fixed exit layer pass through generate's kwargs.
    c = cert(0.3, decay={"max_len": 10, "tau": 4.0})
    hooked = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=10,
        custom_generate=custom_generate,
        certificate=c,
    )
    direct = generate(model, ids, mask, certificate=c, max_new_tokens=10)
    torch.testing.assert_close(hooked.sequences, direct.sequences, rtol=0, atol=0)
    torch.testing.assert_close(hooked.exit_layers, direct.exit_layers, rtol=0, atol=0)


def test_hf_custom_generate_applies_logits_processors():
    model = tiny_model("gpt2")
    ids, mask = left_pad(PROMPTS)
    kw = {"input_ids": ids, "attention_mask": mask, "do_sample": False, "max_new_tokens": 10, "repetition_penalty": 5.0}
    expected = model.generate(**kw)
    out = model.generate(**kw, custom_generate=custom_generate)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Early exit == the slow reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("exit_layer", [1, 2, N_LAYERS])
def test_fixed_exit_layer_matches_reference(arch, exit_layer):
    model = tiny_model(arch)
    prompt = PROMPTS[0]
    tokens, exits = _reference_decode(model, prompt, 10, exit_layer=exit_layer)
    out = generate(model, torch.tensor([prompt]), max_new_tokens=10, exit_layer=exit_layer)
    assert out.new_tokens[0].tolist() == tokens
    assert out.exit_layers[0].tolist() == exits == [exit_layer] * len(tokens)


def test_lambda_zero_exits_everything_at_layer_one():
    """Saturation is 0 at layer 1, so lambda = 0 (no decay) exits every token there."""
    model = tiny_model("llama")
    out = generate(model, torch.tensor([PROMPTS[0]]), certificate=cert(0.0), max_new_tokens=8)
    tokens, _ = _reference_decode(model, PROMPTS[0], 8, exit_layer=1)
    assert out.new_tokens[0].tolist() == tokens
    assert set(out.exit_layers[0].tolist()) == {1}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "measure, lam", [("state_saturation", 0.5), ("softmax_max", 0.2), ("softmax_gap", 0.1), ("entropy", 0.3)]
)
def test_certificate_exits_match_reference(arch, measure, lam):
    model = tiny_model(arch)
    decay = Decay(max_len=12, tau=4.0)
    c = cert(lam, measure, decay=decay.to_dict())
    for prompt in PROMPTS:
        tokens, exits = _reference_decode(model, prompt, 12, lam=lam, measure=measure, decay=decay)
        out = generate(model, torch.tensor([prompt]), certificate=c, max_new_tokens=12)
        assert out.new_tokens[0].tolist() == tokens
        assert out.exit_layers[0].tolist() == exits
    assert out.thresholds == tuple(float(x) for x in decay.thresholds(np.array([lam]), np.arange(len(tokens)))[:, 0])


def test_exit_layers_vary_for_a_mid_threshold():
    """The saturation threshold used above really mixes exit layers (the tests are not vacuous)."""
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    out = generate(model, ids, mask, certificate=cert(0.5, decay={"max_len": 12, "tau": 4.0}), max_new_tokens=12)
    used = set(out.exit_layers[out.exit_layers > 0].tolist())
    assert len(used) >= 2 and min(used) < N_LAYERS


def _classifier_state(hidden_size, n_layers, seed=0):
    rng = np.random.default_rng(seed)
    layers = []
    for layer in range(1, n_layers):
        if layer == 3:  # a layer whose training labels were all 0: constant probability 1/12
            layers.append({"layer": layer, "n_train": 10, "n_positive": 0, "constant": 1 / 12})
            continue
        layers.append(
            {
                "layer": layer,
                "n_train": 100,
                "n_positive": 50,
                "constant": None,
                "mean": rng.normal(size=hidden_size + 1).tolist(),
                "scale": rng.uniform(0.5, 2.0, size=hidden_size + 1).tolist(),
                "coef": rng.normal(size=hidden_size + 1).tolist(),
                "intercept": float(rng.normal()),
            }
        )
    return {
        "format": "calm-calibrate.ExitClassifier",
        "format_version": 1,
        "params": {"C": 1.0, "features": "hidden", "max_iter": 200, "seed": 0},
        "features": "hidden",
        "n_layers": n_layers,
        "n_features": hidden_size + 1,
        "top_k": None,
        "vocab_size": None,
        "n_train_tokens": 100,
        "layers": layers,
    }


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_classifier_measure_matches_reference(arch):
    model = tiny_model(arch)
    state = _classifier_state(32, N_LAYERS)
    c = cert(0.6, "classifier", state=state)
    seen = set()
    for prompt in PROMPTS:
        tokens, exits = _reference_decode(model, prompt, 10, lam=0.6, measure="classifier", clf=state)
        out = generate(model, torch.tensor([prompt]), certificate=c, max_new_tokens=10)
        assert out.new_tokens[0].tolist() == tokens
        assert out.exit_layers[0].tolist() == exits
        seen.update(exits)
    assert len(seen) >= 2


def test_adapter_heads_are_used_for_exits():
    model = tiny_model("llama")
    heads = ExitHeads.from_model(model, adapters=True)
    with torch.no_grad():
        heads.adapter_weight.add_(0.3 * torch.randn_like(heads.adapter_weight))
        heads.adapter_bias.add_(0.3 * torch.randn_like(heads.adapter_bias))
    tokens, exits = _reference_decode(model, PROMPTS[0], 10, heads=heads, lam=0.5, measure="softmax_max")
    out = generate(
        model, torch.tensor([PROMPTS[0]]), certificate=cert(0.5, "softmax_max"), heads=heads, max_new_tokens=10
    )
    assert out.new_tokens[0].tolist() == tokens
    assert out.exit_layers[0].tolist() == exits
    plain = generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=10, exit_layer=2)
    adapted = generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=10, exit_layer=2, heads=heads)
    assert plain.new_tokens.tolist() != adapted.new_tokens.tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_very_high_threshold_is_the_full_model(arch):
    model = tiny_model(arch)
    ids, mask = left_pad(PROMPTS)
    expected = _hf_generate(model, ids, mask, 10)
    for measure in ("state_saturation", "softmax_max"):
        out = generate(model, ids, mask, certificate=cert(1.0, measure), max_new_tokens=10)
        torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Batches: every row on its own
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("how", ["saturation", "classifier", "softmax_gap", "fixed"])
def test_batch_equals_rows_alone(arch, how):
    model = tiny_model(arch)
    kw = {
        "saturation": {"certificate": cert(0.8 if arch == "gpt2" else 0.5, decay={"max_len": 12, "tau": 4.0})},
        "classifier": {"certificate": cert(0.6, "classifier", state=_classifier_state(32, N_LAYERS))},
        "softmax_gap": {"certificate": cert(0.1, "softmax_gap")},
        "fixed": {"exit_layer": 2},
    }[how]
    ids, mask = left_pad(PROMPTS)
    batch = generate(model, ids, mask, max_new_tokens=12, **kw)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=12, **kw)
        n = alone.exit_layers.shape[1]
        assert batch.new_tokens[row, :n].tolist() == alone.new_tokens[0].tolist()
        assert batch.exit_layers[row, :n].tolist() == alone.exit_layers[0].tolist()
        assert bool((batch.exit_layers[row, n:] == 0).all())
    used = batch.exit_layers[batch.exit_layers > 0]
    assert len(set(used.tolist())) > 1 or how == "fixed"
    if how == "saturation":
        # at some step the rows exit at different layers: they really exit on their own
        assert any(len(set(s[s > 0].tolist())) > 1 for s in batch.exit_layers.T)


def test_layers_run_only_for_active_rows(monkeypatch):
    """Count the rows each layer runs for: exited rows are not run, only propagated."""
    from calibrate.runtime import _layers

    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    ran, propagated = [], []
    real_layer, real_prop = _layers.LlamaAdapter.layer, _layers.LlamaAdapter.propagate

    def layer(self, i, h, step, cache, rope):
        if h.shape[1] == 1:
            ran.append(h.shape[0])
        return real_layer(self, i, h, step, cache, rope)

    def propagate(self, i, h, step, cache, rope):
        propagated.append(h.shape[0])
        return real_prop(self, i, h, step, cache, rope)

    monkeypatch.setattr(_layers.LlamaAdapter, "layer", layer)
    monkeypatch.setattr(_layers.LlamaAdapter, "propagate", propagate)
    out = generate(model, ids, mask, certificate=cert(0.5, decay={"max_len": 12, "tau": 4.0}), max_new_tokens=12)
    steps = out.exit_layers[:, 1:]  # the first token comes from the prompt pass
    assert sum(ran) == int(steps.sum())  # one layer run per row and layer up to its exit
    assert sum(propagated) == int(((N_LAYERS - steps) * (steps > 0)).sum())  # skipped layers propagate
    assert sum(ran) < N_LAYERS * int((steps > 0).sum())


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_refuses_certificates_for_another_knob_or_model():
    model = tiny_model("gpt2")
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="token_keep"):
        generate(model, ids, certificate=cert(0.5, knob="token_keep"))
    with pytest.raises(ValueError, match="n_layers=7"):
        generate(model, ids, certificate=cert(0.5, n_layers=7))
    with pytest.raises(ValueError, match="measure must be one of"):
        generate(model, ids, certificate=cert(0.5, measure="oracle"))
    with pytest.raises(ValueError, match="measure_state"):
        generate(model, ids, certificate=cert(0.5, measure="classifier"))
    with pytest.raises(ValueError, match="hidden size"):
        generate(model, ids, certificate=cert(0.5, "classifier", state=_classifier_state(16, N_LAYERS)))
    with pytest.raises(ValueError, match="either certificate or exit_layer"):
        generate(model, ids, certificate=cert(0.5), exit_layer=1)
    with pytest.raises(TypeError, match="Certificate"):
        generate(model, ids, certificate={"lambda_hat": 0.5})


def test_refuses_bad_models_and_prompts():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="'t5'.*supported"):
        generate(tiny_model("t5"), torch.tensor([[5, 6]]))
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1))
    with pytest.raises(ValueError, match="context"):
        generate(model, ids, mask, max_new_tokens=60)
    with pytest.raises(ValueError, match="exit_layer"):
        generate(model, ids, mask, exit_layer=N_LAYERS + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, [[1, 2]])
    assert set(RUNTIME_ARCHITECTURES) >= {"gpt2", "llama", "qwen2"}


def test_import_calibrate_does_not_import_torch():
    import subprocess
    import sys

    code = "import calibrate, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# Round trip: extract -> fit -> runtime
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure, tau", [("state_saturation", None), ("softmax_gap", 4.0), ("classifier", 4.0)])
def test_runtime_exits_agree_with_the_extracted_cache(measure, tau):
    """The first generated token of each prompt exits where the cache's proxy simulation says it does."""
    import dataclasses

    import calibrate
    from calibrate.exits import exit_layers
    from measures.classifier import ExitClassifier

    model = _tiny_hf.tiny_model("llama", seed=5, n_layers=6)
    tokenizer = _tiny_hf.tiny_tokenizer()
    rng = np.random.default_rng(1)
    prompts = [" ".join(f"w{i}" for i in rng.integers(0, 60, size=rng.integers(1, 12))) for _ in range(40)]
    cache = calibrate.extract(model, tokenizer, prompts, max_new_tokens=6, batch_size=8, store_hidden=True, progress=False)
    fitted = calibrate.fit(cache, delta=0.5, epsilon=0.2, measure=measure, decay=tau, seed=0)
    if measure == "classifier":
        conf = ExitClassifier.from_dict(dict(fitted.measure_state)).predict_confidence(cache)
    else:
        conf = cache.arrays[measure]
    first = cache.offsets[:-1]
    decay = None if fitted.decay is None else Decay(**fitted.decay)
    layers = exit_layers(conf, fitted.lambdas, positions=cache.positions, decay=decay)[first]  # (n, K)
    # the grid value that spreads the first tokens' exits over the most layers: a demanding check
    k = int(np.argmax([np.unique(layers[:, j]).size for j in range(layers.shape[1])]))
    assert np.unique(layers[:, k]).size >= 3
    cert = dataclasses.replace(fitted, lambda_hat=fitted.lambdas[k])
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    for start in range(0, len(prompts), 8):
        input_ids, mask = left_pad(ids[start : start + 8])
        out = generate(model, input_ids, mask, certificate=cert, max_new_tokens=1)
        rows = np.arange(start, start + input_ids.shape[0])
        np.testing.assert_array_equal(out.exit_layers[:, 0].numpy(), layers[rows, k])
        expected = cache.arrays["topk_ids"][first[rows], layers[rows, k] - 1, 0]
        expected = np.where(layers[rows, k] == 6, cache.arrays["full_tokens"][first[rows]], expected)
        np.testing.assert_array_equal(out.new_tokens[:, 0].numpy(), expected)

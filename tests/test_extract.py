"""Exit heads and cache extraction on tiny random Hugging Face models built from configs (no download).

Every model is built with a fixed torch seed from a small config (3 decoder layers, d=32, V=64) and a
word-level tokenizer over the same 64 ids, so each test runs in well under a second on a CPU.
"""

import copy
import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny_hf import PAD, V, _config, tiny_model, tiny_tokenizer

import calibrate
import calibrate._extract_checks as extract_checks
import calibrate.extraction as extract_module
from calibrate._format import level
from calibrate.cache import open_cache
from calibrate.extraction import concat_caches, extract, extract_main, read_prompts
from calibrate.heads import SUPPORTED_ARCHITECTURES, ExitHeads, decoder_layers, record_layer_states
from calibrate.synthetic import synthetic_cache
from measures.confidence import entropy, from_topk, softmax_gap, softmax_max, state_saturation

N_LAYERS = 3
PROMPTS = ["w1 w2 w3 w4 w5", "w7", "w9 w10 w11", "w12 w13 w14 w15 w16 w17 w18 w19", "w20 w21"]


# --------------------------------------------------------------------------------------------------
# Tiny models and tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _reference_generate(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """New tokens of Hugging Face greedy ``generate`` for one prompt alone (no padding)."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
    start = 1 if model.config.is_encoder_decoder else enc["input_ids"].shape[1]
    return out[0, start:].tolist()


def _forward(model, ids: torch.Tensor, **kw):
    if model.config.is_encoder_decoder:
        return model(input_ids=torch.tensor([[5, 6, 7, 8]]), decoder_input_ids=ids, output_hidden_states=True, **kw)
    return model(input_ids=ids, output_hidden_states=True, **kw)


# --------------------------------------------------------------------------------------------------
# Exit heads
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_heads_reproduce_the_models_logits(arch):
    model = tiny_model(arch)
    heads = ExitHeads.from_model(model)
    assert (heads.n_layers, heads.hidden_size, heads.vocab_size) == (N_LAYERS, 32, V)
    ids = torch.tensor([[4, 9, 17, 30, 5, 11]])
    with torch.no_grad(), record_layer_states(model, position=None) as recorded:
        out = _forward(model, ids)
    raw = torch.stack([r[0] for r in recorded], dim=-2)  # (1, S, L, d): raw layer outputs (hooks)
    hf = out.decoder_hidden_states if model.config.is_encoder_decoder else out.hidden_states
    assert len(hf) == N_LAYERS + 1  # embedding output first
    # The head on the raw last layer state is the model's own prediction, at every position.
    torch.testing.assert_close(heads(raw)[..., -1, :], out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads(raw[..., -1, :], layer=N_LAYERS - 1), out.logits, rtol=1e-5, atol=1e-5)
    # The Hugging Face tuple gives the same logits for every layer (off by one, last one normalised).
    torch.testing.assert_close(heads.from_hidden_states(hf), heads(raw), rtol=1e-5, atol=1e-5)
    # hidden_states[i + 1] is layer i's raw output for every layer but the last.
    torch.testing.assert_close(torch.stack(hf[1:-1], dim=-2), raw[..., :-1, :])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "t5", "mbart"])
def test_naive_logit_lens_on_hf_hidden_states_is_wrong(arch):
    """The pitfalls the heads avoid: HF's last entry is already normalised, and entry 0 is the embedding."""
    model = tiny_model(arch)
    heads = ExitHeads.from_model(model)
    with torch.no_grad():
        out = _forward(model, torch.tensor([[4, 9, 17, 30]]))
        hf = out.decoder_hidden_states if model.config.is_encoder_decoder else out.hidden_states
        twice = heads(hf[-1], layer=N_LAYERS - 1)  # final norm applied a second time
        shifted = heads(torch.stack(hf[:-1], dim=-2))  # embedding output taken as layer 0
        raw = heads(torch.stack(hf[1:], dim=-2))
    assert not torch.allclose(twice, out.logits, atol=1e-3)
    assert not torch.allclose(shifted[..., -1, :], out.logits, atol=1e-3)
    assert not torch.allclose(shifted[..., 0, :], raw[..., 0, :], atol=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_t5_head_scaling_follows_tied_embeddings(tied):
    model = tiny_model("t5", tie_word_embeddings=tied)
    heads = ExitHeads.from_model(model)
    assert heads.scale == pytest.approx(32**-0.5 if tied else 1.0)
    with torch.no_grad():
        out = _forward(model, torch.tensor([[0, 9, 17]]))
    torch.testing.assert_close(heads.from_hidden_states(out.decoder_hidden_states)[..., -1, :], out.logits)


def test_bart_final_logits_bias_is_added():
    model = tiny_model("bart")
    with torch.no_grad():
        model.final_logits_bias.copy_(torch.linspace(-2, 2, V))
        out = _forward(model, torch.tensor([[3, 9, 17]]))
    heads = ExitHeads.from_model(model)
    assert heads.describe()["logits_bias"] and not heads.describe()["norm"]
    torch.testing.assert_close(heads.from_hidden_states(out.decoder_hidden_states)[..., -1, :], out.logits)


def test_adapters_start_at_identity_and_leave_the_last_layer_alone():
    model = tiny_model("llama")
    plain = ExitHeads.from_model(model)
    heads = ExitHeads.from_model(model, adapters=True)
    d = heads.hidden_size
    # Only the adapters are parameters of the heads (the model's norm and head are shared, not owned).
    assert sum(p.numel() for p in heads.parameters()) == (N_LAYERS - 1) * (d * d + d)
    assert set(heads.state_dict()) == {"adapter_weight", "adapter_bias"}
    assert sum(p.numel() for p in plain.parameters()) == 0
    h = torch.randn(5, N_LAYERS, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(heads(h), plain(h), rtol=0, atol=0)
        heads.adapter_bias.add_(0.5)
        moved = heads(h)
    assert not torch.allclose(moved[:, :-1], plain(h)[:, :-1], atol=1e-3)
    torch.testing.assert_close(moved[:, -1], plain(h)[:, -1], rtol=0, atol=0)
    for i in range(N_LAYERS):
        torch.testing.assert_close(heads(h[:, i], layer=i), moved[:, i])
    # Gradients reach the adapters only.
    heads(h).sum().backward()
    assert heads.adapter_weight.grad is not None and heads.adapter_weight.grad.abs().sum() > 0


def test_heads_reject_bad_input():
    model = tiny_model("gpt2")
    heads = ExitHeads.from_model(model)
    with pytest.raises(ValueError, match="layer must be an int in"):
        heads(torch.zeros(2, 32), layer=N_LAYERS)
    with pytest.raises(TypeError, match=r"layer must be an int in 0..2 \(0-based, n_layers=3\), got 1.0"):
        heads(torch.zeros(2, 32), layer=1.0)
    with pytest.raises(ValueError, match="n_layers=3"):
        heads(torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="hidden_size=32"):
        heads(torch.zeros(2, N_LAYERS, 31))
    with pytest.raises(ValueError, match="n_layers \\+ 1 = 4"):
        heads.from_hidden_states([torch.zeros(1, 1, 32)] * N_LAYERS)


def test_unsupported_architecture_is_named():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, LlamaModel

    torch.manual_seed(0)
    neo = GPTNeoForCausalLM(
        GPTNeoConfig(num_layers=2, hidden_size=16, num_heads=2, vocab_size=V, attention_types=[[["global"], 2]])
    )
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt_neo'.*'gpt2'.*'llama'.*'t5'"):
        ExitHeads.from_model(neo)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt_neo'"):
        extract(neo, tiny_tokenizer(), ["w1"], progress=False)
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        ExitHeads.from_model(LlamaModel(_config("llama")))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        decoder_layers(object())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bart"])
def test_a_model_whose_layers_disagree_with_its_config_is_refused(arch):
    """Llama's forward runs the config's count of layers: the runtime ran every layer (other tokens than generate),
    LAT failed with an IndexError and extract blamed the generation config."""
    from calibrate import lat
    from calibrate.runtime import generate

    cut = tiny_model(arch)
    field = {"gpt2": "n_layer", "t5": "num_decoder_layers", "bart": "decoder_layers"}.get(arch, "num_hidden_layers")
    setattr(cut.config, field, 2)
    pruned = tiny_model(arch)
    del decoder_layers(pruned)[2]  # the config still says 3
    for model, held in ((cut, 3), (pruned, 2)):
        named = "num_hidden_layers" if arch == "gpt2" else field  # GPT-2's config maps n_layer to it
        match = rf"holds {held} decoder layers \(.*\) but its config says {named}={5 - held}: set the one"
        for call in (
            lambda: generate(model, torch.tensor([[4, 5]]), max_new_tokens=2),
            lambda: extract(model, tiny_tokenizer(), ["w1"], max_new_tokens=2, progress=False),
            lambda: ExitHeads.from_model(model),
        ):
            with pytest.raises(ValueError, match=match):
                call()
        if arch == "llama":
            with pytest.raises(ValueError, match=match):
                lat.generate(model, torch.tensor([[4, 5]]), speedup=1.0, max_new_tokens=2)


# --------------------------------------------------------------------------------------------------
# Extraction: tokens equal generate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "t5", "bart"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_tokens_equal_generate_of_each_prompt_alone(arch, batch_size, tokenizer):
    model = tiny_model(arch)
    cache = extract(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=batch_size, top_k=4, progress=False)
    assert cache.n_sequences == len(PROMPTS) and cache.n_layers == N_LAYERS and cache.top_k == 4
    for i, prompt in enumerate(PROMPTS):
        expected = _reference_generate(model, tokenizer, prompt, 6)
        assert cache.sequences["output_ids"][i].tolist() == expected, f"prompt {i}"
        assert cache.sequences["output"][i] == tokenizer.decode(expected, skip_special_tokens=True)
    assert cache.sequences["prompt"].tolist() == PROMPTS
    # Greedy with the model's plain config: the last layer's top-1 is the generated token.
    np.testing.assert_array_equal(cache.arrays["topk_ids"][:, -1, 0], cache.arrays["full_tokens"])


def test_a_prompt_whose_chat_template_wrote_the_bos_gets_one():
    """Llama-style tokenizers add a BOS and their chat templates write one: the prompt text then begins with it, and
    the model read two (apply_chat_template(tokenize=True) gives one); extract and decoded mode share the rule."""
    import torch
    from tokenizers.processors import TemplateProcessing

    from calibrate._extract_checks import prompt_ids

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    templated = tok.apply_chat_template([{"role": "user", "content": "w4 w5 w6"}], tokenize=False)
    assert templated == "<bos>w4 w5 w6" and tok(templated)["input_ids"] == [3, 3, 8, 9, 10]
    assert prompt_ids(tok, [templated, "w4 w5 w6", "w4 <bos>"]) == [[3, 8, 9, 10], [3, 8, 9, 10], [3, 8, 3]]
    assert prompt_ids(tiny_tokenizer(), [templated]) == [[3, 8, 9, 10]]  # a tokenizer that adds none: as it is
    model = tiny_model("llama")
    cache = extract(model, tok, [templated], max_new_tokens=4, progress=False)
    expected = model.generate(torch.tensor([[3, 8, 9, 10]]), do_sample=False, max_new_tokens=4)[0, 4:].tolist()
    assert cache.sequences["output_ids"][0].tolist() == expected  # was the continuation of [3, 3, 8, 9, 10]


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_sequences_stop_at_eos_which_is_kept(arch, tokenizer):
    model = tiny_model(arch, seed=2)
    free = [_reference_generate(model, tokenizer, p, 8) for p in PROMPTS]
    # Make EOS a token that some sequence first generates at step 3 or later.
    s, eos = next((s, t) for s, seq in enumerate(free) for j, t in enumerate(seq) if 2 <= j < 7 and t not in seq[:j])
    model.generation_config.eos_token_id = eos
    cache = extract(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5, progress=False)
    for i, prompt in enumerate(PROMPTS):
        expected = _reference_generate(model, tokenizer, prompt, 8)
        got = cache.sequences["output_ids"][i].tolist()
        assert got == expected
        cut = free[i].index(eos) + 1 if eos in free[i] else 8
        assert got == free[i][:cut]
    assert cache.lengths[s] == free[s].index(eos) + 1 < 8
    assert cache.sequences["output_ids"][s][-1] == eos
    assert cache.meta["generation"]["eos_token_id"] == [eos]


def test_generation_config_that_changes_greedy_choices_warns(tokenizer):
    model = tiny_model("gpt2")
    first = _reference_generate(model, tokenizer, PROMPTS[0], 1)[0]
    model.generation_config.suppress_tokens = [first]
    with pytest.warns(UserWarning, match="last layer's top-1 differs"):
        cache = extract(model, tokenizer, PROMPTS[:1], max_new_tokens=3, progress=False)
    assert cache.sequences["output_ids"][0].tolist() == _reference_generate(model, tokenizer, PROMPTS[0], 3)
    assert cache.arrays["topk_ids"][0, -1, 0] == first != cache.arrays["full_tokens"][0]


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_a_generation_config_returning_a_dict_extracts_the_same_cache(arch, tokenizer):
    model = tiny_model(arch)
    plain = extract(model, tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False)
    model.generation_config.return_dict_in_generate = True  # generate then returns its output as a dict
    model.generation_config.output_scores = True
    cache = extract(model, tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False)  # was a TypeError
    assert cache.checksum == plain.checksum
    assert cache.meta["generation"]["model_generation_config"]["return_dict_in_generate"] is True  # recorded as set


# --------------------------------------------------------------------------------------------------
# Extraction: stored fields
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_fields_match_a_teacher_forced_recomputation(arch, tokenizer):
    """Re-run the model on prompt + generated tokens without a KV cache and recompute every field."""
    # float64, so that the KV-cached generation and the full forward agree to ~1e-12 and the tolerances
    # below measure the extraction (float32 softmax), not the model's rounding.
    model = tiny_model(arch, seed=1).double()
    heads = ExitHeads.from_model(model)
    kw = {"max_new_tokens": 5, "top_k": 3, "store_hidden": True, "progress": False}
    cache = extract(model, tokenizer, PROMPTS[:3], batch_size=1, **kw)
    # Padded batches hold the same rows (a misaligned row or padding leak would differ by far more).
    batched = extract(model, tokenizer, PROMPTS[:3], batch_size=3, **kw)
    np.testing.assert_array_equal(batched.arrays["full_tokens"], cache.arrays["full_tokens"])
    for name in ("topk_logprobs", "softmax_gap", "entropy", "state_saturation", "hidden"):
        np.testing.assert_allclose(batched.arrays[name], cache.arrays[name], rtol=1e-5, atol=1e-5, err_msg=name)
    for s, prompt in enumerate(PROMPTS[:3]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        new = cache.sequences["output_ids"][s].tolist()
        rows = slice(cache.offsets[s], cache.offsets[s + 1])
        with torch.no_grad(), record_layer_states(model, position=None) as recorded:
            if model.config.is_encoder_decoder:
                model(input_ids=torch.tensor([prompt_ids]), decoder_input_ids=torch.tensor([[PAD] + new[:-1]]))
                positions = slice(0, len(new))
            else:
                model(input_ids=torch.tensor([prompt_ids + new[:-1]]))
                positions = slice(len(prompt_ids) - 1, len(prompt_ids) + len(new) - 1)
            states = torch.stack([r[0][0, positions] for r in recorded], dim=1)  # (n, L, d)
            logits = heads(states).numpy().astype(np.float64)  # (n, L, V)
        ref_lp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        order = np.argsort(-ref_lp, axis=-1, kind="stable")[..., :3]
        np.testing.assert_array_equal(cache.arrays["topk_ids"][rows], order)
        np.testing.assert_allclose(
            cache.arrays["topk_logprobs"][rows], np.take_along_axis(ref_lp, order, -1), rtol=1e-5, atol=2e-5
        )
        np.testing.assert_allclose(cache.arrays["softmax_gap"][rows], softmax_gap(logits), atol=2e-5)
        np.testing.assert_allclose(cache.arrays["softmax_max"][rows], softmax_max(logits), atol=2e-5)
        np.testing.assert_allclose(cache.arrays["entropy"][rows], entropy(logits), atol=2e-5)
        np.testing.assert_allclose(cache.arrays["state_saturation"][rows], state_saturation(states.numpy()), atol=2e-5)
        np.testing.assert_allclose(
            cache.arrays["hidden"][rows].astype(np.float32), states.numpy(), rtol=2e-3, atol=2e-3
        )
    assert cache.arrays["hidden"].dtype == np.float16 and cache.hidden_size == 32
    np.testing.assert_array_equal(cache.arrays["state_saturation"][:, 0], 0.0)
    # The entropy is exact (full distribution), not the top-k bound, which is strictly lower here.
    bound = from_topk(cache.arrays["topk_logprobs"], V)["entropy"]
    assert np.all(bound <= cache.arrays["entropy"] + 1e-5) and np.max(cache.arrays["entropy"] - bound) > 1e-3


def test_states_beyond_float16_are_refused_with_the_layer_named(tokenizer):
    """The cache stores hidden states as float16: finite states beyond its range would be stored as inf, which
    the cache's own check then blamed on the array."""
    model = tiny_model("llama", seed=0, n_layers=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(5e4)  # states of |h| ~ 1e5 from layer 2 on
    with pytest.raises(ValueError, match=r"layer 2 reach .*float16 \(65504\).*store_hidden=False"):
        extract(model, tokenizer, PROMPTS, max_new_tokens=3, store_hidden=True, progress=False)
    assert extract(model, tokenizer, PROMPTS, max_new_tokens=3, progress=False).n_tokens > 0


def test_meta_vocab_and_references(tokenizer):
    model = tiny_model("gpt2")
    model.name_or_path = "tiny/gpt2"
    tokenizer.name_or_path = "tiny/tokenizer"
    refs = ["r0", None, "r2"]
    cache = extract(model, tokenizer, PROMPTS[:3], max_new_tokens=4, batch_size=2, references=refs, progress=False)
    meta = cache.meta
    assert meta["model"] == "tiny/gpt2" and meta["tokenizer"] == "tiny/tokenizer"
    assert (meta["n_layers"], meta["vocab_size"], meta["top_k"]) == (N_LAYERS, V, 8)
    assert meta["library_version"] and meta["architecture"] == "gpt2"
    gen = meta["generation"]
    assert (gen["max_new_tokens"], gen["batch_size"], gen["do_sample"], gen["padding_side"]) == (4, 2, False, "left")
    assert meta["heads"]["kind"] == "logit_lens" and "shard" not in meta
    assert meta["software"]["transformers"] == transformers.__version__
    assert cache.vocab == [tokenizer.decode([i], skip_special_tokens=True) for i in range(V)]
    assert cache.vocab[:4] == [""] * 4 and cache.vocab[4] == "w0"  # special tokens decode to "", as in the outputs
    assert cache.sequences["id"].tolist() == ["0", "1", "2"]
    assert [r if isinstance(r, str) else None for r in cache.sequences["reference"]] == refs
    for s in range(3):  # the vocab decodes the proxy outputs
        # (decode([i]) of this word-level tokenizer has no spaces; the tokenizer joins words with one)
        ids = cache.sequences["output_ids"][s]
        assert cache.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "")
        assert cache.sequences["output"][s] == tokenizer.decode(ids, skip_special_tokens=True)


def test_progress_bar_is_shown(tokenizer, capsys):
    extract(tiny_model("gpt2"), tokenizer, PROMPTS[:2], max_new_tokens=2, progress=True)
    assert "extract" in capsys.readouterr().err


def test_custom_heads_are_used(tokenizer):
    model = tiny_model("llama")
    heads = ExitHeads.from_model(model, adapters=True)
    with torch.no_grad():
        heads.adapter_weight.mul_(-1.0)  # flips layers 0..L-2 only
    plain = extract(model, tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False)
    adapted = extract(model, tokenizer, PROMPTS[:2], max_new_tokens=3, heads=heads, progress=False)
    np.testing.assert_array_equal(adapted.arrays["full_tokens"], plain.arrays["full_tokens"])
    np.testing.assert_array_equal(adapted.arrays["topk_ids"][:, -1], plain.arrays["topk_ids"][:, -1])
    assert not np.array_equal(adapted.arrays["topk_ids"][:, 0], plain.arrays["topk_ids"][:, 0])
    assert adapted.meta["heads"]["kind"] == "adapters"


def test_model_mode_is_restored(tokenizer):
    model = tiny_model("gpt2").train()
    extract(model, tokenizer, PROMPTS[:1], max_new_tokens=2, progress=False)
    assert model.training


# --------------------------------------------------------------------------------------------------
# Shards and resume
# --------------------------------------------------------------------------------------------------


def test_layer_states_record_the_calling_threads_forwards_only():
    """A model served in another thread meanwhile: its forward calls are not recorded (extract then failed
    with a misleading "unsupported generation config?")."""
    import threading

    model = tiny_model("llama")
    inside, done = threading.Event(), threading.Event()
    counts = {}

    def recording():
        with torch.no_grad(), record_layer_states(model) as recorded:
            inside.set()
            done.wait(timeout=30)  # another thread's forward runs now
            model(input_ids=torch.tensor([[4, 9, 17]]))
            counts["calls"] = [len(r) for r in recorded]

    thread = threading.Thread(target=recording)
    thread.start()
    assert inside.wait(timeout=30)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]))
    done.set()
    thread.join()
    assert counts["calls"] == [1] * N_LAYERS  # was [2, 2, 2]


def test_two_threads_extracting_with_one_model_get_what_each_gets_alone(tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_model("gpt2")
    run = lambda i: extract(model, tokenizer, PROMPTS[i::2], max_new_tokens=4, progress=False)  # noqa: E731
    alone = [run(i) for i in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(run, (0, 1)))
    for cache, expected in zip(both, alone):
        for field in ("full_tokens", "topk_ids", "softmax_gap"):
            np.testing.assert_array_equal(cache.arrays[field], expected.arrays[field])


def test_crash_then_rerun_resumes_and_equals_an_uninterrupted_run(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    kw = {"max_new_tokens": 4, "batch_size": 2, "top_k": 3, "store_hidden": True, "progress": False}
    full = extract(model, tokenizer, PROMPTS, **kw)
    shards = tmp_path / "shards"
    original = extract_module._extract_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(args[3])  # start index
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_module, "_extract_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(model, tokenizer, PROMPTS, shard_dir=shards, **kw)
    assert sorted(p.name for p in shards.iterdir()) == ["batch_00000"]  # no partial shard left behind
    first = open_cache(shards / "batch_00000")
    assert first.sequences["id"].tolist() == ["0", "1"] and first.meta["shard"]["start"] == 0

    calls.clear()
    monkeypatch.setattr(extract_module, "_extract_batch", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    resumed = extract(model, tokenizer, PROMPTS, shard_dir=shards, **kw)
    assert calls == [2, 4]  # batch 0 was read back, not recomputed
    assert sorted(p.name for p in shards.iterdir()) == ["batch_00000", "batch_00001", "batch_00002"]
    assert resumed.checksum == full.checksum
    assert resumed.sequences["id"].tolist() == [str(i) for i in range(len(PROMPTS))]
    assert "shard" not in resumed.meta and resumed.meta["generation"] == full.meta["generation"]

    calls.clear()
    again = extract(model, tokenizer, PROMPTS, shard_dir=shards, **kw)  # everything on disk already
    assert calls == [] and again.checksum == full.checksum


def test_a_batch_another_run_wrote_meanwhile_is_read_back(tokenizer, tmp_path, monkeypatch):
    """Two runs into one shard_dir (a retry started while the first ran): the second failed with advice to pass an
    overwrite that extract does not take."""
    model = tiny_model("gpt2")
    alone = extract(model, tokenizer, PROMPTS, max_new_tokens=2, progress=False)
    original = extract_module._extract_batch

    def first_run_finishes_meanwhile(*args, **kwargs):  # the other run saves batch 0 while this one computes it
        monkeypatch.setattr(extract_module, "_extract_batch", original)
        extract(model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=8, shard_dir=tmp_path, progress=False)
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_module, "_extract_batch", first_run_finishes_meanwhile)
    cache = extract(model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=8, shard_dir=tmp_path, progress=False)
    assert cache.checksum == alone.checksum


def test_shards_of_another_run_are_refused(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    extract(model, tokenizer, PROMPTS[:2], max_new_tokens=2, shard_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"written by another run \(its prompts, token ids differ\)"):
        extract(model, tokenizer, PROMPTS[2:4], max_new_tokens=2, shard_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=rf"another run \(its setting 'generation' differ\): .*delete {tmp_path}"):
        extract(model, tokenizer, PROMPTS[:2], max_new_tokens=3, shard_dir=tmp_path, progress=False)
    retrained = tiny_model("gpt2", seed=1)  # same architecture and name, other weights: no mixed cache
    with pytest.raises(ValueError, match=r"another run \(its model weights, setting 'heads' differ\)"):
        extract(retrained, tokenizer, PROMPTS[:2], max_new_tokens=2, shard_dir=tmp_path, progress=False)
    model.name_or_path = "/elsewhere/the-same-model"  # the same weights, the path spelled or moved otherwise
    extract(model, tokenizer, PROMPTS[:2], max_new_tokens=2, shard_dir=tmp_path, progress=False)  # resumes
    pieces = extract_checks._vocab
    with monkeypatch.context() as patch:  # e.g. batches of an older extraction, whose special tokens kept their text
        patch.setattr(extract_checks, "_vocab", lambda t, size: ["<eos>" if p == "" else p for p in pieces(t, size)])
        with pytest.raises(ValueError, match=r"another run \(its vocab differ\)"):
            extract(model, tokenizer, PROMPTS[:2], max_new_tokens=2, shard_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="shard_dir must name a directory"):
        extract(model, tokenizer, PROMPTS[:2], max_new_tokens=2, shard_dir="", progress=False)
    batch = tmp_path / "batch_00000"
    part = open_cache(batch)
    part.with_meta({**part.user_meta, "shard": ["not", "a", "dict"]}).save(batch, overwrite=True)
    with pytest.raises(ValueError, match=r"written by another run \(its .* differ\)"):  # an AttributeError
        extract(model, tokenizer, PROMPTS[:2], max_new_tokens=2, shard_dir=tmp_path, progress=False)


def test_concat_caches_inverts_a_split_by_sequence():
    cache = synthetic_cache(12, n_layers=4, seed=0)
    parts = [cache.subset(range(5)), cache.subset(range(5, 6)), cache.subset(range(6, 12))]
    joined = concat_caches(parts)
    assert joined.checksum == cache.checksum
    assert concat_caches([cache]).checksum == cache.checksum
    with pytest.raises(ValueError, match="n_layers"):
        concat_caches([cache, synthetic_cache(3, n_layers=5, seed=0)])
    with pytest.raises(ValueError, match="ids must be unique"):
        concat_caches([parts[0], parts[0]])
    with pytest.raises(ValueError, match="at least one"):
        concat_caches([])


def test_concat_caches_refuses_parts_of_other_models_or_settings_unless_told_what_the_whole_is():
    cache = synthetic_cache(8, n_layers=4, seed=0)
    a, b = cache.subset(range(4)), cache.subset(range(4, 8))
    other = synthetic_cache(3, n_layers=4, seed=1)  # its generator settings differ: allowed
    renamed = other.with_meta({**other.user_meta, "model": "gpt2"})
    with pytest.raises(ValueError, match=r"caches\[1\] differs from caches\[0\] in 'model': 'gpt2' != 'synthetic'"):
        concat_caches([a, renamed])
    longer = b.with_meta({**b.user_meta, "generation": {**b.user_meta["generation"], "max_new_tokens": 99}})
    with pytest.raises(ValueError, match=r"in 'generation' -> 'max_new_tokens': 99 != "):
        concat_caches([a, longer])
    joined = concat_caches([a, longer], meta={**a.user_meta, "note": "joined"})
    assert joined.user_meta["note"] == "joined" and joined.n_sequences == 8
    sharded = b.with_meta({**b.user_meta, "shard": {"index": 1}, "software": {"torch": "x"}})
    assert concat_caches([a, sharded]).checksum == cache.checksum  # what each part is and where it ran may differ
    with pytest.raises(TypeError, match="meta must be a dict"):
        concat_caches([a, b], meta=[("model", "x")])
    heads = {"kind": "logit_lens", "model_digest": "d1"}
    here = a.with_meta({**a.user_meta, "model": "model", "tokenizer": "model", "heads": heads})
    there = b.with_meta({**b.user_meta, "model": "/abs/model", "tokenizer": "/abs/model", "heads": heads})
    assert concat_caches([here, there]).user_meta["model"] == "model"  # the weights say: the same model
    there = there.with_meta({**there.user_meta, "heads": {**heads, "model_digest": "d2"}})
    with pytest.raises(ValueError, match="in 'heads' -> 'model_digest': 'd2' != 'd1'"):
        concat_caches([here, there])
    with pytest.raises(
        ValueError, match=r"sequence id 'synthetic-0' occurs in caches\[0, 1\]; ids must be unique across"
    ):
        concat_caches([a, a.subset([0])])  # it said "ids must be unique, got '0' twice", from inside from_arrays


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_prompts_longer_than_the_context_are_reported(tokenizer):
    model = tiny_model("gpt2")  # n_positions = 64
    long = " ".join(f"w{i % 50}" for i in range(60))
    with pytest.raises(ValueError, match=r"1 prompt\(s\) do not fit .*n_positions=64.*prompt 1 \(60 tokens\)"):
        extract(model, tokenizer, ["w1", long], max_new_tokens=6, progress=False)
    # 60 + 5 - 1 positions fit exactly (the last new token is never fed back), as model.generate allows
    cache = extract(model, tokenizer, [long], max_new_tokens=5, progress=False)
    assert cache.sequences["output_ids"][0].tolist() == _reference_generate(model, tokenizer, long, 5)
    extract(tiny_model("bart"), tokenizer, ["w1"], max_new_tokens=64, progress=False)  # 64 decoder positions
    with pytest.raises(ValueError, match="max_new_tokens=65 needs 65 decoder positions"):
        extract(tiny_model("bart"), tokenizer, ["w1"], max_new_tokens=65, progress=False)


def test_an_encoder_prompt_too_long_is_not_told_to_lower_max_new_tokens(tokenizer):
    model = tiny_model("bart")  # max_position_embeddings = 64: the encoder's input, whatever max_new_tokens is
    long = " ".join(f"w{i % 50}" for i in range(65))
    with pytest.raises(ValueError, match=r"prompt 0 \(65 tokens\); shorten them \(nothing is truncated\)"):
        extract(model, tokenizer, [long], max_new_tokens=1, progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_speculative_settings_of_the_generation_config_decode_one_token_per_call(arch, tokenizer):
    """Prompt lookup feeds several candidate tokens per forward call: the hooks kept the last candidate's state
    (wrong top-k and scores, a warning blaming logits processors), or the run failed after generating."""
    prompts = ["w5 w6 w7 w8 w5 w6 w7 w8 w5 w6 w7 w8", "w9 w10 w9 w10 w9 w10 w9 w10"]
    plain = extract(tiny_model(arch), tokenizer, prompts, max_new_tokens=10, batch_size=1, progress=False)
    model = tiny_model(arch)
    model.generation_config.prompt_lookup_num_tokens = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of changed greedy choices
        looked = extract(model, tokenizer, prompts, max_new_tokens=10, batch_size=1, progress=False)
    assert looked.checksum == plain.checksum


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_a_generation_config_without_kv_cache_is_extracted(arch, tokenizer):
    """use_cache=False feeds the whole sequence at every call: refused as "speculative" by the width check."""
    prompts = ["w1 w2 w3", "w4"]
    cached = extract(tiny_model(arch), tokenizer, prompts, max_new_tokens=4, batch_size=2, progress=False)
    model = tiny_model(arch)
    model.generation_config.use_cache = False
    uncached = extract(model, tokenizer, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert np.array_equal(uncached.arrays["full_tokens"], cached.arrays["full_tokens"])
    assert np.array_equal(uncached.arrays["topk_ids"], cached.arrays["topk_ids"])
    np.testing.assert_allclose(uncached.arrays["topk_logprobs"], cached.arrays["topk_logprobs"], atol=1e-4)
    model.generation_config.use_cache, model.generation_config.prefill_chunk_size = True, 2  # one prompt call
    assert extract(model, tokenizer, prompts, max_new_tokens=4, batch_size=2, progress=False).n_tokens


def test_a_forward_call_of_several_new_positions_is_refused(tokenizer, monkeypatch):
    """A generate that feeds candidates in one call (a speculative setting extraction does not override) fails
    naming it instead of recording the last candidate's state."""
    from transformers.generation import utils

    model = tiny_model("gpt2")
    greedy = utils.GenerationMixin._sample

    def speculative(self, input_ids, *args, **kwargs):
        self(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))  # the whole prompt, then two at once
        self(input_ids=input_ids[:, -2:], attention_mask=torch.ones_like(input_ids))
        return greedy(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(utils.GenerationMixin, "_sample", speculative)
    with pytest.raises(ValueError, match=r"fed \d+ positions at once after the prompt"):
        extract(model, tokenizer, ["w1 w2 w3"], max_new_tokens=3, progress=False)


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_a_pad_id_outside_the_embedding_is_refused(arch, tokenizer):
    """Padded batches indexed the embedding with it: a bare IndexError from torch.nn.functional."""
    for pad in (-1, V):
        model = tiny_model(arch)
        model.generation_config.pad_token_id = pad
        with pytest.raises(ValueError, match=rf"pad id {pad} \(the model's generation_config.pad_token_id\) is not"):
            extract(model, tokenizer, ["w1", "w2 w3"], max_new_tokens=2, batch_size=2, progress=False)


def test_constrained_beam_settings_of_the_generation_config_are_ignored(tokenizer):
    """extract decodes greedily (num_beams=1 overrides beam search): force_words_ids made generate fail with
    "Constrained Beam Search requires trust_remote_code=True"."""
    plain = extract(tiny_model("gpt2"), tokenizer, ["w1 w2"], max_new_tokens=3, progress=False)
    model = tiny_model("gpt2")
    model.generation_config.num_beams = 4
    model.generation_config.force_words_ids = [[7]]
    forced = extract(model, tokenizer, ["w1 w2"], max_new_tokens=3, progress=False)
    assert forced.checksum == plain.checksum


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"prompts": "w1 w2"}, TypeError, "sequence of str"),
        ({"prompts": []}, ValueError, "at least one prompt"),
        ({"prompts": ["w1", 3]}, TypeError, "index 1"),
        ({"prompts": ["w1", ""]}, ValueError, r"prompts \['1'\] tokenise to no token"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an int >= 1"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int >= 1"),
        ({"top_k": V + 1}, ValueError, "top_k must be <= vocab_size=64"),
        ({"store_hidden": 1}, TypeError, "store_hidden must be a bool"),
        ({"references": ["a"]}, ValueError, "one str or None per prompt"),
        ({"references": [b"a", "x"]}, ValueError, "references must hold str or None, got bytes"),
        ({"heads": "lens"}, TypeError, "heads must be an ExitHeads"),
    ],
)
def test_extract_rejects_bad_arguments(kw, error, match, tokenizer):
    args = {"prompts": ["w1", "w2 w3"], "max_new_tokens": 2, "progress": False, **kw}
    with pytest.raises(error, match=match):
        extract(tiny_model("gpt2"), tokenizer, args.pop("prompts"), **args)


def test_heads_of_another_model_are_refused(tokenizer):
    from calibrate.runtime import generate

    model = tiny_model("gpt2")
    refused = r"^heads were made \(ExitHeads.from_model\) from another model than the one decoding \(other weights\)"
    for other in (tiny_model("gpt2", n_layer=2), tiny_model("gpt2", seed=1)):  # other sizes; the same sizes
        heads = ExitHeads.from_model(other)
        with pytest.raises(ValueError, match=refused):
            extract(model, tokenizer, ["w1"], heads=heads, progress=False)
        with pytest.raises(ValueError, match=refused):  # the runtime's check, with its message
            generate(model, torch.tensor([[4, 5, 6]]), heads=heads, max_new_tokens=2)
    same = ExitHeads.from_model(tiny_model("gpt2"))  # another object with the same weights
    extract(model, tokenizer, ["w1"], max_new_tokens=2, heads=same, progress=False)
    half = tiny_model("gpt2").to(torch.bfloat16)  # the same weights loaded in another dtype: was "other weights"
    with pytest.raises(ValueError, match=r"the model they were made from runs in float32, this one in bfloat16, "):
        extract(half, tokenizer, ["w1"], heads=same, progress=False)
    t5 = tiny_model("t5")
    mixed = copy.deepcopy(t5).half()
    for block in mixed.decoder.block:  # as from_pretrained(dtype=float16) keeps T5's 'wo' in float32
        block.layer[-1].DenseReluDense.wo.float()
    with pytest.raises(ValueError, match=r"runs in float16 and float32, this one in float16, "):
        extract(copy.deepcopy(t5).half(), tokenizer, ["w1"], heads=ExitHeads.from_model(mixed), progress=False)
    built = ExitHeads(model.transformer.ln_f, model.lm_head, n_layers=2, hidden_size=32, vocab_size=V)  # no model's
    with pytest.raises(ValueError, match="heads has n_layers=2 but the model has 3"):
        extract(model, tokenizer, ["w1"], heads=built, progress=False)


# --------------------------------------------------------------------------------------------------
# Files: prompts and extract_main
# --------------------------------------------------------------------------------------------------


def test_read_prompts_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("w1 w2\n\nw3 {x}\n", encoding="utf-8")
    assert read_prompts(text) == (["w1 w2", "w3 {x}"], [None, None])
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "w1", "reference": "w2"}\n{"prompt": "w3"}\n', encoding="utf-8")
    assert read_prompts(jsonl) == (["w1", "w3"], ["w2", None])
    upper = tmp_path / "PROMPTS.TXT"  # a text file, whatever the case of its extension (was read as JSONL)
    upper.write_text('{"a": 1}\nsecond\n', encoding="utf-8")
    assert read_prompts(upper) == (['{"a": 1}', "second"], [None, None])
    (tmp_path / "P.JSONL").write_text('{"prompt": "w1"}\n', encoding="utf-8")
    assert read_prompts(tmp_path / "P.JSONL") == (["w1"], [None])
    (tmp_path / "lines.json").write_text('{"prompt": "w1", "reference": "w2"}\n', encoding="utf-8")
    assert read_prompts(tmp_path / "lines.json") == (["w1"], ["w2"])
    for array in ('[\n  {"prompt": "w1", "reference": "w2"},\n  {"prompt": "w3"}\n]\n', '["w1", "w3"]'):
        (tmp_path / "array.json").write_text(array, encoding="utf-8")
        with pytest.raises(ValueError, match=r"array.json: a .json file is read as JSONL .*\(.jsonl\), or one prompt"):
            read_prompts(tmp_path / "array.json")  # were 4 prompts ("[", two lines of JSON, "]") and 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1"}\n{"text": "w3"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"prompt\""):
        read_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(tmp_path / "empty.txt")
    bom = tmp_path / "bom"
    bom.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "w1"}\n'.encode())  # a BOM is not part of the first prompt
    assert read_prompts(bom) == (["w1"], [None])
    brace = tmp_path / "brace.txt"
    brace.write_text("{ w1 w2 }\nw3\n", encoding="utf-8")  # a .txt file is text, whatever its first character
    assert read_prompts(brace) == (["{ w1 w2 }", "w3"], [None, None])
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt": "w1", "reference": 2}\n{"prompt": "w3", "reference": 0}\n', encoding="utf-8")
    assert read_prompts(labels) == (["w1", "w3"], ["2", "0"])  # int class labels (risk_label) were refused
    labels.write_text('{"prompt": "w1", "reference": true}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r'labels.jsonl:1: "reference" must be a str, an int label or null, got bool'):
        read_prompts(labels)


def test_read_prompts_breaks_lines_at_line_feeds_only(tmp_path):
    """U+2028, form feed, file separator, NEL and a lone CR are characters of a prompt, not line breaks."""
    odd = "w1\u2028w2\x0cw3\x1cw4\x85w5\rw6"
    text = tmp_path / "prompts.txt"
    text.write_bytes(f"{odd}\r\nw7\n".encode())
    assert read_prompts(text) == ([odd, "w7"], [None, None])
    jsonl = tmp_path / "prompts.jsonl"
    rows = [{"prompt": odd, "reference": "r\u2028s"}, {"prompt": "w7"}]
    jsonl.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert read_prompts(jsonl) == ([odd, "w7"], ["r\u2028s", None])


def test_extract_main_deletes_only_its_batches_from_a_shard_dir(tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("not a batch")
    kw = dict(max_new_tokens=3, batch_size=2, progress=False)
    kept = extract_main(model_dir, prompts, tmp_path / "kept", shard_dir=work, keep_shards=True, **kw)
    assert sorted(p.name for p in work.iterdir()) == ["batch_00000", "batch_00001", "notes.txt"]
    again = extract_main(model_dir, prompts, tmp_path / "again", shard_dir=work, **kw)  # reads the batches back
    assert again.checksum == kept.checksum
    assert [p.name for p in work.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    extract_main(model_dir, prompts, tmp_path / "third", shard_dir=empty, **kw)
    assert not empty.exists()  # nothing but this run's batches: removed with them
    (empty / ".batch_00001.x1y2.tmp").mkdir(parents=True)  # a batch's save killed (SIGKILL) in an earlier run
    extract_main(model_dir, prompts, tmp_path / "fourth", shard_dir=empty, **kw)
    assert not empty.exists()  # the leftover went with the batches
    with pytest.raises(ValueError, match="output must name a directory, got ''"):
        extract_main(model_dir, prompts, "", overwrite=True, shard_dir=empty, **kw)  # replaced the working directory
    out = tmp_path / "out"
    for inside in (out, out / "batches"):  # extracted everything, then could not save over its own batches
        with pytest.raises(ValueError, match=r"shard_dir \(.*\) must lie outside the output"):
            extract_main(tmp_path / "no-model", prompts, out, shard_dir=inside, **kw)  # before loading a model
    assert not out.exists()


def test_remove_batches_deletes_this_runs_batches_and_their_leftovers_only(tmp_path):
    """One listing of the directory (a glob per batch made the cleanup of 16,000 batches take minutes)."""
    from calibrate._extract_steps import _remove_batches

    ours = ["batch_00000", "batch_00002", ".batch_00001.x1y2.tmp", ".batch_00002.a.b.tmp"]
    others = ["batch_00003", ".batch_00003.x.tmp", ".notes.tmp", "notes.txt", "batch_00000.bak"]
    for name in ours + others:
        (tmp_path / name).mkdir()
    _remove_batches(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    for name in others:
        (tmp_path / name).rmdir()
    _remove_batches(tmp_path, 3)
    assert not tmp_path.exists()  # empty: removed with the batches
    _remove_batches(tmp_path, 3)  # gone already


def test_extract_main_writes_a_url_output_there(tokenizer, tmp_path, monkeypatch):
    """It wrote ``memory://bucket/c`` to the local directory ``memory:/bucket/c``."""
    fsspec = pytest.importorskip("fsspec")
    model_dir = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    url = f"memory://calibrate-test-{tmp_path.name}/cache"
    kw = dict(max_new_tokens=3, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"a URL output \(memory://.*\) needs a local shard_dir \(--shard-dir\)"):
        extract_main(model_dir, prompts, url, **kw)
    with pytest.raises(ValueError, match="shard writes a manifest beside local shards: give a local output"):
        extract_main(model_dir, prompts, url, shard_dir=tmp_path / "work", shard=(0, 2), **kw)
    with pytest.raises(ValueError, match="shard_dir must be a local directory, got the URL 'memory://x'"):
        extract_main(model_dir, prompts, tmp_path / "local", shard_dir="memory://x", **kw)
    cache = extract_main(model_dir, prompts, url, shard_dir=tmp_path / "work", **kw)
    assert open_cache(url).checksum == cache.checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "prompts.txt"]  # nothing written here
    fsspec.filesystem("memory").rm(f"/calibrate-test-{tmp_path.name}", recursive=True)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_extract_main_from_a_saved_directory(arch, tokenizer, tmp_path):
    model = tiny_model(arch)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "reference": f"ref {i}"} for i, p in enumerate(PROMPTS[:3])]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "cache"
    cache = extract_main(model_dir, prompts, out, max_new_tokens=4, batch_size=2, progress=False)
    again = open_cache(out)
    assert again.checksum == cache.checksum
    assert not (tmp_path / "cache.shards").exists()  # shards are removed once the cache is saved
    assert again.meta["model"] == str(model_dir) and again.meta["tokenizer"] == str(model_dir)
    assert again.sequences["reference"].tolist() == ["ref 0", "ref 1", "ref 2"]
    for i, prompt in enumerate(PROMPTS[:3]):
        assert again.sequences["output_ids"][i].tolist() == _reference_generate(model, tokenizer, prompt, 4)
    from calibrate.cli import main

    via_cli = tmp_path / "cli_cache"
    argv = ["extract", "--model", str(model_dir), "--prompts", str(prompts), "-o", str(via_cli)]
    assert main([*argv, "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    assert open_cache(via_cli).checksum == cache.checksum
    assert main([*argv, "--max-new-tokens", "4"]) == 2  # refuses to overwrite, with a message
    with pytest.raises(FileExistsError):
        extract_main(model_dir, prompts, out, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="save_pretrained"):
        extract_main(tmp_path / "nowhere", prompts, tmp_path / "c2", progress=False)
    with pytest.raises(ValueError, match="not a layer cache directory"):  # before loading the model, not after
        extract_main(tmp_path / "nowhere", prompts, tmp_path, overwrite=True, progress=False)


def test_import_calibrate_does_not_import_torch():
    code = "import calibrate, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_exports_are_the_functions():
    import calibrate

    assert calibrate.extract is extract and calibrate.concat_caches is concat_caches
    assert calibrate.ExitHeads is ExitHeads and calibrate.SUPPORTED_ARCHITECTURES == SUPPORTED_ARCHITECTURES
    import calibrate.runtime

    assert calibrate.runtime.generate.__module__ == "calibrate.runtime.decode"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        calibrate.nope


def test_cached_top1_breaks_ties_as_greedy_decoding_does():
    from calibrate._extract_steps import _topk

    logp = torch.tensor([[0.0, 2.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0], [1.0, 0.0, 5.0, 5.0, 0.5]])
    values, ids = _topk(logp, 2)
    assert ids[:, 0].tolist() == logp.argmax(dim=-1).tolist() == [1, 0, 2]  # the lowest id among the tied best
    assert ids[2].tolist() == [2, 3] and all(len(set(row)) == 2 for row in ids.tolist())
    assert bool((values[:, 0] >= values[:, 1]).all())
    torch.testing.assert_close(values, logp.gather(-1, ids))
    # bfloat16 logits tie often: the cache's top-1 must be the token the model emits
    model = tiny_model("gpt2", 0, n_layers=2, vocab_size=4096).to(torch.bfloat16)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{i}" for i in rng.integers(0, 60, size=rng.integers(1, 8))) for _ in range(32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check that the last layer's top-1 is the generated token
        cache = extract(model, tiny_tokenizer(), prompts, max_new_tokens=8, progress=False)
    np.testing.assert_array_equal(cache.arrays["topk_ids"][:, -1, 0], cache.arrays["full_tokens"])


def test_prompts_outside_the_vocabulary_and_a_missing_tokenizer_are_named():
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["brandnew"])  # the embeddings were not resized
    with pytest.raises(ValueError, match=rf"prompt 1 tokenises to ids outside the model's {V} embedding rows"):
        extract(tiny_model("gpt2"), tokenizer, ["w1 w2", "w3 brandnew"], max_new_tokens=2, progress=False)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        extract(tiny_model("gpt2"), None, ["w1 w2"], max_new_tokens=2, progress=False)


def test_a_proxy_fit_warns_when_the_generation_config_processes_logits(tokenizer):
    """The runtime applies the generation config's processors to the emitting layer; the proxy cannot."""
    import calibrate

    model = tiny_model("gpt2")
    cache = extract(model, tokenizer, PROMPTS, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.fit(cache)  # nothing processed: no warning
    model.generation_config.update(repetition_penalty=1.3, no_repeat_ngram_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extraction's own warning when the last layer's choice changes
        processed = extract(model, tokenizer, PROMPTS, max_new_tokens=4)
    advice = r"calibrate.fit\(cache, mode='decoded', model="
    with pytest.warns(UserWarning, match=r"processes logits .*\(repetition_penalty=1.3\).*" + advice) as caught:
        calibrate.fit(processed)
    assert caught[0].filename == __file__


def test_textual_losses_refuse_joined_pieces_where_a_layer_predicts_part_of_a_character():
    """Byte-level tokens split a character: alone each decodes to U+FFFD. The full outputs' check passes (the
    full model emits the whole character), but an early output holding the bytes was scored on two U+FFFD where
    the tokenizer (decoded mode, tokenizer_decode) reads the character."""
    import calibrate

    pieces = [b"c", b"af", b" bar", b"\xc3", b"\xa9", "é".encode()]

    class Bytes:  # a byte-level tokenizer's decode
        def decode(self, ids, skip_special_tokens=False):
            return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    vocab = [Bytes().decode([i]) for i in range(len(pieces))]
    full, early = np.array([0, 1, 5, 2]), np.array([0, 1, 3, 4])  # "café bar" and "caf" + the bytes of "é"
    top1 = np.stack([early, full], axis=1)  # (4 tokens, 2 layers)
    topk = np.stack([top1, (top1 + 1) % 6], axis=2)
    cache = calibrate.LayerCache.from_arrays(
        full_tokens=full, topk_ids=topk, lengths=[4], vocab=vocab, vocab_size=6, prompts=["p"],
        outputs=[Bytes().decode(full)],
    )  # fmt: skip
    conf = np.array([[0.6, 1.0]] * 4)
    with pytest.raises(ValueError, match=r"predict tokens whose vocab pieces are parts of a character \(ids \[3, 4\]"):
        calibrate.proxy_losses(cache, conf, [1.0, 0.5], consistency="token_f1")  # was scored on 'caf\ufffd\ufffd'
    decode = calibrate.tokenizer_decode(Bytes())
    exact = calibrate.proxy_losses(cache, conf, [1.0, 0.5], consistency="token_f1", decode=decode)
    joined = calibrate.proxy_losses(cache, conf, [1.0, 0.5], consistency="token_f1", decode=cache.decode)  # asked for
    assert exact.losses[0, 1] < joined.losses[0, 1] == 1.0  # "café" shares a word with "café bar"


def test_textual_losses_refuse_a_vocab_that_does_not_give_the_outputs(tokenizer, tmp_path, capsys, monkeypatch):
    """The word-level tokenizer joins words with spaces, its per-token pieces do not: joined, they would turn the
    output into one word and ROUGE-L into exact match (and risk_* losses near 0). Refused, naming the way out."""
    import calibrate
    from calibrate.cli import main
    from calibrate.exits import early_tokens, exit_layers
    from measures.consistency import textual_loss

    prompts = [f"w{i} w{(7 * i) % 60} w{(3 * i) % 60}" for i in range(30)]
    cache = extract(tiny_model("gpt2"), tokenizer, prompts, max_new_tokens=6, progress=False)
    first = cache.sequences["output"][0]
    at = first.index(" ")  # the first space, which the joined pieces lack
    match = rf"do not give its output text: sequence '0' differs at character {at} \('w.*' vs 'w.* w.*'\)"
    with pytest.raises(ValueError, match=match):
        calibrate.fit(cache, consistency="rouge_l")
    with pytest.raises(ValueError, match=r"decode=calibrate.tokenizer_decode\(tokenizer\)"):
        calibrate.open_cache(cache.save(tmp_path / "cache"), chunks=10).loss_table(consistency="bleu")
    later = next(s for s in range(1, cache.n_sequences) if " " in cache.sequences["output"][s])
    part = cache.subset([later])
    with pytest.raises(ValueError, match=f"sequence '{later}' differs"):  # its id, not its place in the subset
        calibrate.proxy_losses(part, part.arrays["softmax_max"], [0.5], consistency="bleu")

    def train(*args, **kwargs):
        raise AssertionError("trained before the inputs were checked")

    monkeypatch.setattr("measures.learned.train_measure", train)
    with pytest.raises(ValueError, match="do not give its output text"):
        calibrate.fit(cache, consistency="token_f1", measure="classifier")
    with pytest.raises(ValueError, match="do not give its output text"):
        calibrate.validity(cache, trials=2, consistency="token_f1", measure="classifier", progress=False)
    with pytest.raises(ValueError, match="do not give its output text"):
        calibrate.fit(calibrate.open_cache(tmp_path / "cache", chunks=10), consistency="bleu", measure="classifier")
    monkeypatch.undo()

    class OtherTokenizer:  # another model's ids -> text
        def decode(self, ids, skip_special_tokens=False):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).upper()

    other = calibrate.tokenizer_decode(OtherTokenizer())
    with pytest.raises(
        ValueError, match=r"decode=tokenizer_decode\(OtherTokenizer\) does not give .* Is it the tokenizer"
    ):
        calibrate.fit(cache, consistency="rouge_l", decode=other)
    with pytest.raises(TypeError, match="tokenizer must have a decode"):
        calibrate.tokenizer_decode("tokenizer")
    decode = calibrate.tokenizer_decode(tokenizer)
    assert decode(cache.sequences["output_ids"][0]) == first
    assert pickle.loads(pickle.dumps(decode))(cache.sequences["output_ids"][0]) == first  # to Dask workers too
    with pytest.raises(ValueError, match=r"ids must be one output's token ids, shape \(n,\), got shape \(2, 3\)"):
        decode(np.zeros((2, 3), dtype=int))

    lam = [0.9, 0.5, 0.2, 0.0]
    conf = cache.arrays["softmax_max"]
    table = calibrate.proxy_losses(cache, conf, lam, consistency="rouge_l", decode=decode)
    early = early_tokens(cache.arrays["topk_ids"][:, :, 0], exit_layers(conf, lam), cache.arrays["full_tokens"])
    offsets = cache.offsets
    for k in range(len(lam)):  # the plain definition: 1 - ROUGE-L(tokenizer text of the early ids, output text)
        texts = [decode(early[offsets[s] : offsets[s + 1], k]) for s in range(cache.n_sequences)]
        expected = textual_loss(texts, cache.sequences["output"].tolist(), metric="rouge_l")
        np.testing.assert_allclose(table.losses[:, k], expected)
    joined = calibrate.proxy_losses(cache, conf, lam, consistency="rouge_l", decode=cache.decode)  # asked for
    assert joined.risks[-1] > table.risks[-1]  # one word per output: exact match, far harsher (risk_*: laxer)

    tokenizer.save_pretrained(tmp_path / "tok")
    argv = ["fit", str(tmp_path / "cache"), "--consistency", "rouge_l", "--measure", "softmax_max"]
    assert main(argv) == 2 and "--tokenizer DIR" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "cert.json")]) == 0
    direct = calibrate.fit(cache, consistency="rouge_l", measure="softmax_max", decode=decode)
    assert calibrate.Certificate.from_json(tmp_path / "cert.json") == direct
    lazy = calibrate.open_cache(tmp_path / "cache", chunks=10)  # the same decoding, partition by partition
    assert lazy.loss_table(measure="softmax_max", consistency="rouge_l", lambdas=lam, decode=decode) == table
    assert calibrate.fit(lazy, consistency="rouge_l", measure="softmax_max", decode=decode) == direct
    with pytest.raises(TypeError, match="decode must be a callable"):
        lazy.loss_table(consistency="rouge_l", decode="tokenizer")
    assert (
        main(["fit", str(tmp_path / "cache"), "--consistency", "bleu", "--tokenizer", str(tmp_path / "nothing")]) == 2
    )
    assert "--tokenizer: no directory at" in capsys.readouterr().err  # was transformers' advice to go online
    assert main(["fit", str(tmp_path / "cache"), "--consistency", "bleu", "--tokenizer", str(tmp_path / "cache")]) == 2
    assert "--tokenizer: " + str(tmp_path / "cache") + " holds no tokenizer files" in capsys.readouterr().err
    cert_file = str(tmp_path / "cert.json")
    held = extract(tiny_model("gpt2"), tokenizer, [f"w{(5 * i) % 60} w{i}" for i in range(12)], max_new_tokens=6,
                   progress=False)  # fmt: skip
    held_dir = str(held.save(tmp_path / "held"))
    assert main(["audit", cert_file, held_dir]) == 2 and "--tokenizer DIR" in capsys.readouterr().err
    report = calibrate.audit(direct, held, decode=decode)
    code = main(["audit", cert_file, held_dir, "--tokenizer", str(tmp_path / "tok")])
    printed = capsys.readouterr().out
    assert code == (0 if report.within_tolerance else 1) and f"held-out risk {level(report.risk, '.4f')}" in printed
    assert main(["fit", str(tmp_path / "cache"), "--tokenizer", str(tmp_path / "tok")]) == 2  # token consistency
    assert (
        "--tokenizer decodes text for the textual consistencies; 'token' compares token ids"
        in capsys.readouterr().err
    )


def test_one_layer_heads_equal_all_layer_heads_with_asymmetric_adapters():
    """The runtime scores one layer at a time (layer=i), extraction all at once: with random, non-symmetric
    adapters both must be lm_head(norm(A_i h + b_i)) (identity adapters could not tell A from A.T)."""
    model = tiny_model("llama", 0, n_layers=3)
    heads = ExitHeads.from_model(model, adapters=True)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 3, heads.hidden_size, generator=g)
    with torch.no_grad():
        heads.adapter_weight.add_(0.3 * torch.randn(heads.adapter_weight.shape, generator=g))
        heads.adapter_bias.add_(0.3 * torch.randn(heads.adapter_bias.shape, generator=g))
        every = heads(h)
        for i in range(3):
            torch.testing.assert_close(heads(h[:, i], layer=i), every[:, i])
        a0, b0 = heads.adapter_weight[0], heads.adapter_bias[0]
        torch.testing.assert_close(heads(h[:, 0], layer=0), model.lm_head(model.model.norm(h[:, 0] @ a0.T + b0)))


def test_a_train_cache_of_the_same_prompts_under_another_token_budget_is_warned_of(tokenizer):
    """The overlap check compared (prompt, output) texts, so the same prompts extracted with another max_new_tokens
    (outputs cut elsewhere) went unnoticed: 6 of 20 shared calibration examples were reported."""
    model = tiny_model("llama", seed=1, n_layers=4)
    prompts = [" ".join(f"w{(7 * i + j) % 50}" for j in range(3 + i % 4)) for i in range(40)]
    kw = {"store_hidden": True, "progress": False}
    cal = extract(model, tokenizer, prompts[:30], max_new_tokens=8, **kw)
    train = extract(model, tokenizer, prompts[10:40], max_new_tokens=6, **kw)  # 20 prompts shared
    with pytest.warns(UserWarning, match="^20 calibration sequences also occur in train_cache"):
        calibrate.fit(cal, delta=0.3, epsilon=0.1, measure="classifier", train_cache=train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.fit(cal, delta=0.3, epsilon=0.1, measure="classifier", train_cache=train.subset(np.arange(20, 30)))


def test_what_is_written_down_digests_the_weights_afresh(tokenizer):
    """A weight edited through .data away from the sampled values is missed by the quick check (documented), but
    the cache and LAT's (and FFF's) certificates recorded the digest remembered from before the edit."""
    from calibrate import lat
    from calibrate._digest import model_digest

    model = tiny_model("llama", n_layers=N_LAYERS)
    before, lat_id = model_digest(model), lat.model_id(model)  # remembered
    weight = next(p for p in model.parameters() if p.numel() >= 64)
    weight.data.view(-1)[1] += 1.0  # no version counter, not one of the 16 sampled values
    assert model_digest(model) == before  # the quick per-call check: the documented limit
    cache = extract(model, tokenizer, PROMPTS[:2], max_new_tokens=2, progress=False)
    assert cache.user_meta["heads"]["model_digest"] == model_digest(model, fresh=True) != before
    assert lat.model_id(model, fresh=True) != lat_id


def test_a_model_that_goes_non_finite_is_named_with_its_layer_and_prompts():
    """It failed as "hidden must be finite ... in tokens [0, 6)" with store_hidden=False: a field never asked for,
    a block of tokens, no layer, no cause."""
    model = tiny_model("llama", seed=5, n_layers=4)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")  # layer 3's output is NaN
    with pytest.raises(ValueError, match=r"NaN or inf from layer 3 on, for prompts \['0', '1', '2'\]: the model"):
        calibrate.extract(model, tiny_tokenizer(), ["w1 w2 w3", "w4 w5", "w6"], max_new_tokens=3, progress=False)


def test_a_generation_config_asking_for_dola_or_contrastive_search_is_extracted_greedily():
    """extract failed inside Hugging Face ("requires trust_remote_code=True"), which its caller cannot pass; the cache
    records greedy decoding, as the runtime decodes (and warns of those settings)."""
    tokenizer, prompts = tiny_tokenizer(), ["w1 w2 w3", "w4 w5"]
    plain = calibrate.extract(tiny_model("llama"), tokenizer, prompts, max_new_tokens=3, progress=False)
    for setting in ({"dola_layers": "high"}, {"penalty_alpha": 0.6, "top_k": 4}):
        model = tiny_model("llama")
        model.generation_config.update(**setting)
        cache = calibrate.extract(model, tokenizer, prompts, max_new_tokens=3, progress=False)
        np.testing.assert_array_equal(cache.arrays["full_tokens"], plain.arrays["full_tokens"])

"""MLP blocks distilled into FFFs, and the depth of a language model certified in decoded mode."""

import importlib
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from _tiny_hf import tiny_model, tiny_tokenizer

from calibrate import fff, fwer
from calibrate._format import level
from calibrate.heads import decoder_layers

TEXTS = [" ".join(f"w{(i * j + 3) % 29}" for j in range(10)) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def distilled(tokenizer):
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fff.distill(model, tokenizer, TEXTS, depth=3, layers=[0, 2], steps=150, batch_size=64, progress=False)
    return model, before, result


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_recorded_activations_are_the_mlp_blocks_own(arch, tokenizer):
    model = tiny_model(arch).eval()
    acts = fff.mlp_activations(model, tokenizer, TEXTS[:5], [1], max_tokens=6)
    x, y = acts[1]
    assert x.shape[0] == 5 * 6 and x.shape == y.shape
    with torch.no_grad():
        torch.testing.assert_close(decoder_layers(model)[1].mlp(x), y)


def test_texts_without_tokens_add_none(tokenizer):
    """A blank line of a corpus ran the model on no token (llama: "cannot reshape tensor of 0 elements")."""
    model = tiny_model("llama").eval()
    with_blanks = fff.mlp_activations(model, tokenizer, ["", TEXTS[0], "", TEXTS[1]], [0, 1], max_tokens=6)
    plain = fff.mlp_activations(model, tokenizer, TEXTS[:2], [0, 1], max_tokens=6)
    for i in (0, 1):
        torch.testing.assert_close(with_blanks[i], plain[i], rtol=0, atol=0)
    x, y = fff.mlp_activations(model, tokenizer, ["", ""], [1])[1]
    assert x.shape == y.shape == (0, 32)
    held = np.random.default_rng(0).permutation(4)[:2]  # distill's held-out half at seed 0
    texts = ["" if i in held else TEXTS[i] for i in range(4)]
    with pytest.raises(ValueError, match=r"the held-out texts \(split by heldout=0.5, seed=0\) have no token"):
        fff.distill(model, tokenizer, texts, heldout=0.5, steps=1, progress=False)


def test_distill_replaces_only_the_chosen_blocks_of_a_copy(distilled):
    model, before, result = distilled
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    blocks, original = decoder_layers(result.model), decoder_layers(model)
    assert [isinstance(b.mlp, fff.FFF) for b in blocks] == [True, False, True]
    assert blocks[0].mlp.depth == 3 and not isinstance(original[0].mlp, fff.FFF)
    torch.testing.assert_close(blocks[1].mlp.up_proj.weight, original[1].mlp.up_proj.weight)
    assert result.layers == (0, 2) and len(result.errors) == len(result.baseline_errors) == 2
    assert result.n_train > 2 * result.n_heldout > 0 and "depth=3" in repr(result)  # 20% of the texts held out
    assert result.plot().axes


def test_training_lowers_the_heldout_error(tokenizer, distilled):
    model, _, trained = distilled
    untrained = fff.distill(model, tokenizer, TEXTS, depth=3, layers=[0, 2], steps=1, batch_size=64, progress=False)
    assert np.mean(trained.errors) < np.mean(untrained.errors)


def test_seeds_beyond_64_bits_distil_reproducibly(tokenizer, distilled):
    """torch's generators take seeds below 2**64 and fff.distill seeds layer i with seed * 1009 + i."""
    model, _, _ = distilled
    kw = dict(depth=2, layers=[1], steps=2, batch_size=64, progress=False)
    a, b, c = (fff.distill(model, tokenizer, TEXTS, seed=seed, **kw) for seed in (2**63, 2**63, 2**63 + 1))
    assert a.errors == b.errors and a.errors != c.errors


def test_distill_leaves_torchs_global_generator_alone(tokenizer, distilled, monkeypatch):
    """Another thread drawing from torch's global generator meanwhile must not change the distilled model: the
    initial weights come from a generator of the seed's own (was manual_seed of the global one in fork_rng)."""
    model, _, _ = distilled
    kw = dict(depth=2, layers=[1], steps=2, batch_size=64, progress=False)
    expected = fff.distill(model, tokenizer, TEXTS, seed=5, **kw)
    state = torch.random.get_rng_state()
    try:
        torch.random.set_rng_state(torch.Generator().manual_seed(99).get_state())  # another thread's draws
        monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("seeded torch's global generator"))
        monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: pytest.fail("forked torch's global generator"))
        again = fff.distill(model, tokenizer, TEXTS, seed=5, **kw)
    finally:
        torch.random.set_rng_state(state)
    assert again.errors == expected.errors and again.baseline_errors == expected.baseline_errors
    for a, b in zip(decoder_layers(again.model), decoder_layers(expected.model)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name


def test_initial_weights_from_a_generator_equal_those_of_the_seeded_global_stream():
    """The distilled numbers of the README were made with torch.manual_seed(seed); the generator draws the same."""
    from torch import nn

    from calibrate.fff.distill import _linear

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        before = [fff.FFF(20, 7, 4), nn.Linear(20, 5), nn.Linear(5, 7)]
    g = torch.Generator().manual_seed(123)
    now = [fff.FFF(20, 7, 4, generator=g), _linear(20, 5, g), _linear(5, 7, g)]
    for a, b in zip(before, now):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name


def _greedy(model, tokenizer, prompt, n):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0)
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(1) + 1] if 1 in new else new  # EOS (id 1) kept, as in a cache


def test_decoded_depth_losses_equal_hugging_face_generate_at_each_depth(distilled, tokenizer):
    _, _, result = distilled
    student, prompts = result.model, TEXTS[:8]
    table = fff.depth_losses(student, prompts, tokenizer=tokenizer, max_new_tokens=5, batch_size=1)
    assert table.lambdas.tolist() == [3.0, 2.0, 1.0, 0.0] and table.mode == "decoded"
    full = [_greedy(student, tokenizer, p, 5) for p in prompts]
    for column, depth in enumerate((3, 2, 1, 0)):
        with fff.at_depth(student, depth):
            shallow = [_greedy(student, tokenizer, p, 5) for p in prompts]
        for row, (a, b) in enumerate(zip(shallow, full)):
            common = min(len(a), len(b))
            expected = (sum(x != y for x, y in zip(a[:common], b[:common])) + max(len(a), len(b)) - common) / max(
                len(a), len(b)
            )
            assert table.losses[row, column] == pytest.approx(expected)
    assert np.all(table.losses[:, 0] == 0)


def test_certified_depth_of_a_language_model(distilled, tokenizer):
    _, _, result = distilled
    student = result.model
    cert = fff.fit(student, TEXTS, delta=0.4, epsilon=0.1, tokenizer=tokenizer, max_new_tokens=4, consistency="rouge_l")
    assert cert.knob == "fff_depth" and cert.mode == "decoded" and cert.consistency == "rouge_l"
    assert cert.lambdas == (3.0, 2.0, 1.0, 0.0) and cert.risks[0] == 0.0 and cert.model == fff.model_id(student)
    assert cert.max_new_tokens == 4
    table = fff.depth_losses(student, TEXTS, tokenizer=tokenizer, max_new_tokens=4, consistency="rouge_l")
    tested = [r for r in cert.risks if not np.isnan(r)]
    np.testing.assert_allclose(tested, table.risks[: len(tested)])  # the lazy walk decodes the same losses
    fff.apply(student, cert)
    assert {layer.eval_depth for layer in fff.fff_layers(student)} == {
        None if cert.lambda_hat is None else int(cert.lambda_hat)
    }
    report = fff.audit(cert, student, TEXTS[:10], tokenizer=tokenizer)  # the certificate's 4 tokens, not 32
    assert report.n == 10 and len(report.risks) == 4
    held = fff.depth_losses(student, TEXTS[:10], depths=[3, 2, 1, 0], tokenizer=tokenizer, max_new_tokens=4,
                            consistency="rouge_l")  # fmt: skip
    np.testing.assert_array_equal(report.risks, held.risks)
    assert cert.lambda_hat is not None  # so that longer outputs are uncertified:
    with pytest.warns(UserWarning, match="auditing up to max_new_tokens=6 new tokens, but .* at most 4"):
        fff.audit(cert, student, TEXTS[:2], tokenizer=tokenizer, max_new_tokens=6)
    with pytest.raises(ValueError, match=r"is a language model: pass tokenizer="):  # an AttributeError (.ndim)
        fff.depth_losses(student, torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match=r"is a language model: pass tokenizer="):  # blamed the consistency
        fff.audit(cert, student, TEXTS[:2])
    with pytest.raises(ValueError, match="fixed_sequence"):
        fff.fit(student, TEXTS, tokenizer=tokenizer, method="holm")
    kw = dict(delta=0.4, epsilon=0.1, tokenizer=tokenizer, max_new_tokens=4, consistency="rouge_l", progress=False)
    again = fff.fit(student, TEXTS, method=fwer.FixedSequence(), bound=None, **kw)  # as fit_decoded accepts them
    assert again == cert and again.bound == "hoeffding_bentkus"


def test_a_certificate_made_at_full_depth_is_refused_at_another_depth(distilled, tokenizer):
    """The evaluation depth changes what the model computes, but no identity recorded it: an early-exit certificate
    made at full depth ran silently inside fff.at_depth(student, 0) or after fff.apply."""
    import calibrate
    from calibrate.heads import ExitHeads

    student = distilled[2].model
    cache = calibrate.extract(student, tokenizer, TEXTS[:16], max_new_tokens=3, progress=False)
    cert = calibrate.fit(cache, delta=0.5, epsilon=0.2, lambdas=[1.0, 0.5, 0.0], progress=False)
    ids = torch.tensor(tokenizer(TEXTS[20:22])["input_ids"])
    full = ExitHeads.from_model(student).describe()
    with fff.at_depth(student, 3):  # D: the whole tree, the same computation
        assert ExitHeads.from_model(student).describe() == full
        calibrate.runtime.generate(student, ids, certificate=cert, max_new_tokens=3)
    identity = fff.model_id(student)
    with fff.at_depth(student, 1):
        assert fff.model_id(student) == identity  # fff's own knob: not part of its model id
        with pytest.raises(ValueError, match="the model differs from the one the certificate was calibrated with"):
            calibrate.runtime.generate(student, ids, certificate=cert, max_new_tokens=3)


def test_distill_rejects_bad_arguments(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layers must be distinct"):
        fff.distill(model, tokenizer, TEXTS, layers=[0, 9], progress=False)
    with pytest.raises(ValueError, match="depth must be"):
        fff.distill(model, tokenizer, TEXTS, depth=-1, progress=False)
    with pytest.raises(ValueError, match="at least 2 texts"):
        fff.distill(model, tokenizer, TEXTS[:1], progress=False)
    with pytest.raises(ValueError, match="no .mlp block"):
        fff.distill(tiny_model("t5"), tokenizer, TEXTS, progress=False)
    bad = [("steps", 0), ("steps", -3), ("batch_size", 0), ("max_tokens", 0), ("lr", 0.0), ("lr", float("nan")),
           ("hardening", float("nan")), ("hardening", -5.0), ("hardening", float("inf"))]  # fmt: skip
    for name, value in bad:  # each used to return untrained FFFs (or crash inside the model)
        with pytest.raises(ValueError, match=f"{name} must be"):
            fff.distill(model, tokenizer, TEXTS, layers=[0], progress=False, **{name: value})
    kw = dict(layers=[0], steps=2, progress=False)
    exact = fff.distill(model, tokenizer, TEXTS, lr=Fraction(1, 100), hardening=Fraction(1, 2), **kw)  # a TypeError
    assert exact.errors == fff.distill(model, tokenizer, TEXTS, lr=0.01, hardening=0.5, **kw).errors  # in training
    with pytest.raises(ValueError, match="layers must be distinct"):
        fff.mlp_activations(model, tokenizer, TEXTS, [-1])
    for layers in ([1, 1], [3], [0, 3]):  # a repeated layer; layer 3 of a 3-layer model
        with pytest.raises(ValueError, match=r"layers must be distinct decoder layers in 0..2, got \["):
            fff.distill(model, tokenizer, TEXTS, layers=layers, progress=False)
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"soft_share in \\[0, 1\\], got 0.2 and {share}"):
            fff.distill(model, tokenizer, TEXTS, soft_share=share, progress=False)


def test_distill_leaves_the_global_torch_generator_alone(tokenizer):
    model = tiny_model("llama")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fff.distill(model, tokenizer, TEXTS, depth=1, layers=[0], steps=2, batch_size=8, progress=False)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_blocks_saved_beside_the_original_model_load_back(distilled, tmp_path):
    model, _, result = distilled
    path = fff.save_blocks(result.model, tmp_path / "blocks")
    files = ["layer-00000.safetensors", "layer-00002.safetensors", "source.json"]
    assert sorted(p.name for p in path.iterdir()) == files
    fresh = tiny_model("llama").eval()
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)  # the original model
    loaded = fff.load_blocks(fresh, path)
    assert loaded is fresh and fff.model_id(loaded) == fff.model_id(result.model)
    ids = torch.tensor([[3, 5, 9, 14, 20]])
    with fff.at_depth(loaded, None), fff.at_depth(result.model, None), torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="blocks"):
        fff.save_blocks(result.model, path)
    with pytest.raises(ValueError, match="no FFF block"):
        fff.save_blocks(model, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no FFF block"):
        fff.load_blocks(tiny_model("llama"), tmp_path / "empty")
    small = tiny_model("llama", n_layers=2)
    with pytest.raises(ValueError, match="were distilled from a model with n_layers=3, not 2"):
        fff.load_blocks(small, path)
    (tmp_path / "unrecorded").mkdir()  # no source.json: the layer index is still checked
    (tmp_path / "unrecorded" / "layer-00002.safetensors").write_bytes((path / "layer-00002.safetensors").read_bytes())
    with pytest.raises(ValueError, match="layer-00002.safetensors is for decoder layer 2, but the model has 2"):
        with pytest.warns(UserWarning, match="records no source model"):
            fff.load_blocks(small, tmp_path / "unrecorded")
    assert not any(isinstance(layer.mlp, fff.FFF) for layer in decoder_layers(small))  # untouched, not half-loaded
    (tmp_path / "cut").mkdir()
    data = (path / "layer-00000.safetensors").read_bytes()
    (tmp_path / "cut" / "layer-00000.safetensors").write_bytes(data[:-20])
    with pytest.raises(ValueError, match="layer-00000.safetensors is not a readable safetensors file"):
        with pytest.warns(UserWarning, match="records no source model"):
            fff.load_blocks(tiny_model("llama"), tmp_path / "cut")
    (tmp_path / "narrow").mkdir()
    fff.FFF(16, 16, 2).save(tmp_path / "narrow" / "layer-00001.safetensors")
    with pytest.raises(ValueError, match=r"layer-00001.safetensors maps 16 -> 16 features, the model's MLPs 32"):
        with pytest.warns(UserWarning, match="records no source model"):
            fff.load_blocks(tiny_model("llama"), tmp_path / "narrow")


def test_a_writer_that_loses_the_race_for_the_directory_is_told_it_exists(distilled, tmp_path, monkeypatch):
    """It got 'OSError: [Errno 39] Directory not empty: .blocks.XXXX.tmp -> blocks'."""
    import sys

    distill_module = sys.modules["calibrate.fff.distill"]  # the package's name "distill" is the function
    _, _, result = distilled
    target = tmp_path / "blocks"
    sync_tree = distill_module.sync_tree

    def another_writer_first(root):
        sync_tree(root)
        target.mkdir()
        (target / "layer-00000.safetensors").write_bytes(b"theirs")

    monkeypatch.setattr(distill_module, "sync_tree", another_writer_first)
    with pytest.raises(FileExistsError, match="blocks exists; save the blocks to a new directory"):
        fff.save_blocks(result.model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks"]  # the winner's, and no temporary directory
    assert (target / "layer-00000.safetensors").read_bytes() == b"theirs"


def test_blocks_load_only_into_the_model_they_were_distilled_from(distilled, tmp_path):
    """A deeper model of the same width, another architecture, another model of the same shape: all took them."""
    _, _, result = distilled
    path = fff.save_blocks(result.model, tmp_path / "blocks")
    others = {
        "n_layers=3, not 5": tiny_model("llama", n_layers=5),
        "model_type='llama', not 'gpt2'": tiny_model("gpt2", n_layers=3),
        "another model of this shape": tiny_model("llama", seed=1),
    }
    tuned = tiny_model("llama")  # a fine-tuned copy: the same embeddings, other layer weights
    with torch.no_grad():
        decoder_layers(tuned)[1].self_attn.q_proj.weight.mul_(1.01)
    others["another model of this shape .*a fine-tuned copy"] = tuned
    for match, other in others.items():
        with pytest.raises(ValueError, match=f"the blocks in .*blocks were distilled from (a model with )?{match}"):
            fff.load_blocks(other, path)
        assert not any(isinstance(layer.mlp, fff.FFF) for layer in decoder_layers(other))
    for dtype in (torch.bfloat16, torch.float64):  # the same model in another dtype: its own blocks
        fff.load_blocks(tiny_model("llama").to(dtype), path)
    (path / "layer-00002.safetensors").unlink()  # a lost file: half the blocks went in (or "another model")
    for model in (tiny_model("llama"), tiny_model("llama").to(torch.bfloat16)):
        with pytest.raises(ValueError, match=r"blocks of layers \[0\], .* records \[0, 2\]: missing layer-00002"):
            fff.load_blocks(model, path)
    record = json.loads((path / "source.json").read_text())
    for damaged, match in (("[" * 10**5 + "]" * 10**5, "deeper than 100"), (None, "embedding values")):
        text = damaged or json.dumps({**record, "layers": [0], "embedding_sample": [0.0, 1.0, 2.0]})
        (path / "source.json").write_text(text)  # a RecursionError; a numpy broadcasting error
        with pytest.raises(ValueError, match=match):
            fff.load_blocks(tiny_model("llama"), path)


def test_cli_certifies_and_audits_a_language_model(distilled, tokenizer, tmp_path, capsys):
    from calibrate import Certificate
    from calibrate.cli import main

    model, _, result = distilled
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    fff.save_blocks(result.model, tmp_path / "blocks")
    (tmp_path / "prompts.txt").write_text("\n".join(TEXTS) + "\n")
    common = ["--model", str(tmp_path / "model"), "--blocks", str(tmp_path / "blocks"), "--max-new-tokens", "4"]
    out = tmp_path / "cert.json"
    argv = ["fff-fit", *common, "--prompts", str(tmp_path / "prompts.txt"), "--consistency", "rouge_l"]
    assert main([*argv, "--delta", "0.4", "--epsilon", "0.1", "-o", str(out)]) == 0
    with fff.at_depth(result.model, None):
        kw = dict(tokenizer=tokenizer, max_new_tokens=4, consistency="rouge_l")
        direct = fff.fit(result.model, TEXTS, delta=0.4, epsilon=0.1, **kw)
        report = fff.audit(direct, result.model, TEXTS[:10], tokenizer=tokenizer, max_new_tokens=4)
    assert Certificate.from_json(out) == direct and "fff_depth" in capsys.readouterr().out
    (tmp_path / "held.txt").write_text("\n".join(TEXTS[:10]) + "\n")
    code = main(["audit", str(out), *common, "--prompts", str(tmp_path / "held.txt")])
    assert code == (0 if report.within_tolerance else 1)
    assert f"held-out risk {level(report.risk, '.4f')}" in capsys.readouterr().out
    assert main(["fff-fit", *common]) == 2  # no prompts
    assert "give --model DIR and --prompts FILE" in capsys.readouterr().err
    no_model = common[2:]  # --blocks and --max-new-tokens
    assert main(["audit", str(out), *no_model, "--prompts", str(tmp_path / "held.txt")]) == 2
    # was a TypeError
    assert "is audited by decoding: give --model DIR --blocks DIR --prompts FILE" in capsys.readouterr().err
    assert main(["fff-fit", "--model", str(tmp_path / "model"), "--consistency", "token"]) == 2
    assert "a language model with --blocks DIR --prompts FILE" in capsys.readouterr().err


def test_relative_error_is_zero_when_exact_and_one_for_the_mean_output():
    from calibrate.fff.distill import _relative_error

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn((50, 3), generator=g), torch.randn((50, 2), generator=g) + 5.0  # outputs far from 0
    assert _relative_error(lambda inputs: y, x, y) == 0.0
    assert _relative_error(lambda inputs: y.mean(dim=0).expand(len(inputs), 2), x, y) == pytest.approx(1.0)


def test_soft_phase_adds_the_hardening_term_with_a_linearly_growing_weight():
    """The soft phase minimises ``mse + hardening * step / (soft_steps - 1) * entropy``, then the hard path trains
    on the mean squared error alone: replayed by hand with the same batches, optimiser and schedule."""
    import torch.nn.functional as F

    from calibrate.fff.distill import _train

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn((40, 6), generator=g), torch.randn((40, 3), generator=g)
    start = fff.FFF(6, 3, 2, generator=torch.Generator().manual_seed(8))
    steps, batch_size, lr, hardening, soft_steps = 5, 16, 0.05, 4.0, 3  # soft_share 0.6 of 5 steps: 3 soft steps
    kw = dict(steps=steps, batch_size=batch_size, lr=lr, hardening=hardening, soft_share=0.6)
    trained = _train(fff.FFF(6, 3, 2, generator=torch.Generator().manual_seed(8)), x, y,
                     generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
    without = _train(fff.FFF(6, 3, 2, generator=torch.Generator().manual_seed(8)), x, y,
                     generator=torch.Generator().manual_seed(1), **{**kw, "hardening": 0.0})  # fmt: skip

    batches = torch.Generator().manual_seed(1)
    optimiser = torch.optim.Adam(start.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for step in range(steps):
        batch = torch.randint(0, len(x), (batch_size,), generator=batches)
        if step < soft_steps:
            out, entropy = start.soft_forward(x[batch])
            loss = F.mse_loss(out, y[batch]) + hardening * step / (soft_steps - 1) * entropy
        else:
            loss = F.mse_loss(start.masked_forward(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
    for (name, a), (_, b) in zip(trained.state_dict().items(), start.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert not all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), without.state_dict().values()))


def test_dense_baseline_has_the_ffs_evaluated_width(tokenizer, monkeypatch):
    """The baseline is a dense MLP of ``depth + 1`` hidden neurons, the FFF's cost per token: equal inference cost."""
    distill_module = importlib.import_module("calibrate.fff.distill")  # the module, not fff.distill

    trained = []
    original = distill_module._train

    def spy(module, *args, **kwargs):
        trained.append(module)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(distill_module, "_train", spy)
    model = tiny_model("llama")
    for depth in (2, 3):
        trained.clear()
        fff.distill(model, tokenizer, TEXTS, depth=depth, layers=[1], steps=1, batch_size=8, progress=False)
        layer, narrow = trained
        hidden = [m for m in narrow.modules() if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in hidden] == [(32, depth + 1), (depth + 1, 32)]
        assert isinstance(layer, fff.FFF) and layer.cost() == sum(m.weight.numel() for m in hidden)  # multiply-adds


def test_each_layer_starts_from_its_own_seed(tokenizer, monkeypatch):
    """Layer i's FFF is initialised from seed * 1009 + i: the same start whichever other layers are distilled,
    and different blocks (of the same width) do not start as copies of one another."""
    distill_module = importlib.import_module("calibrate.fff.distill")  # the module, not fff.distill

    starts = []
    original = distill_module._train

    def spy(module, *args, **kwargs):
        if isinstance(module, fff.FFF):
            starts.append({k: v.clone() for k, v in module.state_dict().items()})
        return original(module, *args, **kwargs)

    monkeypatch.setattr(distill_module, "_train", spy)
    model = tiny_model("llama")
    fff.distill(model, tokenizer, TEXTS, depth=2, layers=[0, 1, 2], steps=1, batch_size=8, seed=7, progress=False)
    assert len(starts) == 3
    for i, start in enumerate(starts):
        expected = fff.FFF(32, 32, 2, generator=torch.Generator().manual_seed(7 * 1009 + i)).state_dict()
        for name, value in expected.items():
            assert torch.equal(start[name], value), (i, name)
    assert not torch.equal(starts[0]["w_in"], starts[1]["w_in"])


def test_loaded_blocks_take_the_models_dtype(tmp_path):
    """Blocks saved in float32 and loaded into a float64 model run in float64, as load_blocks documents."""
    model = tiny_model("llama").eval().to(torch.float64)
    block = fff.FFF(32, 32, 2, generator=torch.Generator().manual_seed(0))
    (tmp_path / "blocks").mkdir()
    block.save(tmp_path / "blocks" / "layer-00001.safetensors")
    with pytest.warns(UserWarning, match="records no source model"):
        fff.load_blocks(model, tmp_path / "blocks")
    loaded = decoder_layers(model)[1].mlp
    assert isinstance(loaded, fff.FFF) and {p.dtype for p in loaded.parameters()} == {torch.float64}
    torch.testing.assert_close(loaded.w_in, block.w_in.double(), rtol=0, atol=0)  # the stored weights, widened
    with torch.no_grad():
        logits = model(torch.tensor([[3, 5, 9, 14]])).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()

"""Token elimination in encoders: T5 (``lat.generate``) and BERT-family classifiers (``lat.classify``)."""

from types import SimpleNamespace

import pytest
import torch
from _tiny_hf import BOS, EOS, PAD, tiny_model

from calibrate import lat
from calibrate.certificate import Certificate
from calibrate.lat.encoders import encode, encoder_for
from calibrate.lat.scores import _always_kept

ROWS = [
    [BOS] + [4 + (7 * j) % 60 for j in range(19)] + [EOS],
    [BOS] + [4 + (3 * j + 1) % 60 for j in range(12)] + [EOS],
    [BOS] + [4 + (5 * j + 2) % 60 for j in range(16)] + [EOS],
    [BOS] + [4 + (11 * j + 3) % 60 for j in range(8)] + [EOS],
]


def _right_padded(rows) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return ids, (ids != PAD).long()


def _full_only(model) -> Certificate:
    return Certificate(
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


@pytest.mark.parametrize("batch", [1, 4])
def test_t5_speedup_one_equals_hf_generate(batch):
    model = tiny_model("t5", seed=3, n_layers=3)
    ids, mask = _right_padded(ROWS[:batch])
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    out = lat.generate(model, ids, mask, max_new_tokens=8)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert out.prompt_length == 1 and (out.processed == mask.sum(dim=1, keepdim=True)).all()
    cert = lat.generate(model, ids, mask, certificate=_full_only(model), max_new_tokens=8)
    torch.testing.assert_close(cert.sequences, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("batch", [1, 4])
def test_classify_speedup_one_equals_the_model(arch, batch):
    model = tiny_model(arch, seed=3, n_layers=3)
    ids, mask = _right_padded(ROWS[:batch])
    expected = model(input_ids=ids, attention_mask=mask).logits
    out = lat.classify(model, ids, mask)
    assert not out.logits.requires_grad  # inference: no autograd graph kept
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.logits.shape == (batch, 3) and torch.equal(out.labels, expected.argmax(dim=-1))
    torch.testing.assert_close(lat.classify(model, ids, mask, certificate=_full_only(model)).logits, expected)
    if arch == "bert":  # segment ids reach the embeddings
        types = (torch.arange(ids.shape[1]) >= 5).long().expand_as(ids)
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(lat.classify(model, ids, mask, token_type_ids=types).logits, expected)


def test_classify_a_model_left_in_training_mode_without_dropout():
    model = tiny_model("bert", seed=3, n_layers=3)
    expected = lat.classify(model, *_right_padded(ROWS)).logits
    model.config.hidden_dropout_prob = 0.5
    model.train()
    model.bert.pooler.eval()  # a frozen part: its mode is the caller's too
    for _ in range(2):  # dropout gave other logits at every call
        torch.testing.assert_close(lat.classify(model, *_right_padded(ROWS)).logits, expected, rtol=0, atol=0)
    assert model.training and model.bert.encoder.training and not model.bert.pooler.training


def _encoder_modules(model, arch):
    """Per encoder layer: the attention's query projection and the feed-forward block's input module."""
    if arch == "t5":
        return [(b.layer[0].SelfAttention.q, b.layer[1].DenseReluDense) for b in model.encoder.block]
    return [(layer.attention.self.query, layer.intermediate) for layer in model.base_model.encoder.layer]


@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_encoder_processed_lengths_follow_the_schedule(arch):
    """Counted with hooks: layer l's query projection sees keep[l] vectors, its feed-forward block keep[l+1]."""
    model = tiny_model(arch, seed=4, n_layers=6)
    ids, mask = _right_padded(ROWS[:1])
    seen: dict[str, list[int]] = {"attn": [], "ff": []}
    hooks = []
    for query, ff in _encoder_modules(model, arch):
        hooks.append(query.register_forward_hook(lambda m, a, o: seen["attn"].append(a[0].shape[1])))
        hooks.append(ff.register_forward_hook(lambda m, a, o: seen["ff"].append(a[0].shape[1])))
    try:
        if arch == "t5":
            out = lat.generate(model, ids, mask, speedup=2.0, max_new_tokens=3)
        else:
            out = lat.classify(model, ids, mask, speedup=2.0)
    finally:
        for hook in hooks:
            hook.remove()
    keep = out.schedules[0].keep
    assert keep[-1] < keep[0]
    assert seen["attn"] == list(keep)
    assert seen["ff"] == list(keep[1:]) + [keep[-1]]
    assert out.processed[0].tolist() == list(keep)
    assert out.predicted_speedup >= 2.0


def _kept_columns(kept, i):
    row = kept[i][0]
    return row[row >= 0]


def test_bert_elimination_equals_hf_layers_on_the_kept_columns():
    """A whole Hugging Face layer on the vectors entering it, then keeping the next layer's: the same logits."""
    model = tiny_model("bert", seed=5, n_layers=6)
    ids, mask = _right_padded(ROWS[:1])
    for score in lat.SCORES:
        out = lat.classify(model, ids, mask, speedup=2.5, score=score)
        assert out.processed[0, -1] < out.processed[0, 0]
        h, cols = model.bert.embeddings(input_ids=ids), torch.arange(ids.shape[1])
        for i, layer in enumerate(model.bert.encoder.layer):
            take = _kept_columns(out.kept, i)
            h, cols = h[:, torch.searchsorted(cols, take)], take
            h = layer(h)
        assert cols[0] == 0  # [CLS] kept, first
        expected = model.classifier(model.bert.pooler(h))
        torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)


def test_t5_elimination_equals_hf_blocks_on_the_kept_columns():
    """Survivors keep their original positions: Hugging Face's bias on the full input, restricted to them."""
    model = tiny_model("t5", seed=5, n_layers=6)
    ids, mask = _right_padded(ROWS[:1])
    encoder = encoder_for(model)
    schedule = lat.KeepSchedule.from_speedup(model.config, ids.shape[1], 2.5)
    always = _always_kept(ids, mask, [EOS], last=False)
    for score in lat.SCORES:
        states, valid, kept, processed = encode(encoder, ids, mask, torch.tensor([schedule.keep]), always, score)
        assert processed[0].tolist() == list(schedule.keep) and valid.all()
        stack = model.encoder
        bias = stack.block[0].layer[0].SelfAttention.compute_bias(ids.shape[1], ids.shape[1])  # (1, H, P, P)
        h, cols = stack.embed_tokens(ids), torch.arange(ids.shape[1])
        for i, block in enumerate(stack.block):
            take = _kept_columns(kept, i)
            h, cols = h[:, torch.searchsorted(cols, take)], take
            h = block(h, position_bias=bias[:, :, take][:, :, :, take])[0]
        assert cols[0] == 0 and cols[-1] == ids.shape[1] - 1  # first token and EOS kept
        torch.testing.assert_close(states, stack.final_layer_norm(h), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["t5", "bert"])
@pytest.mark.parametrize("score", ["attention", "value"])
def test_encoder_padded_batch_equals_each_row_alone(arch, score):
    model = tiny_model(arch, seed=9, n_layers=6)
    ids, mask = _right_padded(ROWS)
    if arch == "t5":
        together = lat.generate(model, ids, mask, speedup=2.5, max_new_tokens=6, score=score)
    else:
        together = lat.classify(model, ids, mask, speedup=2.5, score=score)
    for b, row in enumerate(ROWS):
        one = torch.tensor([row])
        if arch == "t5":
            alone = lat.generate(model, one, speedup=2.5, max_new_tokens=6, score=score)
            assert together.new_tokens[b].tolist() == alone.new_tokens[0].tolist()
        else:
            alone = lat.classify(model, one, speedup=2.5, score=score)
            torch.testing.assert_close(together.logits[b], alone.logits[0], rtol=1e-4, atol=1e-4)
        assert together.processed[b].tolist() == alone.processed[0].tolist()
        for layer_b, layer_alone in zip(together.kept, alone.kept):
            assert [c for c in layer_b[b].tolist() if c >= 0] == layer_alone[0].tolist()


def test_classify_keeps_the_first_and_special_tokens():
    model = tiny_model("bert", seed=6, n_layers=6)
    ids, mask = _right_padded(ROWS[:1])
    ids[0, 9] = EOS
    tokenizer = SimpleNamespace(all_special_ids=[EOS])
    out = lat.classify(model, ids, mask, speedup=3.0, tokenizer=tokenizer)
    assert out.processed[0, -1] <= 4
    for layer in out.kept:
        cols = layer[0].tolist()
        assert cols[0] == 0 and 9 in cols and cols[-1] == ids.shape[1] - 1 and cols == sorted(cols)
    without = lat.classify(model, ids, mask, speedup=3.0)
    assert 9 not in without.kept[-1][0].tolist() or ids.shape[1] - 1 not in without.kept[-1][0].tolist()


def test_roberta_inputs_up_to_its_positions_run_and_longer_ones_are_refused():
    model = tiny_model("roberta", seed=1, n_layers=2)
    config = model.config  # positions start at pad_token_id + 1: this many tokens fit
    fits = config.max_position_embeddings - config.pad_token_id - 1
    row = [ROWS[0][0]] + [ROWS[0][1]] * (fits - 1)
    lat.classify(model, torch.tensor([row]))
    with pytest.raises(ValueError, match=f"has {fits + 1} columns but the model has {fits} positions"):
        lat.classify(model, torch.tensor([row + [ROWS[0][1]]]))  # used to fail inside the embedding lookup


def test_classify_bad_input():
    model = tiny_model("bert", seed=1, n_layers=2)
    ids, mask = _right_padded(ROWS[:1])
    left = torch.tensor([[PAD, PAD] + ROWS[3]])
    with pytest.raises(ValueError, match="right-padded"):
        lat.classify(model, left, (left != PAD).long())
    from transformers import BertModel

    with pytest.raises(ValueError, match="ForSequenceClassification"):
        lat.classify(BertModel(model.config).eval(), ids, mask)
    with pytest.raises(ValueError, match=r"does not support model_type 'llama'.*bert"):
        lat.classify(tiny_model("llama", seed=1), ids, mask)
    from transformers import BertForMultipleChoice, BertForSequenceClassification

    one_label = BertForSequenceClassification(model.config.__class__(**{**model.config.to_dict(), "num_labels": 1}))
    for head in (BertForMultipleChoice(model.config), one_label):  # every label was 0: risk 0 at any speed-up
        with pytest.raises(ValueError, match=r"num_labels >= 2 .*got logits of shape \(1, 1\) from Bert"):
            lat.classify(head.eval(), ids, mask)
    # lat.fit refuses them before any work: with too few prompts to decode it returned a certificate
    from _tiny_hf import tiny_tokenizer
    from transformers import BertForMaskedLM

    prompts = [" ".join(f"w{(i * j + 3) % 60}" for j in range(8)) for i in range(5)]
    from transformers import RobertaForTokenClassification

    token_head = RobertaForTokenClassification(tiny_model("roberta").config)
    choices = BertForMultipleChoice(model.config)
    for headless in (BertModel(model.config), BertForMaskedLM(model.config), one_label, choices, token_head):
        with pytest.raises(ValueError, match="lat.classify needs a ...ForSequenceClassification model"):
            lat.fit(headless.eval(), tiny_tokenizer(), prompts, delta=0.1, epsilon=0.05, progress=False)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speedup"):
            lat.classify(model, ids, mask, speedup=bad)
    context = model.config.max_position_embeddings
    long = torch.tensor([ROWS[0][:1] + [ROWS[0][1]] * context])
    with pytest.raises(ValueError, match=f"max_position_embeddings={context}.*nothing is truncated"):
        lat.classify(model, long)
    with pytest.raises(ValueError, match="token_type_ids must have the shape"):
        lat.classify(model, ids, mask, token_type_ids=torch.zeros((1, 3), dtype=torch.long))
    for bad, exc in ((ids.float() * 0, TypeError), (ids.tolist(), TypeError), (torch.full_like(ids, 5), ValueError)):
        with pytest.raises(exc, match="token_type_ids must"):
            lat.classify(model, ids, mask, token_type_ids=bad)
    for bad in (2.5, True, None):  # 2.5 used to run as 2
        with pytest.raises(TypeError, match="min_keep must be an int >= 1"):
            lat.classify(model, ids, mask, speedup=2.0, min_keep=bad)
    other = Certificate(**{**_full_only(model).to_dict(), "model": lat.model_id(tiny_model("bert", seed=2))})
    with pytest.raises(ValueError, match="made for the model"):
        lat.classify(model, ids, mask, certificate=other)
    threshold = Certificate(**{**_full_only(model).to_dict(), "knob": "exit_threshold"})
    with pytest.raises(ValueError, match="knob 'exit_threshold'.*needs a 'token_keep' certificate"):
        lat.classify(model, ids, mask, certificate=threshold)
    with pytest.raises(ValueError, match="score"):
        lat.classify(model, ids, mask, score="acc")


# --------------------------------------------------------------------------------------------------
# Certification
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer():
    from _tiny_hf import tiny_tokenizer

    return tiny_tokenizer()


def _sentences(n: int) -> list[str]:
    return ["<bos> " + " ".join(f"w{(5 * i + 3 * j) % 60}" for j in range(12 + i % 9)) + " <eos>" for i in range(n)]


def test_classifier_fit_counts_label_disagreement(word_tokenizer):
    model = tiny_model("bert", seed=7, n_layers=6)
    prompts = _sentences(40)
    speedups = [1.0, 1.5, 3.0]
    cert = lat.fit(model, word_tokenizer, prompts, delta=0.4, epsilon=0.1, speedups=speedups, batch_size=40)
    model.config.hidden_dropout_prob = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    noisy = lat.fit(model.train(), word_tokenizer, prompts, delta=0.4, epsilon=0.1, speedups=speedups, batch_size=40)
    assert noisy.risks == cert.risks and model.training  # classified in eval mode, the mode restored
    model.eval()
    assert cert.knob == "token_keep" and cert.consistency == "label" and cert.model == lat.model_id(model)
    assert cert.max_new_tokens is None  # a classifier generates nothing
    ids = [word_tokenizer(p)["input_ids"] for p in prompts]
    batch, mask = _right_padded(ids)
    full = lat.classify(model, batch, mask).labels
    assert cert.risks[0] == 0.0
    for k, s in enumerate(speedups):
        if not torch.isnan(torch.tensor(cert.risks[k])):
            early = lat.classify(model, batch, mask, speedup=s, tokenizer=word_tokenizer).labels
            assert cert.risks[k] == pytest.approx((early != full).float().mean().item())
    assert any(r > 0 for r in cert.risks[1:] if r == r)  # elimination changes some labels of a random model
    # risk consistency: wrong where the unmodified model is right, against reference labels
    refs = [int(label) for label in full[:20]] + [(int(label) + 1) % 3 for label in full[20:]]
    risk = lat.fit(
        model,
        word_tokenizer,
        prompts,
        delta=0.4,
        epsilon=0.1,
        speedups=speedups,
        consistency="risk_label",
        references=refs,
        batch_size=40,
    )
    early = lat.classify(model, batch, mask, speedup=1.5, tokenizer=word_tokenizer).labels
    expected = ((early[:20] != full[:20]).float().sum() / 40).item()  # the last 20: the full model is wrong
    assert risk.risks[1] == pytest.approx(expected)
    held = lat.heldout_losses(cert, model, word_tokenizer, prompts[:8])
    assert held.shape == (8,) and set(held.tolist()) <= {0.0, 1.0}


def test_classifier_fit_bad_input(word_tokenizer):
    model = tiny_model("bert", seed=7, n_layers=2)
    prompts = _sentences(10)
    with pytest.raises(ValueError, match="classifier's consistency"):
        lat.fit(model, word_tokenizer, prompts, consistency="rouge_l")
    with pytest.raises(ValueError, match=r"needs references=, one int label per prompt \(10\)"):
        lat.fit(model, word_tokenizer, prompts, consistency="risk_label")
    with pytest.raises(ValueError, match=r"references must hold one int label per prompt \(10\), got 9 labels$"):
        lat.fit(model, word_tokenizer, prompts, consistency="risk_label", references=[0] * 9)
    with pytest.raises(ValueError, match="int labels"):
        lat.fit(model, word_tokenizer, prompts, consistency="risk_label", references=[5] * 10)
    too_long = " ".join(["w1"] * (model.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match=r"1 prompt\(s\) do not fit .* prompt 3 .*shorten them \(nothing"):
        lat.fit(model, word_tokenizer, prompts[:3] + [too_long] + prompts[4:])


def test_t5_fit_is_certified_like_decoders(word_tokenizer):
    model = tiny_model("t5", seed=7, n_layers=6)
    prompts = _sentences(24)
    cert = lat.fit(model, word_tokenizer, prompts, delta=0.5, epsilon=0.1, speedups=[1.0, 2.0], max_new_tokens=4)
    assert cert.consistency == "token" and cert.risks[0] == 0.0 and cert.knob == "token_keep"
    assert cert.model.startswith("t5/L6/")


def test_cli_lat_fit_on_a_classifier(tmp_path, word_tokenizer, capsys):
    import json

    from calibrate.cli import main

    model = tiny_model("bert", seed=7, n_layers=6)
    model.save_pretrained(tmp_path / "model")
    word_tokenizer.save_pretrained(tmp_path / "model")
    prompts = _sentences(30)
    labels = lat.classify(model, *_right_padded([word_tokenizer(p)["input_ids"] for p in prompts])).labels.tolist()
    lines = [json.dumps({"prompt": p, "reference": str(y)}) for p, y in zip(prompts, labels)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cert.json"
    argv = [
        "lat-fit",
        "--model",
        str(tmp_path / "model"),
        "--prompts",
        str(tmp_path / "data.jsonl"),
        "--speedups",
        "1",
        "2",
        "--delta",
        "0.4",
        "--epsilon",
        "0.1",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    assert main([*argv, "--max-new-tokens", "5"]) == 2  # was accepted and ignored: a classifier decodes nothing
    audit = ["audit", str(out), "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "data.jsonl")]
    assert main([*audit, "--max-new-tokens", "5"]) == 2  # so was the audit's
    direct = lat.fit(model, word_tokenizer, prompts, delta=0.4, epsilon=0.1, speedups=[1, 2])
    assert Certificate.from_json(out) == direct and direct.consistency == "label"
    assert main([*argv, "--consistency", "risk_label"]) == 0
    risk = lat.fit(
        model,
        word_tokenizer,
        prompts,
        delta=0.4,
        epsilon=0.1,
        speedups=[1, 2],
        consistency="risk_label",
        references=labels,
    )
    assert Certificate.from_json(out) == risk
    capsys.readouterr()

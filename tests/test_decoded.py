"""Decoded-mode calibration on a tiny random GPT-2 (tests/_tiny_hf.py; nothing is downloaded).

The losses of :func:`calibrate.fit_decoded` are recomputed with ``_reference_losses``: Hugging Face greedy
``generate`` for the full model, ``calibrate.runtime.generate`` with the returned certificate at each
tested threshold for the early outputs, both cut at the first EOS, and the losses re-derived inline (token
disagreement) or by ``measures.consistency``. Laziness is checked by counting runtime calls.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _tiny_hf
from _tiny_hf import EOS, left_pad

import calibrate
from calibrate import bounds, fwer
from calibrate.certificate import Certificate
from calibrate.heads import ExitHeads
from measures.consistency import risk_consistency, textual_loss

N_LAYERS = 4
NEW = 6  # max_new_tokens
BATCH = 12  # two runtime calls per decode of the 24 prompts
GRID = (1.0, 0.3, 0.1, 0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP's spin-waiting makes them 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return _tiny_hf.tiny_model("gpt2", seed=0, n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_hf.tiny_tokenizer()


def _word_prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, 60, size=rng.integers(1, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def prompts():
    return _word_prompts(24, seed=0)


@pytest.fixture(scope="module")
def references(cache):
    """The full model's own outputs: risk consistency then measures how much worse the early output is."""
    return cache.sequences["output"].tolist()


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of calibrate.runtime.generate (the only way decoded mode decodes)."""
    import calibrate.runtime

    count = {"n": 0}
    real = calibrate.runtime.generate

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate.runtime, "generate", counting)
    return count


def _fit(model, tokenizer, prompts, delta=0.25, epsilon=0.1, **kwargs):
    kwargs = {"lambdas": GRID, "max_new_tokens": NEW, "batch_size": BATCH, **kwargs}
    return calibrate.fit_decoded(model, tokenizer, prompts, delta, epsilon, **kwargs)


# --------------------------------------------------------------------------------------------------
# Reference: HF greedy generate for the full model, the runtime at lambda for the early outputs
# --------------------------------------------------------------------------------------------------


def _until_eos(row):
    row = row.tolist()
    return np.array(row[: row.index(EOS) + 1] if EOS in row else row)


def _outputs(model, tokenizer, prompts, cert):
    """Generated ids per prompt (cut after the first EOS); the full model when ``cert`` is None."""
    out = []
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    for start in range(0, len(ids), BATCH):
        input_ids, mask = left_pad(ids[start : start + BATCH])
        if cert is None:
            new = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW)
        else:
            new = calibrate.runtime.generate(model, input_ids, mask, certificate=cert, max_new_tokens=NEW).sequences
        out += [_until_eos(row) for row in new[:, input_ids.shape[1] :]]
    return out


def _reference_losses(model, tokenizer, prompts, cert, lambdas, references=None):
    """Losses ``(n, len(lambdas))`` of the early outputs at each of ``lambdas`` against the full model's."""
    full = _outputs(model, tokenizer, prompts, None)
    columns = []
    for lam in lambdas:
        early = _outputs(model, tokenizer, prompts, dataclasses.replace(cert, lambda_hat=lam))
        columns.append(_losses(tokenizer, early, full, cert.consistency, references))
    return np.column_stack(columns)


def _losses(tokenizer, early, full, consistency, references):
    if consistency == "token":  # differing positions over the longer output; a missing token differs
        return np.array(
            [
                (sum(a != b for a, b in zip(e, f)) + abs(len(e) - len(f))) / max(len(e), len(f))
                for e, f in zip(early, full)
            ]
        )
    if consistency == "sequence":
        return np.array([float(e.tolist() != f.tolist()) for e, f in zip(early, full)])
    texts = [[tokenizer.decode(x.tolist(), skip_special_tokens=True) for x in xs] for xs in (early, full)]
    metric = consistency.removeprefix("risk_")
    if consistency.startswith("risk_"):
        return risk_consistency(*texts, references, metric=metric)
    return textual_loss(*texts, metric=metric)


# --------------------------------------------------------------------------------------------------
# Losses equal a direct decode; laziness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "consistency, measure, tau",
    [("token", "softmax_gap", None), ("rouge_l", "softmax_gap", 4.0), ("sequence", "state_saturation", None)],
)
def test_losses_equal_decoding_with_the_certificate(model, tokenizer, prompts, consistency, measure, tau):
    cert = _fit(model, tokenizer, prompts, consistency=consistency, measure=measure, decay=tau)
    assert cert.mode == "decoded" and "actually decoding" in cert.guarantee and cert.measure == measure
    assert cert.decay == (None if tau is None else {"max_len": NEW, "tau": tau})
    assert cert.heads == ExitHeads.from_model(model).describe() and cert.n_layers == N_LAYERS and cert.n == 24
    tested = np.flatnonzero(cert.tested)
    assert tested.size >= 2 and cert.lambda_hat is not None  # a mixed outcome: not a vacuous check
    losses = _reference_losses(model, tokenizer, prompts, cert, [cert.lambdas[k] for k in tested])
    np.testing.assert_allclose(np.array(cert.risks)[tested], losses.mean(axis=0), rtol=0, atol=1e-12)
    p = bounds.p_values(losses, cert.delta, bound=cert.bound)
    np.testing.assert_allclose(np.array(cert.p_values)[tested], p, rtol=1e-12)
    assert np.array(cert.certified)[tested].tolist() == fwer.fixed_sequence(p, cert.epsilon).tolist()
    assert cert.risks[0] == 0.0 and cert.avg_layers[0] == N_LAYERS  # lambda = 1: no confidence reaches it


def test_a_certificate_is_refused_under_another_generation_config(model, tokenizer, prompts):
    """A repetition penalty, a minimum length or another EOS changes what is decoded; the certificate held on."""
    cert = _fit(model, tokenizer, prompts)
    from calibrate.runtime import generate

    ids = tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    other = copy.deepcopy(model)
    other.generation_config.temperature = 0.3  # a sampling setting: greedy decoding ignores it
    generate(other, ids["input_ids"], ids["attention_mask"], certificate=cert, max_new_tokens=NEW)
    eos = model.generation_config.eos_token_id
    for idle in ({"repetition_penalty": 1.0}, {"min_length": 0}, {"eos_token_id": [eos]}):
        restored = copy.deepcopy(model)  # settings that change nothing greedy decoding emits: still this certificate
        restored.generation_config.update(**idle)
        generate(restored, ids["input_ids"], ids["attention_mask"], certificate=cert, max_new_tokens=NEW)
    for setting in ({"repetition_penalty": 1.3}, {"min_length": 3}, {"eos_token_id": 7}):
        changed = copy.deepcopy(model)
        changed.generation_config.update(**setting)
        refused = r"generation: certificate '.*', heads '.*'\): the model's generation config"
        with pytest.raises(ValueError, match=refused):
            generate(changed, ids["input_ids"], ids["attention_mask"], certificate=cert, max_new_tokens=NEW)


def test_settings_passed_to_a_call_are_held_to_the_certificates_generation_config(model, tokenizer, prompts):
    """The same settings passed per call (to model.generate, or EOS ids to generate) decoded other tokens silently."""
    from calibrate.runtime import custom_generate, generate

    cert = _fit(model, tokenizer, prompts)
    ids = tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    kw = dict(max_new_tokens=NEW, do_sample=False, custom_generate=custom_generate, certificate=cert)
    model.generate(**ids, **kw, repetition_penalty=1.0, temperature=0.3)  # idle or sampling settings: accepted
    generate(model, ids["input_ids"], ids["attention_mask"], certificate=cert, max_new_tokens=NEW, eos_token_id=[eos],
             pad_token_id=pad)  # fmt: skip
    refused = r"other settings than the model's generation config.*repetition_penalty=5.0 \(the config's: None\)"
    with pytest.raises(ValueError, match=refused):
        model.generate(**ids, **kw, repetition_penalty=5.0)
    with pytest.raises(ValueError, match=r"eos_token_id=\[7\] \(the config's: \[1\]\)"):
        generate(model, ids["input_ids"], ids["attention_mask"], certificate=cert, max_new_tokens=NEW, eos_token_id=7)
    generate(model, ids["input_ids"], ids["attention_mask"], max_new_tokens=NEW, eos_token_id=7)  # no certificate: any
    # what generate prepares for the same decoding is taken: min_length = prompt width + min_new_tokens, and a pad id
    # (it fills rows after their EOS) where the config has none
    model.generate(**ids, **kw, min_new_tokens=0, pad_token_id=eos)
    least = copy.deepcopy(model)
    least.generation_config.min_new_tokens = 2
    cert_least = dataclasses.replace(cert, heads=ExitHeads.from_model(least).describe())
    least.generate(**ids, **{**kw, "certificate": cert_least})  # was refused: min_length=... (the config's: None)
    with pytest.raises(ValueError, match="least_new_tokens=3 .the config's: 2."):
        least.generate(**ids, **{**kw, "certificate": cert_least}, min_new_tokens=3)
    least.generation_config.forced_eos_token_id = eos
    cert_forced = dataclasses.replace(cert, heads=ExitHeads.from_model(least).describe())
    least.generate(**ids, **{**kw, "certificate": cert_forced}, forced_eos_token_id=[eos])  # an id or a list alike


def test_processors_and_criteria_a_call_adds_are_held_to_the_certificate(model, tokenizer, prompts):
    """logits_processor=, prefix_allowed_tokens_fn= and stopping_criteria= passed to model.generate decoded other
    tokens under a certificate, while the same settings in the generation config were refused."""
    from transformers import (
        EosTokenCriteria,
        LogitsProcessorList,
        MaxTimeCriteria,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    from calibrate.runtime import custom_generate

    cert = _fit(model, tokenizer, prompts)
    ids = tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=NEW, do_sample=False, custom_generate=custom_generate)
    model.generate(**ids, **kw, certificate=cert, max_time=60.0)  # what the config builds, and a time limit
    added = [
        ({"logits_processor": LogitsProcessorList([SuppressTokensLogitsProcessor([5, 6])])}, "SuppressTokens"),
        ({"prefix_allowed_tokens_fn": lambda batch, ids: [5, 6]}, "PrefixConstrained"),
        ({"stopping_criteria": [EosTokenCriteria(5)]}, "EosTokenCriteria"),  # the config's EOS is another type
    ]
    for extra, name in added:
        with pytest.raises(ValueError, match=f"this call decodes with .*{name}.* other than those generate builds"):
            model.generate(**ids, **kw, certificate=cert, **extra)
        model.generate(**ids, **kw, **extra)  # without a certificate: any
    # one of a type generate builds takes its place: held to the config's (a penalty of 50 passed for 1.2)
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.2
    kw["certificate"] = dataclasses.replace(cert, heads=ExitHeads.from_model(penalised).describe())
    penalised.generate(**ids, **kw, stopping_criteria=[MaxTimeCriteria(60.0)])  # a time limit, as max_time is
    with pytest.raises(ValueError, match=r"this call decodes with \['RepetitionPenaltyLogitsProcessor'\]"):
        penalised.generate(**ids, **kw, logits_processor=[RepetitionPenaltyLogitsProcessor(50.0)])
    # length-based processors act alike on the prompt and differ later: compared by their settings
    width, eos = ids["input_ids"].shape[1], model.generation_config.eos_token_id
    least = copy.deepcopy(model)
    least.generation_config.min_new_tokens = 1
    kw["certificate"] = dataclasses.replace(cert, heads=ExitHeads.from_model(least).describe())
    least.generate(**ids, **kw)
    with pytest.raises(ValueError, match=r"this call decodes with \['MinNewTokensLengthLogitsProcessor'\]"):
        least.generate(**ids, **kw, logits_processor=[MinNewTokensLengthLogitsProcessor(width, 6, eos)])


def test_stop_strings_are_refused_where_they_were_ignored(model, tokenizer, prompts):
    """runtime.generate and lat.generate decoded past stop strings that model.generate stops at; extraction failed
    with Hugging Face's "pass the model's tokenizer", which extract's caller cannot do (and with a bare count of
    forward calls under classifier-free guidance)."""
    from calibrate import lat
    from calibrate.runtime import custom_generate, generate

    stopped = copy.deepcopy(model)
    stopped.generation_config.stop_strings = ["w36"]
    ids = tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    refused = r"sets stop_strings=\['w36'\].*stop at EOS ids and max_new_tokens only"
    with pytest.raises(ValueError, match=refused):
        generate(stopped, ids["input_ids"], ids["attention_mask"], max_new_tokens=NEW)
    with pytest.raises(ValueError, match=refused):
        lat.generate(stopped, ids["input_ids"], ids["attention_mask"], speedup=1.0, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="stop_strings|stop strings"):  # Hugging Face refuses first: no tokenizer
        stopped.generate(**ids, max_new_tokens=NEW, do_sample=False, custom_generate=custom_generate)
    with pytest.raises(ValueError, match=refused):
        calibrate.extract(stopped, tokenizer, prompts[:2], max_new_tokens=NEW, progress=False)
    guided = copy.deepcopy(model)
    guided.generation_config.guidance_scale = 1.5  # was "recorded [8, 8, 8] forward calls per layer for 4 tokens"
    with pytest.raises(ValueError, match=r"guidance_scale=1.5 .*decoded mode"):
        calibrate.extract(guided, tokenizer, prompts[:2], max_new_tokens=NEW, progress=False)


def test_settings_whose_text_says_nothing_are_digested_by_value(model):
    """A watermark was digested by its str ("WatermarkingConfig()"), so one certificate passed under any other; a
    sequence_bias keyed by tuples (Hugging Face's documented form) crashed json.dumps."""
    from transformers.generation import WatermarkingConfig

    from calibrate._digest import generation_digest

    digests = set()
    for setting in (
        {"watermarking_config": WatermarkingConfig(bias=0.5)},
        {"watermarking_config": WatermarkingConfig(bias=8.0, greenlist_ratio=0.1)},
        {"sequence_bias": {(40,): 5.0, (41, 42): 3.0}},
        {"sequence_bias": {(40,): 2.0}},
    ):
        changed = copy.deepcopy(model)
        changed.generation_config.update(**setting)
        digests.add(generation_digest(changed))
        assert ExitHeads.from_model(changed).describe()["generation"] == generation_digest(changed)
    assert len(digests) == 4


def test_calibrating_at_the_tokenizers_eos_alone_is_warned_of(model, tokenizer, prompts):
    """A generation config without EOS: calibration stopped at the tokenizer's, which a deployment without the
    tokenizer (model.generate, custom_generate) runs past, and the certificate cannot say so."""
    bare = copy.deepcopy(model)
    bare.generation_config.eos_token_id = None
    with pytest.warns(UserWarning, match=r"no eos_token_id, so the outputs stop at the tokenizer's \(1\)"):
        cert = _fit(bare, tokenizer, prompts[:4])
    with warnings.catch_warnings():  # an audit decodes as the certificate was made: nothing to advise
        warnings.simplefilter("error")
        calibrate.audit_decoded(cert, bare, tokenizer, prompts[4:8], progress=False)


def test_certificates_of_older_versions_are_named_as_such(model, tokenizer, prompts):
    """Files of an older calm-calibrate: a LAT id without the generation part was refused as "another generation
    config"; an exit-threshold certificate without the generation record was spent under any config, and one
    without a data digest audited on its own calibration prompts as held-out, without a word."""
    from calibrate import lat
    from calibrate.runtime import generate

    cert = _fit(model, tokenizer, prompts)
    ids = tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    old = dataclasses.replace(cert, heads={k: v for k, v in cert.heads.items() if k != "generation"})
    with pytest.warns(UserWarning, match="records the exit heads but not the generation config .*refit it"):
        generate(model, ids["input_ids"], ids["attention_mask"], certificate=old, max_new_tokens=NEW)
    with pytest.warns(UserWarning, match="records no digest of its calibration prompts .*cannot tell"):
        calibrate.audit_decoded(dataclasses.replace(cert, cache_checksum=None), model, tokenizer, prompts,
                                progress=False)  # fmt: skip
    keep = lat.fit(model, tokenizer, prompts, delta=0.5, speedups=[1.0, 1.25], max_new_tokens=3, progress=False)
    older = dataclasses.replace(keep, model=keep.model.split("+")[0])
    with pytest.raises(ValueError, match="the same weights, recorded by a calm-calibrate older than model ids"):
        lat.generate(model, ids["input_ids"], ids["attention_mask"], certificate=older, max_new_tokens=NEW)


def test_a_decode_returning_no_text_is_named(model, tokenizer, prompts):
    """It failed as "`early` must contain only str", after the full model had decoded every prompt."""
    with pytest.raises(TypeError, match="decode must return str .*, got bytes"):
        _fit(model, tokenizer, prompts, 0.9, consistency="rouge_l", decode=lambda ids: tokenizer.decode(ids).encode())


def test_lazy_decoding_stops_at_the_first_failure(model, tokenizer, prompts, calls):
    cert = _fit(model, tokenizer, prompts)
    first_failure = int(np.argmax(np.array(cert.p_values) > cert.epsilon))
    assert 0 < first_failure < len(GRID) - 1  # certified some, failed one, never decoded the rest
    assert cert.tested == (True,) * (first_failure + 1) + (False,) * (len(GRID) - first_failure - 1)
    assert calls["n"] == 2 * (1 + first_failure + 1)  # two batches: the full model, then each tested lambda
    untested = slice(first_failure + 1, None)
    for field in ("risks", "p_values", "avg_layers"):
        assert all(math.isnan(v) for v in getattr(cert, field)[untested])
    assert not any(cert.certified[untested]) and cert.lambda_hat == GRID[first_failure - 1]
    assert f"tested {first_failure + 1} of {len(GRID)} thresholds" in cert.summary()
    frame = cert.to_frame()
    assert frame["risk"].isna().tolist() == [not t for t in cert.tested] and frame["selected"].sum() == 1
    assert frame["tested"].tolist() == list(cert.tested)
    back = Certificate.from_json(cert.to_json())
    assert back.to_json() == cert.to_json() and back.tested == cert.tested


def test_huge_delta_tests_and_certifies_every_threshold(model, tokenizer, prompts, calls):
    grid = GRID[:-1]
    cert = _fit(model, tokenizer, prompts, delta=0.95, lambdas=grid)
    assert all(cert.tested) and all(cert.certified) and cert.lambda_hat == grid[-1]
    assert calls["n"] == 2 * (1 + len(grid))
    assert "fixed-sequence order" not in cert.summary()


def test_failing_safest_threshold_decodes_only_it(model, tokenizer, prompts, calls):
    cert = _fit(model, tokenizer, prompts, lambdas=(0.1, 0.0))  # risk ~0.4 there, delta 0.25
    assert cert.full_model_only and cert.tested == (True, False) and calls["n"] == 2 * 2
    assert "no threshold rejected" in cert.reason and cert.p_values[0] > cert.epsilon


def test_too_few_prompts_for_delta_decodes_nothing(model, tokenizer, prompts, calls):
    cert = _fit(model, tokenizer, prompts, delta=0.01)  # (1 - 0.01)**24 > epsilon even with zero loss
    assert calls["n"] == 0 and cert.full_model_only and not any(cert.tested)
    assert "too few examples" in cert.reason and "nothing was decoded" in cert.reason
    assert Certificate.from_json(cert.to_json()).to_json() == cert.to_json()


@pytest.mark.parametrize("consistency", calibrate.losses.CONSISTENCIES)
def test_losses_lie_in_unit_interval_and_vanish_for_the_full_model(model, tokenizer, prompts, references, consistency):
    bound = "binomial" if consistency == "sequence" else "hoeffding_bentkus"
    cert = _fit(
        model,
        tokenizer,
        prompts,
        0.99,
        0.2,
        lambdas=(1.0, 0.0),
        consistency=consistency,
        references=references,
        bound=bound,
    )
    assert all(cert.tested) and cert.consistency == consistency
    assert cert.risks[0] == 0.0 and cert.avg_layers == (N_LAYERS, 1.0)  # lambda=0: every token exits at layer 1
    assert 0.0 < cert.risks[1] <= 1.0


def test_decoded_losses_match_the_lazy_fit(model, tokenizer, prompts):
    cert = _fit(model, tokenizer, prompts)
    table = calibrate.decoded_losses(model, tokenizer, prompts, cert, max_new_tokens=NEW, batch_size=BATCH)
    assert table.mode == "decoded" and table.losses.shape == (24, len(GRID)) and table.n_layers == N_LAYERS
    tested = list(cert.tested)
    np.testing.assert_array_equal(table.risks[tested], np.array(cert.risks)[tested])
    np.testing.assert_array_equal(table.avg_layers[tested], np.array(cert.avg_layers)[tested])
    # with every column known, fixed-sequence testing certifies the same thresholds
    assert calibrate.certify(table, delta=cert.delta, epsilon=cert.epsilon).certified == cert.certified


def test_decoded_losses_record_the_certificates_decay(model, tokenizer, prompts):
    cert = _fit(model, tokenizer, prompts[:8], decay=4.0)
    table = calibrate.decoded_losses(model, tokenizer, prompts[:8], cert, max_new_tokens=NEW, progress=False)
    assert table.decay == calibrate.Decay(max_len=NEW, tau=4.0)
    # a certificate from the table says lambda is a decaying threshold (lambda > 1 still exits)
    assert calibrate.certify(table, delta=cert.delta, epsilon=cert.epsilon).decay == cert.decay


def test_audit_decoded_checks_a_certificate_on_held_out_prompts(model, tokenizer, prompts):
    cert = _fit(model, tokenizer, prompts, bound=None)
    assert cert.bound == "hoeffding_bentkus"  # None: the default, as in certify and fit
    held_out = [p for p in _word_prompts(60, seed=5) if p not in prompts][:16]
    report = calibrate.audit_decoded(cert, model, tokenizer, held_out, batch_size=BATCH, progress=False)
    # decoded with the certificate's budget (NEW new tokens), not the default 32
    table = calibrate.decoded_losses(model, tokenizer, held_out, cert, max_new_tokens=NEW, progress=False)
    assert calibrate.decoded_losses(model, tokenizer, held_out, cert, progress=False) == table  # same default
    assert isinstance(report, calibrate.AuditReport) and report.n == 16
    np.testing.assert_array_equal(report.risks, table.risks)
    np.testing.assert_array_equal(report.avg_layers, table.avg_layers)
    assert cert.index is not None and report.risk == table.risks[cert.index]
    assert report.layers == table.avg_layers[cert.index]
    assert report.within_tolerance == (report.risk <= cert.delta)
    assert "held-out risk" in report.summary()
    with pytest.warns(UserWarning, match="calibration outputs had at most 6") as caught:
        longer = calibrate.audit_decoded(cert, model, tokenizer, held_out, max_new_tokens=NEW + 4, progress=False)
    assert caught[0].filename == __file__  # the caller's line (was torch's no_grad wrapper or the library)
    assert not np.array_equal(longer.avg_layers, report.avg_layers)  # another budget, other outputs
    full_only = dataclasses.replace(cert, lambda_hat=None, certified=(False,) * len(GRID))
    nothing = calibrate.audit_decoded(full_only, model, tokenizer, held_out, progress=False)
    assert (nothing.risk, nothing.layers) == (0.0, N_LAYERS)
    with pytest.raises(ValueError, match="audit_decoded and decoded_losses take exit_threshold .*calibrate.lat.audit"):
        calibrate.audit_decoded(dataclasses.replace(cert, knob="token_keep", lambdas=(1.0, 0.5, 0.4, 0.3)), model,
                                tokenizer, held_out)  # fmt: skip
    with pytest.raises(ValueError, match=r"calibrate.audit_decoded\(cert, model, tokenizer, prompts\)"):
        calibrate.audit(cert, calibrate.synthetic_cache(10, n_layers=N_LAYERS, seed=0))


def test_audit_decoded_of_a_proxy_certificate_shows_what_the_runtime_emits(model, tokenizer, prompts, cache):
    proxy = calibrate.fit(cache, delta=0.25, epsilon=0.1, measure="softmax_max", lambdas=GRID)
    assert proxy.mode == "proxy" and proxy.max_new_tokens == NEW
    held_out = [p for p in _word_prompts(60, seed=5) if p not in prompts][:16]
    report = calibrate.audit_decoded(proxy, model, tokenizer, held_out, progress=False)
    table = calibrate.decoded_losses(model, tokenizer, held_out, proxy, max_new_tokens=NEW, progress=False)
    np.testing.assert_array_equal(report.risks, table.risks)
    assert report.certificate is proxy and report.n == 16
    import matplotlib.pyplot as plt

    fig = report.plot()  # the title says the held-out curve was decoded (it read "proxy mode")
    assert fig._suptitle.get_text().startswith("softmax_max / token (proxy calibration, decoded held-out), ")
    plt.close(fig)


def test_cli_audit_decodes_held_out_prompts_for_an_exit_threshold_certificate(
    model, tokenizer, prompts, tmp_path, capsys
):
    from calibrate.cli import main

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cert = _fit(model, tokenizer, prompts)
    cert.to_json(tmp_path / "cert.json")
    held_out = [p for p in _word_prompts(60, seed=5) if p not in prompts][:12]
    (tmp_path / "held_out.txt").write_text("\n".join(held_out) + "\n", encoding="utf-8")
    expected = calibrate.audit_decoded(cert, model, tokenizer, held_out, progress=False)
    argv = ["audit", str(tmp_path / "cert.json"), "--model", str(tmp_path / "model"), "--prompts"]
    assert main([*argv, str(tmp_path / "held_out.txt")]) == (0 if expected.within_tolerance else 1)
    assert expected.summary() in capsys.readouterr().out  # the same outputs as decoded in this process
    assert "held-out sequences (decoded by the runtime) at" in expected.summary() and expected.mode == "decoded"
    assert main(["audit", str(tmp_path / "cert.json")]) == 2
    assert "--model DIR --prompts FILE to decode held-out prompts" in capsys.readouterr().err


def test_cli_audit_decodes_through_the_adapters_a_certificate_was_calibrated_with(
    model, tokenizer, prompts, cache, tmp_path, capsys
):
    from calibrate.adapters import save_adapters, train_adapters
    from calibrate.cli import main

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    heads = train_adapters(model, cache, progress=False)
    save_adapters(heads, tmp_path / "adapters.safetensors")
    cert = _fit(model, tokenizer, prompts, heads=heads)
    assert cert.heads["kind"] == "adapters"
    cert.to_json(tmp_path / "cert.json")
    held_out = [p for p in _word_prompts(60, seed=5) if p not in prompts][:12]
    (tmp_path / "held_out.txt").write_text("\n".join(held_out) + "\n", encoding="utf-8")
    expected = calibrate.audit_decoded(cert, model, tokenizer, held_out, heads=heads, progress=False)
    argv = ["audit", str(tmp_path / "cert.json"), "--model", str(tmp_path / "model"), "--prompts"]
    argv += [str(tmp_path / "held_out.txt")]
    assert main([*argv, "--adapters", str(tmp_path / "adapters.safetensors")]) == (
        0 if expected.within_tolerance else 1
    )
    assert expected.summary() in capsys.readouterr().out
    assert main(argv) == 2  # without them the runtime would decode through other heads than certified
    assert "calibrated with exit adapters: give the adapters file" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "cert.json"), str(tmp_path), "--adapters", "a.safetensors"]) == 2
    assert (
        "--adapters does not apply to an exit_threshold certificate audited on a held-out cache"
        in capsys.readouterr().err
    )


# --------------------------------------------------------------------------------------------------
# Learned measures and fit(mode="decoded") on a cache
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(model, tokenizer, prompts):
    return calibrate.extract(
        model, tokenizer, prompts, max_new_tokens=NEW, batch_size=BATCH, store_hidden=True, progress=False
    )


@pytest.mark.parametrize(
    "measure", ["classifier", "halting_geometric", "halting_token_multinomial", "halting_sequence_multinomial"]
)
def test_learned_measure_is_trained_on_the_train_cache_and_used_by_the_runtime(
    model, tokenizer, prompts, cache, measure
):
    from measures.learned import train_measure

    others = [p for p in _word_prompts(40, seed=3) if p not in prompts][:24]  # disjoint from the cache's
    cert = _fit(model, tokenizer, others, 0.5, 0.1, measure=measure, train_cache=cache, lambdas=(0.9, 0.5))
    assert cert.measure == measure and cert.n_train == 24 and cert.n == 24
    assert cert.to_dict()["measure_state"] == train_measure(measure, cache, seed=0).to_dict()
    assert cert.measure != "classifier" or cert.measure_state["features"] == "hidden"
    tuned = _fit(model, tokenizer, others, 0.5, 0.1, measure=measure, train_cache=cache, lambdas=(0.9,),
                 measure_options={"C": 0.01})  # fmt: skip
    assert tuned.to_dict()["measure_state"] == train_measure(measure, cache, seed=0, options={"C": 0.01}).to_dict()
    assert tuned.measure_state != cert.measure_state
    assert cert.tested[1] and cert.avg_layers[1] < N_LAYERS  # the measure really exits tokens early
    losses = _reference_losses(model, tokenizer, others, cert, [0.5])
    assert cert.risks[1] == pytest.approx(losses.mean(), abs=1e-12)
    with pytest.warns(UserWarning, match="also occur in train_cache"):
        _fit(model, tokenizer, prompts, 0.01, measure=measure, train_cache=cache)


def test_fit_mode_decoded_decodes_the_cache_prompts(model, tokenizer, prompts, cache, tmp_path):
    via_fit = calibrate.fit(
        cache, 0.25, 0.1, mode="decoded", model=model, tokenizer=tokenizer, lambdas=GRID, batch_size=BATCH
    )
    direct = _fit(model, tokenizer, prompts)
    assert via_fit.to_json() == direct.to_json()  # the prompts' digest: audit_decoded refuses them as held-out
    with pytest.raises(ValueError, match="the prompts are the certificate's calibration prompts"):
        calibrate.audit_decoded(via_fit, model, tokenizer, cache.sequences["prompt"].tolist())
    split = calibrate.fit(
        cache,
        0.9,
        0.1,
        mode="decoded",
        model=model,
        tokenizer=tokenizer,
        measure="classifier",
        train_fraction=0.5,
        lambdas=(0.9,),
        batch_size=BATCH,
    )
    assert split.n == 12 and split.n_train == 12 and split.measure_state is not None
    pytest.importorskip("dask")
    cache.save(tmp_path / "cache")
    chunked = calibrate.open_cache(tmp_path / "cache", chunks=5)  # the same split, read lazily
    kwargs = dict(mode="decoded", model=model, tokenizer=tokenizer, measure="classifier", train_fraction=0.5)
    same = calibrate.fit(chunked, 0.9, 0.1, lambdas=(0.9,), batch_size=BATCH, **kwargs)
    assert same.to_json() == split.to_json()


def test_a_model_left_in_training_mode_decodes_in_eval_mode(prompts):
    noisy = _tiny_hf.tiny_model("gpt2", seed=0, n_layers=N_LAYERS)
    noisy.config.resid_pdrop = noisy.config.embd_pdrop = noisy.config.attn_pdrop = 0.5
    for module in noisy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    tokenizer = _tiny_hf.tiny_tokenizer()
    kw = dict(max_new_tokens=NEW, batch_size=BATCH, progress=False)
    cert = _fit(noisy.eval(), tokenizer, prompts[:8], delta=0.9)
    expected = calibrate.decoded_losses(noisy, tokenizer, prompts[:8], cert, **kw)
    assert _fit(noisy.train(), tokenizer, prompts[:8], delta=0.9) == cert
    got = calibrate.decoded_losses(noisy, tokenizer, prompts[:8], cert, **kw)
    assert noisy.training  # restored
    np.testing.assert_array_equal(got.losses, expected.losses)


def test_decay_takes_the_grid_with_headroom_above_one(model, tokenizer, prompts):
    cert = _fit(model, tokenizer, prompts, delta=0.001, lambdas=None, decay=4.0)  # too few: nothing decoded
    assert cert.lambdas == tuple(calibrate.decoded_lambdas(decay=True)) and cert.lambdas[0] == pytest.approx(1 / 0.9)
    assert _fit(model, tokenizer, prompts, delta=0.001, lambdas=None).lambdas == tuple(calibrate.decoded_lambdas())


def test_certificates_record_the_budget_and_the_runtime_warns_beyond_it(model, tokenizer, prompts, cache):
    from calibrate.runtime import custom_generate

    decoded = dataclasses.replace(_fit(model, tokenizer, prompts, delta=0.9), lambda_hat=0.3)
    proxy = calibrate.fit(cache, 0.25, 0.1, lambdas=GRID)
    assert decoded.max_new_tokens == proxy.max_new_tokens == NEW  # the decoding budget; the cache's settings
    assert f"at most {NEW} new tokens" in decoded.summary()
    ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts[:2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.runtime.generate(model, ids, mask, certificate=decoded, max_new_tokens=NEW)  # within: silent
        # by default the certified budget (it was 32: more tokens than certified, with a warning)
        assert calibrate.runtime.generate(model, ids, mask, certificate=decoded).exit_layers.shape == (2, NEW)
        assert calibrate.runtime.generate(model, ids, mask).exit_layers.shape == (2, 32)
        full_only = dataclasses.replace(decoded, lambda_hat=None)  # the full model is exact at any length
        calibrate.runtime.generate(model, ids, mask, certificate=full_only, max_new_tokens=NEW + 5)
    with pytest.warns(UserWarning, match=f"max_new_tokens={NEW + 1} .* at most {NEW}") as caught:
        calibrate.runtime.generate(model, ids, mask, certificate=decoded, max_new_tokens=NEW + 1)
    assert caught[0].filename == __file__  # points at the caller's line
    with pytest.warns(UserWarning, match=f"at most {NEW}"):
        model.generate(
            ids, attention_mask=mask, custom_generate=custom_generate, certificate=decoded, max_new_tokens=NEW + 1
        )


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors before anything is decoded
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"model": None}, TypeError, "model must be"),
        ({"tokenizer": None}, TypeError, "tokenizer must be"),
        ({"prompts": []}, ValueError, "prompts must hold at least one"),
        ({"prompts": "w1 w2"}, TypeError, "prompts must be a sequence"),
        ({"prompts": ["w1", 3]}, TypeError, "prompts must hold str"),
        ({"method": "holm"}, ValueError, "method must be 'fixed_sequence'.*decoded mode does not offer them"),
        ({"method": "crc"}, ValueError, "method must be 'fixed_sequence'"),
        ({"method": fwer.Bonferroni()}, ValueError, "method must be 'fixed_sequence'.*Bonferroni"),
        ({"measure": "vibes"}, ValueError, "measure must be one of"),
        ({"measure": "classifier"}, ValueError, "needs train_cache="),
        ({"consistency": "meteor"}, ValueError, "consistency must be one of"),
        ({"consistency": "risk_bleu"}, ValueError, "references"),
        ({"bound": "binomial"}, ValueError, "bound='binomial'"),
        ({"bound": "magic"}, ValueError, "bound must be one of"),
        ({"lambdas": (0.1, 0.5)}, ValueError, "strictly decreasing"),
        ({"decay": "fast"}, TypeError, "decay"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"max_new_tokens": 100}, ValueError, "context"),
        ({"delta": 1.5}, ValueError, "delta"),
        ({"references": ["w1"]}, ValueError, "references must be"),
        ({"references": [b"w1"] * 24}, ValueError, r"references must hold str or None, got bytes b'w1' at index 0"),
    ],
)
def test_bad_input_names_the_argument(model, tokenizer, prompts, calls, change, exc, match):
    args = {"model": model, "tokenizer": tokenizer, "prompts": prompts, **change}
    with pytest.raises(exc, match=match):
        _fit(args.pop("model"), args.pop("tokenizer"), args.pop("prompts"), **args)
    assert calls["n"] == 0


def test_a_top_k_bound_certificate_is_refused_before_decoding(model, tokenizer, prompts, calls):
    """The runtime computes the confidence on the full softmax: refused before the full model decodes."""
    cert = dataclasses.replace(_fit(model, tokenizer, prompts, measure="entropy"), measure_state={"from_topk": 2})
    calls["n"] = 0
    with pytest.raises(ValueError, match="'entropy' confidence is a bound from the top-2"):
        calibrate.audit_decoded(cert, model, tokenizer, _word_prompts(24, seed=99), progress=False)
    assert calls["n"] == 0  # was a full decode of every prompt first


def test_train_cache_only_with_the_classifier(model, tokenizer, prompts, cache, calls):
    with pytest.raises(ValueError, match="train_cache trains the learned measures .* only"):
        _fit(model, tokenizer, prompts, train_cache=cache)
    no_hidden = calibrate.LayerCache.from_arrays(
        full_tokens=cache.arrays["full_tokens"], topk_ids=cache.arrays["topk_ids"], lengths=cache.lengths, vocab_size=64
    )
    with pytest.raises(ValueError, match="store_hidden=True"):
        _fit(model, tokenizer, prompts, measure="classifier", train_cache=no_hidden)
    assert calls["n"] == 0


def test_fit_mode_errors(model, tokenizer, cache):
    with pytest.raises(ValueError, match="mode='decoded' needs model= and tokenizer="):
        calibrate.fit(cache, mode="decoded", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="only with mode='decoded'"):
        calibrate.fit(cache, model=model)
    with pytest.raises(ValueError, match="mode must be 'proxy' or 'decoded'"):
        calibrate.fit(cache, mode="user")
    with pytest.raises(ValueError, match="client= computes proxy losses on Dask"):
        calibrate.fit(cache, mode="decoded", model=model, tokenizer=tokenizer, client=object())
    bare = calibrate.LayerCache.from_arrays(
        full_tokens=cache.arrays["full_tokens"], topk_ids=cache.arrays["topk_ids"], lengths=cache.lengths, vocab_size=64
    )
    with pytest.raises(ValueError, match="max_new_tokens"):
        calibrate.fit(bare, mode="decoded", model=model, tokenizer=tokenizer)


def test_decoded_fit_on_a_cache_names_the_cache_not_fit_decoded_arguments(model, tokenizer, cache, calls):
    """fit(cache, mode='decoded') said "pass references=" (fit takes none) and named a train_cache the user did
    not pass: the cache's references and hidden states are named, as in proxy mode."""
    kwargs = dict(mode="decoded", model=model, tokenizer=tokenizer, lambdas=GRID, batch_size=BATCH)
    with pytest.raises(ValueError, match=r"sequences have no 'reference' in the cache"):
        calibrate.fit(cache, 0.25, 0.1, consistency="risk_rouge_l", **kwargs)
    plain = cache.subset(range(cache.n_sequences))
    no_hidden = calibrate.extract(model, tokenizer, plain.sequences["prompt"].tolist(), max_new_tokens=NEW,
                                  batch_size=BATCH, progress=False)  # fmt: skip
    calls["n"] = 0
    with pytest.raises(ValueError, match=r"this cache has none; extract it with store_hidden=True"):
        calibrate.fit(no_hidden, 0.25, 0.1, measure="classifier", **kwargs)
    assert calls["n"] == 0
    from calibrate.cache import _split_indices

    train_rows = set(_split_indices(cache.n_sequences, [0.3, 0.7], seed=0)[0].tolist())
    references = [None if i in train_rows else "w1 w2" for i in range(cache.n_sequences)]  # the train split's only
    prompts = cache.sequences["prompt"].tolist()
    partly = calibrate.extract(model, tokenizer, prompts, max_new_tokens=NEW, batch_size=BATCH, store_hidden=True,
                               references=references, progress=False)  # fmt: skip
    cert = calibrate.fit(partly, 0.9, 0.1, measure="classifier", consistency="risk_rouge_l", **kwargs)
    assert cert.n == cache.n_sequences - len(train_rows)  # its rows are scored, the train split only trains


def test_a_train_cache_of_another_model_and_a_bad_decode_are_refused_before_decoding(
    model, tokenizer, prompts, cache, calls
):
    """Trained on a 3-layer model's states, the measure was refused by the runtime after the full model decoded
    every prompt; a decode returning a list, after two decodes of every prompt."""
    shallow = calibrate.LayerCache.from_arrays(  # no heads metadata: only the shapes can tell
        full_tokens=cache.arrays["full_tokens"], topk_ids=cache.arrays["topk_ids"][:, 1:], lengths=cache.lengths,
        vocab_size=64, hidden=cache.arrays["hidden"][:, 1:],
    )  # fmt: skip
    others = [p for p in _word_prompts(40, seed=3) if p not in prompts][:24]
    with pytest.raises(ValueError, match=rf"train_cache has n_layers={N_LAYERS - 1}, .* model decoding has n_l"):
        _fit(model, tokenizer, others, measure="classifier", train_cache=shallow)
    with pytest.raises(TypeError, match="decode must return str .*, got list"):
        _fit(model, tokenizer, prompts, consistency="rouge_l", decode=tokenizer.convert_ids_to_tokens)
    assert calls["n"] == 0


def test_untested_thresholds_round_trip_through_json(tmp_path):
    nan = math.nan
    cert = Certificate(
        lambda_hat=0.9,
        delta=0.1,
        epsilon=0.05,
        n=500,
        lambdas=(1.0, 0.9, 0.5, 0.1),
        risks=(0.0, 0.02, 0.3, nan),
        p_values=(*(float(calibrate.bounds.hoeffding_bentkus(r, 500, 0.1)) for r in (0.0, 0.02, 0.3)), nan),
        certified=(True, True, False, False),
        bound="hoeffding_bentkus",
        method="fixed_sequence",
        mode="decoded",
        avg_layers=(4.0, 3.5, 2.0, nan),
        n_layers=4,
    )
    assert cert.tested == (True, True, True, False)
    text = cert.to_json(tmp_path / "cert.json")
    assert "NaN" not in text
    back = Certificate.from_json(tmp_path / "cert.json")
    assert back.to_json() == text and math.isnan(back.risks[3]) and math.isnan(back.avg_layers[3])
    assert back.risk_hat == 0.02 and back.expected_layers == 3.5
    assert "tested 3 of 4 thresholds" in back.summary()


# --------------------------------------------------------------------------------------------------
# benchmarks/proxy_vs_decoded.py
# --------------------------------------------------------------------------------------------------


def _benchmark(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_vs_decoded.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling timing.py, as `python benchmarks/...` sees it
    spec = importlib.util.spec_from_file_location("proxy_vs_decoded", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proxy_vs_decoded_benchmark(model, tokenizer, prompts, capsys, monkeypatch):
    bench = _benchmark(monkeypatch)
    frame, proxy, decoded = bench.compare(model, tokenizer, prompts, lambdas=GRID, max_new_tokens=NEW, batch_size=BATCH)
    assert proxy.mode == "proxy" and decoded.mode == "decoded" and proxy.losses.shape == decoded.losses.shape
    np.testing.assert_allclose(frame["mean_diff"], decoded.risks - proxy.risks, atol=1e-12)
    assert frame.loc[0, ["proxy", "decoded", "mean_abs_diff"]].tolist() == [0.0, 0.0, 0.0]  # lambda = 1
    assert (frame["differ"] > 0).any()  # free-running decoding continues from its own early tokens
    bench.main(["--n", "8", "--max-new-tokens", "3", "--batch-size", "8", "--lambdas", "1.0", "0.0"])
    out = capsys.readouterr().out
    assert "mean_diff" in out and "decoded lambda_hat" in out


def test_the_lazy_decoded_walk_goes_on_past_a_p_value_equal_to_epsilon():
    """Fixed-sequence testing certifies p <= epsilon: the lazy walk (decoding one threshold at a time) must not
    stop at p == epsilon. epsilon is set to the first two columns' exact p-value."""
    from calibrate._decoded_walk import _certify_lazily

    n, delta, bound = 100, 0.2, "hoeffding_bentkus"
    few, many = np.zeros(n), np.zeros(n)
    few[:5], many[:60] = 1.0, 1.0
    columns = {0.9: few, 0.8: few, 0.7: many}
    epsilon = float(bounds.p_values(few[:, None], delta, bound=bound)[0])
    assert 0 < epsilon < 0.5

    class Decoder:
        calls: list = []

        def losses(self, certificate):
            self.calls.append(certificate.lambda_hat)
            return columns[certificate.lambda_hat], 2.0

    template = Certificate(
        lambda_hat=None, delta=delta, epsilon=epsilon, n=n, lambdas=(0.9, 0.8, 0.7),
        risks=(math.nan,) * 3, p_values=(math.nan,) * 3, certified=(False,) * 3,
        bound=bound, method="fixed_sequence", mode="decoded", knob="exit_threshold",
        measure="state_saturation", consistency="token", n_layers=3,
    )
    decoder = Decoder()
    out = _certify_lazily(decoder, template, progress=False)
    assert decoder.calls == [0.9, 0.8, 0.7]
    assert out.lambda_hat == 0.8 and out.certified == (True, True, False)


@pytest.mark.filterwarnings("ignore:the last layer's top-1 differs")  # extract: the processor changes tokens
def test_logits_processors_that_read_the_padding_are_warned_of(tokenizer):
    """no_repeat_ngram_size reads a left-padded prompt's padding (as in Hugging Face), so the full model's own
    outputs, and the decoded risks, change with the batch size: calibrating at batch 4 certified what one
    prompt decoded alone does not emit."""
    model = _tiny_hf.tiny_model("gpt2", seed=0, n_layers=N_LAYERS)
    model.generation_config.no_repeat_ngram_size = 1
    prompts = _word_prompts(12, seed=1)
    kw = {"lambdas": GRID, "max_new_tokens": 20, "progress": False}
    with pytest.warns(UserWarning, match=r"prompts through its generation config's no_repeat_ngram_size=1"):
        batched = calibrate.fit_decoded(model, tokenizer, prompts, 0.99, 0.5, batch_size=4, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = calibrate.fit_decoded(model, tokenizer, prompts, 0.99, 0.5, batch_size=1, **kw)
    assert not np.allclose(batched.risks, alone.risks)  # what the warning is about
    with pytest.warns(UserWarning, match="no_repeat_ngram_size=1"):
        calibrate.extract(model, tokenizer, prompts[:4], max_new_tokens=3, batch_size=4, progress=False)
    model.generation_config.no_repeat_ngram_size = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.fit_decoded(model, tokenizer, prompts, 0.99, 0.5, batch_size=4, **kw)


def test_a_classifier_on_topk_features_is_refused_before_any_decoding(model, tokenizer, prompts, calls, monkeypatch):
    """The runtime scores the classifier on hidden states only; a proxy certificate of a classifier fitted on top-k
    features (a cache without hidden states) was refused only after the full model had decoded every prompt."""
    cache = calibrate.extract(model, tokenizer, _word_prompts(40, seed=1), max_new_tokens=4, progress=False)
    cert = calibrate.fit(cache, 0.5, 0.2, measure="classifier", lambdas=GRID)
    assert cert.measure_state["features"] == "topk" and cert.lambda_hat is not None
    with pytest.raises(ValueError, match="classifier uses features='topk'; the runtime supports only"):
        calibrate.audit_decoded(cert, model, tokenizer, prompts, batch_size=BATCH, progress=False)
    assert calls["n"] == 0
    import measures.learned

    # fit_decoded trained a top-k classifier on a cache with hidden states, then the runtime refused it, saying to
    # extract with store_hidden=True (it had): refused before the training, naming the option
    hidden = calibrate.extract(model, tokenizer, _word_prompts(20, seed=2), max_new_tokens=4, store_hidden=True,
                               progress=False)  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(measures.learned, "train_measure", lambda *a, **k: pytest.fail("trained before the check"))
        with pytest.raises(ValueError, match=r"measure_options=\{'features': 'topk'\}: the runtime evaluates"):
            _fit(model, tokenizer, prompts, 0.5, 0.2, measure="classifier", train_cache=hidden,
                 measure_options={"features": "topk"})  # fmt: skip
    assert calls["n"] == 0
    ids, mask = left_pad([[5, 6, 7]])
    with pytest.raises(ValueError, match="classifier uses features='topk'"):
        calibrate.runtime.generate(model, ids, mask, certificate=cert, max_new_tokens=2)


def test_audits_refuse_the_calibration_prompts_or_inputs_as_held_out(model, tokenizer, prompts, calls):
    """calibrate.audit refused the calibration cache, but audit_decoded, lat.audit and fff.audit took the very
    prompts or inputs a certificate was fitted on and reported their in-sample risk as held-out (exit 0 in the CLI).
    The certificates record a digest of them (cache_checksum); another order is the same data."""
    from calibrate import fff, lat

    cert = _fit(model, tokenizer, prompts)
    assert cert.cache_checksum.startswith("prompts-")
    calls["n"] = 0
    with pytest.raises(ValueError, match="the prompts are the certificate's calibration prompts"):
        calibrate.audit_decoded(cert, model, tokenizer, prompts[::-1], progress=False)
    with pytest.raises(ValueError, match="the prompts are the certificate's calibration prompts"):
        calibrate.audit_decoded(cert, model, tokenizer, collections.UserList(prompts), progress=False)  # any sequence
    assert calls["n"] == 0
    calibrate.audit_decoded(cert, model, tokenizer, _word_prompts(12, seed=99), progress=False)  # held out
    keep = lat.fit(model, tokenizer, prompts, delta=0.5, speedups=[1.0, 1.25], max_new_tokens=3, progress=False)
    with pytest.raises(ValueError, match="calibration prompts"):
        lat.audit(keep, model, tokenizer, prompts, progress=False)
    with pytest.raises(ValueError, match="calibration prompts"):
        lat.heldout_losses(keep, model, tokenizer, prompts)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(fff.FFF(8, 3, depth=3)).eval()
    x = torch.randn(200, 8)
    depth = fff.fit(layer, x, delta=0.5, epsilon=0.1)
    with pytest.raises(ValueError, match="the inputs are the certificate's calibration inputs"):
        fff.audit(depth, layer, x.clone())
    with pytest.raises(ValueError, match="the inputs are the certificate's calibration inputs"):
        fff.audit(depth, layer, x[torch.randperm(200)])  # inputs in another order (was taken as held-out)
    assert fff.fit(layer, x.flip(0), delta=0.5, epsilon=0.1) == depth
    fff.audit(depth, layer, torch.randn(200, 8))
    from calibrate.audit import _calibration_data_digest

    assert _calibration_data_digest(x.numpy()[::-1]) == _calibration_data_digest(x.numpy())
    assert _calibration_data_digest(x.reshape(100, 16)) != _calibration_data_digest(x)  # rows of another shape
    half = fff.fit(layer.to(torch.bfloat16), x.bfloat16(), delta=0.5, epsilon=0.1)  # no numpy dtype: its bytes
    assert half.cache_checksum.startswith("inputs-") and half.cache_checksum != depth.cache_checksum
    with pytest.raises(TypeError, match="prompts must hold str, got NoneType at index 1"):  # named, not a sort error
        calibrate.audit_decoded(cert, model, tokenizer, ["w1 w2", None], progress=False)

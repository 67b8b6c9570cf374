"""Certificate: frozen, JSON round trip, derived values, tables and text."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

import calibrate
from calibrate._format import level
from calibrate.certificate import Certificate


def _cert(**overrides):
    base = dict(
        lambda_hat=0.8,
        delta=0.1,
        epsilon=0.05,
        n=500,
        lambdas=(0.9, 0.8, 0.7),
        risks=(0.01, 0.03, 0.2),
        p_values=(1e-9, 0.004, 0.9),
        certified=(True, True, False),
        bound="wsr",  # made-up p-values: the mean-based bounds would recompute them from the risks
        method="fixed_sequence",
        mode="proxy",
        measure="softmax_gap",
        consistency="token",
        decay={"max_len": 64, "tau": 4.0},
        avg_layers=(10.5, 8.25, 3.0),
        n_layers=12,
        max_new_tokens=32,
        measure_state={"weights": [[0.5, -1.0]], "kind": "x"},
    )
    base.update(overrides)
    return Certificate(**base)


def test_json_round_trip_is_exact(tmp_path):
    cert = _cert()
    path = tmp_path / "cert.json"
    cert.to_json(path)
    back = Certificate.from_json(path)
    assert back == cert
    assert Certificate.from_json(cert.to_json()) == cert
    assert json.loads(path.read_text())["lambda_hat"] == 0.8


def test_certificates_with_mappings_pickle_and_copy(tmp_path):
    """Their read-only mappings (decay, measure_state, heads) did not pickle: no process pool, no Dask submit."""
    import copy
    import pickle

    cert = _cert(decay={"max_len": 32, "tau": 4.0}, measure_state={"layers": [{"coef": [0.5, 1.0]}]},
                 heads={"kind": "logit_lens", "n_layers": 3})  # fmt: skip
    for back in (pickle.loads(pickle.dumps(cert)), copy.deepcopy(cert), copy.copy(cert)):
        assert back == cert and back.to_json() == cert.to_json()
        assert dict(back.decay) == {"max_len": 32, "tau": 4.0}
    at = dataclasses.replace(cert, lambda_hat=0.7)  # set to decode at an untested value: from_dict refuses it
    assert copy.deepcopy(at).lambda_hat == 0.7 and pickle.loads(pickle.dumps(at)) == at
    # a file whose name starts like JSON text is read as a file
    path = tmp_path / "{run-1}.json"
    cert.to_json(path)
    assert Certificate.from_json(str(path)) == cert
    with pytest.raises(ValueError, match="certificate is not valid JSON"):
        Certificate.from_json("{not json")
    path.write_text(cert.to_json()[:-40])  # cut short: the file is named (it was "certificate is not valid JSON")
    with pytest.raises(ValueError, match=rf"certificate file {re.escape(str(path))} is not valid JSON"):
        Certificate.from_json(path)


@pytest.mark.parametrize(
    "field, value, exc, match",
    [
        ("measure_state", {"layers": {1: 0.5}}, TypeError, r"measure_state\['layers'\] keys must be str"),
        ("measure_state", {"w": float("nan")}, ValueError, r"measure_state\['w'\] must be finite"),
        ("heads", {"ids": {1, 2}}, TypeError, r"heads\['ids'\] must hold JSON data .* got set"),
        ("measure_state", {(1, 2): 3}, TypeError, "keys must be str"),
    ],
)
def test_mappings_json_cannot_hold_are_refused_at_construction(field, value, exc, match):
    """They were accepted; to_json, == or hash failed later, or an int key came back as a str yet compared equal."""
    with pytest.raises(exc, match=match):
        _cert(**{field: value})


def test_numpy_scalars_in_mappings_become_python_numbers():
    cert = _cert(decay={"max_len": np.int64(8), "tau": np.float32(4.0)}, measure_state={"w": [np.float32(0.5)]})
    assert type(cert.decay["max_len"]) is int and cert.measure_state["w"] == (0.5,)
    assert Certificate.from_json(cert.to_json()) == cert


def test_nan_p_values_round_trip_as_null():
    cert = _cert(p_values=(np.nan, np.nan, np.nan), method="crc", bound=None)
    text = cert.to_json()
    assert "NaN" not in text
    back = Certificate.from_json(text)
    assert np.all(np.isnan(back.p_values))
    assert "expectation" in back.guarantee
    assert back == cert and hash(back) == hash(cert) and len({back, cert}) == 1  # untested entries compare equal
    assert back != _cert(p_values=(np.nan, np.nan, 0.5), method="crc", bound=None)
    assert back != "not a certificate"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _cert().lambda_hat = 0.1
    state = {"weights": [[0.5, -1.0]], "kind": "x"}
    cert = _cert(measure_state=state)
    state["weights"][0][0] = 9.0  # the caller's dict: the certificate holds its own copy
    before = hash(cert)
    with pytest.raises(TypeError):
        cert.decay["tau"] = 0.0
    with pytest.raises(TypeError):
        cert.measure_state["kind"] = "y"
    with pytest.raises(TypeError):
        cert.measure_state["weights"][0][0] = 9.0  # nested lists are tuples
    for change in (lambda m: m.update(kind="y"), lambda m: m.pop("kind"), lambda m: m.setdefault("z", 1),
                   lambda m: m.clear(), lambda m: m.popitem(), lambda m: m.__delitem__("kind"),
                   lambda m: m.__ior__({"kind": "y"})):  # fmt: skip
        with pytest.raises(TypeError, match="read-only"):
            change(cert.measure_state)
    assert hash(cert) == before and cert.to_dict()["measure_state"] == {"weights": [[0.5, -1.0]], "kind": "x"}


def test_dataclasses_asdict_of_a_certificate_is_json_data():
    """It failed: copy.deepcopy of the read-only mappings (cannot pickle 'mappingproxy' object)."""
    cert = _cert(decay={"max_len": 32, "tau": 4.0}, measure_state={"layers": [{"coef": [0.5, 1.0]}]})
    data = dataclasses.asdict(cert)
    assert data["decay"] == {"max_len": 32, "tau": 4.0} and data["measure_state"] == {"layers": ({"coef": (0.5, 1.0)},)}
    assert json.loads(json.dumps(data["measure_state"])) == cert.to_dict()["measure_state"]
    with pytest.raises(TypeError, match="read-only"):
        data["decay"]["tau"] = 1.0  # asdict keeps the mapping type, read-only like the certificate's


def test_derived_values():
    cert = _cert()
    assert cert.index == 1
    assert cert.risk_hat == 0.03 and cert.p_value == 0.004
    assert cert.expected_layers == 8.25
    assert cert.layer_savings == pytest.approx(1 - 8.25 / 12)
    assert not cert.full_model_only
    full = _cert(lambda_hat=None, certified=(False, False, False), reason="too few examples")
    assert full.full_model_only and full.index is None and full.risk_hat is None
    assert full.expected_layers == 12 and full.layer_savings == 0.0


def test_frame_summary_and_repr():
    cert = _cert()
    frame = cert.to_frame()
    assert list(frame["lambda"]) == [0.9, 0.8, 0.7]
    assert list(frame["selected"]) == [False, True, False] and list(frame["tested"]) == [True, True, True]
    assert list(frame["avg_layers"]) == [10.5, 8.25, 3.0]
    text = cert.summary()
    assert "lambda_hat = 0.8" in text and "delta (tolerance) = 0.1" in text and "epsilon (failure probability)" in text
    assert "teacher-forced" in text and "outputs of at most 32 new tokens" in text
    assert repr(cert).startswith("Certificate(lambda_hat=0.8,") and "expected_layers=8.25/12" in repr(cert)
    unsized = dataclasses.replace(cert, n_layers=None)  # printed "expected_layers=8.25/None"
    assert repr(unsized).endswith("expected_layers=8.25)") and "expected layers 8.25" in unsized.summary()
    crc = calibrate.certify(np.tile([0.0, 0.05, 0.5], (200, 1)), [0.9, 0.5, 0.1], delta=0.1, method="crc")
    assert "epsilon" not in repr(crc) and "epsilon" not in repr(dataclasses.replace(crc, epsilon=0.5))
    assert "<pre" in cert._repr_html_()
    full = _cert(lambda_hat=None, certified=(False, False, False), reason="too few examples")
    assert "full model only (run every layer)" in full.summary() and "too few examples" in full.summary()
    tree = dataclasses.replace(full, knob="fff_depth", lambdas=(8.0, 7.0, 6.0), avg_layers=None, n_layers=None)
    assert "full model only (evaluate the whole tree)" in tree.summary()
    assert "None (full model)" in repr(full)



def test_summary_and_frame_say_what_was_tested_and_at_what_cost():
    cert = _cert()
    text = cert.summary()
    assert text.startswith("Certificate (exit_threshold, mode=proxy, n=500): measure=softmax_gap, consistency=token\n")
    assert "2 of 3 thresholds certified" in text and "tested" not in text  # every threshold was tested
    assert "expected layers 8.25 of 12 (saves 31.2% of layers)" in text
    holm = _cert(method="holm", certified=(False, True, False))  # a procedure whose flags need not be a prefix
    assert "1 of 3 thresholds certified" in holm.summary()
    lazy = _cert(risks=(0.01, 0.03, np.nan), p_values=(1e-9, 0.004, np.nan), avg_layers=None)
    frame = lazy.to_frame()
    assert list(frame["tested"]) == [True, True, False] and "avg_layers" not in frame.columns
    assert "tested 2 of 3 thresholds in fixed-sequence order" in lazy.summary()
    bare = _cert(measure=None, consistency=None)
    assert bare.summary().startswith("Certificate (exit_threshold, mode=proxy, n=500)\n")

def test_levels_near_0_and_1_are_not_printed_as_0_or_1():
    """``:g`` printed 1 - 1e-12 as 1 (a claim of certainty) and delta = 1 - 1e-9 as 1."""
    cert = calibrate.certify(np.zeros((5000, 2)), [0.9, 0.5], delta=0.1, epsilon=1e-12)
    assert ">= 0.999999 over calibration draws" in cert.guarantee  # 1 - 1e-12 rounded down
    wide = calibrate.certify(np.zeros((40, 1)), [0.5], delta=1 - 1e-9, epsilon=1 - 1e-9)
    # 1 - epsilon is 9.9999997e-10 in floats, printed rounded down (1e-09 would claim more)
    assert "P(risk(lambda_hat) <= 0.999999999) >= 9.99999e-10" in wide.guarantee
    assert "delta (tolerance) = 0.999999999, epsilon (failure probability) = 0.999999999" in wide.summary()
    assert "delta=0.999999999, epsilon=0.999999999," in repr(wide)
    # a p-value just below 1 is not shown as 1; 0.1 and 0.05 print as before
    few = calibrate.certify(np.zeros((10**5, 1)), [0.5], delta=1e-9, epsilon=0.05)
    assert few.lambda_hat is None and "p=0.9999" in few.reason and "epsilon=0.05 " in few.reason
    assert (
        "P(risk(lambda_hat) <= 0.1) >= 0.95 over"
        in calibrate.certify(np.zeros((500, 1)), [0.5], 0.1, 0.05).guarantee
    )


def test_levels_are_rounded_towards_a_weaker_guarantee():
    """``:g`` printed delta = 0.1234564 as 0.123456 and 1 - epsilon = 2/3 as 0.666667: a stronger claim."""
    cert = calibrate.certify(np.zeros((500, 2)), [0.9, 0.5], delta=0.1234564, epsilon=1 / 3)
    delta, confidence = map(float, re.search(r"<= ([\d.]+)\) >= ([\d.]+) over", cert.guarantee).groups())
    assert delta >= cert.delta and confidence <= 1 - cert.epsilon
    summary = re.search(r"delta \(tolerance\) = ([\d.]+), epsilon \(failure probability\) = ([\d.]+)", cert.summary())
    assert float(summary[1]) >= cert.delta and float(summary[2]) >= cert.epsilon
    assert "delta=0.123457, epsilon=0.333334," in repr(cert) and "(risk 0.0000, p = " in cert.summary()
    tiny = calibrate.certify(np.zeros((20000, 2)), [1.0, 0.5], delta=0.1, epsilon=1e-20)  # 1 - 1e-20 is 1.0 in floats
    assert ">= 1 - 1e-20 over" in tiny.guarantee  # it printed ">= 1", a claim of certainty
    small_p = calibrate.certify(np.zeros((6720, 2)), [1.0, 0.5], delta=0.1, bound="binomial")
    assert "p = 3.24e-308)" in small_p.summary()  # an OverflowError in the rounding
    cases = [(1.2345638e-310, ".3g", "1.24e-310"), (5e-324, "g", "4.94066e-324"), (1e308, "g", "1e+308"),
             (0.1999991, "g", "0.2"), (-0.123456789, "g", "-0.123456"), (0.0, ".4f", "0.0000")]  # fmt: skip
    assert [level(value, spec) for value, spec, _ in cases] == [text for *_, text in cases]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"risks": (0.1,)}, "risks must have 3"),
        ({"mode": "magic"}, "mode must be one of"),
        ({"knob": "speed"}, "knob must be one of"),
        ({"lambda_hat": 0.55}, "not a grid value"),
        ({"avg_layers": (1.0,)}, "avg_layers"),
        ({"delta": 5}, r"delta must lie in the open interval \(0, 1\)"),
        ({"epsilon": 0.0}, r"epsilon must lie in the open interval \(0, 1\)"),
        ({"n": -3}, "n must be an int in 0..9007199254740992"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int in 1..2147483648"),
        ({"lambdas": (0.7, 0.8, 0.9), "lambda_hat": None}, "lambdas must be non-empty and strictly decreasing"),
        ({"lambdas": (0.9, None, 0.7)}, "lambdas must be a sequence of finite numbers"),
        ({"risks": (0.1, 2.0, 0.3)}, r"risks must lie in \[0, 1\]"),
        ({"certified": ("false", True, False)}, "certified must hold booleans"),
        ({"certified": 5}, "certified must hold booleans"),
        ({"bound": "bogus"}, "bound must be one of"),
        ({"method": None}, "method must be a str"),
        ({"decay": {"tau": 4.0}}, r"decay must be \{'max_len': int, 'tau': float\}"),
        ({"decay": 4.0}, "decay must be a mapping or None"),
        ({"decay": {"max_len": 64}}, r"decay must be \{'max_len': int, 'tau': float\}.*missing \['tau'\]"),
        ({"knob": "fff_depth", "lambdas": (3.0, 1.4, 1.0), "lambda_hat": 1.4},
         "lambdas: an fff_depth grid holds whole"),
        ({"knob": "fff_depth", "lambdas": (1.0, 0.0, -1.0), "lambda_hat": 0.0},
         "lambdas: an fff_depth grid holds whole"),
        ({"knob": "token_keep", "lambdas": (1.0, 0.5, 0.0), "lambda_hat": 0.5},
         r"lambdas: a token_keep grid .* \(0, 1\]"),
        ({"knob": "token_keep", "lambdas": (2.0, 1.0, 0.5), "lambda_hat": 1.0},
         r"lambdas: a token_keep grid .* \(0, 1\]"),
        ({"measure_state": "abc"}, "measure_state must be a mapping or None"),
    ],
)
def test_inconsistent_fields_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _cert(**overrides)



@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"lambdas": (1.0, 0.5, 0.25), "lambda_hat": True}, "lambda_hat must be a finite number or None, got True"),
        ({"certified": (1, 1, 0)}, "certified must hold booleans"),  # ints, as a hand-written JSON file has them
        ({"avg_layers": (10.5, "x", 3.0)}, "avg_layers must be a sequence of numbers or NaN"),
        ({"avg_layers": (10.5, float("inf"), 3.0)}, "avg_layers must be a sequence of numbers or NaN"),
        # float() reads strings: these loaded as numbers, "987" one character a threshold
        ({"lambdas": "987", "lambda_hat": 8.0}, r"lambdas must be a sequence of finite numbers, got '987'"),
        ({"risks": ("0.01", "0.03", "0.2")}, r"risks must be a sequence of numbers or NaN, got \('0.01'"),
        ({"p_values": [b"0", 0.5, 1.0]}, "p_values must be a sequence of numbers or NaN"),
        ({"model": 5}, "Certificate.model must be a str or None, got 5"),
        ({"cache_checksum": b"ab12"}, "Certificate.cache_checksum must be a str or None"),
    ],
)
def test_fields_that_look_almost_right_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        _cert(**overrides)


def test_stored_fields_of_the_wrong_type_are_named():
    data = json.loads(_cert().to_json())
    for field, value, match in [
        ("n_train", None, r"Certificate.n_train must be an int in 0..9007199254740992, got None"),
        ("n", 10**400, r"Certificate.n must be an int in 0..9007199254740992, got 1000"),  # an OverflowError (WSR)
        ("n_layers", 2**40, r"Certificate.n_layers must be an int in 1..2147483648, got 1099511627776"),
        ("certified", [1, 1, 0], "certified must hold booleans"),
        ("model", 5, "Certificate.model must be a str or None"),
    ]:
        with pytest.raises(ValueError, match=match):
            Certificate.from_json(json.dumps({**data, field: value}))
    with pytest.raises(TypeError, match="build a certificate from a dict with from_dict"):
        Certificate.from_json(data)
    data["avg_layers"][2] = None  # a threshold never tested: NaN, as in risks and p_values
    assert np.isnan(Certificate.from_json(json.dumps(data)).avg_layers[2])
    data["risks"] = [str(r) for r in data["risks"]]
    with pytest.raises(ValueError, match="Certificate.risks must be a sequence of numbers or NaN"):
        Certificate.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"n": "x"}, r"n must be an int in 0..9007199254740992, got 'x' \(str\)"),
        ({"n_layers": "12"}, "n_layers must be an int in 1..2147483648"),
        ({"max_new_tokens": 8.0}, r"max_new_tokens must be an int in 1..2147483648, got 8.0 \(float\)"),
    ],
)
def test_fields_of_the_wrong_type_raise_type_errors(overrides, match):
    with pytest.raises(TypeError, match=match):
        _cert(**overrides)


def test_bad_json(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Certificate.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Certificate.from_json("{not json")
    data = _cert().to_dict()
    data["surprise"] = 1
    with pytest.raises(ValueError, match=r"certificate fields: unknown \['surprise'\], missing \[\]$"):
        Certificate.from_dict(data)
    with pytest.raises(ValueError, match=r"unknown \['surprise'\], .* \(written by calm-calibrate 9.0; this is "):
        Certificate.from_dict({**data, "version": "9.0"})  # a newer version's field
    with pytest.raises(ValueError, match="Certificate.delta must be a real number"):  # a TypeError in memory
        Certificate.from_dict({**_cert().to_dict(), "delta": "0.1"})
    del data["surprise"], data["delta"]
    with pytest.raises(ValueError, match=r"certificate fields: unknown \[\], missing \['delta'\]"):
        Certificate.from_dict(data)
    older = _cert().to_dict()
    del older["max_new_tokens"]  # certificates written before the field existed
    assert Certificate.from_dict(older) == _cert(max_new_tokens=None)
    edited = json.loads(_cert().to_json())
    edited["lambda_hat"] = 0.7  # on the grid, but not certified
    with pytest.raises(ValueError, match="lambda_hat=0.7 is a grid value that the certificate does not certify"):
        Certificate.from_json(json.dumps(edited))
    edited["certified"][2] = True  # flags that contradict the p-values: a threshold put to use uncertified
    with pytest.raises(ValueError, match=r"certified\[2\] \(lambda=0.7\) is True but its p-value is 0.9"):
        Certificate.from_json(json.dumps(edited))
    edited = json.loads(_cert().to_json())
    edited["p_values"][1] = edited["risks"][1] = None  # never tested, yet certified
    with pytest.raises(ValueError, match=r"certified\[1\] .* its p-value is nan"):
        Certificate.from_json(json.dumps(edited))
    text = _cert().to_json()
    assert Certificate.from_json("\ufeff\n" + text) == _cert()  # a byte-order mark and blank lines
    (tmp_path / "[run 1]").mkdir()
    (tmp_path / "[run 1]" / "bom.json").write_text(text, encoding="utf-8-sig")
    assert Certificate.from_json(str(tmp_path / "[run 1]" / "bom.json")) == _cert()  # a path, not a JSON array
    (tmp_path / "array.json").write_text("[1, 2]")
    for bad, match in [("", "certificate is empty"), (tmp_path / "array.json", "must be an object"),
                       ('{"a": ' * 10**5, "certificate nests JSON deeper than 100 levels")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Certificate.from_json(bad)


def test_files_in_utf16_or_utf32_are_read_and_json_that_is_no_object_is_named(tmp_path):
    """PowerShell's ``>`` and Notepad's "Unicode" write UTF-16 (a bare UnicodeDecodeError before); JSON text that
    is no object was taken for a path (OSError: file name too long, or "file not found: null")."""
    text = _cert().to_json()
    for encoding in ("utf-16", "utf-32", "utf-16-le"):
        (tmp_path / f"{encoding}.json").write_bytes(text.encode(encoding))
        assert Certificate.from_json(tmp_path / f"{encoding}.json") == _cert(), encoding
    (tmp_path / "latin1.json").write_bytes(text.replace('"proxy"', '"pr\xf6xy"').encode("utf-8")[:-3] + b"\xff}")
    with pytest.raises(ValueError, match=r"latin1.json is not UTF-8 \(or UTF-16/32\) JSON text"):
        Certificate.from_json(tmp_path / "latin1.json")
    for bad, kind in [("null", "NoneType"), ("[" + text + "]", "list"), ('"' + "x" * 5000 + '"', "str"), ("3", "int")]:
        with pytest.raises(ValueError, match=f"certificate JSON must be an object, got {kind}$"):
            Certificate.from_json(bad)
    with pytest.raises(ValueError, match="certificate file not found: 'x{100}"):
        Certificate.from_json("x" * 5000 + ".json")  # a name too long for the file system


def test_edited_layer_counts_and_null_risks_are_named():
    """Average exit layers outside [1, n_layers] made layer_savings leave [0, 1) ("saves -1566.7% of layers"); a
    risk blanked beside its p-value was refused through the bounds module's own argument name (mean_loss)."""
    for avg_layers, n_layers in [((10.5, 8.25, 30.0), 12), ((10.5, 0.5, 3.0), 12), ((10.5, 8.25, 3.0), 4)]:
        with pytest.raises(ValueError, match=r"Certificate.avg_layers must be exit layers in \[1, \d+\] or NaN"):
            _cert(avg_layers=avg_layers, n_layers=n_layers)
    assert _cert(avg_layers=(12.0, float("nan"), 1.0)).avg_layers[0] == 12.0
    losses = (np.random.default_rng(0).random((500, 5)) < np.linspace(0, 0.3, 5)).astype(float)
    data = json.loads(calibrate.certify(losses, np.linspace(0.9, 0.1, 5), delta=0.2).to_json())
    data["risks"][3] = None
    with pytest.raises(ValueError, match=r"risks\[3\] \(lambda=0.3\) is null \(not tested\) but p_values\[3\]"):
        Certificate.from_json(json.dumps(data))


def test_stored_numbers_beyond_the_float_range_and_deep_nesting_are_named():
    """JSON holds integers of any size and nesting the parser accepts but Python's recursion does not: each was
    a bare OverflowError or RecursionError (the command line printed a traceback)."""
    data = json.loads(_cert().to_json())
    for field, value, match in [
        ("lambda_hat", 10**400, "Certificate.lambda_hat must be a finite number or None"),
        ("delta", 10**400, r"Certificate.delta must lie in the open interval \(0, 1\), got 10{39}$"),
        ("lambdas", [10**400, 0.5], "Certificate.lambdas must be a sequence of finite numbers"),
        ("decay", {"max_len": 10**400, "tau": 4.0}, r"Decay.max_len must be an int in 1..4611686018427387904"),
        ("bound", ["hoeffding"], r"Certificate.bound must be one of .* got \['hoeffding'\]"),
        ("heads", _nested(700), r"(certificate|Certificate.heads\['a'\]\S*) nests (JSON )?deeper than 100 levels"),
    ]:
        with pytest.raises(ValueError, match=match):
            Certificate.from_json(json.dumps({**data, field: value}))
        with pytest.raises(ValueError, match=match):
            Certificate.from_dict({**data, field: value})


def test_a_field_nested_as_deep_as_stored_json_may_round_trips():
    """Decay, measure state and heads sit a level below the certificate's object: 99 levels of their own are 100 in
    the file. The constructor held them to 100 of their own, which the file then could not be read back with."""
    cert = dataclasses.replace(_cert(), measure_state=_nested(98))
    assert Certificate.from_json(cert.to_json()) == cert
    with pytest.raises(ValueError, match=r"Certificate.measure_state\S* nests deeper than 100 levels"):
        dataclasses.replace(_cert(), measure_state=_nested(99))


def _nested(depth: int) -> dict:
    out: dict = {}
    for _ in range(depth):
        out = {"a": out}
    return out


def test_heads_identity_round_trips_through_json():
    from calibrate.certificate import Certificate

    heads = {"kind": "adapters", "adapters_digest": "ab12", "n_layers": 4, "vocab_size": 50}
    cert = Certificate(
        lambda_hat=None,
        delta=0.1,
        epsilon=0.05,
        n=10,
        lambdas=(1.0,),
        risks=(0.0,),
        p_values=(float(calibrate.bounds.hoeffding(0.0, 10, 0.1)),),
        certified=(False,),
        bound="hoeffding",
        method="fixed_sequence",
        mode="proxy",
        heads=heads,
    )
    back = Certificate.from_json(cert.to_json())
    assert back.heads == heads and back == cert


def test_a_speed_knob_certified_at_its_safest_value_says_it_changes_nothing():
    losses = np.zeros((200, 3))
    keep = calibrate.certify(losses, [1.0, 0.5, 0.25], delta=0.1, knob="token_keep")
    assert "certified target speed-up 4x of the prefill (the cost" in keep.summary()
    first = dataclasses.replace(keep, lambda_hat=1.0, certified=(True, False, False))
    assert "certified target speed-up 1x of the prefill (the full model's: no speed-up)" in first.summary()
    depth = calibrate.certify(losses, [6, 5, 4], delta=0.1, knob="fff_depth")
    whole = dataclasses.replace(depth, lambda_hat=6.0, certified=(True, False, False), model="fff/2x/D5-6/ab")
    assert "certified evaluation depth 6 (the full model's: no speed-up):" in whole.summary()
    assert "certified evaluation depth 4:" in depth.summary()
    # grids that start below the whole model: their first value is a speed-up (the note was given by position)
    halved = calibrate.certify(losses[:, :1], [0.5], delta=0.1, knob="token_keep")
    assert "certified target speed-up 2x of the prefill (the cost" in halved.summary()
    shallower = calibrate.certify(losses[:, :2], [4, 3], delta=0.1, knob="fff_depth")
    shallower = dataclasses.replace(shallower, lambda_hat=4.0, certified=(True, False), model="fff/2x/D5-6/ab")
    assert "certified evaluation depth 4:" in shallower.summary()
    unknown = dataclasses.replace(whole, model=None)  # no tree depth known: no claim
    assert "certified evaluation depth 6:" in unknown.summary()
    for odd in ("fff/2x/D--/abc", f"fff/2x/D{'9' * 5000}/abc"):  # ids of no fff model: raised when shown
        assert "certified evaluation depth 6:" in dataclasses.replace(whole, model=odd).summary()


@pytest.mark.filterwarnings("ignore:conformal risk control's guarantee")
def test_real_certificates_of_every_bound_and_method_load_back():
    """No false alarm from the evidence check: certify's own numbers (sums of the losses, rounded risks) pass."""
    rng = np.random.default_rng(0)
    methods = [("fixed_sequence", b) for b in ("hoeffding", "hoeffding_kl", "bentkus", "hoeffding_bentkus", "wsr")]
    methods += [("bonferroni", "hoeffding_bentkus"), ("holm", "bentkus"), ("multistart", "hoeffding_bentkus")]
    for trial in range(60):
        n, k = int(rng.integers(5, 3000)), 12
        kind = trial % 3
        scale = np.linspace(0, 0.5, k)
        if kind == 0:  # 0/1 losses: also the binomial bound
            losses = (rng.random((n, k)) < scale).astype(float)
        elif kind == 1:
            losses = rng.random((n, k)) * scale
        else:  # multiples of 1/7: sums that are integers, rounded means just off them
            losses = np.round(rng.random((n, k)) * scale * 7) / 7
        delta = float(rng.choice([0.05, 0.1, 0.2, 1 / 3]))
        runs = methods + [("fixed_sequence", "binomial")] * (kind == 0) + [("crc", None)]
        for method, bound in runs:
            cert = calibrate.certify(losses, np.linspace(1, 0, k), delta=delta, epsilon=0.1, bound=bound, method=method)
            assert Certificate.from_json(cert.to_json()) == cert, (trial, method, bound)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"delta": 0.01}, r"p_values\[\d\] .* below the .* delta=0.01"),
        ({"delta": 0.095}, r"p_values\[\d\] .* below the .* that the hoeffding_bentkus bound gives .* delta=0.095"),
        ({"n": 200}, r"below the .* bound gives for risks\[\d+\]=.*, n=200, "),
        ({"epsilon": 1e-6}, r"its p-value is .*, not <= epsilon=1e-06"),
        ({"risks": "raise the last certified"}, r"p_values\[2\] .* below the .* for risks\[2\]=0.095"),
        ({"p_values": "lower the first uncertified"}, r"is True, but fixed_sequence .* does not certify it"),
    ],
)
def test_a_hand_edited_certificate_is_refused_naming_the_field(edit, match):
    """The runtime spends lambda_hat as loaded: an edited delta, n, risk or p-value made it claim more."""
    losses = (np.random.default_rng(1).random((2000, 8)) < np.linspace(0, 0.3, 8)).astype(float)
    cert = calibrate.certify(losses, np.linspace(1, 0.3, 8), delta=0.1, epsilon=0.05)
    data = json.loads(cert.to_json())
    last, first_out = cert.index, cert.index + 1
    assert not cert.certified[first_out]
    if edit == {"risks": "raise the last certified"}:
        data["risks"][last] = 0.095
    elif edit == {"p_values": "lower the first uncertified"}:  # certify one past the first failure: no fixed sequence
        data["certified"][first_out + 1] = True
        data["risks"][first_out + 1] = 0.0
        data["p_values"][first_out + 1] = float(calibrate.bounds.hoeffding_bentkus(0.0, 2000, 0.1))
    else:
        data.update(edit)
    with pytest.raises(ValueError, match=match):
        Certificate.from_json(json.dumps(data))
    data = json.loads(cert.to_json())
    data["certified"] = [False] * 8  # claiming less is fine
    data["lambda_hat"] = None
    assert Certificate.from_json(json.dumps(data)).lambda_hat is None


def test_an_edited_crc_certificate_is_refused():
    losses = np.sort(np.random.default_rng(2).random((500, 6)) * np.linspace(0, 0.4, 6), axis=1)  # monotone
    cert = calibrate.certify(losses, np.linspace(1, 0.5, 6), delta=0.1, method="crc")
    data = json.loads(cert.to_json())
    k = cert.index + 1
    data["certified"][k], data["lambda_hat"] = True, cert.lambdas[k]
    with pytest.raises(ValueError, match=r"certified\[\d\] .* contradicts conformal risk control"):
        Certificate.from_json(json.dumps(data))
    data = json.loads(cert.to_json())
    data["certified"][0] = False  # a hole: certified values form a prefix
    with pytest.raises(ValueError, match=r"certified\[0\] .* contradicts conformal risk control"):
        Certificate.from_json(json.dumps(data))


def test_an_edited_binomial_risk_that_is_no_count_of_failures_is_refused_as_edited():
    losses = (np.random.default_rng(0).random((100, 2)) < [0.01, 0.05]).astype(float)
    cert = calibrate.certify(losses, [0.9, 0.5], delta=0.2, epsilon=0.05, bound="binomial")
    data = json.loads(cert.to_json())
    data["risks"][1] = 0.0512  # not k / 100
    with pytest.raises(ValueError, match=r"risks\[1\] \(lambda=0.5\) is 0.0512, which is no count of failures "
                       r"over n=100 as the binomial bound's p-values need: the certificate was edited"):
        Certificate.from_json(json.dumps(data))
    data["risks"][1] = 0.05
    assert Certificate.from_json(json.dumps(data)) == cert


def test_wsr_and_binomial_certify_thresholds_whose_final_risk_exceeds_delta_and_load_back():
    """WSR rejects at the best time of its bets, the binomial bound at epsilon >= 0.5 with a risk above delta: both
    certificates were refused as edited ("empirical risk ... not <= delta")."""
    losses = np.empty((140, 1))  # rows placed so that WSR reads the zeros first (bounds.p_values' fixed row order)
    losses[np.random.default_rng(0).permutation(140), 0] = np.concatenate([np.zeros(100), np.ones(40)])
    wsr = calibrate.certify(losses, [1.0], delta=0.1, epsilon=0.05, bound="wsr")
    assert wsr.certified == (True,) and wsr.risks[0] > 0.1
    assert Certificate.from_json(wsr.to_json()) == wsr
    binomial = calibrate.certify(np.array([[0.0], [0], [0], [1], [1]]), [1.0], delta=0.3, epsilon=0.9, bound="binomial")
    assert binomial.certified == (True,) and binomial.risks[0] > 0.3
    assert Certificate.from_json(binomial.to_json()) == binomial


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"n": 0}, r"from n=0 examples nothing is certified"),
        ({"bound": None}, r"with method='fixed_sequence' a bound is needed"),
        ({"bound": "wsr", "p_values": [1e-300] * 4}, r"below the .* that WSR can reach with n=50"),
    ],
)
def test_forgeries_of_the_examples_or_the_bound_are_refused(edit, match):
    cert = calibrate.certify(np.zeros((50, 4)), [1.0, 0.8, 0.6, 0.4], delta=0.2, epsilon=0.1, bound="wsr")
    assert all(cert.certified)
    with pytest.raises(ValueError, match=match):
        Certificate.from_dict({**cert.to_dict(), **edit})


def test_multistart_flags_need_epsilon_split_over_their_runs():
    p = [0.001, 0.5, 0.03, 0.001]  # two runs: each flag needs p <= 0.05 / 2
    cert = calibrate.certify(np.zeros((100, 4)), [1.0, 0.8, 0.6, 0.4], delta=0.2, method="multistart", bound="wsr")
    forged = {**cert.to_dict(), "p_values": p, "certified": [True, False, True, True], "lambda_hat": 0.4}
    with pytest.raises(ValueError, match=r"certified\[2\] .* multistart certifies 2 separate runs only with "
                       r"p-values <= epsilon/2=0.025, got 0.03"):
        Certificate.from_dict(forged)
    assert Certificate.from_dict({**forged, "p_values": [0.001, 0.5, 0.02, 0.001]}).lambda_hat == 0.4


def test_a_custom_procedure_may_not_take_a_built_in_name():
    """Its certificates were refused on load: they are checked against the procedure they name."""
    from calibrate import fwer

    class Fallback(fwer.FixedSequence):
        def reject(self, p_values, epsilon):
            return np.asarray(p_values) <= epsilon

    with pytest.raises(ValueError, match=r"cannot take the built-in name 'fixed_sequence' .* give Fallback a name"):
        calibrate.certify(np.zeros((100, 3)), [1.0, 0.5, 0.1], delta=0.2, method=Fallback())

    class Named(Fallback):
        name = "fallback"

    cert = calibrate.certify(np.zeros((100, 3)), [1.0, 0.5, 0.1], delta=0.2, method=Named())
    assert cert.method == "fallback" and Certificate.from_json(cert.to_json()) == cert

    class Wider(fwer.MultiStart):  # another setting of a built-in procedure keeps its name
        def __init__(self):
            super().__init__(starts=2)

    assert calibrate.certify(np.zeros((100, 3)), [1.0, 0.5, 0.1], delta=0.2, method=Wider()).method == "multistart"


def test_a_missing_version_is_not_named_none():
    data = {**_cert().to_dict(), "surprise": 1}
    del data["version"]
    with pytest.raises(ValueError, match=r"unknown \['surprise'\], missing \['version'\]$"):
        Certificate.from_dict(data)


@pytest.mark.skipif(__import__("sys").platform == "win32", reason="Windows cannot flush a directory")
def test_a_written_certificate_is_flushed_then_renamed_then_its_directory_flushed(tmp_path, monkeypatch):
    import os
    import stat

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))), fsync(fd))[1]
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), replace(a, b))[1])
    _cert().to_json(tmp_path / "cert.json")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]  # the file, its rename, the directory


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import os

    def failing(a, b):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        _cert().to_json(tmp_path / "cert.json")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    """'[Errno 28] No space left on device' named no file (the demo writes twenty)."""
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'cert.json'} \(No space left on device\)") as info:
        _cert().to_json(tmp_path / "cert.json")
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []



def test_an_interrupted_write_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """Ctrl-C (a BaseException, not an Exception) between writing and renaming."""
    import os

    target = tmp_path / "cert.json"
    target.write_text("the previous certificate")

    def interrupted(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cert().to_json(target)
    assert [p.name for p in tmp_path.iterdir()] == ["cert.json"] and target.read_text() == "the previous certificate"


def test_concurrent_writers_and_stale_temporary_files_do_not_collide(tmp_path, monkeypatch):
    import secrets

    from calibrate._atomic import atomic_file

    target = tmp_path / "cert.json"
    with atomic_file(target) as first, atomic_file(target) as second:  # two writers at once: their own names
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the last to finish wins, whole
    stale = tmp_path / ".cert.json.00000000.tmp"  # left by a writer that was killed (SIGKILL)
    stale.write_text("stale")
    names = iter(["00000000", "00000001"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    _cert().to_json(target)  # the taken name is skipped, not overwritten or refused
    assert Certificate.from_json(target) == _cert() and stale.read_text() == "stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cert.json.00000000.tmp", "cert.json"]


@pytest.mark.skipif(__import__("sys").platform == "win32", reason="POSIX permissions and umask")
def test_a_written_certificate_gets_the_mode_the_umask_gives(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        _cert().to_json(tmp_path / "cert.json")
    finally:
        os.umask(old)
    assert (tmp_path / "cert.json").stat().st_mode & 0o777 == 0o640
    os.chmod(tmp_path / "cert.json", 0o600)  # kept private by its owner
    _cert().to_json(tmp_path / "cert.json")
    assert (tmp_path / "cert.json").stat().st_mode & 0o777 == 0o600  # as a plain write keeps it (was 0o644)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts file descriptors through /proc")
def test_writing_certificates_leaves_no_file_descriptor_open(tmp_path):
    import os

    cert = _cert()
    cert.to_json(tmp_path / "warm.json")  # imports and caches opened once
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        cert.to_json(tmp_path / f"cert{i}.json")
    assert len(os.listdir("/proc/self/fd")) == before

def test_tied_lambdas_are_refused():
    """Ties are not strictly decreasing: a grid (0.9, 0.9, 0.7) names one threshold twice."""
    with pytest.raises(ValueError, match="lambdas must be non-empty and strictly decreasing"):
        _cert(lambdas=(0.9, 0.9, 0.7), lambda_hat=None)


def _hoeffding_bentkus_cert():
    losses = (np.random.default_rng(1).random((2000, 8)) < np.linspace(0, 0.3, 8)).astype(float)
    return calibrate.certify(losses, np.linspace(1, 0.3, 8), delta=0.1, epsilon=0.05)


def test_p_values_lowered_even_slightly_below_their_bound_are_refused():
    """The floor a stored p-value is held to is what its risk, n and delta give, less only float slack (1e-9)."""
    cert = _hoeffding_bentkus_cert()
    for factor in (0.6, 1 - 1e-6):
        data = json.loads(cert.to_json())
        data["p_values"][cert.index] *= factor
        with pytest.raises(ValueError, match=r"below the .* hoeffding_bentkus bound gives"):
            Certificate.from_json(json.dumps(data))


def test_a_flag_with_its_p_value_just_above_epsilon_is_named_as_such():
    cert = _hoeffding_bentkus_cert()
    data = json.loads(cert.to_json())
    k = cert.index + 1
    data["certified"][k], data["risks"][k], data["p_values"][k] = True, 0.0, 0.06
    with pytest.raises(ValueError, match=r"is True but its p-value is 0.06, not <= epsilon=0.05"):
        Certificate.from_json(json.dumps(data))


def test_an_unwritable_destination_is_named_not_its_temporary_file(tmp_path):
    """The error named the hidden temporary file ('.x.fa420feb.tmp') the user never typed."""
    missing = tmp_path / "no_dir" / "cert.json"
    with pytest.raises(FileNotFoundError, match=rf"cannot write {missing} \(No such file or directory"):
        _cert().to_json(missing)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway
            pytest.skip("this user can write to a read-only directory")
        with pytest.raises(PermissionError, match=rf"cannot write {locked / 'cert.json'} \(Permission denied"):
            _cert().to_json(locked / "cert.json")
    finally:
        locked.chmod(0o700)


def test_a_certificate_does_not_depend_on_the_order_of_the_examples():
    """The risks were plain means, whose last bit followed the row order (0.31583333333333324 against
    0.3158333333333333 for the same rows): the same calibration set gave two certificates."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        losses = rng.random((40, 3)) * (rng.random((40, 3)) < 0.6)
        made = [
            calibrate.certify(losses[order], [0.9, 0.6, 0.3], delta=0.4, epsilon=0.1).to_dict()
            for order in (np.arange(40), *(rng.permutation(40) for _ in range(5)))
        ]
        assert all(m == made[0] for m in made)

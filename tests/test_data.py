"""The bundled Debian summarisation task: its file, the loader, the splits, the prompt format, the build script."""

import functools
import hashlib
import importlib.util
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from calibrate.data import INSTRUCTION, SPLITS, Task, format_prompt, load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = resources.files("calibrate.data").joinpath("debian_summaries.jsonl")
#: SHA-256 of the bundled file, as recorded in calibrate/data/README.md.
DATA_SHA256 = "32ef20e6a58850b3baf4cdefb7a04548043295623af4052a046887c3d481ccf6"


@functools.cache
def _build_script():
    """scripts/build_data.py as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("build_data", ROOT / "scripts" / "build_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------


def test_jsonl_is_valid_small_and_as_documented():
    raw = DATA.read_bytes()
    assert len(raw) < 1_500_000
    assert hashlib.sha256(raw).hexdigest() == DATA_SHA256
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert len(rows) == 2000
    for row in rows:
        assert set(row) == {"package", "description_md5", "text", "reference"}
        assert all(isinstance(v, str) and v.strip() == v and v for v in row.values())
        assert 30 <= len(row["text"].split()) <= 120
        assert 3 <= len(row["reference"].split()) <= 15
        assert "\n" not in row["reference"]
    packages = [row["package"] for row in rows]
    assert packages == sorted(packages) and len(set(packages)) == len(packages)
    assert len({row["description_md5"] for row in rows}) == len(rows)
    assert len({" ".join(row["reference"].casefold().split()) for row in rows}) == len(rows)


# --------------------------------------------------------------------------------------------------
# load_task
# --------------------------------------------------------------------------------------------------


def test_whole_task_in_file_order():
    task = load_task()
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    assert isinstance(task, Task) and task.split is None and len(task) == 2000
    assert list(task.ids) == [r["package"] for r in rows]
    assert list(task.texts) == [r["text"] for r in rows]
    assert list(task.references) == [r["reference"] for r in rows]
    assert repr(task) == "Task('debian_summaries', split=None, seed=0, n=2000)"


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_splits_are_disjoint_cover_the_task_and_have_documented_sizes(seed):
    whole = load_task()
    parts = {split: load_task(split=split, seed=seed) for split in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [800, 800, 400]
    ids = [set(parts[s].ids) for s in SPLITS]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    assert set().union(*ids) == set(whole.ids)
    position = {package: i for i, package in enumerate(whole.ids)}
    for part in parts.values():
        assert [position[p] for p in part.ids] == sorted(position[p] for p in part.ids)  # file order
        for package, text, reference in zip(part.ids, part.texts, part.references):
            assert whole.texts[position[package]] == text and whole.references[position[package]] == reference


def test_split_is_the_documented_permutation():
    # Re-derive: default_rng(seed).permutation(n), cut at round(0.4 n) and round(0.8 n), each part sorted.
    n, seed = 2000, 7
    perm = np.random.default_rng(seed).permutation(n)
    whole = load_task()
    expected = {"train": perm[:800], "calibration": perm[800:1600], "test": perm[1600:]}
    for split, index in expected.items():
        assert load_task(split=split, seed=seed).ids == tuple(whole.ids[i] for i in np.sort(index))


def test_split_depends_on_the_seed_only():
    assert load_task(split="test", seed=3) == load_task(split="test", seed=3)
    assert load_task(split="test", seed=3).ids != load_task(split="test", seed=4).ids
    # Another interpreter (another hash seed) gives the same split, without importing torch.
    code = (
        "import sys; from calibrate.data import load_task; print(','.join(load_task(split='calibration', seed=5).ids));"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert run.stdout == ",".join(load_task(split="calibration", seed=5).ids) + "\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "cnn_dailymail"}, ValueError, r"name must be one of \['debian_summaries'\], got 'cnn_dailymail'"),
        ({"split": "validation"}, ValueError, r"split must be one of \['train', 'calibration', 'test'\] or None"),
        ({"split": ["train"]}, ValueError, r"split must be one of"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0 .*, got -1"),
        ({"seed": 1.5}, TypeError, "seed must be an int >= 0 .*, got float"),
        ({"seed": True}, TypeError, "got bool"),
    ],
)
def test_load_task_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_task(**kwargs)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def test_plain_prompt():
    assert format_prompt("Text.") == "Summarize in one sentence: Text."
    assert format_prompt("Text.", instruction="Title: ") == "Title: Text."
    task = load_task(split="test")
    assert task.prompts() == [INSTRUCTION + text for text in task.texts]


def test_chat_prompt_uses_the_template():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match="has no chat template"):
        format_prompt("Text.", tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert format_prompt("Text.", tokenizer) == "<|user|>Summarize in one sentence: Text.<|end|><|assistant|>"
    task = load_task(split="test")
    assert task.prompts(tokenizer)[0] == f"<|user|>{INSTRUCTION}{task.texts[0]}<|end|><|assistant|>"


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [("", ValueError, "non-empty"), ("  \n", ValueError, "non-empty"), (None, TypeError, "got NoneType")],
)
def test_format_prompt_rejects_bad_text(text, error, match):
    with pytest.raises(error, match=match):
        format_prompt(text)


# --------------------------------------------------------------------------------------------------
# scripts/build_data.py
# --------------------------------------------------------------------------------------------------

_STANZAS = """\
Package: foo
Description-md5: 11
Description-en: Frobnicate files quickly
 Foo frobnicates files. It is fast
 and small.
 .
 Features:
  * speed
  * size

Package: foo-doc
Description-md5: 11
Description-en: Frobnicate files quickly
 Foo frobnicates files. It is fast
 and small.
"""


def test_build_script_parses_debian_descriptions():
    build = _build_script()
    records = list(build.records(_STANZAS))
    assert [r.package for r in records] == ["foo", "foo-doc"]
    assert records[0].short == "Frobnicate files quickly" and records[0].md5 == "11"
    assert records[0].text == "Foo frobnicates files. It is fast and small.\n\nFeatures:\n* speed\n* size"
    assert records[0].prose_words == 9  # the verbatim list lines are not prose


def test_build_script_skips_near_duplicates():
    build = _build_script()
    base = " ".join(f"word{i}" for i in range(40))

    def make(package, short, text):
        return build.Record(package, package, short, text, len(text.split()))

    candidates = [
        make("a", "First tool", base),
        make("a-dev", "First tool (development files)", base + " This package contains the headers."),
        make("b", "first TOOL", "Something else entirely, " + "other " * 30),  # same synopsis, case folded
        make("c", "Second tool", " ".join(f"term{i}" for i in range(40))),
    ]
    for seed in range(5):
        kept = build.select(candidates, 10, seed)
        assert len({"a", "a-dev"} & {r.package for r in kept}) == 1
        assert len({"a", "b"} & {r.package for r in kept}) <= 1
        assert "c" in {r.package for r in kept}
    assert len(build.select(candidates, 1, 0)) == 1


TRANSLATION = _build_script().DEFAULT_TRANSLATION


@pytest.mark.slow
@pytest.mark.skipif(not TRANSLATION.is_file(), reason="apt has not downloaded bookworm's Translation-en here")
def test_build_script_rebuilds_the_file_byte_for_byte(tmp_path):
    out = tmp_path / "debian_summaries.jsonl"
    assert _build_script().main(["--output", str(out)]) == 0
    assert out.read_bytes() == DATA.read_bytes()

"""Bundled text tasks: read a task's JSON-lines file, split it by a seeded permutation, format prompts."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from calibrate._validation import seed_iv

#: Task name -> file in this package. Each line: {"package", "description_md5", "text", "reference"}.
TASKS = {"debian_summaries": "debian_summaries.jsonl"}

#: Fractions of a task in each split, in permutation order: train 0.4, calibration 0.4, test 0.2.
SPLITS = {"train": 0.4, "calibration": 0.4, "test": 0.2}

#: What :func:`format_prompt` puts before the text.
INSTRUCTION = "Summarize in one sentence: "

_FIELDS = ("package", "description_md5", "text", "reference")


@dataclass(frozen=True)
class Task:
    """Examples of a bundled task: input texts and their human-written references.

    Attributes
    ----------
    name : str
        The task, e.g. ``"debian_summaries"``.
    split : {"train", "calibration", "test"} or None
        The part of the task held; None = all examples.
    seed : int
        Seed of the split permutation (ignored when ``split`` is None).
    ids : tuple of str, shape (n,)
        Example identifiers (for ``debian_summaries``, the Debian package names), unique.
    texts : tuple of str, shape (n,)
        Inputs (the long package descriptions).
    references : tuple of str, shape (n,)
        Target outputs (the packages' one-line synopses).
    """

    name: str
    split: str | None
    seed: int
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    references: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, split={self.split!r}, seed={self.seed}, n={len(self)})"

    def prompts(self, tokenizer=None, *, instruction: str = INSTRUCTION) -> list[str]:
        """The texts as prompts, :func:`format_prompt` applied to each.

        Parameters
        ----------
        tokenizer : transformers.PreTrainedTokenizerBase, optional
            A tokenizer with a chat template; without one the prompts are ``instruction + text``.
        instruction : str, default="Summarize in one sentence: "
            Put before each text.

        Returns
        -------
        list of str, shape (n,)
        """
        return [format_prompt(text, tokenizer, instruction=instruction) for text in self.texts]


def load_task(name: str = "debian_summaries", split: str | None = None, *, seed: int = 0) -> Task:
    """Load a task bundled with the package, whole or one of its train / calibration / test splits.

    Parameters
    ----------
    name : {"debian_summaries"}, default="debian_summaries"
        The task. ``debian_summaries``: 2,000 English Debian package descriptions (30-120 words) and
        their one-line synopses (3-15 words), from Debian 12 (see ``calibrate/data/README.md``).
    split : {"train", "calibration", "test"} or None, default=None
        Which part; None = every example, in file order.
    seed : int, default=0
        Seed of the split permutation; the same seed always gives the same split.

    Returns
    -------
    Task
        ``ids``, ``texts`` and ``references`` of the examples of ``split``, in file order.

    Raises
    ------
    ValueError
        When ``name`` or ``split`` is not one of the allowed values, ``seed`` is negative, or the task
        file is malformed (the message names the line).
    TypeError
        When ``seed`` is not an integer.

    Notes
    -----
    The examples are permuted with ``numpy.random.default_rng(seed).permutation(n)``; the train split takes
    the first ``round(0.4 n)``, calibration the next ``round(0.8 n) - round(0.4 n)``, test the rest (for
    ``debian_summaries``: 800 / 800 / 400), each kept in file order. The splits are disjoint and cover the
    task, and the scheme is that of :meth:`calibrate.LayerCache.split` with fractions ``[0.4, 0.4, 0.2]``.
    The guarantee of :func:`calibrate.fit` needs calibration examples exchangeable with those the model
    will see and untouched by anything chosen or trained before (thresholds, exit heads, measures): train
    on ``"train"``, calibrate on ``"calibration"``, audit on ``"test"``, with one seed throughout.

    Examples
    --------
    >>> from calibrate.data import load_task
    >>> task = load_task("debian_summaries", "test", seed=0)
    >>> task
    Task('debian_summaries', split='test', seed=0, n=400)
    >>> len(load_task(split="train")), len(load_task(split="calibration")), len(load_task())
    (800, 800, 2000)
    """
    name, split, seed = _load_task_iv(name, split, seed)
    rows = _read(name)
    if split is None:
        index = np.arange(len(rows))
    else:
        index = _split_indices(len(rows), seed)[split]
    picked = [rows[i] for i in index]
    return Task(
        name=name,
        split=split,
        seed=seed,
        ids=tuple(r["package"] for r in picked),
        texts=tuple(r["text"] for r in picked),
        references=tuple(r["reference"] for r in picked),
    )


def format_prompt(text: str, tokenizer=None, *, instruction: str = INSTRUCTION) -> str:
    """Turn a text into a summarisation prompt, in the tokenizer's chat format when one is given.

    Parameters
    ----------
    text : str
        The text to summarise, non-empty.
    tokenizer : transformers.PreTrainedTokenizerBase, optional
        A tokenizer with a chat template. The prompt is then ``tokenizer.apply_chat_template([{"role":
        "user", "content": instruction + text}], tokenize=False, add_generation_prompt=True)``: the
        template's own special tokens and default system prompt, ending where the assistant's answer
        starts. :func:`calibrate.extract` and decoded mode tokenise it with the tokenizer's special tokens but
        no second BOS where the template wrote one (SmolLM2's tokenizer adds none).
    instruction : str, default="Summarize in one sentence: "
        Put before the text.

    Returns
    -------
    str
        The prompt; ``instruction + text`` without a tokenizer.

    Raises
    ------
    TypeError
        When ``text`` or ``instruction`` is not a str.
    ValueError
        When ``text`` is empty or the tokenizer has no chat template.

    Examples
    --------
    >>> from calibrate.data import format_prompt
    >>> format_prompt("A game of ancient warfare.")
    'Summarize in one sentence: A game of ancient warfare.'
    """
    if not isinstance(text, str) or not isinstance(instruction, str):
        raise TypeError(f"text and instruction must be str, got {type(text).__name__} and {type(instruction).__name__}")
    if not text.strip():
        raise ValueError("text must be a non-empty string")
    content = instruction + text
    if tokenizer is None:
        return content
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; pass tokenizer=None for plain prompts"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def _load_task_iv(name, split, seed) -> tuple[str, str | None, int]:
    """Validate the arguments of :func:`load_task`."""
    if name not in TASKS:
        raise ValueError(f"name must be one of {sorted(TASKS)}, got {name!r}")
    if split is not None and (not isinstance(split, str) or split not in SPLITS):
        raise ValueError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
    return name, split, seed_iv(seed)


def _split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
    """Sorted example indices of each split of ``n`` examples, from a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.rint(np.cumsum(list(SPLITS.values())) * n).astype(np.int64)
    parts = np.split(perm, cuts[:-1])
    return {split: np.sort(part) for split, part in zip(SPLITS, parts)}


@functools.cache
def _read(name: str) -> tuple[dict[str, str], ...]:
    """Parse and check a task file (cached: the rows are never mutated)."""
    path = resources.files(__package__).joinpath(TASKS[name])
    rows = []
    seen = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{TASKS[name]} line {number} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) or not row[k].strip() for k in _FIELDS):
            raise ValueError(f"{TASKS[name]} line {number} needs non-empty string fields {list(_FIELDS)}")
        if row["package"] in seen:
            raise ValueError(f"{TASKS[name]} line {number} repeats package {row['package']!r}")
        seen.add(row["package"])
        rows.append(row)
    return tuple(rows)

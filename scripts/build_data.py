"""Build ``calibrate/data/debian_summaries.jsonl`` from Debian's English package descriptions.

Each Debian package has a one-line synopsis (the short description, written by a person) and a long
description of a few paragraphs. This script turns them into a small summarisation task, long description
-> synopsis, read by :func:`calibrate.data.load_task`. It uses only what apt already downloaded:

    apt-get update -o Acquire::Languages=en    # fetches main/i18n/Translation-en and InRelease
    python scripts/build_data.py               # reads them from /var/lib/apt/lists

The default input is Debian 12 "bookworm" ``main/i18n/Translation-en`` as stored by apt (lz4-compressed,
read with ``/usr/lib/apt/apt-helper cat-file``, which ships with apt); its SHA-256 is checked against the
release's ``InRelease`` (whose signature apt verified when it downloaded both), so the same release gives
the same file byte for byte. Plain, ``.xz``, ``.gz`` and ``.bz2`` files are read too
(``--translation``, e.g. ``Translation-en.xz`` from a Debian mirror).

Selection, in order (counts are printed):

1. one record per distinct description (``Description-md5``; sibling packages share descriptions);
2. no transitional, dummy or empty packages (the words "transitional", "dummy" or "empty package");
3. English prose: at most 1% non-ASCII characters; of the long description's word tokens (``\\w+``), at least
   8% common English function words and at least 60% in flowed (non-verbatim) lines;
4. lengths: the long description has 30-120 words, the synopsis 3-15 words (split on whitespace);
5. in an order shuffled with ``random.Random(SEED)``, keep a candidate unless its synopsis equals (case
   folded) a kept one's or its long description shares at least half of its word trigrams with a kept
   one's (overlap coefficient ``|A & B| / min(|A|, |B|) >= 0.5``; catches the ``libfoo``/``libfoo-dev``
   families that repeat one description with a different last paragraph), until ``N_EXAMPLES`` are kept.

Output: one JSON object per line, sorted by package name, with ``package``, ``description_md5``, ``text``
(the long description as plain text: paragraphs separated by a blank line, verbatim lines such as list
items on lines of their own) and ``reference`` (the synopsis).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEED = 20251125
N_EXAMPLES = 2000
LONG_WORDS = (30, 120)
SHORT_WORDS = (3, 15)
MAX_NON_ASCII = 0.01
MIN_FUNCTION_WORDS = 0.08
MIN_PROSE_WORDS = 0.6
MAX_TRIGRAM_OVERLAP = 0.5

LISTS = Path("/var/lib/apt/lists")


def _apt_list(suffix: str) -> Path:
    """The file apt keeps for ``suffix`` (its name starts with the archive's address, whatever that is)."""
    found = sorted(LISTS.glob(f"*_{suffix}"))
    return found[0] if found else LISTS / f"MISSING_{suffix}"


DEFAULT_TRANSLATION = _apt_list("dists_bookworm_main_i18n_Translation-en.lz4")
DEFAULT_RELEASE = _apt_list("dists_bookworm_InRelease")
INDEX_NAME = "main/i18n/Translation-en"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "calibrate" / "data" / "debian_summaries.jsonl"

#: Common English words: at least MIN_FUNCTION_WORDS of a description's words must be among them.
# fmt: off
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "of", "and", "or", "to", "in", "on", "for", "with", "from", "by", "as", "at", "is",
    "are", "be", "it", "its", "this", "that", "these", "which", "can", "you", "your", "not", "all", "also",
    "into", "than", "when", "other", "such"
})
# fmt: on
EXCLUDE = re.compile(r"\b(transitional|dummy|empty package)\b", re.IGNORECASE)
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Record:
    """One package's description: synopsis, long text, and how much of it is flowed prose."""

    package: str
    md5: str
    short: str
    text: str
    prose_words: int


def read_index(path: Path) -> bytes:
    """Return the uncompressed bytes of an apt index file (plain, .lz4, .xz, .gz or .bz2)."""
    if path.suffix == ".lz4":
        return subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", str(path)], check=True, capture_output=True
        ).stdout
    openers = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
    with openers.get(path.suffix, open)(path, "rb") as fh:
        return fh.read()


def release_info(path: Path) -> tuple[dict[str, str], str]:
    """Return the header fields of an ``InRelease`` file and the SHA-256 it lists for ``INDEX_NAME``."""
    fields: dict[str, str] = {}
    digest = None
    in_sha256 = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(" ") and in_sha256:
            value, _size, name = line.split()
            if name == INDEX_NAME:
                digest = value
        elif ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
            in_sha256 = key == "SHA256"
    if digest is None:
        raise ValueError(f"{path} lists no SHA256 for {INDEX_NAME}")
    return fields, digest


def records(text: str) -> Iterator[Record]:
    """Parse a ``Translation-en`` file (deb822 stanzas) into records, in file order."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        body: list[str] = []
        for line in stanza.split("\n"):
            if line.startswith(" "):
                body.append(line)
            elif line:
                key, _, value = line.partition(": ")
                fields[key] = value
        if "Package" in fields and "Description-en" in fields:
            text_, prose = _render(body)
            yield Record(fields["Package"], fields["Description-md5"], fields["Description-en"].strip(), text_, prose)


def _render(body: list[str]) -> tuple[str, int]:
    """Render a long description as plain text; also return its number of words (``WORD``) in flowed lines.

    Debian policy 5.6.13: a line " ." separates paragraphs, a line starting with one space is flowed
    prose, a line starting with two or more spaces is shown verbatim (lists, code).
    """
    paragraphs: list[list[str]] = [[]]
    prose_words = 0
    for line in body:
        if line.strip() == ".":
            paragraphs.append([])
        elif line.startswith("  "):
            paragraphs[-1].append("\n" + line.strip())
        else:
            prose_words += len(WORD.findall(line))
            paragraphs[-1].append(" ".join(line.split()))
    rendered = []
    for parts in paragraphs:
        paragraph = ""
        for part in parts:
            paragraph += part if part.startswith("\n") or not paragraph else " " + part
        if paragraph.strip():
            rendered.append(paragraph.strip("\n"))
    return "\n\n".join(rendered), prose_words


def is_english_prose(record: Record) -> bool:
    """True when the long description looks like English prose (see the module docstring, step 3)."""
    chars = record.text + record.short
    if sum(ord(c) > 127 for c in chars) > MAX_NON_ASCII * len(chars):
        return False
    words = WORD.findall(record.text.lower())
    function = sum(w in FUNCTION_WORDS for w in words)
    return function >= MIN_FUNCTION_WORDS * len(words) and record.prose_words >= MIN_PROSE_WORDS * len(words)


def trigrams(text: str) -> frozenset[tuple[str, ...]]:
    """Word (``WORD``) trigrams of the case-folded text."""
    words = WORD.findall(text.casefold())
    return frozenset(zip(words, words[1:], words[2:]))


def select(candidates: list[Record], n: int, seed: int) -> list[Record]:
    """Keep up to ``n`` candidates in a seeded order, skipping near-duplicates of those already kept."""
    order = list(candidates)
    random.Random(seed).shuffle(order)
    kept: list[Record] = []
    kept_shorts: set[str] = set()
    kept_grams: list[frozenset] = []
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for record in order:
        if len(kept) == n:
            break
        short = " ".join(record.short.casefold().split())
        grams = trigrams(record.text)
        if short in kept_shorts or not grams:
            continue
        shared = Counter(j for g in grams for j in index.get(g, ()))
        if any(count >= MAX_TRIGRAM_OVERLAP * min(len(grams), len(kept_grams[j])) for j, count in shared.items()):
            continue
        for g in grams:
            index[g].append(len(kept))
        kept.append(record)
        kept_shorts.add(short)
        kept_grams.append(grams)
    return kept


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--translation", type=Path, default=DEFAULT_TRANSLATION, help="Translation-en file")
    parser.add_argument(
        "--release", type=Path, default=DEFAULT_RELEASE, help="InRelease of that suite ('none' skips the check)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--n", type=int, default=N_EXAMPLES, help="examples to keep")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    raw = read_index(args.translation)
    digest = hashlib.sha256(raw).hexdigest()
    print(f"input: {args.translation} ({len(raw):,} bytes uncompressed, SHA-256 {digest})")
    if str(args.release) != "none":
        fields, expected = release_info(args.release)
        if digest != expected:
            raise SystemExit(f"SHA-256 of {args.translation} is {digest}; {args.release} lists {expected}")
        release = ", ".join(f"{k} {fields[k]}" for k in ("Origin", "Codename", "Suite", "Version", "Date"))
        print(f"release: {release}; checksum matches {args.release.name}")

    all_records = list(records(raw.decode("utf-8")))
    seen: set[str] = set()
    unique = [r for r in all_records if not (r.md5 in seen or seen.add(r.md5))]
    kept = [r for r in unique if not EXCLUDE.search(r.short + "\n" + r.text)]
    english = [r for r in kept if is_english_prose(r)]
    sized = [
        r
        for r in english
        if LONG_WORDS[0] <= len(r.text.split()) <= LONG_WORDS[1]
        and SHORT_WORDS[0] <= len(r.short.split()) <= SHORT_WORDS[1]
    ]
    chosen = sorted(select(sized, args.n, args.seed), key=lambda r: r.package)
    print(
        f"records {len(all_records):,}; distinct descriptions {len(unique):,}; not transitional/dummy {len(kept):,}; "
        f"English prose {len(english):,}; lengths in range {len(sized):,}; selected {len(chosen):,} (seed {args.seed})"
    )
    if len(chosen) < args.n:
        print(f"warning: only {len(chosen)} examples pass the filters, fewer than --n {args.n}", file=sys.stderr)

    lines = [
        json.dumps(
            {"package": r.package, "description_md5": r.md5, "text": r.text, "reference": r.short}, ensure_ascii=False
        )
        for r in chosen
    ]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"output: {args.output} ({len(data):,} bytes, SHA-256 {hashlib.sha256(data).hexdigest()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line: ``calibrate fit | audit | extract | lat-fit | fff-fit | synthetic | demo``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from calibrate._cli_commands import (
    _cmd_audit,
    _cmd_demo,
    _cmd_extract,
    _cmd_fff_fit,
    _cmd_fit,
    _cmd_lat_fit,
    _cmd_synthetic,
)

__all__ = ["main"]


_BOUND_HELP = "p-value bound (default hoeffding_bentkus)"
_DEVICE_HELP = "torch device of the model, e.g. cuda (default cpu)"
_DTYPE_HELP = "torch dtype of the model's weights, e.g. bfloat16 (default: as saved)"


_TOKENIZER_HELP = (
    "textual consistencies: decode the token ids with the tokenizer saved in DIR (save_pretrained), special tokens "
    "skipped; needed when the cache's vocab pieces, joined, do not give its output texts (or split characters)"
)


def _count(text: str) -> int:
    """``argparse`` type of a count flag (tokens, prompts, sequences, ...): an int >= 1, or a usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


_count.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"


def _add_risk_options(p: argparse.ArgumentParser) -> None:
    """``--delta`` and ``--epsilon``, with the library's defaults."""
    p.add_argument("--delta", type=float, default=0.1, help="tolerance on the loss, in (0, 1) (default %(default)s)")
    p.add_argument("--epsilon", type=float, default=0.05, help="failure probability, in (0, 1) (default %(default)s)")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    from calibrate.bounds import P_VALUES
    from calibrate.fit import METHODS
    from calibrate.losses import CONSISTENCIES
    from measures.confidence import MEASURES
    from measures.learned import LEARNED_MEASURES

    _add_risk_options(p)
    p.add_argument(
        "--measure", default="softmax_gap", metavar="MEASURE",
        help=f"confidence measure: {', '.join((*MEASURES, *LEARNED_MEASURES))}, or the name of a score the cache "
        "stores (default softmax_gap)",
    )
    p.add_argument(
        "--consistency", default="token", choices=CONSISTENCIES, help="loss of the early output (default token)"
    )
    p.add_argument(
        "--bound", default=None, choices=tuple(P_VALUES),
        help="p-value bound (default hoeffding_bentkus; none with --method crc, which uses no p-value)",
    )
    p.add_argument(
        "--method", default="fixed_sequence", choices=METHODS,
        help="family-wise error control over the thresholds (default fixed_sequence)",
    )
    p.add_argument(
        "--decay", type=float, default=None, metavar="TAU", help="decaying threshold with rate TAU (CALM: 4)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a learned measure's train split (default 0)")
    p.add_argument(
        "--measure-options", type=_json_object, default=None, metavar="JSON",
        help="a learned measure's estimator options as a JSON object, e.g. '{\"max_iter\": 1000}'",
    )


def _json_object(text: str) -> dict:
    """``--measure-options``: a JSON object (argparse reports the ValueError as an invalid value)."""
    from calibrate._validation import parse_json

    try:
        value = parse_json(text, f"{text!r:.60}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from calibrate import __version__
    from calibrate.bounds import P_VALUES
    from calibrate.losses import CONSISTENCIES

    parser = argparse.ArgumentParser(prog="calibrate", description="Certified early-exit thresholds (calm-calibrate).")
    parser.add_argument("--version", action="version", version=f"calm-calibrate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="certify a threshold from a layer cache")
    p.add_argument("cache", help="layer cache directory or fsspec URL (memory://, s3:// with s3fs, ...)")
    _add_fit_options(p)
    p.add_argument("--chunks", type=_count, default=None, help="open lazily, this many sequences per Dask task")
    p.add_argument(
        "--scheduler", default=None, help="Dask scheduler address (tcp://host:port): run the tasks on that cluster"
    )
    p.add_argument("-o", "--output", help="write the certificate as JSON")
    p.add_argument("--tokenizer", metavar="DIR", help=_TOKENIZER_HELP)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser(
        "audit", help="check a certificate on a held-out cache, prompts or inputs (exit 1 if risk > delta)",
        description="Check a certificate on held-out data; exit status 1 if the held-out risk exceeds delta. "
        "exit_threshold: a layer cache (proxy losses), or --model DIR --prompts FILE (decoded by the runtime; add "
        "--adapters FILE for a certificate calibrated with exit adapters); token_keep: --model DIR --prompts FILE; "
        "fff_depth: --model FILE --inputs FILE, or --model DIR --blocks DIR --prompts FILE"
    )
    p.add_argument("certificate", help="certificate JSON")
    p.add_argument(
        "cache", nargs="?", help="held-out layer cache directory or fsspec URL (exit-threshold certificates)"
    )
    p.add_argument("--figure", help="write the risk figure (PNG)")
    p.add_argument("--tokenizer", metavar="DIR", help="with a CACHE: " + _TOKENIZER_HELP)
    p.add_argument(
        "--model",
        help="exit_threshold and token_keep: model directory (save_pretrained) to decode with; fff_depth: FFF file, or "
        "with --blocks the language model's directory",
    )
    p.add_argument("--blocks", help="fff_depth certificates of a language model: its FFF blocks (fff.save_blocks)")
    p.add_argument(
        "--adapters",
        help="exit_threshold certificates calibrated with exit adapters: their file (calibrate.adapters.save_adapters; "
        "the demo writes adapters.safetensors), decoded through them",
    )
    p.add_argument("--prompts", help="with --model: held-out prompts to decode, one per line or JSONL")
    p.add_argument(
        "--max-new-tokens", type=_count, default=None,
        help="when decoding: tokens per prompt (default: the certificate's max_new_tokens, else 32)",
    )
    p.add_argument(
        "--batch-size", type=_count, default=None, help="prompts (default 8) or inputs (default 1024) per forward pass"
    )
    p.add_argument("--device", default=None, help="torch device of the model (when decoding or running an FFF)")
    p.add_argument("--dtype", default=None, help="torch dtype of the model's weights, e.g. bfloat16")
    p.add_argument("--inputs", help="fff_depth certificates: held-out inputs (.npy, n x in_features)")
    p.add_argument("--references", help="fff_depth certificates with risk_label: reference labels (.npy)")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("extract", help="run a local Hugging Face model over prompts and write a layer cache")
    p.add_argument("--model", required=True, help="directory written by save_pretrained (model and tokenizer)")
    p.add_argument("--prompts", required=True, help="one prompt per line, or JSONL with 'prompt' and 'reference'")
    p.add_argument(
        "-o", "--output", required=True, help="cache directory to write, or an fsspec URL (with a local --shard-dir)"
    )
    p.add_argument("--max-new-tokens", type=_count, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--batch-size", type=_count, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--top-k", type=_count, default=8, help="log-probabilities kept per layer and token (default 8)")
    p.add_argument(
        "--store-hidden",
        action="store_true",
        help="store float16 hidden states (the halting measures and retrained adapters need them)",
    )
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="extract the I-th (0-based) of N slices of the prompts into OUTPUT/shard-...; OUTPUT/manifest.json "
        "joins them (default under torchrun: RANK/WORLD_SIZE)",
    )
    p.add_argument(
        "--shard-dir", default=None,
        help="local directory where each batch is saved as it completes; rerunning resumes from it",
    )
    p.add_argument("--keep-shards", action="store_true", help="keep --shard-dir after the cache is written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("lat-fit", help="certify a token-elimination speed-up by decoding prompts (decoded mode)")
    p.add_argument("--model", required=True, help="directory written by save_pretrained (model and tokenizer)")
    p.add_argument("--prompts", required=True, help="one prompt per line, or JSONL with 'prompt' and 'reference'")
    p.add_argument(
        "--speedups",
        type=float,
        nargs="+",
        default=None,
        help="grid of predicted prefill speed-ups, increasing (default 1 1.1 1.25 1.5 1.75 2 2.5 3 4)",
    )
    _add_risk_options(p)
    p.add_argument(
        "--consistency",
        default=None,
        choices=(*CONSISTENCIES, "label", "risk_label"),
        help="loss (default: token for generators, label for classifiers)",
    )
    p.add_argument("--bound", default=None, choices=tuple(P_VALUES), help=_BOUND_HELP)
    p.add_argument("--score", default="attention", help="contribution score: attention (default) or value")
    p.add_argument(
        "--max-new-tokens", type=_count, default=None, help="generators: tokens decoded per prompt (default 32)"
    )
    p.add_argument("--batch-size", type=_count, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    p.add_argument("-o", "--output", help="write the certificate as JSON")
    p.set_defaults(func=_cmd_lat_fit)

    p = sub.add_parser(
        "fff-fit",
        help="certify the evaluation depth of an FFF classifier on inputs, or of a language model's FFF blocks by "
        "decoding prompts",
    )
    p.add_argument(
        "--model",
        required=True,
        help="FFF layer file (calibrate.fff.FFF.save), or with --blocks a model directory (save_pretrained)",
    )
    p.add_argument("--inputs", help="classifier: calibration inputs, .npy array (n, in_features)")
    p.add_argument("--references", help="classifier: reference labels (.npy ints), risk_label instead of label")
    p.add_argument("--blocks", help="language model: directory of its FFF blocks (calibrate.fff.save_blocks)")
    p.add_argument("--prompts", help="language model: calibration prompts, one per line or JSONL with 'reference'")
    p.add_argument(
        "--consistency", default=None, choices=CONSISTENCIES, help="language model: the loss (default token)"
    )
    p.add_argument(
        "--max-new-tokens", type=_count, default=None, help="language model: tokens decoded per prompt (default 32)"
    )
    p.add_argument(
        "--batch-size", type=_count, default=None, help="inputs (default 1024) or prompts (default 8) per forward pass"
    )
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    _add_risk_options(p)
    p.add_argument("--bound", default=None, choices=tuple(P_VALUES), help=_BOUND_HELP)
    p.add_argument("-o", "--output", help="write the certificate as JSON")
    p.set_defaults(func=_cmd_fff_fit)

    p = sub.add_parser("synthetic", help="write a synthetic layer cache")
    p.add_argument("-o", "--output", required=True, help="cache directory to write")
    p.add_argument("--sequences", type=_count, default=500, help="sequences in the cache (default 500)")
    p.add_argument("--layers", type=_count, default=12, help="layers per token (default 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(func=_cmd_synthetic)

    p = sub.add_parser("demo", help="the whole path on the built-in default (SmolLM2 if installed, else synthetic)")
    p.add_argument(
        "--out", default="demo_out",
        help="output directory (default demo_out): new, empty, or an earlier demo's, whose files are replaced",
    )
    p.add_argument(
        "--synthetic", action="store_true", help="use the synthetic cache even if the real model is installed"
    )
    p.add_argument("--sequences", type=_count, default=2000, help="synthetic: sequences in the cache (default 2000)")
    p.add_argument(
        "--trials", type=_count, default=50, help="synthetic: random splits in the validity study (default 50)"
    )
    p.add_argument(
        "--train", type=_count, default=48, help="real model: prompts for fitting the exit adapters (default 48)"
    )
    p.add_argument("--cal", type=_count, default=128, help="real model: calibration prompts (default 128)")
    p.add_argument(
        "--test", type=_count, default=32, help="real model: held-out prompts, audit and timed decoding (default 32)"
    )
    p.add_argument(
        "--max-new-tokens", type=_count, default=16, help="real model: tokens generated per prompt (default 16)"
    )
    _add_risk_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the data splits (default 0)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``calibrate`` command; returns the exit status.

    0: done (``audit``: risk within delta); 1: ``audit`` found the risk above delta; 2: invalid input or a
    file that cannot be read or written; 130: interrupted (Ctrl-C); 141: standard output was closed before
    the summary was printed (``calibrate fit ... | head -1``; fit, audit, synthetic and extract write their output
    files first, the demo stops where it was).

    Parameters
    ----------
    argv : list of str, optional
        The command line after the program name, e.g. ``["fit", "cache/", "--delta", "0.1"]``; default
        ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0, 1, 2, 130 or 141 as above. Errors and warnings are printed to standard error, one
        line each, prefixed with ``calibrate <command>:``.

    Raises
    ------
    SystemExit
        From :mod:`argparse`: status 2 for a command line it cannot parse (after printing the usage), 0 for
        ``--help`` and ``--version``.
    """
    args = _parser().parse_args(argv)
    prefix = f"calibrate {args.command}"

    def show(message, category, filename, lineno, file=None, line=None):  # one line, without source paths
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            status = args.func(args)
            if sys.stdout is not None:  # None: started with standard output closed (>&-); print() writes nothing
                sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at exit
            return status
        except BrokenPipeError:  # the reader went away; outputs are written before anything is printed
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
            return 141  # 128 + SIGPIPE, as a shell reports a writer killed by a closed pipe
        # OSError: missing, existing or unwritable files; ImportError: an extra that is not installed
        except (ValueError, TypeError, OSError, ImportError) as exc:
            print(f"{prefix}: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
            return 2
        except KeyboardInterrupt:
            print(
                f"{prefix}: interrupted; files are written whole or not at all (extract resumes from its finished "
                "batches when rerun)",
                file=sys.stderr,
            )
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

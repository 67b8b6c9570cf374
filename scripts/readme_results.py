"""Write the demo's results table into README.md, between the markers ``<!-- demo-results:start/end -->``.

Run ``calibrate demo`` first (it writes ``demo_out/summary.json``), then
``python scripts/readme_results.py [demo_out/summary.json] [README.md]``. The table is generated, never
typed by hand: per confidence measure, the certified lambda, calibration and held-out risk, average exit
layers (simulated and decoded), and the measured decoding speed-up with its decoded loss.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def _cell(value, fmt: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return (
        format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    ) + suffix


def _risk_cell(value) -> str:
    """A risk or loss as the demo prints it: three decimals, never below the value (calibrate._format.level)."""
    from calibrate._format import level

    return _cell(value, ".3f") if value is None or value != value else level(value, ".3f")


def results_markdown(summary: dict) -> str:
    """The README block for a demo summary (``demo_out/summary.json``)."""
    settings = (
        f"{summary['model']}, {summary['n_cal']} calibration / {summary['n_test']} held-out prompts "
        f"({summary['max_new_tokens']} new tokens), exit adapters fitted on {summary['n_train']} train prompts; "
        f"delta = {summary['delta']:g} on the {summary['consistency']} loss against the full model, "
        f"epsilon = {summary['epsilon']:g}; decoding at batch {summary['batch_size']} on {summary['threads']} "
        "CPU threads."
    )
    header = (
        "| measure | certified λ̂ | calibration risk | held-out risk | within δ | avg layers (held-out) "
        "| decoded exit layer | speed-up (tokens/s) | decoded loss |"
    )
    lines = [settings, "", header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["table"]:
        lines.append(
            f"| {row['measure']} | {row['lambda_hat']} | {_risk_cell(row['cal_risk'])} | "
            f"{_risk_cell(row['test_risk'])} | {'yes' if row['within_delta'] else 'no'} | "
            f"{_cell(row['avg_layers'], '.1f')} | {_cell(row.get('decoded_exit_layer'), '.1f')} | "
            f"{_cell(row.get('speedup'), '.2f', 'x')} | {_risk_cell(row.get('decoded_loss'))} |"
        )
    plain, adapted = summary["agreement_plain"], summary["agreement_adapters"]
    layers = [i for i in (10, 20, 25, 28) if i < len(plain)]
    lines += [
        "",
        "Agreement of layer i's prediction with the full model, plain head (train prompts) → fitted adapters "
        "(calibration prompts): "
        + ", ".join(f"layer {i} {plain[i - 1]:.0%} → {adapted[i - 1]:.0%}" for i in layers)
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    summary_path = Path(args[0] if args else "demo_out/summary.json")
    readme = Path(args[1] if len(args) > 1 else Path(__file__).resolve().parents[1] / "README.md")
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    block = results_markdown(json.loads(summary_path.read_text(encoding="utf-8")))
    head, rest = text.split(START, 1)
    new = f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}"
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, readme)
    print(f"updated {readme} from {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

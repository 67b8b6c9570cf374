"""Generated tokens/s of the early-exit runtime next to Hugging Face greedy ``generate``, same batch size.

Model: random weights with SmolLM2-135M's shape (LlamaConfig: 30 layers, d=576, MLP 1536, 9 heads,
3 KV heads, vocabulary 49,152, tied embeddings), so nothing is downloaded; speed does not depend on the
weights. Every run generates exactly ``--new`` tokens per row (no EOS) after a ``--prompt``-token prompt;
tokens/s counts generated tokens over the whole call (prompt pass included), best of ``--repeat``
rounds in which every row of a batch size runs in turn (after one untimed warm-up call each).

Rows printed per batch size:

* ``hf``                 -- ``model.generate(do_sample=False)``, the baseline;
* ``runtime full``       -- our loop without a certificate (its overhead over Hugging Face); it must emit
  the tokens of ``hf`` (asserted);
* ``exit@k``             -- every token exits at layer k (``exit_layer=k``; the first token comes from
  the prompt pass, which runs every layer), state propagation for the skipped layers;
* ``sat lam=1`` / ``softmax_gap lam=1`` -- a certificate at which no token exits (no confidence of this random
  model reaches 1; asserted): every layer evaluates the
  measure, so the gap to ``runtime full`` is the **measure overhead** (saturation: O(d); softmax: the
  vocabulary-sized head at every layer);
* ``sat lam=x``          -- a saturation threshold (mixed exits; mean exit layer shown).

``speed-up`` = tokens/s over Hugging Face's; ``ideal`` = the cost-model ratio (DESIGN section 13):
full cost over early-exit cost per token, in multiply-accumulates, counting the layers run, the LM head
(for SmolLM2 the head is ~8 layers), the K/V projections of state propagation and, for the softmax
measure, one head per layer tried (the exit layer's logits are emitted as they are); a row's first token
costs every layer on both sides (the prompt pass);
``achieved/ideal`` = speed-up over ideal.

Run: ``python benchmarks/runtime.py [--batch 1 8] [--new 32] [--prompt 32] [--threads 2] [--device cpu]``.
"""

from __future__ import annotations

import argparse

import torch
from timing import device_arg, positive_int, side_by_side

from calibrate.certificate import Certificate
from calibrate.runtime import generate


def smollm2_like(device: str, dtype: torch.dtype = torch.float32, **overrides):
    """Random weights with SmolLM2-135M's configuration (context 8192, as the real model).

    ``overrides`` replace entries of the configuration (the tests build a small one of the same kind).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def macs(config) -> dict[str, float]:
    """Multiply-accumulates per token: one layer, the head, one layer's K/V projections (propagation)."""
    d, f = config.hidden_size, config.intermediate_size
    hd = d // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    layer = 2 * d * d + 2 * d * kv + 3 * d * f  # q, o; k, v; gate, up, down (attention scores ignored)
    return {"layer": layer, "head": d * config.vocab_size, "kv": 2 * d * kv}


def ideal_ratio(exit_layers: torch.Tensor, cost: dict[str, float], n_layers: int, softmax: bool) -> float:
    """Full-model cost over early-exit cost, summed over the generated tokens ``exit_layers`` (B, N).

    A token that exits at layer ``e`` runs ``e`` layers, propagates keys and values through the other
    ``L - e`` and calls the head once; with the softmax measure the head runs at every layer it tests
    (``1 .. min(e, L - 1)``), the exit layer's logits are emitted as they are and a token that reaches
    layer ``L`` adds the last head: ``e`` head calls either way. A row's first token comes from the prompt
    pass, which runs every layer on both sides: it costs ``L`` layers and its head calls (the prompt's
    other positions, the same work on both sides, are left out, as are attention scores).

    At batch > 1 this counts work (what a layer costs grows with its active rows, as on a CPU), not steps: on
    a GPU, where a layer call on one row costs about what it costs on eight, a step costs about its slowest
    row, so the ratio reachable there is lower (for the saturation row at batch 8, 2.11 instead of 2.19).
    """
    e = exit_layers.double()  # 0: after the row's EOS, no token
    heads = e if softmax else (e > 0).double()
    early = e * cost["layer"] + (n_layers - e) * cost["kv"] + heads * cost["head"]
    early[:, 0] = (e[:, 0] > 0) * n_layers * cost["layer"] + heads[:, 0] * cost["head"]
    full = (e > 0).sum() * (n_layers * cost["layer"] + cost["head"])
    return float(full / early[e > 0].sum())


def certificate(lam: float, measure: str, n_layers: int) -> Certificate:
    return Certificate(
        lambda_hat=lam, delta=0.1, epsilon=0.05, n=1, lambdas=(lam,), risks=(0.0,), p_values=(0.0,),
        certified=(True,), bound="hoeffding_bentkus", method="fixed_sequence", mode="user",
        measure=measure, n_layers=n_layers,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=positive_int, default=32, help="generated tokens per row")
    parser.add_argument("--prompt", type=positive_int, default=32, help="prompt tokens per row")
    parser.add_argument("--repeat", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--exits", type=positive_int, nargs="+", default=[8, 15])
    parser.add_argument("--sat", type=float, default=0.9, help="saturation threshold of the mixed-exit row")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = smollm2_like(args.device, getattr(torch, args.dtype))
    L = model.config.num_hidden_layers
    cost = macs(model.config)
    print(
        f"SmolLM2-shaped random model on {args.device} ({args.dtype}, {torch.get_num_threads()} threads): "
        f"layer {cost['layer'] / 1e6:.2f} M MAC, head {cost['head'] / 1e6:.1f} M MAC "
        f"(= {cost['head'] / cost['layer']:.1f} layers), propagation {cost['kv'] / 1e6:.2f} M MAC per skipped layer; "
        f"prompt {args.prompt}, new {args.new}"
    )
    g = torch.Generator().manual_seed(1)
    for batch in args.batch:
        ids = torch.randint(2, model.config.vocab_size, (batch, args.prompt), generator=g).to(args.device)
        mask = torch.ones_like(ids)
        n_tokens = batch * args.new

        def hf(ids=ids, mask=mask):
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new)

        def ours(ids=ids, mask=mask, **kw):
            return lambda: generate(model, ids, mask, max_new_tokens=args.new, **kw)

        runs = {"hf": (hf, False), "runtime full": (ours(), False)}
        runs |= {f"exit@{k}": (ours(exit_layer=k), False) for k in args.exits}
        runs |= {
            "sat lam=1 (overhead)": (ours(certificate=certificate(1.0, "state_saturation", L)), False),
            "softmax_gap lam=1 (overhead)": (ours(certificate=certificate(1.0, "softmax_gap", L)), True),
            f"sat lam={args.sat}": (ours(certificate=certificate(args.sat, "state_saturation", L)), False),
        }
        best, out = side_by_side({name: fn for name, (fn, _) in runs.items()}, args.repeat)
        assert torch.equal(out["runtime full"].sequences, out["hf"]), "runtime full differs from HF generate"
        print(f"\nbatch {batch}: hf {n_tokens / best['hf']:8.1f} tok/s; runtime full emits the tokens of HF generate")
        print(f"  {'run':30s} {'tok/s':>8s} {'mean exit':>9s} {'speed-up':>8s} {'ideal':>6s} {'achieved/ideal':>14s}")
        for name, (_, softmax) in list(runs.items())[1:]:
            assert "lam=1 " not in name or out[name].mean_exit_layer == L, f"a token exited in {name}"
            speed_up = best["hf"] / best[name]
            ideal = ideal_ratio(out[name].exit_layers, cost, L, softmax)
            print(
                f"  {name:30s} {n_tokens / best[name]:8.1f} {out[name].mean_exit_layer:9.2f} {speed_up:8.2f} "
                f"{ideal:6.2f} {speed_up / ideal:14.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

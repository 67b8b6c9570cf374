"""Contribution scores of word vectors: which ones token elimination removes.

The Latency-Adjustable Transformer ranks word vectors by their "Attention Context Contribution" (ACC),
whose exact formula is not published. We define two scores from published relatives instead:

- **attention received** (PoWER-BERT): ``s_j = mean_h sum_i A[h, i, j]``, over the real query-key pairs
  only (padding excluded);
- **value-weighted** (the norm-based analysis of Kobayashi et al., 2020): ``s_j = mean_h sum_i
  A[h, i, j] * ||v_j^h W_O^h||``, where ``W_O^h`` is head ``h``'s block of the output projection, so that
  a token that is attended to but writes almost nothing counts for little.

Both are divided by what key ``j`` would receive under uniform attention, ``u_j = sum_i 1[i sees j] /
n_i`` with ``n_i`` the number of keys query ``i`` sees. In a decoder a causal mask lets only the later
queries see key ``j``, so raw column sums favour early tokens; after this normalisation uniform attention
scores 1 everywhere, and a score above 1 means more than a fair share. (For an encoder without padding,
``u_j = 1`` and the score is the plain column sum.)

The attention is the one the layer computes anyway: in a layer that eliminates, the runtime computes it
explicitly in chunks of queries and adds up what each key receives as it goes (one pass, no second
attention computation, memory bounded by the chunk).
"""

from __future__ import annotations

import math

from calibrate._extras import require

require(__name__, "hf", ("torch",))  # before torch: an ImportError naming the extra

import torch

__all__ = ["SCORES", "attention_received", "contribution_scores", "survivors", "value_norms"]

#: Names of the contribution scores.
SCORES = ("attention", "value")


def value_norms(values: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """``||v_j^h W_O^h||`` of every query head and key: what each key writes into the residual stream.

    Parameters
    ----------
    values : torch.Tensor
        Values ``(n, KVH, S_k, hd)``, one per key/value head (grouped-query attention: query head ``h``
        reads key/value head ``h // (H / KVH)``).
    out_weight : torch.Tensor
        The output projection as ``(H * hd, d)`` (``out = concat_h(attended_h) @ out_weight``).

    Returns
    -------
    torch.Tensor
        ``(n, H, S_k)``, float32, computed through the ``hd x hd`` Gram matrix of each head's block
        (never an ``(n, H, S_k, d)`` tensor).
    """
    n, kv_heads, _, hd = values.shape
    if out_weight.ndim != 2 or out_weight.shape[0] % hd or (out_weight.shape[0] // hd) % kv_heads:
        raise ValueError(
            f"out_weight must be (H * hd, d) with H a multiple of the {kv_heads} key/value heads and hd={hd}, "
            f"got {tuple(out_weight.shape)}"
        )
    heads = out_weight.shape[0] // hd
    w = out_weight.float().reshape(kv_heads, heads // kv_heads, hd, -1)  # (KVH, g, hd, d)
    gram = w @ w.transpose(-1, -2)  # (KVH, g, hd, hd)
    v = values.float()
    squared = torch.einsum("nksd,kgde,nkse->nkgs", v, gram, v)  # (n, KVH, g, S_k)
    return squared.clamp_min(0.0).sqrt().reshape(n, heads, -1)


def attention_received(probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i A[h, i, j]``: the attention each key receives, per head, from queries weighted by ``w``.

    Parameters
    ----------
    probs : torch.Tensor
        Attention probabilities ``(n, H, S_q, S_k)`` of a masked softmax.
    query_weight : torch.Tensor
        ``(n, S_q)``: 1 for a real query, 0 for padding.

    Returns
    -------
    torch.Tensor
        ``(n, H, S_k)``, float32.
    """
    return torch.einsum("nhqk,nq->nhk", probs.float(), query_weight.float())


def contribution_scores(
    received: torch.Tensor, allowed: torch.Tensor, norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised contribution of each key: attention received, optionally value-weighted.

    Parameters
    ----------
    received : torch.Tensor
        ``(n, H, S_k)`` from :func:`attention_received` with the real queries (the layer adapters of the
        runtime add it up while they attend, chunk by chunk, without keeping the probabilities).
    allowed : torch.Tensor
        Boolean ``(n, S_q, S_k)``: which real query sees which real key (causal mask and padding; a
        padding query has an all-False row and counts for nothing).
    norms : torch.Tensor, optional
        ``(n, H, S_k)`` from :func:`value_norms` for the value-weighted score; None for attention received.

    Returns
    -------
    torch.Tensor
        Scores ``(n, S_k)``, float32, ``>= 0``; 1 under uniform attention (attention received); 0 for keys
        no real query sees.
    """
    if received.ndim != 3 or allowed.ndim != 3 or allowed.shape[::2] != received.shape[::2]:
        raise ValueError(
            f"received must be (n, H, S_k) and allowed (n, S_q, S_k); got {tuple(received.shape)} and "
            f"{tuple(allowed.shape)}"
        )
    if norms is not None:
        received = received * norms.float()
    received = received.float().mean(dim=1)  # (n, S_k)
    seen = allowed.float()  # (n, S_q, S_k)
    per_query = seen.sum(dim=2)  # (n, S_q) keys each query sees, 0 for a padding query
    uniform = torch.einsum("nqk,nq->nk", seen, (per_query > 0).float() / per_query.clamp_min(1.0))  # (n, S_k)
    return torch.where(uniform > 0, received / uniform.clamp_min(1e-30), torch.zeros_like(received))


def survivors(
    received: torch.Tensor,
    allowed: torch.Tensor,
    norms: torch.Tensor | None,
    always: torch.Tensor,
    valid: torch.Tensor,
    target: torch.Tensor,
    *,
    filler_first: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The word vectors each row keeps: its ``target`` best by :func:`contribution_scores` (of equal scores, the
    earlier column), in column order.

    Parameters
    ----------
    received, allowed, norms
        As in :func:`contribution_scores`, for ``n`` rows of width ``W``.
    always : torch.Tensor
        Boolean ``(n, W)``: vectors kept whatever their score.
    valid : torch.Tensor
        Boolean ``(n, W)``: real vectors (False: filler of a row narrower than the batch).
    target : torch.Tensor
        ``(n,)`` long: vectors each row keeps, ``>=`` its always-kept ones and ``<=`` its real ones.
    filler_first : bool
        Put the filler of the new width before the kept columns (decoders: the last prompt token stays
        last), else after them (encoders: the first kept token, e.g. [CLS], comes first).

    Returns
    -------
    index : torch.Tensor
        ``(n, W')`` long, ``W' = max(target)``: the columns to gather.
    valid : torch.Tensor
        ``(n, W')`` bool: which gathered columns are kept vectors (the rest is filler).
    """
    s = torch.nan_to_num(contribution_scores(received, allowed, norms), nan=0.0)  # (n, W)
    s = s.masked_fill(always, math.inf).masked_fill(~valid, -math.inf)
    width = s.shape[1]
    # (n, W') best first; ties to the earlier column (topk broke them by the width: padding changed a row's survivors)
    best = s.sort(dim=1, descending=True, stable=True).indices[:, : int(target.max())]
    chosen = torch.arange(best.shape[1], device=s.device)[None, :] < target[:, None]  # (n, W')
    order = (
        torch.where(chosen, best + width, best) if filler_first else torch.where(chosen, best, best + width)
    ).argsort(dim=1)
    return best.gather(1, order), chosen.gather(1, order)


def _always_kept(ids: torch.Tensor, mask: torch.Tensor, special: list[int], *, last: bool) -> torch.Tensor:
    """``(B, P)`` bool: the first real token, special tokens and (``last``: decoders) the last column of each row."""
    always = torch.zeros_like(mask, dtype=torch.bool)
    always[:, -1] = last
    first = mask.argmax(dim=1)  # the first 1
    always[torch.arange(ids.shape[0]), first] = True
    if special:
        always |= torch.isin(ids, torch.tensor(special, device=ids.device))
    return always & mask.bool()


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``(B, W')`` along dim 1 of ``x`` ``(B, W, ...)``."""
    return x.gather(1, index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand(*index.shape, *x.shape[2:]))

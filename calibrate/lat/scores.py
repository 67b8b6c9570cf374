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

The probabilities are those the layer computes anyway (the runtime computes attention explicitly in a
layer that eliminates: no second attention pass).
"""

from __future__ import annotations

import torch

__all__ = ["SCORES", "contribution_scores", "value_norms"]

#: Names of the contribution scores.
SCORES = ("attention", "value")


def value_norms(values: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """``||v_j^h W_O^h||`` of every head and key: what each key writes into the residual stream.

    Parameters
    ----------
    values : torch.Tensor
        Per-head values ``(n, H, S_k, hd)``.
    out_weight : torch.Tensor
        The output projection as ``(H * hd, d)`` (``out = concat_h(attended_h) @ out_weight``).

    Returns
    -------
    torch.Tensor
        ``(n, H, S_k)``, float32.
    """
    _, heads, _, hd = values.shape
    w = out_weight.reshape(heads, hd, -1).to(values.dtype)  # (H, hd, d)
    return torch.linalg.vector_norm(torch.einsum("nhsk,hkd->nhsd", values, w).float(), dim=-1)


def contribution_scores(probs: torch.Tensor, allowed: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised contribution of each key: attention received, optionally value-weighted.

    Parameters
    ----------
    probs : torch.Tensor
        Attention probabilities ``(n, H, S_q, S_k)``, rows summing to 1 over the keys a query sees.
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
    if probs.ndim != 4 or allowed.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"probs must be (n, H, S_q, S_k) and allowed (n, S_q, S_k); got {tuple(probs.shape)} and {tuple(allowed.shape)}"
        )
    weights = probs.float() * allowed[:, None]  # (n, H, S_q, S_k)
    if norms is not None:
        weights = weights * norms[:, :, None, :].float()
    received = weights.sum(dim=2).mean(dim=1)  # (n, S_k)
    seen = allowed.float()
    per_query = seen.sum(dim=2, keepdim=True).clamp_min(1.0)  # (n, S_q, 1) keys each query sees
    uniform = (seen / per_query).sum(dim=1)  # (n, S_k)
    return torch.where(uniform > 0, received / uniform.clamp_min(1e-30), torch.zeros_like(received))

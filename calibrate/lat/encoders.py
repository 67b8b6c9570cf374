"""Token elimination in bidirectional encoders: T5's encoder and the BERT family.

:func:`encode` runs an encoder layer by layer with the model's own modules (not its ``forward``). In a
layer after which the schedule keeps fewer vectors, the attention is computed explicitly
(``attend_and_count`` of the runtime's layer code), each word vector is scored by the attention it
receives from the real tokens (every real query sees every real key, so the uniform share is 1 for all)
and only the best are gathered before the output projection and the feed-forward block: later layers run
on shorter sequences. The survivors keep their original positions (T5's relative position bias is
recomputed from them). The first real token (BERT's ``[CLS]``, which the classifier pools) and special
tokens are always kept; survivors are packed to the left, so ``[CLS]`` stays in column 0.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.t5.modeling_t5 import T5Attention

from calibrate.lat.scores import _gather, survivors, value_norms
from calibrate.runtime._layers import _placement_iv, _skipped_hooks_iv, additive_mask, attend_and_count

__all__ = ["CLASSIFIER_ARCHITECTURES", "ENCODER_DECODER_ARCHITECTURES", "encode", "encoder_for"]

#: ``config.model_type`` values of sequence classifiers :func:`calibrate.lat.classify` thins out.
CLASSIFIER_ARCHITECTURES: tuple[str, ...] = ("bert", "roberta")
#: ``config.model_type`` values of encoder-decoder models whose encoder :func:`calibrate.lat.generate` thins out.
ENCODER_DECODER_ARCHITECTURES: tuple[str, ...] = ("t5",)


class _Encoder(ABC):
    """One encoder's embeddings and layers, each split at the elimination point (after attention)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, n_heads: int, head_dim: int) -> None:
        self.layers = layers
        self.n_layers = len(layers)
        self.n_heads, self.head_dim = int(n_heads), int(head_dim)
        self.dtype = next(model.parameters()).dtype

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, self.n_heads, self.head_dim).transpose(1, 2)  # (n, H, S, hd)

    @abstractmethod
    def embed(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings ``(n, S, d)`` (positions are the columns, as the models' own ``forward``)."""

    def bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Additive position bias ``(n, H, S, S)`` of the vectors at ``positions`` ``(n, S)``, or None."""
        return None

    @abstractmethod
    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Layer ``i``'s queries, keys, values ``(n, H, S, hd)`` of ``h`` and its score scale."""

    @abstractmethod
    def finish(self, i: int, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of layer ``i`` after attention ``(n, S, H*hd)``: output projection, residual, feed-forward."""

    @abstractmethod
    def out_weight(self, i: int) -> torch.Tensor:
        """Layer ``i``'s attention output projection as ``(H*hd, d)``."""

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """What the encoder applies after its last layer (T5: its final norm)."""
        return h


class _T5Encoder(_Encoder):
    """T5 encoder blocks: ``h + o(attn(n1 h))`` with the first layer's bidirectional relative bias, ``+ ff(n2 h)``."""

    def __init__(self, model: nn.Module) -> None:
        self.stack = model.get_encoder()
        config = model.config
        super().__init__(model, self.stack.block, config.num_heads, config.d_kv)
        self.relative = self.stack.block[0].layer[0].SelfAttention

    def embed(self, ids, token_type_ids):
        return self.stack.embed_tokens(ids)  # (n, S, d)

    def bias(self, positions):
        a = self.relative
        buckets = T5Attention._relative_position_bucket(
            positions[:, None, :] - positions[:, :, None],  # (n, S_q, S_k): key minus query position
            bidirectional=True,
            num_buckets=a.relative_attention_num_buckets,
            max_distance=a.relative_attention_max_distance,
        )
        return a.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # (n, H, S_q, S_k)

    def qkv(self, i, h):
        sub = self.layers[i].layer[0]
        x = sub.layer_norm(h)
        a = sub.SelfAttention
        return self._split(a.q(x)), self._split(a.k(x)), self._split(a.v(x)), float(a.scaling)

    def finish(self, i, h, attended):
        attention, ff = self.layers[i].layer
        h = h + attention.SelfAttention.o(attended)
        return h + ff.DenseReluDense(ff.layer_norm(h))  # (n, S, d)

    def out_weight(self, i):
        return self.layers[i].layer[0].SelfAttention.o.weight.T

    def final(self, h):
        return self.stack.final_layer_norm(h)


class _BertEncoder(_Encoder):
    """BERT / RoBERTa layers (post-norm): ``n1(h + out(attn(h)))``, then ``n2(h + ff(h))``."""

    def __init__(self, model: nn.Module) -> None:
        self.base = model.base_model
        config = model.config
        heads = config.num_attention_heads
        super().__init__(model, self.base.encoder.layer, heads, config.hidden_size // heads)

    def embed(self, ids, token_type_ids):
        return self.base.embeddings(input_ids=ids, token_type_ids=token_type_ids)  # (n, S, d)

    def qkv(self, i, h):
        a = self.layers[i].attention.self
        return self._split(a.query(h)), self._split(a.key(h)), self._split(a.value(h)), float(a.scaling)

    def finish(self, i, h, attended):
        layer = self.layers[i]
        out = layer.attention.output
        h = out.LayerNorm(h + out.dense(attended))
        return layer.output.LayerNorm(h + layer.output.dense(layer.intermediate(h)))  # (n, S, d)

    def out_weight(self, i):
        return self.layers[i].attention.output.dense.weight.T


def encoder_for(model: nn.Module) -> _Encoder:
    """The encoder of a T5 model or a BERT-family classifier.

    Parameters
    ----------
    model : torch.nn.Module
        A T5 model (``config.model_type`` in :data:`ENCODER_DECODER_ARCHITECTURES`) or a sequence classifier
        (in :data:`CLASSIFIER_ARCHITECTURES`); its modules are used as they are, not copied.

    Returns
    -------
    _Encoder
        Its embeddings and layers, each split at the elimination point, for :func:`encode`.

    Raises
    ------
    ValueError
        For any other architecture (the message names the supported ones), or forward hooks on modules whose
        forward token elimination does not call (a layer, an attention or output block).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ENCODER_DECODER_ARCHITECTURES + CLASSIFIER_ARCHITECTURES:
        encoder = (_T5Encoder if model_type in ENCODER_DECODER_ARCHITECTURES else _BertEncoder)(model)
        _placement_iv(model)
        _skipped_hooks_iv(model, encoder.layers)  # its layers run by their parts, as the runtime's
        return encoder
    raise ValueError(
        f"token elimination in encoders does not support model_type {model_type!r}; supported: "
        f"{ENCODER_DECODER_ARCHITECTURES + CLASSIFIER_ARCHITECTURES}"
    )


def encode(
    encoder: _Encoder,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    always: torch.Tensor,
    score: str,
    token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Run ``ids`` ``(B, P)`` (0/1 ``mask``) through the encoder, thinning it out where ``keep`` ``(B, L)`` drops.

    Parameters
    ----------
    encoder : _Encoder
        From :func:`encoder_for`.
    ids : torch.Tensor
        Long ``(B, P)``: input token ids, right-padded.
    mask : torch.Tensor
        ``(B, P)``, 1 for a real token, 0 for padding.
    keep : torch.Tensor
        Long ``(B, L)``: each row's ``KeepSchedule.keep`` (:class:`calibrate.lat.KeepSchedule`), the vectors
        entering each of the ``L`` layers' attention (after layer ``i``'s attention a row keeps
        ``keep[:, i + 1]`` vectors, never fewer than its always-kept ones; ``keep[:, 0]`` is not read).
    always : torch.Tensor
        Boolean ``(B, P)``: vectors kept whatever their score (the first real token, special tokens).
    score : {"attention", "value"}
        Contribution score that ranks the vectors (:data:`calibrate.lat.scores.SCORES`).
    token_type_ids : torch.Tensor, optional
        Long ``(B, P)`` segment ids (BERT family).

    Returns
    -------
    states : torch.Tensor
        ``(B, W, d)``: the final states, kept vectors first in column order, then filler.
    valid : torch.Tensor
        Boolean ``(B, W)``: which of ``states`` are real vectors.
    kept : tuple of torch.Tensor
        Per layer, ``(B, W_i)`` long: the input columns of the vectors that entered it (``-1`` filler).
    processed : torch.Tensor
        Long ``(B, L)``: vectors each row processed in each layer.
    """
    B, P = ids.shape
    L = encoder.n_layers
    positions = torch.arange(P, device=ids.device).expand(B, P)  # also the input columns
    columns, valid = positions, mask.bool()
    h = encoder.embed(ids, token_type_ids)  # (B, P, d)
    bias = encoder.bias(positions)
    kept, processed = [], []
    for i in range(L):
        count = valid.sum(dim=1)  # (B,)
        target = torch.maximum(keep[:, i + 1], always.sum(dim=1)) if i + 1 < L else count
        eliminate = bool((target < count).any())
        mask_i = None if bool(valid.all()) else additive_mask(valid[:, None, None, :], encoder.dtype)  # (B, 1, 1, W)
        if bias is not None:
            mask_i = bias if mask_i is None else bias + mask_i
        q, k, v, scale = encoder.qkv(i, h)  # (B, H, W, hd)
        if eliminate:
            out, received = attend_and_count(q, k, v, mask_i, scale, valid.float())
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_i, scale=scale)
        attended = out.transpose(1, 2).reshape(B, h.shape[1], -1)  # (B, W, H*hd)
        kept.append(torch.where(valid, columns, -1))
        processed.append(count)
        if eliminate:
            sees = valid[:, :, None] & valid[:, None, :]  # (B, W, W) real query -> real key
            norms = value_norms(v, encoder.out_weight(i)) if score == "value" else None
            index, valid = survivors(received, sees, norms, always, valid, target, filler_first=False)  # (B, W')
            h, attended = _gather(h, index), _gather(attended, index)
            positions, always, columns = (x.gather(1, index) for x in (positions, always, columns))
            bias = encoder.bias(positions)
        h = encoder.finish(i, h, attended)  # (B, W', d)
    return encoder.final(h), valid, tuple(kept), torch.stack(processed, dim=1)

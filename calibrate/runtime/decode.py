"""Greedy early-exit decoding with a certificate, for decoder-only and encoder-decoder Hugging Face models.

:func:`generate` runs its own loop (it does not call the model's ``forward``): every generated token
runs decoder layers 1, 2, ... until the certificate's confidence measure passes the threshold
``lambda_t`` (with the certified decay), then emits ``argmax heads(h_i, layer=i)`` through the same
:class:`~calibrate.heads.ExitHeads` that built the cache. Layers a token skipped still get its keys and
values by state propagation (each skipped layer's own input norm and K/V projections of the exit state),
so later tokens attend to something at every layer. In a batch every row exits on its own: a layer runs
only for the rows still active (gathered, run, scattered back), rows that exited only propagate, rows
that finished (EOS) stop. Keys and values live in a pre-allocated cache per layer.

Encoder-decoder models (T5, BART, mBART) run the same loop on the decoder: the encoder runs once over
the input, every decoder layer's cross-attention keys/values are computed once from its output, and the
decoder starts from ``decoder_start_token_id``. Architecture specifics live in
:mod:`calibrate.runtime._layers`.

Without a certificate, or with a "full model only" certificate (``lambda_hat is None``), every token runs
every layer and the output equals ``model.generate(do_sample=False)`` token for token.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from calibrate._digest import model_digest
from calibrate._validation import int_at_least
from calibrate.certificate import Certificate, _budget_warning
from calibrate.exits import Decay
from calibrate.heads import ExitHeads, context_positions, decoder_layers
from calibrate.models import eval_mode, in_training
from calibrate.runtime._layers import KVCache, LayerAdapter, Step, adapter_for, additive_mask
from calibrate.runtime._measures import RUNTIME_MEASURES, RuntimeMeasure, build_measure
from measures.confidence import _SOFTMAX_MEASURES, _source

if TYPE_CHECKING:
    from transformers import LogitsProcessorList

__all__ = ["EarlyExitConfig", "EarlyExitOutput", "custom_generate", "generate"]


# --------------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EarlyExitConfig:
    """Settings of one early-exit decoding run (built by :func:`generate` from its arguments).

    Attributes
    ----------
    max_new_tokens : int
        Most tokens generated per row (>= 1).
    n_layers : int
        Decoder layers ``L`` of the model.
    lambda_hat : float or None
        Certified threshold; None runs the full model (no certificate, or "full model only").
    measure : str or None
        Confidence measure (one of :data:`~calibrate.runtime.RUNTIME_MEASURES`), None for the
        full model or a fixed exit layer.
    decay : Decay or None
        Decaying threshold as certified (``lambda_t = clip(0.9 lambda + 0.1 exp(-tau t / N), 0, 1)``).
    exit_layer : int or None
        Fixed exit layer (1-based) for every token, instead of a certificate (benchmarks and tests; no
        guarantee attached).
    eos_token_ids : tuple of int
        Tokens that end a row (kept as its last token); later positions get ``pad_token_id``.
    pad_token_id : int
        Filler after a row's EOS.
    """

    max_new_tokens: int
    n_layers: int
    lambda_hat: float | None = None
    measure: str | None = None
    decay: Decay | None = None
    exit_layer: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @property
    def full_model(self) -> bool:
        """Whether every token runs every layer."""
        return self.lambda_hat is None and self.exit_layer is None

    def threshold(self, t: int) -> float:
        """``lambda_t`` of the ``t``-th (0-based) generated token; ``inf`` for the full model."""
        if self.lambda_hat is None:
            return math.inf
        if self.decay is None:
            return float(self.lambda_hat)
        # The same float64 formula as the calibration (calibrate.exits.Decay.thresholds).
        return float(self.decay.thresholds(np.array([self.lambda_hat]), np.array([t]))[0, 0])


@dataclass(frozen=True)
class EarlyExitOutput:
    """Result of :func:`generate`, shaped like Hugging Face ``GenerateDecoderOnlyOutput`` plus exit layers.

    Attributes
    ----------
    sequences : torch.LongTensor, shape (batch, prompt_length + n_steps)
        Prompt (as given, left-padded) followed by the generated tokens; for encoder-decoder models the
        decoder's sequence, ``decoder_start_token_id`` then the generated tokens. After a row's EOS its
        positions hold ``pad_token_id``: exactly what ``model.generate`` returns. ``n_steps <=
        max_new_tokens`` (the loop stops when every row has finished).
    exit_layers : torch.LongTensor, shape (batch, n_steps)
        1-based layer that emitted each generated token (``n_layers`` = full model), 0 at the padding
        after a row's EOS.
    prompt_length : int
        Width of the (padded) prompt; 1 (the start token) for encoder-decoder models.
    n_layers : int
        Decoder layers ``L`` of the model.
    thresholds : tuple of float, shape (n_steps,)
        ``lambda_t`` used at each step (``inf`` when running the full model).
    measure : str or None
        Confidence measure used (None for the full model or a fixed exit layer).
    config : EarlyExitConfig
        All settings of the run.
    """

    sequences: torch.Tensor
    exit_layers: torch.Tensor
    prompt_length: int
    n_layers: int
    thresholds: tuple[float, ...]
    measure: str | None
    config: EarlyExitConfig = field(repr=False)

    @property
    def new_tokens(self) -> torch.Tensor:
        """Generated part of :attr:`sequences`, shape ``(batch, n_steps)``."""
        return self.sequences[:, self.prompt_length :]

    @property
    def n_generated(self) -> torch.Tensor:
        """Tokens generated per row, EOS included, shape ``(batch,)``."""
        return (self.exit_layers > 0).sum(dim=1)

    def mean_exit_layer(self) -> float:
        """Average 1-based exit layer over all generated tokens (``n_layers`` for the full model)."""
        used = self.exit_layers[self.exit_layers > 0]
        return float(used.float().mean()) if used.numel() else float("nan")

    def layer_savings(self) -> float:
        """Fraction of decoder layers skipped, ``1 - mean_exit_layer / n_layers``."""
        return 1.0 - self.mean_exit_layer() / self.n_layers

    def __repr__(self) -> str:
        return (
            f"EarlyExitOutput(batch={self.sequences.shape[0]}, prompt_length={self.prompt_length}, "
            f"n_steps={self.exit_layers.shape[1]}, n_layers={self.n_layers}, measure={self.measure!r}, "
            f"mean_exit_layer={self.mean_exit_layer():.3g})"
        )


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    certificate: Certificate | None = None,
    max_new_tokens: int = 32,
    heads: ExitHeads | None = None,
    *,
    exit_layer: int | None = None,
    tokenizer=None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> EarlyExitOutput:
    """Greedy decoding that exits each token at the first layer whose confidence passes the certificate.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model with its LM head (:data:`~calibrate.runtime.RUNTIME_ARCHITECTURES`): decoder-only
        GPT-2, Llama, Mistral, Qwen2 or Qwen3, or encoder-decoder T5, BART or mBART; used in eval mode, not
        modified.
    input_ids : torch.LongTensor, shape (batch, prompt_length)
        Decoder-only: prompts, **left**-padded (as for ``model.generate``). Encoder-decoder: the encoder's
        input, padded on either side (tokenizers pad on the right); the decoder starts from
        ``model.generation_config.decoder_start_token_id`` (else its ``bos_token_id``).
    attention_mask : torch.Tensor, shape (batch, prompt_length), optional
        1 for tokens, 0 for padding (the tokenizer's mask; for encoder-decoder models the encoder's, as
        ``model.generate`` takes it). Default, as ``model.generate``: for decoder-only prompts in which
        the pad id (below) occurs and is no EOS id, ``input_ids != pad_token_id``; otherwise (and for
        encoder inputs) all ones. Pass the tokenizer's mask when the pad id can also be a real token.
    certificate : Certificate, optional
        A certificate for ``knob="exit_threshold"`` made for this model's layer count. None, or
        ``lambda_hat is None`` ("full model only"), runs every layer for every token.
    max_new_tokens : int, default=32
        Most tokens generated per row.
    heads : ExitHeads, optional
        What a layer predicts; must be the heads the certificate was calibrated with (checked against
        ``certificate.heads`` when the certificate records them). Default: ``ExitHeads.from_model(model)``
        (final norm + LM head shared by every layer).
    exit_layer : int, optional
        Exit every token at this 1-based layer instead of using a certificate (a fixed-depth baseline for
        benchmarks and tests; nothing is certified). Exclusive with ``certificate``.
    tokenizer : transformers.PreTrainedTokenizerBase, optional
        Only read for its ``eos_token_id`` and ``pad_token_id``, the fallbacks below (pass the tokenizer the
        cache was extracted with to stop rows where the cache's sequences stop).
    eos_token_id : int or list of int, optional
        Tokens that end a row (kept as its last token). Default, resolved as :func:`calibrate.extract`
        resolves it (and stores it as ``cache.meta["generation"]["eos_token_id"]``):
        ``model.generation_config.eos_token_id``, else ``tokenizer.eos_token_id``; with none, rows run to
        ``max_new_tokens``.
    pad_token_id : int, optional
        Filler after a row's EOS. Default: ``model.generation_config.pad_token_id``, else
        ``tokenizer.pad_token_id``, else the first EOS id.

    Returns
    -------
    EarlyExitOutput
        ``sequences`` ``(batch, prompt_length + n_steps)`` as ``model.generate`` returns them (for
        encoder-decoder models the decoder's, ``prompt_length = 1``) and ``exit_layers`` ``(batch,
        n_steps)`` (1-based, 0 after EOS).

    Raises
    ------
    ValueError
        When the architecture is unsupported (naming it and the supported ones); the certificate is for
        another knob, another layer count, other exit heads (``certificate.heads`` differs from
        ``heads.describe()``: the message names each differing key, e.g. ``vocab_size``,
        ``adapters_digest`` or ``model_digest`` (other weights), with both values), heads made from another
        model, a measure the runtime cannot evaluate, or a learned measure whose ``measure_state`` is
        missing, invalid, of another measure or fitted for another layer count or hidden size;
        decoder-only prompts are right-padded; a row is empty; the prompt (or the encoder input) is too
        long for the model's context (nothing is truncated); an encoder-decoder model has no start token;
        ``max_new_tokens`` or ``exit_layer`` is below 1; or ``attention_mask`` is not a 0/1 tensor of the
        shape of ``input_ids``.
    TypeError
        When ``input_ids`` is not an integer tensor, ``max_new_tokens`` or ``exit_layer`` not an int, or
        ``certificate``, ``heads`` or ``tokenizer`` has the wrong type.

    Warns
    -----
    UserWarning
        When ``max_new_tokens`` exceeds the certificate's ``max_new_tokens`` (its calibration outputs'
        budget): longer outputs are not what it certifies.

    Notes
    -----
    - **Exit rule** (as calibrated, DESIGN section 6): token ``t`` (0-based) exits at the first layer
      ``i < L`` with ``conf_i >= lambda_t``, ``lambda_t = clip(0.9 lambda + 0.1 exp(-tau t / N), 0, 1)``
      with the certificate's decay, else at layer ``L``; it is emitted as ``argmax heads(h_i, layer=i)``.
      The comparison is done in float64 on the float32 confidence, like the calibration.
    - **Prompt.** The prompt runs every layer (like an encoder); then the first new token's exit layer is
      decided on the prompt's last position, layer by layer, exactly as in the cache, whose first token
      of a sequence holds those states. For encoder-decoder models the encoder runs once, every layer,
      and the decoder's prompt is the start token, which likewise runs every decoder layer.
    - **Halting heads.** ``halting_geometric`` scores each layer as the classifier does.
      ``halting_token_multinomial`` predicts each token's depth distribution when the token leaves
      layer 1; its confidence at layer ``i`` is ``P(depth <= i)``. ``halting_sequence_multinomial``
      predicts one depth distribution per row, once, from the states of the prompt's last position at
      every layer (the prompt pass computes them all before the first token's exit is decided), i.e.
      from the cache's first generated token of the sequence, as it was trained (encoder-decoder models:
      the start token's decoder states, which see the encoder through cross-attention); every token of
      the row then uses it.
    - **State propagation.** For a token that exited at layer ``i``, every layer ``j > i`` stores keys and
      values computed from the exit state ``h_i`` through layer ``j``'s own input norm (pre-norm layers;
      BART's post-norm layers project ``h_i`` itself) and K/V projections (RoPE included); its attention,
      cross-attention and MLP are skipped. Cross-attention keys/values depend only on the encoder output:
      each layer's are computed once, before the first token, so a skipped layer needs none.
    - **Batches.** Each row exits on its own. A layer runs only for the rows still active; exited rows
      only propagate (~2 ``d x d_kv`` products); finished rows do nothing. The rows' decisions need one
      device synchronisation per layer.
    - **Measure cost.** ``state_saturation``, ``classifier`` and ``halting_geometric`` cost ``O(d)`` per
      row and layer, the multinomial halting heads ``O(d L)`` per token (token) or per row (sequence); the
      softmax measures need the vocabulary-sized head at every layer tried, which on small models with
      large vocabularies costs more than the layers saved (benchmarks/runtime.py measures it).
    - **Special tokens.** ``model.generate`` stops rows only on the generation config's EOS; extraction
      cuts its sequences at the first EOS of the generation config or, when that has none, of the
      tokenizer. Both agree whenever the generation config has an EOS. When it has none, pass
      ``tokenizer=`` to stop on the tokens the cache stops on, or leave it out to run like ``model.generate``.
    - **Equality with Hugging Face.** Without a certificate the tokens equal
      ``model.generate(input_ids, attention_mask=..., do_sample=False, max_new_tokens=...)``, including the
      logits processors the model's generation config asks for (e.g. ``repetition_penalty``,
      ``no_repeat_ngram_size``, ``min_new_tokens``, BART's ``forced_bos_token_id``/``forced_eos_token_id``):
      Hugging Face builds them, and they act on the logits of whatever layer emits the token, as in
      :func:`custom_generate`. Sampling settings of the config (``do_sample``, ``temperature``, ...) are
      ignored: decoding is greedy. Not reproduced: Hugging Face's clamping of infinite float16
      activations in T5 decoder layers (such a model overflows anyway; use bfloat16 or float32).
    - The guarantee ``P(risk(lambda_hat) <= delta) >= 1 - epsilon`` of the certificate (delta =
      tolerance, epsilon = failure probability) covers what this runtime emits only for
      ``mode="decoded"`` certificates; a ``"proxy"`` certificate certifies the teacher-forced simulation.

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from calibrate.runtime import generate
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> out = generate(model, ids, max_new_tokens=4)                  # no certificate: the full model
    >>> torch.equal(out.sequences, model.generate(ids, do_sample=False, max_new_tokens=4))
    True
    >>> out.exit_layers.tolist()
    [[3, 3, 3, 3]]
    >>> generate(model, ids, max_new_tokens=4, exit_layer=1).exit_layers.tolist()
    [[1, 1, 1, 1]]

    An encoder-decoder model: ``sequences`` are the decoder's, from the start token on.

    >>> from transformers import T5Config, T5ForConditionalGeneration
    >>> config = T5Config(num_layers=2, d_model=16, d_kv=8, d_ff=32, num_heads=2, vocab_size=50, decoder_start_token_id=0)
    >>> t5 = T5ForConditionalGeneration(config)
    >>> out = generate(t5.eval(), ids, max_new_tokens=4)
    >>> torch.equal(out.sequences, t5.generate(ids, do_sample=False, max_new_tokens=4))
    True
    >>> out.prompt_length, out.exit_layers.shape
    (1, torch.Size([1, 4]))
    """
    special_tokens = _special_tokens_iv(model, tokenizer, eos_token_id, pad_token_id)
    run = _generate_iv(model, input_ids, attention_mask, certificate, max_new_tokens, heads, exit_layer, special_tokens)
    prompt = run.inputs[0]  # (B, P): the decoder prompt; the encoder's input is what generate calls encoder_input_ids
    decoder_only = run.encoder is None
    processors = _greedy_processors(
        model, prompt, prompt if decoder_only else run.encoder.ids, run.config.max_new_tokens, special_tokens,
        attention_mask=run.inputs[1] if decoder_only else None,
    )  # fmt: skip
    with eval_mode(model):  # as calibrated: a model left in training mode would decode with dropout
        return _decode(run, *run.inputs, logits_processor=processors)


def _greedy_processors(
    model,
    prompt: torch.Tensor,
    encoder_ids: torch.Tensor,
    max_new_tokens: int,
    special_tokens,
    *,
    attention_mask: torch.Tensor | None,
) -> LogitsProcessorList | None:
    """The logits processors ``model.generate(do_sample=False)`` builds from the model's generation config, or None.

    E.g. a repetition penalty, n-gram blocking, a minimum length, forced BOS/EOS tokens, suppressed tokens.
    They are built by Hugging Face's own preparation steps (private methods of ``GenerationMixin``), so that
    they are exactly the ones ``model.generate`` applies, for the decoder prompt ``prompt`` ``(B, P)``, the
    encoder input ``encoder_ids`` (the prompt for decoder-only models), ``max_new_tokens``, the
    ``special_tokens`` (EOS ids, pad id) of the run and a decoder-only prompt's ``attention_mask`` ``(B, P)``
    (None for an encoder-decoder model, as generate has no decoder mask): the repetition penalty skips the
    left padding it marks. Token elimination's decoding uses them too.
    """
    if getattr(model, "generation_config", None) is None:
        return None
    eos, pad = special_tokens
    config = copy.deepcopy(model.generation_config)
    config.update(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=list(eos) or None, pad_token_id=pad
    )
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=prompt.device)
    model._prepare_generated_length(
        config,
        has_default_max_length=True,
        has_default_min_length=True,
        model_input_name="input_ids",
        input_ids_length=prompt.shape[1],
        inputs_tensor=encoder_ids,
    )
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=prompt.shape[1], encoder_input_ids=encoder_ids,
        device=prompt.device, model_kwargs={"attention_mask": attention_mask},
    )
    return processors if len(processors) else None


#: Generation outputs besides the sequences, which custom_generate does not produce.
_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def custom_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    certificate: Certificate | None = None,
    heads: ExitHeads | None = None,
    exit_layer: int | None = None,
    **model_kwargs,
) -> EarlyExitOutput | torch.Tensor:
    """Early-exit decoding as a Hugging Face decoding method: ``model.generate(..., custom_generate=custom_generate)``.

    Works for decoder-only and encoder-decoder models alike: for the latter ``generate`` runs the encoder
    and passes its output and the decoder prompt, which this function decodes (the encoder is not run
    again).

    Parameters
    ----------
    model, input_ids
        Passed by ``generate``: the model and the left-padded prompts (decoder-only) or the decoder prompt
        ``(batch, 1)`` holding ``decoder_start_token_id`` (encoder-decoder).
    logits_processor, stopping_criteria, generation_config
        Prepared by ``generate``; the processors are applied to the emitted logits (of whatever layer
        exits) and the stopping criteria (EOS, max length, stop strings) end rows, as in greedy ``_sample``.
    synced_gpus, streamer
        Not supported (``synced_gpus=True`` or a streamer raise).
    certificate, heads, exit_layer
        As in :func:`generate`; ``generate`` forwards them because they are in this signature, e.g.
        ``model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
        custom_generate=custom_generate, certificate=cert)``.
    **model_kwargs
        ``attention_mask`` is used (the encoder's for encoder-decoder models), and so is ``encoder_outputs``
        (the encoder output ``generate`` computed: the encoder does not run twice); ``position_ids``,
        ``use_cache``, ``cache`` and ``logits_to_keep`` prepared by ``generate`` are ignored (positions come
        from the mask, the cache is our own).

    Returns
    -------
    torch.LongTensor or EarlyExitOutput
        As Hugging Face's decoding methods: the sequences ``(batch, length)``, or with
        ``return_dict_in_generate=True`` an :class:`EarlyExitOutput` (``.sequences`` and the exit layer of
        every token).

    Raises
    ------
    ValueError
        As :func:`generate`; also for sampling or beam search settings and unsupported model kwargs.
    """
    if synced_gpus or streamer is not None:
        raise ValueError("custom_generate (early exit) supports neither synced_gpus nor a streamer")
    outputs = [k for k in _OUTPUTS if generation_config is not None and getattr(generation_config, k, False)]
    if outputs:
        raise ValueError(
            f"custom_generate (early exit) returns sequences and exit layers only; {outputs} are not supported"
        )
    if generation_config is not None and (generation_config.do_sample or (generation_config.num_beams or 1) > 1):
        raise ValueError(
            "early-exit decoding is greedy: pass do_sample=False and num_beams=1 to generate, got "
            f"do_sample={generation_config.do_sample}, num_beams={generation_config.num_beams}"
        )
    known = {
        "position_ids",
        "use_cache",
        "cache",
        "past_key_values",
        "logits_to_keep",
        "attention_mask",
        "encoder_outputs",
    }
    unknown = sorted(k for k, v in model_kwargs.items() if k not in known and v is not None)
    if unknown:
        raise ValueError(f"custom_generate (early exit) does not support the model kwargs {unknown}")
    attention_mask = model_kwargs.get("attention_mask")
    encoder_outputs = model_kwargs.get("encoder_outputs")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if attention_mask is None and not encoder_decoder:  # generate drops a mask of ones: nothing to infer again
        attention_mask = torch.ones_like(input_ids)
    if encoder_decoder and encoder_outputs is None:
        raise ValueError(
            "custom_generate needs the encoder_outputs that model.generate prepares for encoder-decoder models"
        )
    if encoder_decoder and in_training(model):  # as its owner left it, whatever another thread's decoding set
        raise ValueError(
            "the model is in training mode, so model.generate ran its encoder with dropout (it does not switch to "
            "eval mode); call model.eval() first, or decode with calibrate.runtime.generate, which runs in eval mode"
        )
    if generation_config is None or generation_config.max_length is None:
        raise ValueError("custom_generate needs the generation_config prepared by model.generate (with max_length)")
    max_new_tokens = int(generation_config.max_length) - int(input_ids.shape[1])
    if max_new_tokens < 1:
        raise ValueError(
            f"generation_config.max_length={generation_config.max_length} leaves no room after the prompt width "
            f"{input_ids.shape[1]}; pass max_new_tokens (>= 1) to model.generate"
        )
    pad = generation_config._pad_token_tensor
    pad_id = None if pad is None else int(pad.reshape(-1)[0])
    run = _generate_iv(
        model,
        input_ids,
        attention_mask,
        certificate,
        max_new_tokens,
        heads,
        exit_layer,
        ((), pad_id),  # EOS is handled by the stopping criteria
        encoder_states=None if encoder_outputs is None else encoder_outputs[0],  # (B, S_enc, d)
    )
    with eval_mode(model):
        out = _decode(run, *run.inputs, logits_processor=logits_processor, stopping_criteria=stopping_criteria)
    return out if generation_config.return_dict_in_generate else out.sequences


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoder:
    """Encoder input of an encoder-decoder model: its padding mask, and its token ids or output states."""

    mask: torch.Tensor  # (B, S_enc) 1 = token, 0 = padding
    ids: torch.Tensor | None  # (B, S_enc), None when the encoder already ran
    states: torch.Tensor | None  # (B, S_enc, d) encoder output (custom_generate), else None


@dataclass(frozen=True)
class _Run:
    """Everything the loop needs, validated."""

    adapter: LayerAdapter
    heads: ExitHeads
    measure: RuntimeMeasure | None
    config: EarlyExitConfig
    inputs: tuple[torch.Tensor, torch.Tensor]  # decoder prompt ids and mask, (B, P) each
    encoder: _Encoder | None = None


def _token_ids(value, name: str = "eos_token_id") -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise TypeError(
            f"{name} must be a token id (int) or a list of them, got {value!r:.60}; for a token string use "
            "tokenizer.convert_tokens_to_ids"
        )
    return [int(v) for v in values]


def _certificate_iv(certificate, n_layers: int, heads: ExitHeads) -> tuple[float | None, str | None, Decay | None]:
    if certificate is None:
        return None, None, None
    if not isinstance(certificate, Certificate):
        raise TypeError(f"certificate must be a calibrate.Certificate or None, got {type(certificate).__name__}")
    if certificate.knob != "exit_threshold":
        raise ValueError(
            f"certificate.knob is {certificate.knob!r}, but the early-exit runtime spends only 'exit_threshold' "
            "certificates"
        )
    if certificate.n_layers is not None and certificate.n_layers != n_layers:
        raise ValueError(
            f"the certificate was made for a model with n_layers={certificate.n_layers}, this model has {n_layers} "
            "decoder layers"
        )
    _heads_identity_iv(certificate.heads, heads)
    if certificate.lambda_hat is None:  # "full model only": nothing to measure
        return None, None, None
    _runtime_measure_iv(certificate)
    decay = certificate.decay
    if decay is not None and not isinstance(decay, Decay):
        decay = Decay(**dict(decay))
    return float(certificate.lambda_hat), certificate.measure, decay


def _runtime_measure_iv(certificate: Certificate) -> None:
    """The certificate's measure is one the runtime computes, as it was calibrated (not a top-k bound)."""
    if certificate.measure not in RUNTIME_MEASURES:
        raise ValueError(
            f"certificate.measure must be one of {RUNTIME_MEASURES} for the runtime, got {certificate.measure!r}"
        )
    from_topk = (certificate.measure_state or {}).get("from_topk") if certificate.measure in _SOFTMAX_MEASURES else None
    if from_topk is not None:
        raise ValueError(
            f"the certificate's {certificate.measure!r} confidence is {_source(from_topk)}; the runtime computes "
            "its value on the full softmax, which differs on the same tokens: calibrate on a cache that stores "
            f"{certificate.measure!r} (calibrate.extract does), or in decoded mode"
        )


def _heads_identity_iv(recorded, heads: ExitHeads) -> None:
    """Refuse exit heads that differ from those the certificate was calibrated with (``certificate.heads``).

    Only the keys both descriptions have are compared, so certificates written by another library
    version (fewer or more keys) stay usable; None (old or synthetic certificates) checks nothing.
    """
    if recorded is None:
        return
    current = heads.describe()
    differ = [key for key in current if key in recorded and recorded[key] != current[key]]
    if differ:
        details = "; ".join(f"{key}: certificate {recorded[key]!r}, heads {current[key]!r}" for key in differ)
        if set(differ) <= {"kind", "adapters_digest"} and recorded.get("kind") == "logit_lens":
            advice = (
                "the certificate was calibrated with the model's own heads: pass heads=None (command line: no "
                "--adapters)"
            )
        elif set(differ) <= {"kind", "adapters_digest"}:  # the same model, other adapters (or none)
            advice = (
                "the certificate was calibrated with other exit heads: pass those (heads="
                "calibrate.adapters.load_adapters(model, FILE); command line: --adapters FILE)"
            )
        else:
            advice = (
                "the model differs from the one the certificate was calibrated with (other weights or config, another "
                "dtype, resized embeddings, another model): calibrate a certificate for the model as it is deployed"
            )
        raise ValueError(f"certificate.heads does not describe the exit heads used here ({details}): {advice}")


def _special_tokens_iv(model, tokenizer, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int | None]:
    """EOS ids and pad id: the arguments, else the generation config, else the tokenizer (as extraction).

    The pad id falls back to the first EOS id; it is None when there is neither (no row ever ends).
    """
    if tokenizer is not None and not (hasattr(tokenizer, "eos_token_id") and hasattr(tokenizer, "pad_token_id")):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (with eos_token_id and pad_token_id) or None, "
            f"got {type(tokenizer).__name__}"
        )
    gen = getattr(model, "generation_config", None)
    for source in (gen, tokenizer):
        if eos_token_id is None:
            eos_token_id = getattr(source, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(source, "pad_token_id", None)
    eos = tuple(_token_ids(eos_token_id))
    pad = _token_ids(pad_token_id, "pad_token_id")[:1] or list(eos[:1])
    return eos, pad[0] if pad else None


def _ids_iv(
    ids,
    mask,
    model,
    device,
    *,
    left_padded: bool,
    special_tokens: tuple[tuple[int, ...], int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` (ids the ``model`` embeds) and its ``attention_mask`` as long tensors on ``device``.

    Without a mask: with ``special_tokens`` (EOS ids, pad id), the mask ``model.generate`` infers for
    decoder-only prompts, ``input_ids != pad`` when the pad id occurs in ``input_ids`` and is no EOS id;
    else all ones.
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (torch.long, torch.int):
        what = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"input_ids must be an integer (int64 or int32) torch.Tensor of shape (batch, length), got {what}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one row and one token, got shape {tuple(ids.shape)}")
    ids = ids.to(device=device, dtype=torch.long)
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    outside = (ids < 0) | (ids >= rows) if rows is not None else None
    if outside is not None and bool(outside.any()):
        row, col = (int(v) for v in outside.nonzero()[0])
        raise ValueError(
            f"input_ids must be token ids in [0, {rows}) (the model's embedding rows), got {int(ids[row, col])} in row "
            f"{row} at position {col}; a tokenizer with added tokens needs model.resize_token_embeddings(len(tokenizer))"
        )
    if mask is None and special_tokens is not None:
        eos, pad = special_tokens
        if pad is not None and pad not in eos and bool((ids == pad).any()):
            inferred = (ids != pad).long()
            try:
                return ids, _mask_iv(inferred, ids.shape, device, left_padded=left_padded)
            except ValueError as exc:
                raise ValueError(
                    f"no attention_mask was given, so it was inferred as input_ids != pad_token_id={pad} (as "
                    f"model.generate does) and then: {exc}; if pad_token_id={pad} is also a real token of the prompts, "
                    "pass the tokenizer's attention_mask"
                ) from None
    return ids, _mask_iv(mask, ids.shape, device, left_padded=left_padded)


def _mask_iv(mask, shape: tuple[int, ...], device, *, left_padded: bool) -> torch.Tensor:
    """A 0/1 ``attention_mask`` of ``shape`` (default all ones), every row with a token, as a long tensor."""
    if mask is None:
        return torch.ones(shape, dtype=torch.long, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        what = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be a torch.Tensor of shape {tuple(shape)} (that of input_ids), got {what}")
    mask = mask.to(device=device, dtype=torch.long)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if left_padded and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "input_ids must be left-padded (attention_mask zeros before ones in every row), as for model.generate: "
            "set tokenizer.padding_side = 'left'"
        )
    if not bool(mask.any(dim=1).all()):
        empty = torch.nonzero(~mask.bool().any(dim=1)).reshape(-1).tolist()
        raise ValueError(f"rows {empty[:10]} of input_ids have no token (attention_mask all 0)")
    return mask


def _decoder_start_iv(model) -> int:
    """``decoder_start_token_id`` of the generation config, else its ``bos_token_id`` (as ``model.generate``)."""
    gen = model.generation_config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else gen.bos_token_id
    ids = _token_ids(start, "decoder_start_token_id")
    if len(ids) != 1:
        raise ValueError(
            "encoder-decoder decoding starts from one token: model.generation_config.decoder_start_token_id (or "
            f"bos_token_id) must be one int, got {start!r}"
        )
    return ids[0]


def _context_iv(model, adapter: LayerAdapter, prompt_mask: torch.Tensor, encoder: _Encoder | None, max_new_tokens):
    """Refuse sequences longer than the model's positions or sliding window (nothing is truncated)."""
    config = model.config
    longest = int(prompt_mask.sum(dim=1).max())
    used = longest + max_new_tokens - 1  # positions the decoder sees: the last new token is never fed back
    name, context = context_positions(config) or (None, None)
    if context is not None and used > context:
        what = "the decoder prompt (start token)" if encoder is not None else "the longest prompt"
        raise ValueError(
            f"{what} ({longest} tokens) + max_new_tokens={max_new_tokens} needs {used} positions (the last new "
            f"token is never fed back), more than the model's context config.{name}={context}; shorten it or "
            "lower max_new_tokens (nothing is truncated)"
        )
    if context is not None and encoder is not None and encoder.ids is not None and encoder.ids.shape[1] > context:
        raise ValueError(
            f"input_ids has {encoder.ids.shape[1]} columns, more than the encoder's context config.{name}={context}; "
            "shorten the inputs (nothing is truncated)"
        )
    window = adapter.sliding_window
    if window is not None and used > window:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} needs {used} positions, more "
            f"than the sliding window {window}; sliding-window attention is not implemented by the runtime"
        )


def _generate_iv(
    model,
    input_ids,
    attention_mask,
    certificate,
    max_new_tokens,
    heads,
    exit_layer,
    special_tokens,
    encoder_states: torch.Tensor | None = None,
) -> _Run:
    layers = decoder_layers(model)  # raises for architectures the heads do not know
    adapter = adapter_for(model, layers)  # raises for architectures the runtime does not decode
    n_layers = len(layers)
    max_new_tokens = int_at_least(max_new_tokens, "max_new_tokens")
    device = adapter.device
    # Prompts: the decoder's (left-padded; positions count real tokens), and the encoder's input if any.
    encoder = None
    if not adapter.encoder_decoder:
        prompt_ids, prompt_mask = _ids_iv(
            input_ids, attention_mask, model, device, left_padded=True, special_tokens=special_tokens
        )
    elif encoder_states is None:  # generate(): input_ids feed the encoder, padded on either side
        ids, mask = _ids_iv(input_ids, attention_mask, model, device, left_padded=False)
        encoder = _Encoder(mask, ids, None)
        prompt_ids = torch.full((ids.shape[0], 1), _decoder_start_iv(model), dtype=torch.long, device=device)
        prompt_mask = torch.ones_like(prompt_ids)
    else:  # custom_generate: model.generate ran the encoder; input_ids are the decoder prompt it prepared
        prompt_ids, prompt_mask = _ids_iv(input_ids, None, model, device, left_padded=True)
        states = encoder_states.to(device=device, dtype=adapter.dtype)
        if states.ndim != 3 or states.shape[0] != prompt_ids.shape[0] or states.shape[2] != adapter.hidden_size:
            raise ValueError(
                f"encoder_outputs must hold a state of shape (batch={prompt_ids.shape[0]}, length, "
                f"{adapter.hidden_size}), got {tuple(states.shape)}"
            )
        encoder = _Encoder(_mask_iv(attention_mask, states.shape[:2], device, left_padded=False), None, states)
    _context_iv(model, adapter, prompt_mask, encoder, max_new_tokens)
    # Heads and exit rule.
    if heads is None:
        heads = ExitHeads.from_model(model)
    elif not isinstance(heads, ExitHeads):
        raise TypeError(f"heads must be an ExitHeads (or None for the model's own), got {type(heads).__name__}")
    elif heads._model and heads._model[0] is not model and model_digest(heads._model[0]) != model_digest(model):
        raise ValueError(
            "heads were made (ExitHeads.from_model) from another model than the one decoding (other weights): "
            "a layer would be read through another model's norm and LM head"
        )
    if heads.has_adapters and (heads.adapter_weight.dtype, heads.adapter_weight.device) != (adapter.dtype, device):
        raise ValueError(
            f"the heads' adapters are {heads.adapter_weight.dtype} on {heads.adapter_weight.device} but the model runs "
            f"in {adapter.dtype} on {device}: load the adapters after moving the model "
            "(calibrate.adapters.load_adapters(model, path)); a certificate holds for the dtype it was calibrated in"
        )
    if heads.n_layers != n_layers or heads.hidden_size != adapter.hidden_size:
        raise ValueError(
            f"heads has n_layers={heads.n_layers}, hidden_size={heads.hidden_size} but the model has "
            f"{n_layers} decoder layers of width {adapter.hidden_size}"
        )
    lambda_hat, measure_name, decay = _certificate_iv(certificate, n_layers, heads)
    _budget_warning(certificate, max_new_tokens)
    if exit_layer is not None:
        if certificate is not None:
            raise ValueError("pass either certificate or exit_layer, not both")
        exit_layer = int_at_least(exit_layer, "exit_layer")
        if exit_layer > n_layers:
            raise ValueError(f"exit_layer must lie in [1, n_layers={n_layers}], got {exit_layer}")
    measure = None
    if measure_name is not None:
        measure = build_measure(
            measure_name,
            state=certificate.measure_state,
            n_layers=n_layers,
            hidden_size=adapter.hidden_size,
            vocab_size=heads.vocab_size,
            device=device,
        )
    eos, pad_token_id = special_tokens
    run_config = EarlyExitConfig(
        max_new_tokens=max_new_tokens,
        n_layers=n_layers,
        lambda_hat=lambda_hat,
        measure=measure_name,
        decay=decay,
        exit_layer=exit_layer,
        eos_token_ids=eos,
        pad_token_id=0 if pad_token_id is None else pad_token_id,  # None: no EOS, so no filler is written
    )
    return _Run(adapter, heads, measure, run_config, (prompt_ids, prompt_mask), encoder)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _take(pos_data, index: torch.Tensor):
    """Rows ``index`` of the per-step position data (RoPE cos/sin, T5's bias), or None."""
    return None if pos_data is None else tuple(x[index] for x in pos_data)


class _Exits:
    """Exit bookkeeping of one step for ``n`` rows: who exited where, and what each row emits."""

    def __init__(self, n: int, run: _Run, device) -> None:
        self.layer = torch.full((n,), run.config.n_layers, dtype=torch.long, device=device)  # (n,) 1-based
        self.state = torch.empty((n, run.adapter.hidden_size), dtype=run.adapter.dtype, device=device)  # (n, d)
        needs_logits = run.measure is not None and run.measure.needs_logits
        self.logits = torch.empty((n, run.heads.vocab_size), device=device) if needs_logits else None  # (n, V)

    def test(
        self, run: _Run, i: int, lam: float, h: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor | None:
        """Rows (of ``h``, the active rows' states after layer ``i``) whose token exits at layer ``i``.

        ``prev`` ``(m, d)`` are their inputs of layer ``i``, ``rows`` ``(m,)`` their indices in the batch.
        """
        cfg = run.config
        if cfg.full_model or i == cfg.n_layers - 1:
            return None
        if cfg.exit_layer is not None:
            return torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if i + 1 == cfg.exit_layer else None
        logits = run.heads(h, layer=i).float() if run.measure.needs_logits else None  # (m, V)
        passed = run.measure(i, h, prev, logits, rows).double() >= lam  # (m,)
        if logits is not None:
            self._pending_logits = logits[passed]
        return passed

    def record(self, run: _Run, i: int, rows: torch.Tensor, h: torch.Tensor) -> None:
        """Rows ``rows`` (local indices) exit at layer ``i`` with states ``h`` ``(m, d)``."""
        self.layer[rows] = i + 1
        self.state[rows] = run.heads._adapt(h, i)
        if self.logits is not None and run.config.exit_layer is None:
            self.logits[rows] = self._pending_logits

    def emit(self, run: _Run, rest: torch.Tensor | None, h_rest: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, V)`` float32: exited rows from their exit layer, rows ``rest`` from layer ``L``."""
        if rest is None:
            rest = slice(None)
        self.state[rest] = h_rest
        if self.logits is None:
            return run.heads(self.state, layer=run.config.n_layers - 1).float()  # one head call for all rows
        self.logits[rest] = run.heads(h_rest, layer=run.config.n_layers - 1).float()
        return self.logits


@torch.no_grad()
def _decode(
    run: _Run,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    logits_processor=None,
    stopping_criteria=None,
) -> EarlyExitOutput:
    adapter, cfg = run.adapter, run.config
    device, dtype = adapter.device, adapter.dtype
    B, P = input_ids.shape  # the decoder prompt: the prompt, or the start token of an encoder-decoder model
    L, T = cfg.n_layers, cfg.max_new_tokens

    # 1. Buffers: output ids (pad after EOS), exit layers, pre-allocated keys/values of every layer.
    sequences = torch.full((B, P + T), cfg.pad_token_id, dtype=torch.long, device=device)  # (B, P+T)
    sequences[:, :P] = input_ids
    exit_layers = torch.zeros((B, T), dtype=torch.long, device=device)  # (B, T)
    cache: KVCache = adapter.new_cache(B, P + T)
    if run.encoder is not None:  # encoder-decoder: the encoder runs once, each layer's cross-attention K/V once
        adapter.encode(cache, run.encoder.mask, ids=run.encoder.ids, states=run.encoder.states)
    eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long, device=device)  # (n_eos,)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)  # (B,)
    thresholds: list[float] = []

    # 2. Positions and keys visible to each row: left padding is masked, positions count real tokens
    #    (as Hugging Face generate does: cumsum(mask) - 1).
    keys_visible = torch.ones((B, P + T), dtype=torch.bool, device=device)  # (B, P+T)
    keys_visible[:, :P] = attention_mask.bool()
    padded = not bool(attention_mask.all())
    positions = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, P)
    first_new_position = attention_mask.sum(dim=1)  # (B,) position of the first generated token

    # 3. Prefill: the whole prompt runs every layer; keep the last position's input and layer outputs.
    causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()  # (P, P)
    diagonal = torch.eye(P, dtype=torch.bool, device=device)  # padding queries see themselves: no empty row
    allowed = (causal[None] & keys_visible[:, None, :P]) | diagonal[None]  # (B, P, P)
    step = Step(None, 0, positions, additive_mask(allowed, dtype)[:, None])  # mask (B, 1, P, P)
    h = adapter.embed(input_ids, positions)  # (B, P, d)
    pos_data = adapter.positional(h, step)  # RoPE cos/sin, T5's relative position bias, or None
    last = [h[:, -1]]
    for i in range(L):
        h = adapter.layer(i, h, step, cache, pos_data)  # (B, P, d)
        last.append(h[:, -1])
    last_states = torch.stack(last, dim=1)  # (B, L+1, d): embedding, then the output of layers 1..L
    if run.measure is not None:
        run.measure.prefill(last_states[:, 1:])  # e.g. the sequence halting head's depth distribution

    # 4. The first token's exit, decided on the last position layer by layer, as in the cache.
    lam = cfg.threshold(0)
    exits = _Exits(B, run, device)
    open_rows = torch.arange(B, device=device)  # rows whose first token has not exited yet
    for i in range(L):
        h_open = last_states[open_rows, i + 1]  # (m, d)
        passed = exits.test(run, i, lam, h_open, last_states[open_rows, i], open_rows) if open_rows.numel() else None
        if passed is not None and bool(passed.any()):
            exits.record(run, i, open_rows[passed], h_open[passed])
            open_rows = open_rows[~passed]
    logits = exits.emit(run, open_rows, last_states[open_rows, L])  # (B, V)
    t = 0
    rows = torch.arange(B, device=device)
    layer_of = exits.layer

    while True:
        # 5. Emit token t of the unfinished rows (logits processors as in HF greedy search), record exits.
        if logits_processor is not None:  # processors may be batch-aware: give them every row
            every = logits.new_zeros((B, logits.shape[1])).index_copy_(0, rows, logits)  # (B, V)
            logits = logits_processor(sequences[:, : P + t], every)[rows]  # (n, V)
        token = logits.argmax(dim=-1)  # (n,)
        sequences[rows, P + t] = token
        exit_layers[rows, t] = layer_of
        thresholds.append(lam)
        # 6. Rows that produced EOS (or meet a stopping criterion) finish; stop when all have.
        if stopping_criteria is not None:
            unfinished &= ~stopping_criteria(sequences[:, : P + t + 1], None).to(device)
        elif eos.numel():
            unfinished[rows] &= ~torch.isin(token, eos)
        t += 1
        if t == T or not bool(unfinished.any()):
            break

        # 7. Next step: the unfinished rows feed their last token at cache column P + t - 1.
        rows = torch.nonzero(unfinished).reshape(-1)  # (n,) global row indices
        n = rows.numel()
        global_rows = None if n == B else rows
        col = P + t - 1
        pos = (first_new_position[rows] + t - 1)[:, None]  # (n, 1)
        mask = additive_mask(keys_visible[rows, None, None, : col + 1], dtype) if padded else None  # (n, 1, 1, col+1)
        step = Step(global_rows, col, pos, mask)
        h = adapter.embed(sequences[rows, col : col + 1], pos)  # (n, 1, d)
        pos_data = adapter.positional(h, step)
        lam = cfg.threshold(t)
        exits = _Exits(n, run, device)

        # 8. Layers: active rows run the layer (gathered when not all), exited rows only propagate
        #    their frozen exit state into the layer's keys/values.
        active: torch.Tensor | None = None  # local indices of the active rows; None = all n rows
        done: torch.Tensor | None = None  # local indices of the rows that exited
        for i in range(L):
            if done is not None:
                adapter.propagate(i, h[done], step.subset(done, rows[done]), cache, _take(pos_data, done))
            if active is None:
                prev, h = h, adapter.layer(i, h, step, cache, pos_data)  # (n, 1, d)
                h_act = h
            elif active.numel():
                prev = h[active]  # (m, 1, d)
                h_act = adapter.layer(i, prev, step.subset(active, rows[active]), cache, _take(pos_data, active))
                h[active] = h_act
            else:
                continue
            batch_rows = rows if active is None else rows[active]  # (m,) the active rows' batch indices
            passed = exits.test(run, i, lam, h_act[:, -1], prev[:, -1], batch_rows)  # (m,) or None
            if passed is None or not bool(passed.any()):
                continue
            local = torch.arange(n, device=device) if active is None else active
            exits.record(run, i, local[passed], h_act[passed, -1])
            done = local[passed] if done is None else torch.cat([done, local[passed]])
            active = local[~passed]

        # 9. Logits of every unfinished row: exited rows through their exit layer, the rest through layer L.
        logits = exits.emit(run, active, h[:, -1] if active is None else h[active, -1])  # (n, V)
        layer_of = exits.layer

    n_steps = t
    return EarlyExitOutput(
        sequences=sequences[:, : P + n_steps],
        exit_layers=exit_layers[:, :n_steps],
        prompt_length=P,
        n_layers=L,
        thresholds=tuple(thresholds),
        measure=cfg.measure,
        config=cfg,
    )

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
:mod:`calibrate.runtime._layers`, the loop in ``_loop``, input validation in ``_inputs``, the config and
result classes in ``_result`` and :func:`custom_generate` (the ``model.generate`` hook) in ``_hf``; this
module re-exports them.

Without a certificate, or with a "full model only" certificate (``lambda_hat is None``), every token runs
every layer and the output equals ``model.generate(do_sample=False)`` token for token.

This module imports torch; ``import calibrate`` does not import it.
"""

from __future__ import annotations

import torch
from torch import nn

from calibrate._digest import stop_strings_iv
from calibrate.certificate import Certificate, _budget
from calibrate.heads import ExitHeads
from calibrate.models import _eval_mode
from calibrate.runtime._hf import _greedy_processors, custom_generate
from calibrate.runtime._inputs import _call_settings_iv, _generate_iv, _hf_equality_warnings, _special_tokens_iv
from calibrate.runtime._loop import _decode
from calibrate.runtime._result import EarlyExitConfig, EarlyExitOutput

__all__ = ["EarlyExitConfig", "EarlyExitOutput", "custom_generate", "generate"]


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    certificate: Certificate | None = None,
    max_new_tokens: int | None = None,
    heads: ExitHeads | None = None,
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
        GPT-2, Llama, Mistral, Qwen2 or Qwen3, or encoder-decoder T5, BART or mBART; switched to eval mode
        for the call, its training flags restored after (for every thread: a model trained in another thread
        meanwhile runs without dropout, so decode a ``copy.deepcopy`` of a model in training); not otherwise
        modified.
    input_ids : torch.LongTensor, shape (batch, prompt_length)
        Decoder-only: prompts, **left**-padded (as for ``model.generate``). Encoder-decoder: the encoder's
        input, padded on the right as tokenizers pad it and as extraction and decoded mode do (T5 gives the
        same outputs padded on either side; BART and mBART, whose learned positions count the padding, do
        not, here as in ``model.generate``); the decoder starts from
        ``model.generation_config.decoder_start_token_id`` (else its ``bos_token_id``).
    attention_mask : torch.Tensor, shape (batch, prompt_length), optional
        1 for tokens, 0 for padding (the tokenizer's mask; for encoder-decoder models the encoder's, as
        ``model.generate`` takes it). Default, as ``model.generate``: for decoder-only prompts in which
        the pad id (below) occurs and is no EOS id, ``input_ids != pad_token_id``; otherwise (and for
        encoder inputs) all ones. Pass the tokenizer's mask when the pad id can also be a real token.
    certificate : Certificate, optional
        A certificate for ``knob="exit_threshold"`` made for this model's layer count. None, or
        ``lambda_hat is None`` ("full model only"), runs every layer for every token.
    max_new_tokens : int, optional
        Most tokens generated per row; default the certificate's ``max_new_tokens`` (the budget it was
        calibrated with), else 32.
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
        ``tokenizer.pad_token_id``, else the first EOS id. With a certificate that records the generation config
        it was calibrated under (that of a cache :func:`calibrate.extract` made, or of decoded mode), an
        ``eos_token_id`` other than the config's is refused (where the config has none, the tokenizer's was
        used, of which extraction and decoded calibration warn: pass the tokenizer); a certificate of a cache
        from other sources records none, and what it was calibrated under is not checked.

    Returns
    -------
    EarlyExitOutput
        ``sequences`` ``(batch, prompt_length + n_steps)`` as ``model.generate`` returns them (for
        encoder-decoder models the decoder's, ``prompt_length = 1``) and ``exit_layers`` ``(batch,
        n_steps)`` (1-based, 0 after EOS).

    Raises
    ------
    ValueError
        When the architecture is unsupported (naming it and the supported ones); the model has forward hooks
        on modules whose forward the runtime does not call (a layer, an attention block), is spread over
        several devices (``device_map``) or has offloaded embeddings, or runs under ``torch.autocast``; the
        certificate is for another knob, another layer count, other exit heads (``certificate.heads`` differs from
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
        When ``max_new_tokens`` differs from the certificate's ``max_new_tokens`` (its calibration outputs'
        budget): longer outputs are not what it certifies, nor are shorter ones (except for the ``"sequence"``
        loss, whose risk can only fall when outputs are cut).

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
    - **Learned measures** score states rounded to float16, as the cache stores them: a state beyond
      float16's range (no cache holds one) scores NaN, which passes no threshold, so its token runs on.
    - **Special tokens.** ``model.generate`` stops rows only on the generation config's EOS; extraction
      cuts its sequences at the first EOS of the generation config or, when that has none, of the
      tokenizer. Both agree whenever the generation config has an EOS. When it has none, pass
      ``tokenizer=`` to stop on the tokens the cache stops on, or leave it out to run like ``model.generate``.
    - **Equality with Hugging Face.** Without a certificate the tokens equal
      ``model.generate(input_ids, attention_mask=..., do_sample=False, max_new_tokens=...)``, including the
      logits processors the model's generation config asks for (e.g. ``repetition_penalty``,
      ``no_repeat_ngram_size``, ``min_new_tokens``, BART's ``forced_bos_token_id``/``forced_eos_token_id``):
      Hugging Face builds them, and they act on the logits of whatever layer emits the token, as in
      :func:`custom_generate`. Those that read the prompt (``no_repeat_ngram_size``, ``repetition_penalty``,
      ``min_length``) read its left padding too, as in Hugging Face: a prompt's output can then depend on
      the batch it is padded in. Sampling settings of the config (``do_sample``, ``temperature``, ...) are
      ignored: decoding is greedy (a config's ``num_beams > 1`` too, with a warning). Not reproduced:
      Hugging Face's clamping of infinite float16 activations in T5 decoder layers (such a model overflows
      anyway; use bfloat16 or float32), and eager attention in float16/bfloat16 (the runtime attends with
      ``scaled_dot_product_attention``, the default of transformers, which rounds otherwise: it warns).
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
    >>> config = T5Config(
    ...     num_layers=2, d_model=16, d_kv=8, d_ff=32, num_heads=2, vocab_size=50, decoder_start_token_id=0
    ... )
    >>> t5 = T5ForConditionalGeneration(config)
    >>> out = generate(t5.eval(), ids, max_new_tokens=4)
    >>> torch.equal(out.sequences, t5.generate(ids, do_sample=False, max_new_tokens=4))
    True
    >>> out.prompt_length, out.exit_layers.shape
    (1, torch.Size([1, 4]))
    """
    special_tokens = _special_tokens_iv(model, tokenizer, eos_token_id, pad_token_id)
    max_new_tokens = _budget(certificate, max_new_tokens)
    run = _generate_iv(model, input_ids, attention_mask, certificate, max_new_tokens, heads, exit_layer, special_tokens)
    _call_settings_iv(model, certificate, eos_token_id=eos_token_id)
    stop_strings_iv(model)
    _hf_equality_warnings(model, run.adapter.dtype, beams=True)
    prompt = run.inputs[0]  # (B, P): the decoder prompt; the encoder's input is what generate calls encoder_input_ids
    decoder_only = run.encoder is None
    processors = _greedy_processors(
        model, prompt, prompt if decoder_only else run.encoder.ids, run.config.max_new_tokens, special_tokens,
        attention_mask=run.inputs[1] if decoder_only else None,
    )  # fmt: skip
    with _eval_mode(model):  # as calibrated: a model left in training mode would decode with dropout
        return _decode(run, *run.inputs, logits_processor=processors)

"""Tiny random Hugging Face models and a word-level tokenizer, built from configs (no download).

Shared by the extraction and runtime tests. Ids 0-3 are <pad> <eos> <unk> <bos>, then the words w0..w59.
"""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

V = 64
PAD, EOS, UNK, BOS = 0, 1, 2, 3


def _config(arch: str, n_layers: int = 3, **kwargs):
    from transformers import (
        BartConfig,
        BertConfig,
        GPT2Config,
        LlamaConfig,
        MBartConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
        RobertaConfig,
        T5Config,
    )

    ids = {"vocab_size": V, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS}
    # Initialisations 10x the defaults: outputs vary from token to token instead of repeating one token.
    llama = dict(
        initializer_range=0.2,
        num_hidden_layers=n_layers,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **ids,
    )
    bart = dict(
        encoder_layers=2,
        decoder_layers=n_layers,
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        max_position_embeddings=64,
        init_std=0.2,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
        **ids,
    )
    configs = {
        "gpt2": lambda: GPT2Config(
            **{**dict(n_layer=n_layers, n_embd=32, n_head=2, n_positions=64, initializer_range=0.2, **ids), **kwargs}
        ),
        "llama": lambda: LlamaConfig(**llama, **kwargs),
        "mistral": lambda: MistralConfig(**llama, **kwargs),
        "qwen2": lambda: Qwen2Config(**llama, **kwargs),
        "qwen3": lambda: Qwen3Config(head_dim=8, **llama, **kwargs),
        # transformers 5.24 needs num_layers == num_decoder_layers for T5's generation cache.
        "t5": lambda: T5Config(
            num_layers=n_layers,
            num_decoder_layers=n_layers,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_heads=4,
            initializer_factor=20.0,
            decoder_start_token_id=PAD,
            **ids,
            **kwargs,
        ),
        "bart": lambda: BartConfig(**bart, **kwargs),
        # Sequence classifiers (3 labels); RoBERTa's positions start after its pad id, hence the + 2.
        **{
            name: (
                lambda c=c: c(
                    num_hidden_layers=n_layers,
                    hidden_size=32,
                    intermediate_size=64,
                    num_attention_heads=4,
                    max_position_embeddings=66,
                    initializer_range=0.2,
                    num_labels=3,
                    **ids,
                    **kwargs,
                )
            )
            for name, c in (("bert", BertConfig), ("roberta", RobertaConfig))
        },
        "mbart": lambda: MBartConfig(**bart, **kwargs),
    }
    return configs[arch]()


def tiny_model(arch: str, seed: int = 0, n_layers: int = 3, **kwargs):
    """A tiny random model of ``arch`` in eval mode, built with ``torch.manual_seed(seed)``.

    ``bert`` and ``roberta`` give ``...ForSequenceClassification`` models with 3 labels.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    config = _config(arch, n_layers, **kwargs)
    if arch in ("bert", "roberta"):
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config).eval()
    # Norms start at weight 1, bias 0, where applying a norm twice is nearly the identity: perturb them
    # so that a head that normalises twice (or not at all) gives visibly wrong logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln_" in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else 0.1 * torch.randn_like(p))
    return model


def tiny_tokenizer():
    """Word-level tokenizer: ids 0-3 are <pad> <eos> <unk> <bos>, then w0..w59."""
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<bos>"] + [f"w{i}" for i in range(V - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts padded on the left with PAD, as decoder-only generation pads: ``(ids, mask)``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask

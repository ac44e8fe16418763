"""Tiny random Hugging Face transformers models, saved for KerasHub `from_preset`.

Each architecture is built from a small config (hidden 32, one or two layers,
vocabulary 64), so that the tests make everything they compare and download
nothing. torch, transformers and peft are test-only dependencies.
"""

import numpy as np

VOCAB = 64
SEQ = 6


def configs():
    import transformers

    decoder = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "bert": (
            transformers.BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=32,
                hidden_act="gelu_pytorch_tanh",  # KerasHub BERT: tanh GELU
            ),
            transformers.BertModel,
        ),
        "roberta": (
            transformers.RobertaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=40,
                hidden_act="gelu",
                layer_norm_eps=1e-5,  # KerasHub's RoBERTa (1e-4 apart with 1e-12)
            ),
            transformers.RobertaForMaskedLM,
        ),
        "gpt2": (
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=32,
                bos_token_id=0,
                eos_token_id=0,
            ),
            transformers.GPT2LMHeadModel,
        ),
        "llama": (
            transformers.LlamaConfig(**decoder, tie_word_embeddings=False),
            transformers.LlamaForCausalLM,
        ),
        "mistral": (
            transformers.MistralConfig(**decoder, tie_word_embeddings=False),
            transformers.MistralForCausalLM,
        ),
        "gemma": (
            transformers.GemmaConfig(
                **decoder, head_dim=8, hidden_activation="gelu_pytorch_tanh"
            ),
            transformers.GemmaForCausalLM,
        ),
        "gemma2": (
            transformers.Gemma2Config(
                **decoder, head_dim=8, query_pre_attn_scalar=8, sliding_window=4
            ),
            transformers.Gemma2ForCausalLM,
        ),
        "qwen2": (
            transformers.Qwen2Config(**decoder, tie_word_embeddings=False),
            transformers.Qwen2ForCausalLM,
        ),
        "qwen3": (
            transformers.Qwen3Config(**decoder, head_dim=8, tie_word_embeddings=False),
            transformers.Qwen3ForCausalLM,
        ),
    }


ARCHITECTURES = (
    "bert",
    "roberta",
    "gpt2",
    "llama",
    "mistral",
    "gemma",
    "gemma2",
    "qwen2",
)


def make_hf_model(arch, seed=0):
    """A tiny random transformers model of `arch`, in float32 and eval mode."""
    import torch

    config, cls = configs()[arch]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            # Mistral's KerasHub converter casts weights to float16: make them
            # exactly representable so both sides start from the same model.
            parameter.copy_(parameter.half().float())
        if arch == "roberta":
            # KerasHub's RoBERTa has no token-type embedding (RoBERTa
            # checkpoints hold zeros there): match it.
            model.base_model.embeddings.token_type_embeddings.weight.zero_()
    return model


def save_base(model, folder):
    """Writes the base model (config.json, model.safetensors) to `folder`."""
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def token_ids(batch=2, seq=SEQ, seed=0):
    # From 2: RoBERTa counts positions after its padding id 1.
    rng = np.random.default_rng(seed)
    return rng.integers(2, VOCAB, (batch, seq)).astype("int32")


def keras_inputs(arch, ids):
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    if arch == "bert":
        x["segment_ids"] = np.zeros_like(ids)
    return x

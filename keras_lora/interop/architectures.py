"""Which Hugging Face module of each architecture is which KerasHub layer.

One entry per architecture, read off KerasHub's transformers converters
(`keras_hub/src/utils/transformers/convert_*.py`), which port every Hugging
Face weight onto a KerasHub variable. Module names are relative to the
transformers *base* model (`LlamaModel`, `GPT2Model`, `BertModel`, ...); a task
model adds a prefix (`model.`, `transformer.`, `bert.`).

In every converter the Hugging Face weight `(out_features, in_features)` maps
onto the Keras kernel by flattening the kernel's input axes and its output
axes each in kernel order (C order): so a LoRA factor maps the same way (see
`factors.py`). A fused module (GPT-2's `c_attn`) lists several Keras layers:
its output features are theirs, concatenated in that order. A conv module
(ViT's patch embedding) maps onto a Keras conv layer, its weight
`(filters, in, *kernel_size)` onto the kernel `(*kernel_size, in, filters)`.
"""

import dataclasses

import keras


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one transformers architecture maps onto its KerasHub backbone.

    Attributes:
        name: the transformers `model_type`.
        backbones: KerasHub backbone class names (any class in the MRO).
        task_prefix: the base model's attribute in the transformers task
            models (`"model."` in `LlamaForCausalLM`).
        block: module name of transformer block `i`, e.g. `"layers.{i}"`.
        block_modules: module name inside a block -> attribute chains (from
            the KerasHub block, `backbone.transformer_layers[i]`) of the
            Keras layers it maps onto.
        top_modules: module name -> backbone attribute chain, outside the
            blocks (a chain element the object lacks as an attribute is a
            layer name: `get_layer`).
        unmapped: module names (suffixes) transformers models have that no
            KerasHub layer LoRA can adapt represents; kept so that written
            `target_modules` never select them by accident.
        heads: task-head module names of the transformers task model ->
            attribute of the KerasHub task (for `modules_to_save`).
        conv1d: whether the block modules are GPT-2 `Conv1D`s, whose
            weights are stored `(in_features, out_features)`.
        blocks: the backbone attribute chain of its list of blocks.
        experts: mixture-of-experts modules inside a block, adapted by PEFT
            through `target_parameters` (see `peft_experts.py`): module name
            -> (attribute chain of the KerasHub expert bank, {parameter name,
            in the module's definition order: the bank's weight attributes
            it maps onto, its output features theirs, concatenated}).
    """

    name: str
    backbones: tuple
    task_prefix: str
    block: str
    block_modules: dict
    top_modules: dict
    unmapped: tuple = ()
    heads: dict = dataclasses.field(default_factory=dict)
    conv1d: bool = False
    blocks: str = "transformer_layers"
    experts: dict = dataclasses.field(default_factory=dict)


_DECODER_MLP_NAMES = {
    "gate_proj": "_feedforward_gate_dense",
    "up_proj": "_feedforward_intermediate_dense",
    "down_proj": "_feedforward_output_dense",
}
_DECODER_MLP = {f"mlp.{p}": (dense,) for p, dense in _DECODER_MLP_NAMES.items()}
_DECODER_ATTENTION = {
    "self_attn.q_proj": ("_self_attention_layer._query_dense",),
    "self_attn.k_proj": ("_self_attention_layer._key_dense",),
    "self_attn.v_proj": ("_self_attention_layer._value_dense",),
    "self_attn.o_proj": ("_self_attention_layer._output_dense",),
}


def _decoder(name, backbones):
    """Llama-style decoders: Llama, Mistral, Qwen2 share their module names."""
    return Architecture(
        name=name,
        backbones=backbones,
        task_prefix="model.",
        block="layers.{i}",
        block_modules={**_DECODER_ATTENTION, **_DECODER_MLP},
        top_modules={"embed_tokens": "token_embedding"},
        unmapped=("lm_head", "score"),
    )


# BERT and RoBERTa blocks (KerasHub's TransformerEncoder) share one layout.
_ENCODER_BLOCK = {
    "attention.self.query": ("_self_attention_layer._query_dense",),
    "attention.self.key": ("_self_attention_layer._key_dense",),
    "attention.self.value": ("_self_attention_layer._value_dense",),
    "attention.output.dense": ("_self_attention_layer._output_dense",),
    "intermediate.dense": ("_feedforward_intermediate_dense",),
    "output.dense": ("_feedforward_output_dense",),
}


def _moe(name, backbones, attention, bank, weights, unmapped=("mlp.gate",), extra=None):
    """A decoder whose MLP is a mixture of experts (transformers 5 layout).

    transformers 5 keeps each block's experts as two raw parameters of
    `mlp.experts`, `gate_up_proj` and `down_proj` (defined in that order);
    KerasHub's converters port them onto the bank's weights in `weights`.
    The router is no `nn.Linear` there, so PEFT cannot target it as a module.
    """
    return Architecture(
        name=name,
        backbones=backbones,
        task_prefix="model.",
        block="layers.{i}",
        block_modules={
            f"self_attn.{p}_proj": (f"{attention}{dense}_dense",)
            for p, dense in zip("qkvo", ("query", "key", "value", "output"))
        }
        | (extra or {}),
        top_modules={"embed_tokens": "token_embedding"},
        unmapped=("lm_head", "score", *unmapped),
        experts={"mlp.experts": (bank, weights)},
    )


_MOE_WEIGHTS = {
    # gate_up_proj (E, 2I, H) holds [gate; up]: Mixtral's bank keeps them
    # apart (its converter's w1 and w3), Qwen3-MoE's as one (E, H, 2I).
    "mixtral": {
        "gate_up_proj": (
            "_expert_feedforward_gate_dense",
            "_expert_feedforward_intermediate_dense",
        ),
        "down_proj": ("_expert_feedforward_output_dense",),
    },
    "qwen3_moe": {  # and Qwen-MoE (qwen2_moe)
        "gate_up_proj": ("_expert_feedforward_gate_dense",),
        "down_proj": ("_expert_feedforward_output_dense",),
    },
    # GPT-OSS: (E, H, 2I), gate and up interleaved, on both sides.
    "gpt_oss": {"gate_up_proj": ("gate_up_proj",), "down_proj": ("down_proj",)},
}


ARCHITECTURES = (
    Architecture(
        name="bert",
        backbones=("BertBackbone",),
        task_prefix="bert.",
        block="encoder.layer.{i}",
        block_modules=_ENCODER_BLOCK,
        top_modules={
            "embeddings.word_embeddings": "token_embedding",
            "embeddings.token_type_embeddings": "segment_embedding",
            "pooler.dense": "pooled_dense",
        },
        unmapped=("embeddings.position_embeddings", "classifier", "cls"),
        # BertForSequenceClassification's head; BertTextClassifier's Dense.
        heads={"classifier": "output_dense"},
    ),
    Architecture(
        name="roberta",
        backbones=("RobertaBackbone",),
        task_prefix="roberta.",
        block="encoder.layer.{i}",
        block_modules=_ENCODER_BLOCK,
        top_modules={"embeddings.word_embeddings": "token_embedding"},
        unmapped=(
            "embeddings.position_embeddings",
            "embeddings.token_type_embeddings",
            "pooler.dense",
            "classifier.dense",
            "classifier.out_proj",
            "lm_head.dense",
            "lm_head.decoder",
        ),
    ),
    Architecture(
        name="gpt2",
        backbones=("GPT2Backbone",),
        task_prefix="transformer.",
        block="h.{i}",
        block_modules={
            # One matrix for q, k and v: [q | k | v] along its outputs.
            "attn.c_attn": (
                "_self_attention_layer._query_dense",
                "_self_attention_layer._key_dense",
                "_self_attention_layer._value_dense",
            ),
            "attn.c_proj": ("_self_attention_layer._output_dense",),
            "mlp.c_fc": ("_feedforward_intermediate_dense",),
            "mlp.c_proj": ("_feedforward_output_dense",),
        },
        top_modules={"wte": "token_embedding"},
        unmapped=("wpe", "lm_head", "score"),
        conv1d=True,
    ),
    _decoder("llama", ("LlamaBackbone",)),
    _decoder("mistral", ("MistralBackbone",)),
    _decoder("qwen2", ("QwenBackbone",)),
    _decoder("qwen3", ("Qwen3Backbone",)),
    Architecture(
        name="gemma",  # and gemma2: same backbone class and module names
        backbones=("GemmaBackbone",),
        task_prefix="model.",
        block="layers.{i}",
        block_modules={
            "self_attn.q_proj": ("attention.query_dense",),
            "self_attn.k_proj": ("attention.key_dense",),
            "self_attn.v_proj": ("attention.value_dense",),
            "self_attn.o_proj": ("attention.output_dense",),
            "mlp.gate_proj": ("gating_ffw",),
            "mlp.up_proj": ("gating_ffw_2",),
            "mlp.down_proj": ("ffw_linear",),
        },
        top_modules={"embed_tokens": "token_embedding"},
        unmapped=("lm_head", "score"),
    ),
    Architecture(
        # ViTForImageClassification checkpoints (KerasHub's converter reads
        # their `vit.` weights); the patch embedding is a real Conv2D. Module
        # names are transformers 5's (`layers.{i}.attention.q_proj`, which
        # PEFT 0.21 writes); transformers 4 named them
        # `encoder.layer.{i}.attention.attention.query`.
        name="vit",
        backbones=("ViTBackbone",),
        task_prefix="vit.",
        block="layers.{i}",
        block_modules={
            "attention.q_proj": ("mha._query_dense",),
            "attention.k_proj": ("mha._key_dense",),
            "attention.v_proj": ("mha._value_dense",),
            "attention.o_proj": ("mha._output_dense",),
            "mlp.fc1": ("mlp.dense_1",),
            "mlp.fc2": ("mlp.dense_2",),
        },
        top_modules={
            "embeddings.patch_embeddings.projection": (
                "vit_patching_and_embedding.patch_embedding"
            ),
        },
        unmapped=("pooler.dense", "classifier"),
        heads={"classifier": "output_dense"},
        blocks="vit_encoder.encoder_layers",
    ),
    _moe(
        "mixtral",
        ("MixtralBackbone",),
        "_self_attention_layer.",
        "_sparse_moe_block.expert_bank",
        _MOE_WEIGHTS["mixtral"],
    ),
    _moe(
        "qwen3_moe",
        ("Qwen3MoeBackbone",),
        "_self_attention_layer._",
        "mlp.expert_bank",
        _MOE_WEIGHTS["qwen3_moe"],
    ),
    _moe(
        # Qwen-MoE: also a shared expert (a gated MLP) and its sigmoid gate.
        "qwen2_moe",
        ("QwenMoeBackbone",),
        "_self_attention_layer.",
        "mlp.expert_bank",
        _MOE_WEIGHTS["qwen3_moe"],
        extra={
            "self_attn.o_proj": ("_self_attention_layer._output_dense",),
            **{
                f"mlp.shared_expert.{p}": (f"mlp.shared_expert_dense.{dense}",)
                for p, dense in _DECODER_MLP_NAMES.items()
            },
            "mlp.shared_expert_gate": ("mlp.shared_expert_gate_dense",),
        },
    ),
    _moe(
        "gpt_oss",
        ("GptOssBackbone",),
        "self_attention_layer.",
        "sparse_moe_block.experts",
        _MOE_WEIGHTS["gpt_oss"],
        unmapped=("mlp.router",),
    ),
)


@dataclasses.dataclass(frozen=True)
class Module:
    """One Hugging Face module and the Keras layers it maps onto."""

    name: str  # relative to the transformers base model
    layers: tuple  # Keras layers; a fused module's outputs are theirs, in order


def _attribute(obj, chain):
    for attribute in chain.split("."):
        if hasattr(obj, attribute):
            obj = getattr(obj, attribute)
        else:  # a Functional backbone's layer, by name
            obj = obj.get_layer(attribute)
    return obj


def find_architecture(backbone):
    """The `Architecture` of a KerasHub backbone, or None."""
    names = {cls.__name__ for cls in type(backbone).__mro__}
    for architecture in ARCHITECTURES:
        if names.intersection(architecture.backbones):
            return architecture
    return None


def supported_names():
    return [a.name for a in ARCHITECTURES]


def modules(backbone, architecture):
    """Every mappable module of `backbone`: {base-relative name: Module}."""
    found = {}
    for name, attribute in architecture.top_modules.items():
        found[name] = Module(name, (_attribute(backbone, attribute),))
    for i, block in enumerate(_attribute(backbone, architecture.blocks)):
        prefix = architecture.block.format(i=i)
        for name, chains in architecture.block_modules.items():
            layers = tuple(_attribute(block, chain) for chain in chains)
            found[f"{prefix}.{name}"] = Module(f"{prefix}.{name}", layers)
    return found


@dataclasses.dataclass(frozen=True)
class ExpertModule:
    """One transformers experts module and the KerasHub bank it maps onto."""

    name: str  # relative to the transformers base model
    bank: keras.layers.Layer
    parameters: dict  # parameter name -> the bank's weight attributes


def expert_modules(backbone, architecture):
    """Every experts module of `backbone`: {base-relative name: ExpertModule}.

    A block without the bank (a dense block of a model that mixes both)
    has none.
    """
    found = {}
    for i, block in enumerate(_attribute(backbone, architecture.blocks)):
        prefix = architecture.block.format(i=i)
        for name, (chain, parameters) in architecture.experts.items():
            try:
                bank = _attribute(block, chain)
            except (AttributeError, ValueError):
                continue
            found[f"{prefix}.{name}"] = ExpertModule(
                f"{prefix}.{name}", bank, parameters
            )
    return found


def heads(model, architecture):
    """{module name: Keras layer} of the task heads `model` has."""
    found = {}
    for name, attribute in architecture.heads.items():
        layer = getattr(model, attribute, None)
        if isinstance(layer, keras.layers.Layer):
            found[name] = layer
    return found

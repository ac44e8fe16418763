"""How KerasHub's mixture-of-experts banks use their expert weights.

A KerasHub MoE block keeps its experts in one layer (an "expert bank") whose
weights are raw variables of shape (experts, d_in, d_out), used through
`ops.einsum` in the bank's `call`: every token goes through every expert and
the block weighs the results by the router's top-k scores. No Dense or
EinsumDense layer is involved, so LoRA has to know where each weight is used.

A recipe records, for one bank class, the einsum that uses each weight and
the bank's `call` written with one hook, `project(attribute, x)`: the
product of x with that weight. keras-lora passes a `project` that adds the
weight's low-rank update factored (`einsum(x, A)` then `B`, per expert), so
the E×d_in×d_out update is never built. Each recipe repeats its bank's `call`
line for line; `expert_bank.attach` checks it against the bank's own `call`
on a few random tokens before using it (a KerasHub release that changes a
bank's `call` falls back to the generic path, with a warning).

Keys are `module.qualname`, so KerasHub need not be imported to read them.
"""

import collections

from keras import ops

# The letter of the experts axis in every recipe's equations.
EXPERT_AXIS = "e"

Recipe = collections.namedtuple("Recipe", ["weights", "call"])
Recipe.__doc__ = """One bank class's expert weights and its `call`.

Attributes:
    weights: {attribute name: the einsum equation `"x,W->y"` that uses it}.
    call: `call(bank, hidden_states, project) -> outputs`.
"""


def _mixtral(bank, hidden_states, project):
    gate = project("_expert_feedforward_gate_dense", hidden_states)
    gate = ops.cast(gate, "float32")  # as Mixtral: SiLU in float32
    gate = ops.cast(bank.activation(gate), bank.compute_dtype)
    intermediate = project("_expert_feedforward_intermediate_dense", hidden_states)
    return project("_expert_feedforward_output_dense", intermediate * gate)


def _qwen(bank, hidden_states, project):
    gate_up = project("_expert_feedforward_gate_dense", hidden_states)
    gate, up = ops.split(gate_up, 2, axis=-1)
    return project("_expert_feedforward_output_dense", up * bank.activation(gate))


def _qwen3_5(bank, hidden_states, project):
    gate_up = project("_expert_feedforward_gate_dense", hidden_states)
    gate, up = ops.split(gate_up, 2, axis=-1)
    gate = ops.cast(ops.silu(ops.cast(gate, "float32")), hidden_states.dtype)
    return project("_expert_feedforward_output_dense", up * gate)


def _gpt_oss(bank, hidden_states, project):
    gate_up = project("gate_up_proj", hidden_states)
    gate_up = gate_up + bank.gate_up_proj_bias[:, None, :]
    gate = ops.clip(gate_up[..., ::2], -1e9, bank.limit)
    up = ops.clip(gate_up[..., 1::2], -bank.limit, bank.limit)
    glu = gate * ops.sigmoid(gate * bank.alpha)
    out = project("down_proj", (up + 1) * glu)
    return out + bank.down_proj_bias[:, None, :]


_GATED = {
    "_expert_feedforward_gate_dense": "th,ehm->etm",
    "_expert_feedforward_output_dense": "eti,eih->eth",
}
_MODELS = "keras_hub.src.models."

RECIPES = {
    f"{_MODELS}mixtral.mixtral_decoder.MixtralMoeExperts": Recipe(
        {
            "_expert_feedforward_gate_dense": "th,ehm->etm",
            "_expert_feedforward_intermediate_dense": "th,ehm->etm",
            "_expert_feedforward_output_dense": "eti,eih->eth",
        },
        _mixtral,
    ),
    f"{_MODELS}qwen_moe.qwen_moe_decoder.QwenMoeExperts": Recipe(_GATED, _qwen),
    f"{_MODELS}qwen3_moe.qwen3_moe_decoder.Qwen3MoeExperts": Recipe(_GATED, _qwen),
    f"{_MODELS}qwen3_5_moe.qwen3_5_moe_decoder.Qwen3_5MoeExperts": Recipe(
        _GATED, _qwen3_5
    ),
    f"{_MODELS}gpt_oss.gpt_oss_decoder.GptOssExperts": Recipe(
        {"gate_up_proj": "th,ehm->etm", "down_proj": "etm,emh->eth"}, _gpt_oss
    ),
}


def class_key(cls):
    """`module.qualname` of a class, as `RECIPES` is keyed."""
    return f"{cls.__module__}.{cls.__qualname__}"


def recipe_for(cls):
    """The recipe of a bank class (exact class, not a subclass), or None."""
    return RECIPES.get(class_key(cls))


def generic_equation(ndim):
    """The einsum of a raw weight of `ndim` axes whose use is not known.

    Its last two axes are taken as (d_in, d_out) and any axes before them as
    group axes (one pair of factors each, as for experts): `"zah,ahm->zam"`
    for (experts, d_in, d_out). Only the factor shapes and the merge
    equation are read from it: the generic path adds s·A·B to the weight.
    """
    if ndim < 2:
        raise ValueError(f"A raw weight needs 2 axes or more. Received: ndim={ndim}")
    groups = "abcdefg"[: ndim - 2]
    return f"z{groups}h,{groups}hm->z{groups}m"

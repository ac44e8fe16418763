"""`LoRAExpertEinsum`: LoRA on a raw weight that a layer uses itself.

A mixture-of-experts bank (see `expert_recipes.py`) keeps its expert weights
as raw variables, not in Dense or EinsumDense layers. `enable_lora` gives
each adapted weight a `LoRAExpertEinsum`: an EinsumDense-shaped LoRA layer
whose kernel is the bank's own variable (borrowed, never copied or saved
twice) and whose factors are per expert, A (E, d_in, r) and B (E, r, d_out),
the expert axis a group axis. It lives inside the bank (`expert_bank.py`) at
the path `<bank path>/<weight name>`, so specs, adapter files, patterns,
named adapters and `disable_lora` treat it as any LoRA layer.

Two ways to use it, chosen by `expert_bank.attach`:
- factored (a known KerasHub bank): the bank's `call` is its recipe and each
  product with the weight is `layer(x) = einsum(x, W) + s·(x·A)·B`, per
  expert, never building an E×d_in×d_out update;
- generic (any other raw weight a user names): the bank's own `call` runs and
  reads `W + s·A·B` (`merged_kernel()`) where it reads the weight, as Keras's
  own LoRA does for kernels. Simple, but it builds the full update each call.
"""

import contextlib

import keras

from keras_lora.layers import expert_bank, expert_recipes
from keras_lora.layers.einsum_dense import LoRAEinsumDense


class LoRAExpertEinsum(LoRAEinsumDense):
    """LoRA factors for one raw weight of another layer (an expert bank).

    Not created directly: `enable_lora` creates it for each selected raw
    weight (e.g. `targets="all-linear"` on a Mixtral, Qwen-MoE or GPT-OSS
    backbone), and `merge_lora` folds it into the weight and removes it.

    Attributes:
        factored: True when the bank computes the update factored (a known
            KerasHub bank), False for the generic W + s·A·B path.
    """

    @classmethod
    def adapt(cls, weight, dropout=0.0, use_dora=False, init=None, **config):
        """Creates the LoRA layer of `weight` (a `raw_weights.RawWeight`).

        Args:
            weight: the raw weight: its layer, attribute and variable.
            dropout, use_dora, init, **config: as `LoRAEinsumDense.adapt`.

        Returns:
            The new layer, tracked inside `weight.layer`.
        """
        path = weight.path
        if use_dora:
            raise ValueError(
                f"DoRA is not supported on the raw weight '{path}' (a "
                "mixture-of-experts bank): its per-expert magnitude has no "
                "Keras layer to live in. Received: use_dora=True"
            )
        if init is not None:
            raise ValueError(
                f"PiSSA/OLoRA cannot start the factors of the raw weight "
                f"'{path}': they write a residual into the kernel of a Dense or "
                f"EinsumDense layer only. Received: init={init!r}"
            )
        dtype = keras.backend.standardize_dtype(weight.variable.dtype)
        if "float" not in dtype:
            raise ValueError(
                f"The raw weight '{path}' is {dtype}, not float: LoRA adapts "
                "float expert weights only (quantize the model after "
                f"`enable_lora`, or adapt it unquantized). Received: dtype={dtype}"
            )
        recipe = expert_recipes.recipe_for(expert_bank.original_class(weight.layer))
        factored = (
            recipe is not None
            and weight.attribute in recipe.weights
            and expert_bank.check_recipe(weight.layer)
        )
        if factored:
            equation = recipe.weights[weight.attribute]
        else:
            equation = expert_recipes.generic_equation(len(weight.variable.shape))
            if dropout:
                raise ValueError(
                    f"LoRA dropout needs the input of the update, which the "
                    f"generic path for raw weight '{path}' never sees (it adds "
                    "W + s·A·B to the weight). Use `dropout=0.0`. "
                    f"Received: dropout={dropout}"
                )
        layer = cls(
            equation,
            output_shape=(None,),  # not read: the layer is never built by shape
            dropout=dropout,
            name=weight.variable.name,
            dtype=weight.layer.dtype_policy,
            **config,
        )
        # The bank's own variable, untracked here: the bank saves it.
        object.__setattr__(layer, "_kernel", weight.variable)
        object.__setattr__(layer, "bias", None)
        object.__setattr__(layer, "factored", factored)
        object.__setattr__(layer, "lora_bank", weight.layer)
        object.__setattr__(layer, "lora_attribute", weight.attribute)
        layer.__dict__.pop("quantize", None)  # Keras binds its own per instance
        with contextlib.ExitStack() as scopes:  # its path: <bank path>/<name>
            for part in weight.path.split("/")[:-1]:
                scopes.enter_context(keras.name_scope(part))
            layer.build(None)
        expert_bank.attach(weight.layer, layer)
        return layer

    def build(self, input_shape):
        self._build_lora()
        self.built = True

    def _lora_layout(self):
        experts = expert_recipes.EXPERT_AXIS if self.factored else ""
        return self._layout_of(self.equation, experts)

    def unadapt(self, merge):
        """Folds W + s·A·B into the bank's weight (if `merge`), then leaves it."""
        if merge:
            self._kernel.assign(self.merged_kernel())
        expert_bank.detach(self.lora_bank, self)
        return self

    def quantize(self, mode=None, type_check=True, config=None):
        # `model.quantize` warns with this message and goes on, as it does
        # for the bank itself (a plain Layer) without LoRA.
        raise NotImplementedError(
            f"The expert weight '{self.path}' is not quantized: Keras quantizes "
            "Dense, EinsumDense and Embedding layers, not a mixture-of-experts "
            f"bank's raw weights. Received: mode={mode!r}"
        )

    # The kernel is the bank's: only the factors are this layer's to save.
    def save_own_variables(self, store):
        self.save_lora_variables(store)

    def load_own_variables(self, store):
        self.load_lora_variables(store)

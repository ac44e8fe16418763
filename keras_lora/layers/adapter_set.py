"""Several named adapters on one LoRA layer, and which of them are active.

A LoRA layer's first adapter is its *primary* one: its factors are the
variables `lora_a` / `lora_b` and its settings the layer's `rank`, `alpha`,
`lora_scale`, `dropout` (what `enable_lora` made, and what a single-adapter
user sees). Further adapters (`keras_lora.add_adapter`) are `Adapter` records
with their own variables `lora_a_<name>` / `lora_b_<name>`, laid out like the
primary ones with their own rank.

Which adapters the forward pass adds is Python state on the layer
(`_lora_active`): None means "the primary adapter alone", the fast path, which
runs exactly the single-adapter code; otherwise a tuple of `(name, weight)`,
each adapter's update scaled by its weight. Compiled functions depend on it,
so `keras_lora.set_adapter` keeps one compiled `predict`/`evaluate` function
per configuration (see `named_adapters.py`). Per-example adapters in one batch
(`keras_lora.adapter_ids`) read an int32 variable of adapter indices and
gather each example's factors (Punica's BGMV): see `_lora_mixed_delta`.
"""

import math
import re

import keras
from keras import ops

from keras_lora.layers import layouts, lora_math

_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def check_adapter_name(name):
    """Returns `name` if it can name an adapter (and a variable), else raises."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            "An adapter name must be 1-64 letters, digits or underscores. "
            f"Received: name={name!r}"
        )
    return name


class Adapter:
    """One low-rank update of a layer: factors, rank, scale, dropout."""

    def __init__(self, name, a, b, rank, alpha, dropout, use_rslora, seed_generator):
        self.name = name
        self.a = a
        self.b = b
        self.rank = rank
        self.alpha_arg = alpha
        self.alpha = lora_math.check_alpha(alpha, rank)
        self.dropout = dropout
        self.use_rslora = use_rslora
        self.scale = lora_math.lora_scale(rank, self.alpha, use_rslora)
        self.seed_generator = seed_generator

    def config(self):
        return {
            "rank": self.rank,
            "alpha": self.alpha_arg,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
        }


class AdapterSet:
    """Mixin of `LoRALayer`: named adapters beside the primary one."""

    # Python state, set on adapted layers only; class defaults keep a plain
    # single-adapter layer on the fast path.
    _lora_primary = "default"
    _lora_extra = None  # {name: Adapter}
    _lora_active = None  # None: the primary alone; else ((name, weight), ...)
    _lora_example_ids = None  # int32 variable of per-example adapter indices
    _lora_example_names = ()  # the model's adapter names the ids index

    @property
    def lora_adapter_names(self):
        """Names of this layer's adapters, the primary one first."""
        return [self._lora_primary, *(self._lora_extra or {})]

    def lora_adapter(self, name):
        """The `Adapter` record called `name` (the primary one as a view)."""
        if name == self._lora_primary:
            return Adapter(
                name,
                self.lora_a,
                self.lora_b,
                self.rank,
                self._alpha_arg,
                self.dropout,
                self.use_rslora,
                self.lora_seed_generator,
            )
        if name not in (self._lora_extra or {}):
            raise ValueError(
                f"Layer '{self.path}' has no adapter {name!r}. Its adapters: "
                f"{self.lora_adapter_names}"
            )
        return self._lora_extra[name]

    def add_lora_adapter(
        self,
        name,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        a_initializer="he_uniform",
        b_initializer="zeros",
        use_dora=False,
        init=None,
    ):
        """Adds an adapter beside the existing ones (its update starts at 0).

        Args:
            name: a new adapter name (letters, digits, underscores).
            rank, alpha, dropout, use_rslora, a_initializer, b_initializer:
                as in the layer's constructor.
            use_dora, init: must be False and None: DoRA and PiSSA/OLoRA
                adapters are a layer's only adapter.
        """
        check_adapter_name(name)
        if self.use_dora or use_dora or self.lora_init or init:
            raise ValueError(
                f"Layer '{self.path}' cannot hold a further adapter {name!r} "
                "beside a DoRA or PiSSA/OLoRA adapter: DoRA's update is not "
                "additive and PiSSA/OLoRA change the base kernel. Received: "
                f"use_dora={self.use_dora or use_dora}, "
                f"init={self.lora_init or init!r}"
            )
        if name in self.lora_adapter_names:
            raise ValueError(f"Layer '{self.path}' already has adapter {name!r}.")
        rank = lora_math.check_rank(rank)
        lora_math.check_alpha(alpha, rank)
        dropout = lora_math.check_dropout(dropout)
        a_shape, b_shape, d_in, d_out = self._lora_layout()
        lora_math.check_rank_fits(rank, d_in, d_out, self.name)
        # Same layout as the primary factors, with this adapter's rank: A's
        # rank axis is last, B's follows its group axes.
        groups = self._lora_group_count()
        a_shape = (*a_shape[:-1], rank)
        b_shape = (*b_shape[:groups], rank, *b_shape[groups + 1 :])
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            with layouts.factor_layouts(self):  # follow the kernel's sharding
                a = self.add_weight(
                    name=f"lora_a_{name}",
                    shape=a_shape,
                    initializer=keras.initializers.get(a_initializer),
                    dtype="float32",
                )
                b = self.add_weight(
                    name=f"lora_b_{name}",
                    shape=b_shape,
                    initializer=keras.initializers.get(b_initializer),
                    dtype="float32",
                )
            seed = (
                keras.random.SeedGenerator(name=f"lora_seed_{name}")
                if dropout > 0
                else None
            )
        finally:
            if locked:
                self._tracker.lock()
        extra = dict(self._lora_extra or {})
        extra[name] = Adapter(name, a, b, rank, alpha, dropout, use_rslora, seed)
        self._lora_set("_lora_extra", extra)
        return extra[name]

    def remove_lora_adapter(self, name):
        """Drops one adapter's variables; the primary one only if others remain
        (the first of them becomes primary)."""
        adapter = self.lora_adapter(name)
        extra = dict(self._lora_extra or {})
        if name == self._lora_primary:
            if not extra:
                raise ValueError(
                    f"Adapter {name!r} is the only one of layer '{self.path}': "
                    "turn the layer back into its base class instead."
                )
            promoted = extra.pop(next(iter(extra)))
            self._lora_promote(promoted)
        else:
            extra.pop(name)
        for variable in (adapter.a, adapter.b):
            self._untrack_variable(variable)
        if adapter.seed_generator is not None:
            self._seed_generators.remove(adapter.seed_generator)
        self._lora_set("_lora_extra", extra)
        if self._lora_active is not None:
            active = tuple((n, w) for n, w in self._lora_active if n != name)
            self.set_lora_active(active)

    def _lora_promote(self, adapter):
        """Makes `adapter` the primary one (its variables keep their names)."""
        for attribute, value in (
            ("lora_a", adapter.a),
            ("lora_b", adapter.b),
            ("rank", adapter.rank),
            ("_alpha_arg", adapter.alpha_arg),
            ("alpha", adapter.alpha),
            ("dropout", adapter.dropout),
            ("use_rslora", adapter.use_rslora),
            ("lora_scale", adapter.scale),
            ("lora_seed_generator", adapter.seed_generator),
            ("_lora_primary", adapter.name),
        ):
            self._lora_set(attribute, value)

    def set_lora_active(self, active):
        """Sets which adapters the forward pass adds.

        Args:
            active: None (the primary adapter alone, the fast path), or a
                sequence of `(name, weight)` pairs of this layer's adapters
                (empty: no update at all).
        """
        if active is not None:
            active = tuple((n, float(w)) for n, w in active)
            for name, _ in active:
                self.lora_adapter(name)
            if active == ((self._lora_primary, 1.0),):
                active = None
            if active and self.use_dora:
                raise ValueError(
                    f"Layer '{self.path}' uses DoRA, whose update is not "
                    "additive: it runs with its adapter at weight 1 or with "
                    f"none. Received: active={list(active)}"
                )
        self._lora_set("_lora_active", active)

    def _lora_group_count(self):
        """How many group axes lead B (EinsumDense groups; 0 elsewhere)."""
        equations = getattr(self, "_lora_equations", None) or {}
        return len(equations.get("group_axes", ""))

    def _lora_set(self, attribute, value):
        # Plain Python state: no Keras tracking of these attributes.
        object.__setattr__(self, attribute, value)

    # The forward pass over the active adapters.
    def _lora_total_delta(self, inputs, training):
        """The sum of the active adapters' updates (None when there is none)."""
        if self._lora_active is not None and self._lora_example_ids is not None:
            self._lora_check_example_batch(inputs, training)
            return self._lora_mixed_delta(inputs, self._lora_example_names)
        return self._lora_each_active(
            lambda adapter: self._lora_delta(inputs, training, adapter)
        )

    def _lora_each_active(self, update):
        """Σ weight · update(adapter) over the active adapters.

        `update(adapter)` computes one adapter's update (None: the primary
        one). The adapter is passed, not stored on the layer, so that a call
        changes no layer state (calls from several threads stay apart).
        """
        active = self._lora_active
        if active is None:
            return update(None)  # the primary adapter alone: the fast path
        total = None
        for name, weight in active:
            primary = name == self._lora_primary
            delta = update(None if primary else self.lora_adapter(name))
            if weight != 1.0:
                delta = ops.multiply(delta, ops.cast(weight, delta.dtype))
            total = delta if total is None else ops.add(total, delta)
        return total

    def lora_active_pairs(self):
        """The active `(name, weight)` pairs, the fast path spelled out."""
        if self._lora_active is None:
            return ((self._lora_primary, 1.0),)
        return self._lora_active

    def lora_update(self):
        """Σ weight·s·A·B over the active adapters, kernel-shaped, float32."""
        total = None
        for name, weight in self.lora_active_pairs():
            adapter = self.lora_adapter(name)
            delta = ops.einsum(
                self.lora_merge_equation,
                ops.cast(adapter.a, "float32"),
                ops.cast(adapter.b, "float32"),
            )
            delta = ops.multiply(delta, adapter.scale * weight)
            total = delta if total is None else ops.add(total, delta)
        return total

    # Per-example adapters (serving): gathered factors.
    def _lora_stacked(self, names):
        """A and s·B of `names` padded to one rank, plus a zero adapter last.

        Returns `(a_stack, b_stack)` of shapes `(n + 1, *A)` and `(n + 1, *B)`
        in the compute dtype; index n is "no adapter".
        """
        mine = set(self.lora_adapter_names)
        adapters = [self.lora_adapter(n) if n in mine else None for n in names]
        rank = max(adapter.rank for adapter in adapters if adapter is not None)
        groups = self._lora_group_count()
        a_parts, b_parts = [], []
        for adapter in adapters:
            if adapter is None:  # an adapter that does not adapt this layer
                a_parts.append(None)
                b_parts.append(None)
                continue
            a = ops.cast(adapter.a, self.compute_dtype)
            b = ops.multiply(ops.cast(adapter.b, self.compute_dtype), adapter.scale)
            pad = rank - adapter.rank
            if pad:
                a = ops.pad(a, [(0, 0)] * (len(a.shape) - 1) + [(0, pad)])
                b_pad = [(0, 0)] * len(b.shape)
                b_pad[groups] = (0, pad)
                b = ops.pad(b, b_pad)
            a_parts.append(a)
            b_parts.append(b)
        real = next(i for i, a in enumerate(a_parts) if a is not None)
        a_zero, b_zero = ops.zeros_like(a_parts[real]), ops.zeros_like(b_parts[real])
        a_parts = [a_zero if a is None else a for a in a_parts] + [a_zero]
        b_parts = [b_zero if b is None else b for b in b_parts] + [b_zero]
        return ops.stack(a_parts), ops.stack(b_parts)

    def _lora_check_example_batch(self, inputs, training):
        """Per-example adapters: inference on a batch of exactly len(ids)."""
        if training is True:
            raise ValueError(
                f"Layer '{self.path}' runs per-example adapters "
                "(`keras_lora.adapter_ids`), which are for inference: train "
                "each adapter outside the block, after "
                "`keras_lora.set_adapter(model, name)`. Received: training=True"
            )
        size, batch = self._lora_example_ids.shape[0], inputs.shape[0]
        if batch != size:
            raise ValueError(
                f"Layer '{self.path}' runs per-example adapters for batches of "
                f"exactly len(ids) = {size} examples. Received: a batch of "
                f"{'unknown size' if batch is None else batch} (call `predict` "
                "with `batch_size=len(ids)` on a number of examples it "
                "divides, or open one `adapter_ids` block per batch)."
            )

    def _lora_mixed_delta(self, inputs, names):
        """Each example's update with its own adapter (`adapter_ids`).

        Example i uses adapter `names[ids[i]]` (index `len(names)`: none).
        The factors are gathered per example and applied as batched matmuls
        (Punica's BGMV): the cost is one rank-r path per example, whatever
        the number of adapters. Dropout is off (serving).
        """
        a_stack, b_stack = self._lora_stacked(names)
        ids = ops.convert_to_tensor(self._lora_example_ids)
        b_g = _take_rows(b_stack, ids)  # (batch, r, *outputs)
        rank = b_stack.shape[1]
        if isinstance(self, keras.layers.Embedding):
            vocab = a_stack.shape[1]
            flat = ops.reshape(a_stack, (-1, rank))
            tokens = ops.cast(inputs, "int32")
            rows = ops.add(ops.expand_dims(ids, 1) * vocab, tokens)
            low = ops.take(flat, rows, axis=0)  # (batch, seq, r)
            return ops.einsum("bsr,bro->bso", low, b_g)
        if not self._lora_matmul_like():
            raise ValueError(
                f"Per-example adapters need a matmul-shaped layer; layer "
                f"'{self.path}' ({type(self).__name__}) is not one."
            )
        a_g = _take_rows(a_stack, ids)  # (batch, *inputs, r)
        d_in = math.prod(a_stack.shape[1:-1])
        shape = ops.shape(inputs)
        kept = shape[: len(shape) - (len(a_stack.shape) - 2)]
        x = ops.reshape(ops.cast(inputs, a_g.dtype), (shape[0], -1, d_in))
        d_out = math.prod(b_stack.shape[2:])
        low = ops.einsum("bni,bir->bnr", x, ops.reshape(a_g, (-1, d_in, rank)))
        up = ops.einsum("bnr,bro->bno", low, ops.reshape(b_g, (-1, rank, d_out)))
        return ops.reshape(up, (*kept, *b_stack.shape[2:]))

    def _lora_matmul_like(self):
        """True when x meets A as `x @ reshape(A, (d_in, r))`."""
        if isinstance(self, keras.layers.EinsumDense):
            return self._lora_is_matmul()
        return isinstance(self, keras.layers.Dense)


def _take_rows(stack, ids):
    """`stack[ids]`, gathered from a 2-D view of `stack`.

    Keras's PyTorch `take` on more than two axes flattens the ids with
    `ravel`, which PyTorch's ONNX exporter cannot write (a multi-adapter
    artifact, `keras_lora.export_multi_adapter`); on two axes it is an
    embedding lookup, the same gather.
    """
    rows = ops.take(ops.reshape(stack, (stack.shape[0], -1)), ids, axis=0)
    return ops.reshape(rows, (-1, *stack.shape[1:]))

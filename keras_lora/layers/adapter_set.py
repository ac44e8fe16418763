"""Several named adapters on one LoRA layer, and which of them are active.

Every adapter of a layer is an `Adapter` record (its settings, factors and
dropout seed) in one ordered dict, `_lora_adapters`. The first one is the
*primary* adapter: what `enable_lora` made, and what a single-adapter user
sees as the layer's `lora_a`, `lora_b`, `rank`, `alpha`, `lora_scale`,
`dropout` (properties reading that record). Its variables are called
`lora_a` / `lora_b`; a further adapter's (`keras_lora.add_adapter`)
`lora_a_<name>` / `lora_b_<name>`, laid out alike with its own rank. The
records are replaced, never changed in place, so that `atomic.py` can put a
layer back by restoring its attributes.

Which adapters the forward pass adds is Python state on the layer
(`_lora_active`): None means "the primary adapter alone", the fast path, which
runs exactly the single-adapter code; otherwise a tuple of `(name, weight)`,
each adapter's update scaled by its weight. Compiled functions depend on it,
so `keras_lora.set_adapter` keeps one compiled `predict`/`evaluate` function
per configuration (see `named_adapters.py`). Per-example adapters in one batch
(`keras_lora.adapter_ids`) read an int32 variable of adapter indices and
gather each example's factors (Punica's BGMV): see `_lora_mixed_delta`.
"""

import contextlib
import math
import re

import keras
from keras import ops

from keras_lora.layers import layouts, lora_math, variants
from keras_lora.layers.lora_settings import LoRASettings

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
    """One low-rank update of a layer: its settings, factors and dropout seed.

    Args:
        name: the adapter's name.
        settings: its `LoRASettings`.
        a, b: its factor variables (None until the layer makes them).
        seed_generator: its dropout seed (None without dropout).
    """

    def __init__(self, name, settings, a=None, b=None, seed_generator=None):
        self.name = name
        self.settings = settings
        self.a = a
        self.b = b
        self.seed_generator = seed_generator
        # Plain attributes (read in every call), copied from the settings.
        self.rank = settings.rank
        self.alpha = settings.alpha
        self.alpha_arg = settings.alpha_arg
        self.dropout = settings.dropout
        self.use_rslora = settings.use_rslora
        self.scale = settings.scale

    def replaced(self, **changes):
        """A copy of this record with some fields changed."""
        fields = {
            "name": self.name,
            "settings": self.settings,
            "a": self.a,
            "b": self.b,
            "seed_generator": self.seed_generator,
        }
        return Adapter(**{**fields, **changes})

    def config(self):
        """The settings a further adapter can differ in (`add_adapter`)."""
        names = ("rank", "alpha", "dropout", "use_rslora")
        return {n: v for n, v in self.settings.config().items() if n in names}


class AdapterSet:
    """Mixin of `LoRALayer`: its adapters, stored alike, and the active set."""

    # Python state, set on adapted layers only; class defaults keep a plain
    # single-adapter layer on the fast path.
    _lora_adapters = None  # {name: Adapter}, the primary one first
    _lora_named = False  # True once the model named the primary adapter
    _lora_active = None  # None: the primary alone; else ((name, weight), ...)
    _lora_example_ids = None  # int32 variable of per-example adapter indices
    _lora_example_names = ()  # the model's adapter names the ids index

    @property
    def lora_adapter_names(self):
        """Names of this layer's adapters, the primary one first."""
        return list(self._lora_adapters)

    @property
    def lora_primary(self):
        """The name of the adapter whose factors are `lora_a` / `lora_b`."""
        return next(iter(self._lora_adapters))

    @property
    def lora_primary_adapter(self):
        """The primary `Adapter` record (what `enable_lora` made)."""
        # Kept beside the dict: read several times in every call.
        return self._lora_primary_record

    def lora_adapter(self, name):
        """The `Adapter` record called `name`."""
        if name not in self._lora_adapters:
            raise ValueError(
                f"Layer '{self.path}' has no adapter {name!r}. Its adapters: "
                f"{self.lora_adapter_names}"
            )
        return self._lora_adapters[name]

    def _lora_set_adapters(self, adapters):
        # A new dict each time: `atomic.py` restores the old one on failure.
        self._lora_set("_lora_adapters", dict(adapters))
        self._lora_set("_lora_primary_record", next(iter(adapters.values())))

    def _lora_replace_primary(self, adapter):
        """Puts `adapter` (a new primary record) first in place of the old."""
        _, *rest = self._lora_adapters.values()
        self._lora_set_adapters({a.name: a for a in [adapter, *rest]})

    def _lora_make_factors(self, adapter):
        """Adds `adapter`'s factor variables (and dropout seed) to the layer.

        The primary adapter's are `lora_a` / `lora_b`, another's
        `lora_a_<name>` / `lora_b_<name>`: one layout, each with its rank (A's
        rank axis is last, B's follows its group axes).

        Returns:
            The record with its variables.
        """
        a_shape, b_shape, d_in, d_out = self._lora_layout()
        lora_math.check_rank_fits(adapter.rank, d_in, d_out, self.name)
        groups = self._lora_group_count()
        a_shape = (*a_shape[:-1], adapter.rank)
        b_shape = (*b_shape[:groups], adapter.rank, *b_shape[groups + 1 :])
        suffix = "" if adapter.name == self.lora_primary else f"_{adapter.name}"
        settings = adapter.settings
        with self._lora_unlocked(), layouts.factor_layouts(self):
            a = self._lora_add_float32(
                f"lora_a{suffix}", a_shape, settings.a_initializer
            )
            b = self._lora_add_float32(
                f"lora_b{suffix}", b_shape, settings.b_initializer
            )
            seed = None
            if adapter.dropout > 0:
                seed = keras.random.SeedGenerator(name=f"lora_seed{suffix}")
                self._tracker.track(seed)
        return adapter.replaced(a=a, b=b, seed_generator=seed)

    def _lora_add_float32(self, name, shape, initializer, trainable=True):
        # Float32 under every dtype policy: bf16 factors stop learning.
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=initializer,
            dtype="float32",
            trainable=trainable,
        )

    @contextlib.contextmanager
    def _lora_unlocked(self):
        """Adding state to a built layer, as Keras's own `enable_lora` does."""
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            yield
        finally:
            if locked:
                self._tracker.lock()

    def add_lora_adapter(self, name, **settings):
        """Adds an adapter beside the existing ones (its update starts at 0).

        Args:
            name: a new adapter name (letters, digits, underscores).
            **settings: its `LoRASettings` (`rank`, `alpha`, `dropout`, ...).
                `use_dora` and `init` must be False and None: DoRA and
                PiSSA/OLoRA adapters are a layer's only adapter.
        """
        check_adapter_name(name)
        use_dora, init = settings.get("use_dora", False), settings.get("init")
        wanted = variants.variants_for(use_dora, init)
        if not all(v.shares_layer for v in (*self.lora_variants, *wanted)):
            raise ValueError(
                f"Layer '{self.path}' cannot hold a further adapter {name!r} "
                "beside a DoRA or PiSSA/OLoRA adapter: DoRA's update is not "
                "additive and PiSSA/OLoRA change the base kernel. Received: "
                f"use_dora={self.use_dora or use_dora}, "
                f"init={self.lora_init or init!r}"
            )
        if name in self._lora_adapters:
            raise ValueError(f"Layer '{self.path}' already has adapter {name!r}.")
        adapter = self._lora_make_factors(Adapter(name, LoRASettings(**settings)))
        self._lora_set_adapters({**self._lora_adapters, name: adapter})
        return adapter

    def remove_lora_adapter(self, name):
        """Drops one adapter's variables; the primary one only if others remain
        (the first of them becomes primary; its variables keep their names)."""
        adapter = self.lora_adapter(name)
        if len(self._lora_adapters) == 1:
            raise ValueError(
                f"Adapter {name!r} is the only one of layer '{self.path}': "
                "turn the layer back into its base class instead."
            )
        self._lora_untrack(adapter)
        self._lora_set_adapters(
            {n: a for n, a in self._lora_adapters.items() if n != name}
        )
        if self._lora_active is not None:
            active = tuple((n, w) for n, w in self._lora_active if n != name)
            self.set_lora_active(active)

    def _lora_untrack(self, adapter):
        """Takes `adapter`'s variables and seed out of the layer's tracking."""
        for variable in (adapter.a, adapter.b):
            self._untrack_variable(variable)
        if adapter.seed_generator is not None:
            self._seed_generators.remove(adapter.seed_generator)

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
            if active == ((self.lora_primary, 1.0),):
                active = None
            if active and not self.lora_variants[-1].additive:
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
            delta = update(self.lora_adapter(name))
            if weight != 1.0:
                delta = ops.multiply(delta, ops.cast(weight, delta.dtype))
            total = delta if total is None else ops.add(total, delta)
        return total

    def lora_active_pairs(self):
        """The active `(name, weight)` pairs, the fast path spelled out."""
        if self._lora_active is None:
            return ((self.lora_primary, 1.0),)
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

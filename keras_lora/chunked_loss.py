"""A memory-lean causal-LM loss: the vocabulary's logits in chunks of tokens.

In a causal LM's training step the logits (tokens x vocabulary, plus their
softmax and gradient) can outweigh the rest of the step: Llama 3's 128,256
logits per token are 0.5 MB each in float32. `use_chunked_loss` changes how
`model.fit` computes a KerasHub `CausalLM`'s loss, in place: in training the
model returns its backbone's hidden states, and the loss runs the logits
layer (`backbone.token_embedding(h, reverse=True)`) on `chunk_size` positions
at a time, each chunk under `keras.remat`, so its logits are recomputed in the
backward pass instead of kept (cf. torchtune's chunked cross-entropy). The
loss and the gradients are those of the plain path; `predict`, `generate`,
`evaluate` and calls outside `fit` are unchanged.

    causal_lm.compile(optimizer=...)          # the loss KerasHub picks
    keras_lora.use_chunked_loss(causal_lm)    # the one-line change
    causal_lm.fit(...)

Compiled metrics (KerasHub's default accuracy) are updated chunk by chunk
from logits computed without a gradient, as for a batch split in parts.
"""

import keras
from keras import ops

# The key of the training-time output that carries the hidden states.
HIDDEN = "keras_lora_hidden_states"


def use_chunked_loss(model, chunk_size=128):
    """Makes `model.fit` compute the causal-LM loss in chunks of tokens.

    Args:
        model: a KerasHub `CausalLM` (a `backbone` whose `token_embedding`
            is a `ReversibleEmbedding`: GPT-2, Llama, Gemma, Mistral, ...),
            compiled or not; compile it with a
            `SparseCategoricalCrossentropy(from_logits=True)` loss (KerasHub's
            default) before `fit`.
        chunk_size: positive int, the sequence positions per chunk: the
            logits of batch x `chunk_size` tokens exist at once.

    Returns:
        `model`, changed in place.

    Raises:
        ValueError: if `model` has no such logits layer, or `chunk_size` is
            not a positive int.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise ValueError(
            f"`chunk_size` must be a positive int. Received: chunk_size={chunk_size!r}"
        )
    if chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be a positive int. Received: chunk_size={chunk_size!r}"
        )
    backbone = getattr(model, "backbone", None)
    embedding = getattr(backbone, "token_embedding", None)
    if not isinstance(embedding, keras.layers.ReversibleEmbedding):
        raise ValueError(
            "`use_chunked_loss` needs a KerasHub `CausalLM`: a model whose "
            "`backbone.token_embedding` is a `ReversibleEmbedding` that makes "
            f"the logits. Received: model={model!r}"
        )
    model.__dict__["keras_lora_chunk_size"] = chunk_size
    if "call" in model.__dict__:  # already chunked: only the size changes
        return model
    model_class = type(model)

    def call(inputs, training=None, mask=None):
        if training is True:  # `fit`: the loss makes the logits
            return {HIDDEN: backbone(inputs, training=True)}
        return model_class.call(model, inputs, training=training, mask=mask)

    def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not (isinstance(y_pred, dict) and HIDDEN in y_pred):
            return model_class.compute_loss(
                model, x, y, y_pred, sample_weight, training=training
            )
        return chunked_loss(model, x, y, y_pred[HIDDEN], sample_weight)

    def compute_metrics(x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict) and HIDDEN in y_pred:
            return model.get_metrics_result()  # updated by `compute_loss`
        return model_class.compute_metrics(model, x, y, y_pred, sample_weight)

    model.__dict__["call"] = call
    model.__dict__["compute_loss"] = compute_loss
    model.__dict__["compute_metrics"] = compute_metrics
    return model


def _check_loss(model):
    loss = getattr(model, "loss", None)
    if not (
        isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
        and loss.get_config().get("from_logits")
        and loss.get_config().get("ignore_class") is None
    ):
        raise ValueError(
            "The chunked causal-LM loss computes a sparse categorical "
            "cross-entropy from the logits: compile the model with "
            "`loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)`"
            f" (KerasHub's default, no `ignore_class`). Received: loss={loss!r}"
        )
    return loss


class _PerToken(keras.losses.Loss):
    """Returns the per-token values it is given: Keras reduces and weighs
    them exactly as it reduces the plain loss's."""

    def call(self, y_true, y_pred):
        return y_pred


def chunked_loss(model, x, y, hidden, sample_weight=None):
    """The model's compiled loss, from hidden states, in chunks of tokens.

    Args:
        model: a model prepared by `use_chunked_loss`.
        x: the inputs (unused, as in `Model.compute_loss`).
        y: the target token ids, `(batch, sequence)`.
        hidden: the backbone's output, `(batch, sequence, hidden)`.
        sample_weight: the padding weights, `(batch, sequence)`, or None.

    Returns:
        The scalar loss: the compiled loss's reduction of the per-token
        cross-entropies, plus the model's additional losses.
    """
    del x
    loss = _check_loss(model)
    embedding = model.backbone.token_embedding
    size = model.__dict__["keras_lora_chunk_size"]
    length = hidden.shape[1]

    def chunk_loss(h, labels):
        logits = ops.cast(embedding(h, reverse=True), "float32")
        return keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )

    recomputed = keras.remat(chunk_loss)  # its logits: recomputed in backward
    # Chunks of positions, so that an unknown batch size (a TensorFlow
    # trace) still chunks.
    if length is None:  # an unknown sequence length: one chunk
        parts = [slice(None)]
    else:
        parts = [slice(s, min(s + size, length)) for s in range(0, length, size)]
    if (
        embedding.quantization_mode
        and len(parts) > 1
        and keras.backend.backend() == "jax"
    ):
        # A scan, not a Python loop: XLA could run a loop's chunks side by
        # side, each with its part of the unpacked table. (A float table is
        # better in the loop: in a scan XLA hoists its transpose, a copy.)
        # JAX only: Keras's TensorFlow `scan` rejects this step's shapes, and
        # torch runs the loop in order.
        per_token = _scan_chunks(recomputed, hidden, y, length, size)
    else:
        values = [recomputed(hidden[:, part], y[:, part]) for part in parts]
        per_token = ops.concatenate(values, axis=1) if len(parts) > 1 else values[0]
    by_position = sample_weight is not None and len(sample_weight.shape) == 2
    for part in parts:
        weights = sample_weight[:, part] if by_position else sample_weight
        _update_metrics(model, embedding, hidden[:, part], y[:, part], weights)
    total = _PerToken(name="chunked_loss", reduction=loss.reduction, dtype=loss.dtype)(
        y, per_token, sample_weight
    )
    for extra in model.losses:  # e.g. regularizers, as `compute_loss` adds
        total = ops.add(total, ops.cast(ops.sum(extra), total.dtype))
    return total


def _scan_chunks(chunk_loss, hidden, labels, length, size):
    """`chunk_loss` over chunks of `size` positions, one after another.

    The last chunk is padded, its extra values dropped (no gradient).
    """
    count = -(-length // size)
    pad = count * size - length
    if pad:
        hidden = ops.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = ops.pad(labels, ((0, 0), (0, pad)))
    chunks = (  # (chunk, batch, position, ...)
        ops.moveaxis(ops.reshape(hidden, (-1, count, size, hidden.shape[-1])), 1, 0),
        ops.moveaxis(ops.reshape(labels, (-1, count, size)), 1, 0),
    )

    def step(carry, chunk):
        return carry, chunk_loss(*chunk)

    _, values = ops.scan(step, ops.zeros(()), chunks)
    values = ops.reshape(ops.moveaxis(values, 0, 1), (-1, count * size))
    return values[:, :length]


def _update_metrics(model, embedding, h, labels, sample_weight):
    """Updates the compiled metrics with one chunk's logits (no gradient).

    Done here, where the variables of a stateless (JAX) step are in scope;
    `compute_metrics` then only reads the results.
    """
    if not any(m.name == "compile_metrics" for m in model.metrics):
        return  # compiled without metrics: no logits to make
    logits = embedding(ops.stop_gradient(h), reverse=True)
    type(model).compute_metrics(model, None, labels, logits, sample_weight)

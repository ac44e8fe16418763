"""From `enable_lora`'s arguments to the spec they describe.

A spec (`spec.py`) is what an adapted model records of its adapters: the
adapted layers by path with their settings, and the layers trained whole.
`enable_lora` and `add_adapter` make one here and apply it
(`transform.apply_spec`).
"""

from keras_lora import patterns
from keras_lora import targets as targets_lib
from keras_lora.layers.lora_layer import LoRALayer
from keras_lora.layers.lora_settings import LoRASettings
from keras_lora.model_paths import path_checker
from keras_lora.raw_weights import RawWeight, raw_weights
from keras_lora.spec import SPEC_VERSION


def build_spec(
    model,
    *,
    rank,
    alpha,
    targets,
    dropout,
    train_layers,
    use_rslora,
    adapted_ok=False,
    rank_pattern=None,
    alpha_pattern=None,
    use_dora=False,
    init=None,
):
    """Checks `enable_lora`'s arguments and returns the spec they describe.

    Args:
        model: the model.
        rank, alpha, targets, dropout, train_layers, use_rslora: as in
            `enable_lora`.
        adapted_ok: let `targets` select layers that already are LoRA layers
            (a further named adapter goes beside their existing ones).
        rank_pattern, alpha_pattern: per-layer ranks and alphas
            (`keras_lora/patterns.py`), recorded per layer in the spec.
        use_dora: DoRA on every selected layer (recorded when True).
        init: None, or a residual init (`"pissa"`/`"olora"`), recorded.
    """
    # The one check of the layers' settings (their `LoRASettings`).
    LoRASettings(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        init=init,
    )
    selected = targets_lib.match_layers(model, targets, "targets")
    targets_lib.check_adaptable(
        [lyr for lyr in selected if not (adapted_ok and isinstance(lyr, LoRALayer))]
    )
    trained = (
        targets_lib.match_layers(model, train_layers, "train_layers")
        if train_layers is not None
        else []
    )
    # A raw weight's layer trains all of it: `train_layers` names layers.
    trained = [lyr for lyr in trained if not isinstance(lyr, RawWeight)]
    overlap = [lyr for lyr in trained if any(lyr is s for s in selected)]
    if overlap:
        raise ValueError(
            f"Layer '{targets_lib.describe(overlap[0])}' is in both `targets` and "
            "`train_layers`: an adapted layer's base weights stay frozen."
        )
    patterns.check_patterns(rank_pattern, alpha_pattern)
    unique_path = path_checker(model, raw_weights(model))
    paths = [unique_path(lyr) for lyr in selected]
    patterns.check_all_used(rank_pattern, "rank_pattern", paths)
    patterns.check_all_used(alpha_pattern, "alpha_pattern", paths)
    layers = {}
    for path in paths:
        layers[path] = {
            "rank": patterns.pattern_value(rank_pattern, path, rank, "/"),
            "alpha": patterns.pattern_value(alpha_pattern, path, alpha, "/"),
            "dropout": dropout,
            "use_rslora": use_rslora,
        }
        if use_dora:
            layers[path]["use_dora"] = True
        if init is not None:
            layers[path]["init"] = init
    return {
        "version": SPEC_VERSION,
        "targets": targets
        if targets is None or isinstance(targets, str)
        else (list(targets) if isinstance(targets, (list, tuple)) else "callable"),
        "layers": layers,
        "train_layers": [unique_path(lyr) for lyr in trained],
    }

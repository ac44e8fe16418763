"""Adapter vs full model file sizes; time of `enable_lora` and `export_merged`."""

import os
import tempfile

import keras_lora
from benchmarks import models
from benchmarks.timing import timed


def _size_mb(path):
    return os.path.getsize(path) / 2**20


def file_sizes(config, dropout):
    """Sizes of the keras-lora adapter (q/v) and of the full model file."""
    model = models.build_classifier(config, dropout=dropout)
    keras_lora.enable_lora(model, rank=config["rank"], train_layers=["head"])
    result = {}
    with tempfile.TemporaryDirectory() as directory:
        save_adapter = getattr(keras_lora, "save_adapter", None)
        if save_adapter is not None:
            path = os.path.join(directory, "adapter.keras")
            save_adapter(model, path)
            result["adapter_mb"] = _size_mb(path)
        export_merged = getattr(keras_lora, "export_merged", None)
        path = os.path.join(directory, "merged.keras")
        if export_merged is not None:
            export_merged(model, path)
            result["full_model_mb"] = _size_mb(path)
            result["full_model_file"] = "keras_lora.export_merged"
        else:
            base = models.build_classifier(config, dropout=dropout)
            base.save(path)
            result["full_model_mb"] = _size_mb(path)
            result["full_model_file"] = "model.save of the base model"
    if "adapter_mb" in result:
        result["adapter_over_full"] = result["adapter_mb"] / result["full_model_mb"]
    return result


def large_model_times(config):
    """Seconds for `enable_lora` and `export_merged` on a large backbone."""
    # dropout 0.1 is GPT2Backbone's default: the same model as before.
    backbone = models.build_backbone(config, seed=0)
    result = {"parameters": int(backbone.count_params())}
    _, result["enable_lora_s"] = timed(
        lambda: keras_lora.enable_lora(backbone, rank=config["rank"])
    )
    export_merged = getattr(keras_lora, "export_merged", None)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "merged.keras")
        if export_merged is not None:
            _, result["export_merged_s"] = timed(lambda: export_merged(backbone, path))
            result["export_merged_mb"] = _size_mb(path)
        else:
            # Stand-in until `export_merged` lands: merge in place, then save.
            _, merge_s = timed(lambda: keras_lora.merge_lora(backbone))
            _, save_s = timed(lambda: backbone.save(path))
            result["merge_lora_s"] = merge_s
            result["model_save_s"] = save_s
    return result

"""`MergeLoRA`: export the merged model from `model.fit`."""

import operator
import warnings

import keras

from keras_lora.export import export_merged


class MergeLoRA(keras.callbacks.Callback):
    """Calls `export_merged` when training ends, or on each improvement.

    Like `keras.callbacks.ModelCheckpoint`, `filepath` may hold `{epoch}` and
    metric placeholders (`"merged-{epoch:02d}-{val_loss:.3f}.keras"`).

    Args:
        filepath: destination ending in `.keras` (placeholders allowed).
        monitor: the metric watched with `save_best_only`.
        mode: `"min"`, `"max"` or `"auto"` (max for accuracy/AUC-like names).
        save_best_only: export whenever `monitor` improves at an epoch end,
            instead of once when training ends.
        verbose: 1 prints a line for each export.
        dtype: passed to `export_merged` (e.g. `"float32"` on a bf16 base).
        quantize: passed to `export_merged`: `"same"` keeps a quantized
            base quantized in the file (int8/int4), None writes float.

    Example:

    >>> model.fit(x, y, callbacks=[keras_lora.MergeLoRA("merged.keras")])
    """

    def __init__(
        self,
        filepath,
        monitor="val_loss",
        mode="auto",
        save_best_only=False,
        verbose=0,
        dtype=None,
        quantize=None,
    ):
        super().__init__()
        if not isinstance(filepath, str) or not filepath.endswith(".keras"):
            raise ValueError(
                "`filepath` must be a str ending in '.keras'. "
                f"Received: filepath={filepath!r}"
            )
        if mode not in ("auto", "min", "max"):
            raise ValueError(
                f"`mode` must be 'auto', 'min' or 'max'. Received: mode={mode!r}"
            )
        if mode == "auto":
            higher = ("acc", "accuracy", "auc", "precision", "recall", "f1")
            mode = "max" if monitor.split("_")[-1] in higher else "min"
        self.filepath = filepath
        self.monitor = monitor
        self.mode = mode
        self.save_best_only = save_best_only
        self.verbose = verbose
        self.export_options = {"dtype": dtype, "quantize": quantize}
        self.best = None
        self.exported = []  # paths written, in order
        self._last_logs = {}
        self._epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._last_logs = epoch, dict(logs or {})
        if not self.save_best_only:
            return
        current = self._last_logs.get(self.monitor)
        if current is None:
            warnings.warn(
                f"MergeLoRA: `monitor={self.monitor!r}` is not in the epoch logs "
                f"(available: {sorted(self._last_logs)}); nothing exported.",
                stacklevel=2,
            )
            return
        better = operator.lt if self.mode == "min" else operator.gt
        if self.best is None or better(current, self.best):
            self.best = float(current)
            self._export()

    def on_train_end(self, logs=None):
        if not self.save_best_only:
            self._export()

    def _export(self):
        path = self.filepath.format(epoch=self._epoch + 1, **self._last_logs)
        export_merged(self.model, path, **self.export_options)
        self.exported.append(path)
        if self.verbose:
            print(f"MergeLoRA: exported the merged model to {path}")

"""A per-thread view of an object's class, for writing files.

`export_merged` writes a LoRA model as the plain model it was before
`enable_lora`: Keras's serializer names each layer by `layer.__class__`, so
that must read `Dense` for a `LoRADense`. Assigning the class would change
the layer for every thread, and a serving thread calling the model meanwhile
would compute without the update. Instead the writing thread sees the base
class through `class_view`, and every other thread sees the real class.
(`type(obj)`, method lookup and `isinstance` against the real class are
unchanged everywhere; only `obj.__class__` reads differently.)
"""

import contextlib
import threading

_VIEWS = threading.local()
_REAL_CLASS = object.__dict__["__class__"]  # the slot behind `obj.__class__`


@contextlib.contextmanager
def class_view(pairs):
    """Within it, on this thread, `obj.__class__` reads `cls` for each
    `(obj, cls)` pair (for objects of a `ClassViewMixin` class)."""
    previous = getattr(_VIEWS, "classes", None) or {}
    _VIEWS.classes = {**previous, **{id(obj): cls for obj, cls in pairs}}
    try:
        yield
    finally:
        _VIEWS.classes = previous


class ClassViewMixin:
    """Gives `__class__` the per-thread view of `class_view`."""

    # A data descriptor named `__class__`, as `unittest.mock` uses for specs.
    def _viewed_class(self):
        views = getattr(_VIEWS, "classes", None)
        if views:
            cls = views.get(id(self))
            if cls is not None:
                return cls
        return type(self)

    def _set_class(self, cls):
        _REAL_CLASS.__set__(self, cls)

    __class__ = property(_viewed_class, _set_class)

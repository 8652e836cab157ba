"""A pickle reader that admits only data: containers, numbers, strings and numpy arrays/dtypes.

Pickle runs whatever callable a file names (os.system, eval, ...); Detectron2's .pkl weights are
plain pickles. `safe_unpickle` resolves only the few globals needed to rebuild numpy arrays and
ordered dicts and refuses every other global *before* calling anything, so a malicious file raises
CheckpointError and executes nothing.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import IO, Any


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the model."""


# (module, name) pairs a data-only pickle may reference. Numpy moved its internals from numpy.core
# to numpy._core in 2.0; pickles written by either name the module they were written with.
_ALLOWED = {
    ("collections", "OrderedDict"),
    *((mod, name) for mod in ("builtins", "__builtin__")  # __builtin__: pickles written by Python 2
      for name in ("set", "frozenset", "slice", "complex", "bytearray")),
    ("_codecs", "encode"),  # protocol-2 pickles store bytes (numpy buffers) as latin-1 text + encode
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED |= {(f"{_core}.multiarray", "_reconstruct"), (f"{_core}.multiarray", "scalar"),
                 (f"{_core}.numeric", "_frombuffer")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source}: refusing to load '{module}.{name}': this pickle references code, and only plain "
            "data (dicts, lists, numbers, strings, numpy arrays) is allowed. If you trust the file, convert it "
            "to .safetensors in a trusted environment.")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: pickle uses persistent ids (a torch.save file?); "
                              "load it with torch.load(weights_only=True) instead")


def safe_unpickle(source: str | os.PathLike | bytes | IO[bytes]) -> Any:
    """Unpickle a file path, bytes or binary file object, admitting only plain data."""
    if isinstance(source, (bytes, bytearray)):
        name, stream = "<bytes>", io.BytesIO(source)
        return _load(stream, name)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise CheckpointError(f"checkpoint not found: {name}")
        with open(name, "rb") as f:
            return _load(f, name)
    return _load(source, getattr(source, "name", "<stream>"))


def _load(stream: IO[bytes], name: str) -> Any:
    try:
        return _RestrictedUnpickler(stream, name).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: not a readable pickle ({type(exc).__name__}: {exc})") from None

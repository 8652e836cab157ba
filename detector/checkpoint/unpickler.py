"""A pickle reader that admits only data: containers, numbers, strings and numpy arrays/dtypes.

Pickle runs whatever callable a file names (os.system, eval, ...); Detectron2's .pkl weights are
plain pickles. `safe_unpickle` resolves only the few globals needed to rebuild numpy arrays and
ordered dicts and refuses every other global *before* calling anything, so a malicious file raises
CheckpointError and executes nothing. With `plain=True` (data files such as the refer API's
`refs(unc).p`) no global at all is resolved: only what pickle builds without calling anything (dicts,
lists, tuples, strings, numbers) can come out.
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
    def __init__(self, file: IO[bytes], source: str, plain: bool = False):
        super().__init__(file, encoding="latin1")
        self.source = source
        self.plain = plain

    def find_class(self, module: str, name: str) -> Any:
        if not self.plain and (module, name) in _ALLOWED:
            return super().find_class(module, name)
        what = "dicts, lists, numbers, strings" + ("" if self.plain else ", numpy arrays")
        hint = ("" if self.plain
                else " If you trust the file, convert it to .safetensors in a trusted environment.")
        raise CheckpointError(f"{self.source}: refusing to load '{module}.{name}': this pickle references "
                              f"code, and only plain data ({what}) is allowed.{hint}")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: pickle uses persistent ids (a torch.save file?); "
                              "load it with torch.load(weights_only=True) instead")


def safe_unpickle(source: str | os.PathLike | bytes | IO[bytes], plain: bool = False) -> Any:
    """Unpickle a file path, bytes or binary file object, admitting only plain data (`plain`: not even
    numpy arrays or ordered dicts, i.e. no global of any kind)."""
    if isinstance(source, (bytes, bytearray)):
        name, stream = "<bytes>", io.BytesIO(source)
        return _load(stream, name, plain)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise CheckpointError(f"{'file' if plain else 'checkpoint'} not found: {name}")
        with open(name, "rb") as f:
            return _load(f, name, plain)
    return _load(source, getattr(source, "name", "<stream>"), plain)


def _load(stream: IO[bytes], name: str, plain: bool) -> Any:
    try:
        return _RestrictedUnpickler(stream, name, plain).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as exc:
        raise CheckpointError(f"{name}: not a readable pickle ({type(exc).__name__}: {exc})") from None

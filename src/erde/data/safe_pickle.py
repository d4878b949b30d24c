"""Read the pickles the CIFAR archives ship without letting a crafted one run code.

The official batches hold dicts, lists, strings, numbers and numpy arrays. A plain `pickle.load`
would also call any function a file names; this unpickler resolves only the few globals that
numpy arrays need and refuses every other one, whatever the file's md5 sum.
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO

import numpy as np

# numpy's array reconstructor, found through numpy's own reduction rather than a private module.
_reconstruct = np.zeros(0).__reduce__()[0]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol 2, and for no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


_ALLOWED = {
    # Python 2 numpy (the official files) and numpy 1.x name the reconstructor here ...
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    # ... numpy 2 names it here.
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which holds no data: erde never unpickles it"
            ) from None


def load_arrays_pickle(fh: BinaryIO) -> Any:
    """Unpickle plain data and numpy arrays; Python 2 strings are decoded as latin-1 (the
    encoding numpy needs for the raw bytes of Python 2 arrays)."""
    return _ArraysOnly(fh, encoding="latin1").load()

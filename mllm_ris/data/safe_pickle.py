"""A restricted unpickler for the ``refs(<splitBy>).p`` files of the refer datasets.

The refs pickles (RefCOCO/+/g, RefCLEF, R-RefCOCO) are downloaded from the internet, and a
plain ``pickle.load`` runs whatever callable the file names (``os.system`` included). The real
files hold only a list of ref dicts made of dicts, lists, strings and ints (they were written by
Python 2 with protocol 2, and the reference API ``lichengunc/refer`` simply calls
``pickle.load``): no class, no ``copy_reg._reconstructor``, no numpy. So this unpickler resolves
no global at all except the builtin container types that protocol 2 can only express through a
global (``set`` and ``frozenset``, spelled ``__builtin__.*`` by Python 2 and ``builtins.*`` by
Python 3). Every other ``find_class`` request - ``os.system``, ``numpy.core.multiarray``,
``copy_reg._reconstructor``, ``_codecs.encode`` (how Python 3 writes ``bytes`` at protocol 2) -
raises :class:`DatasetError` before anything is called. Persistent ids are refused too.

Python 2 ``str`` objects are decoded as latin-1 (every byte maps to one code point, so a
Python 2 pickle always loads; ASCII text, which is all the real files hold, is unchanged).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from mllm_ris.errors import DatasetError

__all__ = ["load_refs_pickle", "safe_loads"]

# The only globals a pickle of builtin containers and scalars can need (protocol <= 3 writes
# set / frozenset as ``GLOBAL + REDUCE``; protocol 4+ has dedicated opcodes).
_ALLOWED_GLOBALS: dict[tuple[str, str], type] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that refuses every global outside :data:`_ALLOWED_GLOBALS`."""

    def __init__(self, file: io.BufferedIOBase, *, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise DatasetError(
                f"refusing to unpickle {module}.{name} from {self._source}: refs pickles may only "
                "hold builtin containers and scalars"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(
            f"refusing to unpickle a persistent id from {self._source}: refs pickles may only "
            "hold builtin containers and scalars"
        )


def safe_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only builtin containers and scalars.

    Args:
        data: the pickle bytes (any protocol; Python 2 pickles included).
        source: the file name used in error messages.

    Returns:
        The unpickled object (dicts, lists, tuples, sets, str, bytes, int, float, bool, None).

    Raises:
        DatasetError: the pickle names a global other than ``set`` / ``frozenset`` (nothing it
            names is called), uses a persistent id, or is truncated / corrupt.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except DatasetError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise DatasetError(f"cannot unpickle {source}: {type(exc).__name__}: {exc}") from None


def load_refs_pickle(path: str | Path) -> Any:
    """Read a refs pickle with :func:`safe_loads`.

    Raises:
        DatasetError: the file is missing or unreadable, or :func:`safe_loads` refuses it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"refs pickle not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read refs pickle {path}: {exc}") from None
    return safe_loads(data, source=str(path))

"""Read the tensors of a TorchScript archive without running any of its code.

``torch.jit.save`` writes a zip with one top-level folder (``archive/``, the file's stem or any
other name) holding:

* ``data.pkl``: a pickle (protocol 2) of the module tree. Each module is a ``__torch__.*``
  class built as ``GLOBAL cls; EMPTY_TUPLE; NEWOBJ`` and filled by ``BUILD`` with a dict of
  its attributes: parameters and buffers (tensors, parameters first, then buffers),
  submodules (further such objects) and plain values (``training``, ints, strings, lists
  wrapped in ``torch.jit._pickle`` helpers, ...). A tensor is
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``,
  its storage a persistent id ``('storage', torch.<Type>Storage, key, location, numel)``
  whose bytes are the record ``data/<key>``. Every torch version that writes ``data.pkl``
  (1.3 to 2.x, OpenAI's CLIP files included) uses this typed-storage form; the Python
  pickler of ``torch.save`` writes the same, or ``torch.storage.UntypedStorage`` for raw
  bytes.
* ``data/<key>``: raw storage bytes, in the order named by ``byteorder`` (``little`` when
  that record is absent).
* ``code/``, ``constants.pkl``, ``version``: TorchScript source and constants. This reader
  never opens them.

``data.pkl`` is unpickled with an allow-list: the tensor rebuild functions and storage
types are replaced by functions written here, ``__torch__.*`` classes become inert records,
and any other global raises :class:`UnsafeArchiveError` without being imported.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import torch

from .archive_limits import MAX_CLIP_BYTES, archive_problem

__all__ = ["ArchiveFormatError", "UnsafeArchiveError", "is_torchscript_archive",
           "read_torchscript_state_dict"]

_CHUNK = 1 << 24
_MAX_DEPTH = 200


class ArchiveFormatError(ValueError):
    """The file is not a readable torch zip archive (truncated, corrupt, incomplete)."""


class UnsafeArchiveError(ValueError):
    """The archive's pickle references a global outside the allow-list."""


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16,
    "ByteStorage": torch.uint8, "CharStorage": torch.int8, "ShortStorage": torch.int16,
    "IntStorage": torch.int32, "LongStorage": torch.int64, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = ("float16", "half", "float32", "float", "float64", "double", "bfloat16",
                "uint8", "int8", "int16", "short", "int32", "int", "int64", "long", "bool",
                "complex64", "complex128")


class _Sealed:
    """Base of the objects this reader hands to pickle: a ``BUILD`` on them (which could
    otherwise set their slots, e.g. a storage's length) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeArchiveError("tries to modify a storage or tensor after building it")


class _StorageType(_Sealed):
    """Stands in for a ``torch.*Storage`` class (or dtype) named in the pickle."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage(_Sealed):
    """One ``data/<key>`` record: its bytes as an untyped storage and the dtype they hold."""

    __slots__ = ("dtype", "numel", "untyped")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, numel: int) -> None:
        self.untyped, self.dtype, self.numel = untyped, dtype, numel


class _TensorRef(_Sealed):
    """A rebuilt tensor, wrapped so that pickle cannot reach ``Tensor.__setstate__`` (whose
    ``set_`` does no bounds checks)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _Record:
    """An instance of a scripted ``__torch__`` class: nothing but its pickled attributes."""

    attrs: dict
    args: tuple

    def __new__(cls, *args: Any) -> _Record:
        obj = object.__new__(cls)
        obj.attrs, obj.args = {}, args
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.attrs.update(state)
        else:
            self.attrs["__state__"] = state


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry value {value!r}")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRef:
    """A view of ``storage``, after checking that it lies inside it (``set_`` would quietly
    grow the storage instead)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something other than a storage")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) \
            or len(size) != len(stride):
        raise pickle.UnpicklingError("bad tensor size/stride")
    offset, size, stride = _int(offset), [_int(n) for n in size], [_int(s) for s in stride]
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise pickle.UnpicklingError("tensor reaches past the end of its storage")
    return _TensorRef(torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, size,
                                                                stride))


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    # requires_grad, backward hooks and metadata are dropped: a state dict holds plain tensors.
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("parameter rebuilt from something other than a tensor")
    return data


def _first(value: Any, *_: Any) -> Any:
    return value


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "complex"): complex,
    # TorchScript wraps typed lists/dicts in these; all return their first argument.
    **{("torch.jit._pickle", f"build_{kind}list"): _first
       for kind in ("int", "double", "bool", "tensor")},
    ("torch.jit._pickle", "restore_type_tag"): _first,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
    **{("torch", name): _StorageType(getattr(torch, name)) for name in _DTYPE_NAMES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str, zf: zipfile.ZipFile, prefix: str,
                 big_endian: bool) -> None:
        super().__init__(file)
        self._path, self._zf, self._prefix, self._big = path, zf, prefix, big_endian
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _Record
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeArchiveError(
                f"'{self._path}' references the global '{module}.{name}', which a weights "
                "file has no use for; refusing to load it") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError(f"bad storage record {str(pid)[:80]}")
        dtype, cached = stype.dtype, self._storages.get(key)
        if cached is None:
            cached = self._storages[key] = self._read_storage(key, dtype, _int(numel))
        elif cached.dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key} is read with two dtypes")
        return cached

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        nbytes = numel * itemsize
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f"missing storage record {name}") from None
        if info.file_size < nbytes:
            raise pickle.UnpicklingError(f"storage record {name} is shorter than its tensor")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
        with self._zf.open(info) as f:
            done = 0
            while done < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - done))
                if not chunk:
                    raise pickle.UnpicklingError(f"storage record {name} ends early")
                view[done:done + len(chunk)] = chunk
                done += len(chunk)
        if self._big and itemsize > 1:
            unit = itemsize // 2 if dtype.is_complex else itemsize
            buf = buf.view(-1, unit).flip(1).reshape(-1)
        return _Storage(buf.untyped_storage(), dtype, numel)


def _archive_prefix(names: list[str]) -> str | None:
    """The top-level folder holding ``data.pkl``, or None."""
    found = [n[:-len("/data.pkl")] for n in names
             if n.endswith("/data.pkl") and n.count("/") == 1]
    return found[0] if len(found) == 1 else None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a zip with ``<folder>/data.pkl`` and ``<folder>/code/`` or ``constants.pkl``."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    prefix = _archive_prefix(names)
    return prefix is not None and any(
        n.startswith(f"{prefix}/code/") or n == f"{prefix}/constants.pkl" for n in names)


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], path: list[int]) -> None:
    """Tensor attributes at ``prefix + name``, then each submodule record, depth first."""
    if id(obj) in path or len(path) > _MAX_DEPTH:
        raise pickle.UnpicklingError("module tree is cyclic or too deep")
    attrs = obj.attrs if isinstance(obj, _Record) else obj
    subs = []
    for name, value in attrs.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, _TensorRef):
            out[prefix + name] = value.tensor
        elif isinstance(value, _Record):
            subs.append((name, value))
    for name, sub in subs:
        _flatten(sub, f"{prefix}{name}.", out, path + [id(obj)])


def read_torchscript_state_dict(path: str | os.PathLike, max_bytes: int = MAX_CLIP_BYTES
                                ) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (or a zip-format ``torch.save``
    of a state dict) as CPU tensors, keyed and ordered as ``torch.jit.load(path)
    .state_dict()``; tensors that share a storage in the file share it here too.

    Raises :class:`UnsafeArchiveError` when ``data.pkl`` references a global outside the
    allow-list or the archive declares more bytes than ``max_bytes`` or than its compression
    allows (``models.archive_limits``; checked before any entry is read), and
    :class:`ArchiveFormatError` when the file is not a readable archive."""
    path = os.fspath(path)
    try:
        problem = archive_problem(path, max_bytes)
    except OSError:
        raise ArchiveFormatError(f"'{path}' does not exist or cannot be read") from None
    if problem is not None:
        raise UnsafeArchiveError(f"'{path}' {problem}; refusing to read it")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf.namelist())
            if prefix is None:
                raise ArchiveFormatError(f"'{path}' is a zip without a <folder>/data.pkl "
                                         "record; not a TorchScript archive")
            try:
                order = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            except KeyError:
                order = "little"
            if order not in ("little", "big"):
                raise ArchiveFormatError(f"'{path}' has an unknown byte order {order[:20]!r}")
            with zf.open(f"{prefix}/data.pkl") as f:
                root = _Unpickler(f, path, zf, prefix, order == "big").load()
            if not isinstance(root, (_Record, dict)):
                raise ArchiveFormatError(f"'{path}' does not hold a module or a state dict")
            out: dict[str, torch.Tensor] = {}
            _flatten(root, "", out, [])
            return out
    except UnsafeArchiveError as e:
        if path in str(e):
            raise
        raise UnsafeArchiveError(f"'{path}' {e}") from None
    except ArchiveFormatError:
        raise
    except FileNotFoundError:
        raise ArchiveFormatError(f"'{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and geometry errors alike
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise ArchiveFormatError(f"'{path}' is not a readable TorchScript archive "
                                 f"({type(e).__name__}: {detail})") from None

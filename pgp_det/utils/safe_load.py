"""Read checkpoint files without running code they contain.

Python pickles can call any function while they load, so a crafted checkpoint runs its payload
the moment a careless loader opens it. Every weights file pgp_det reads goes through
:func:`read_checkpoint_file`:

* ``.pth`` / ``.pt`` (PyTorch): ``torch.load(weights_only=True)``, which rebuilds tensors and
  plain containers (dict, list, tuple, str, numbers, None) and refuses everything else. pgp_det's
  own checkpoints (weights, ``pgp_architecture``, hook state, optimizer, scheduler, iteration)
  hold nothing else.
* ``.pkl`` (detectron2 model zoo, Caffe2 conversions): :class:`RestrictedUnpickler`, which
  rebuilds dicts, lists, tuples, strings, bytes, numbers and NumPy arrays of numbers, and refuses
  every other global the file names.

A file that needs anything else is refused with one line naming the file and what it holds.
``trusted=True`` (the tools' ``--trust-weights``) opts in to plain unpickling of a file the user
vouches for: that runs whatever code the file holds, and is never the default.
"""
import codecs
import collections
import importlib
import io
import os
import pickle
import re
from typing import Any, Dict

import numpy as np
import torch

from ..errors import UserInputError

# the checkpoint entry that records a pruned model's widths (pgp_det.checkpoint.architecture_record)
ARCHITECTURE_KEY = "pgp_architecture"

__all__ = ["RestrictedUnpickler", "read_checkpoint_file", "TRUST_HINT"]

TRUST_HINT = "if you trust the file and its source, pass --trust-weights (this runs the code the file holds)"


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as Python 2 / protocol-2 pickles of bytes use it, for latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding, errors)


def _numpy_globals() -> Dict[tuple, Any]:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # the module that pickled arrays name moved from numpy.core to numpy._core in NumPy 2
    multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for name in ("_reconstruct", "scalar"):
            allowed[(module, name)] = getattr(multiarray, name)
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _frombuffer
    for kind in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType",
                 "Int8DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType"):
        dtype_class = getattr(getattr(np, "dtypes", None), kind, None)
        if dtype_class is not None:
            allowed[("numpy.dtypes", kind)] = dtype_class
    return allowed


def _frombuffer(buffer, dtype, shape, order):
    """NumPy's protocol-5 array rebuild, for numeric dtypes only."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for weights: dicts, lists, tuples, strings, bytes, numbers and NumPy arrays.

    Any other global a pickle names (a class, a function such as ``os.system``) raises
    ``pickle.UnpicklingError`` naming it, before anything is called.
    """

    _ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str):
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names the Python object {module}.{name}")
        return found


# torch names the refused global in its message ("... unsupported GLOBAL posix.system ..."); wording varies
_WEIGHTS_ONLY_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _refused(path: str, what: str) -> UserInputError:
    return UserInputError(
        f"checkpoint '{path}' was refused: {what}, which could run code when loaded; "
        f"use weights saved by pgp_det or detectron2, or {TRUST_HINT}"
    )


def _check_plain(value, path: str, depth: int = 0) -> None:
    """Refuse arrays of Python objects (the restricted unpickler builds them from plain values)."""
    if depth > 64:
        raise UserInputError(f"cannot read checkpoint '{path}': it is nested more than 64 levels deep")
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise _refused(path, "it holds an array of Python objects")
    if isinstance(value, dict):
        for item in value.values():
            _check_plain(item, path, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, path, depth + 1)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _load_pth(path: str, trusted: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "weights_only" in message or "GLOBAL" in message:
            found = _WEIGHTS_ONLY_GLOBAL.search(message)
            what = f"it pickles the Python object {found.group(1)}" if found else "it pickles Python objects"
            raise _refused(path, what) from None
        raise UserInputError(f"cannot read checkpoint '{path}': not a PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file is a bad file, not a crash
        raise UserInputError(
            f"cannot read checkpoint '{path}': not a PyTorch checkpoint ({_first_line(e)})"
        ) from None


def _load_pkl(path: str, trusted: bool):
    try:
        with open(path, "rb") as f:
            if trusted:
                return pickle.load(f, encoding="latin1")
            return RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        message = str(e)
        if message.startswith("it names") or "array of Python objects" in message or "_codecs" in message:
            raise _refused(path, message) from None
        raise UserInputError(f"cannot read checkpoint '{path}': not a valid pickle ({message})") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed: one line, not a traceback
        raise UserInputError(f"cannot read checkpoint '{path}': not a valid pickle ({_first_line(e)})") from None


def _plain_record(record):
    """A ``pgp_architecture`` record read from a pickle, its numpy integers made Python ints (the
    record's own check, :func:`pgp_det.checkpoint.apply_architecture`, takes ints only)."""
    if not isinstance(record, dict):
        return record
    return {key: int(value) if isinstance(value, np.integer) else value for key, value in record.items()}


def _is_weights(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray, np.generic, int, float))


def read_checkpoint_file(path: str, trusted: bool = False) -> Dict[str, Any]:
    """Load a weights file without executing code, in detectron2's checkpoint layout.

    Args:
        path: a local ``.pth``/``.pt`` (PyTorch) or ``.pkl`` (detectron2 / Caffe2) file.
        trusted: allow any pickled Python object (runs code the file holds).

    Returns:
        ``{"model": {name: tensor or array}, ...}``: a PyTorch checkpoint's own entries (a bare
        state dict becomes ``{"model": state}``); for ``.pkl`` files the weights with
        ``"__author__"`` and ``"matching_heuristics": True`` (detectron2 converts their names), and
        Caffe2 ``blobs`` without their ``_momentum`` entries.

    Raises:
        UserInputError: the file is missing, unreadable, not a checkpoint, holds anything but
            plain data (unless ``trusted``), or holds no weights.
    """
    if not os.path.isfile(path):
        raise UserInputError(f"checkpoint '{path}' does not exist")
    if path.endswith(".pkl"):
        data = _load_pkl(path, trusted)
        if not trusted:
            _check_plain(data, path)
        if not isinstance(data, dict):
            raise UserInputError(f"cannot read checkpoint '{path}': it holds a {type(data).__name__}, not a dict of weights")
        if "model" in data and "__author__" in data:  # detectron2's model zoo layout
            record = data.get(ARCHITECTURE_KEY)
            data = {"model": data["model"], "__author__": data["__author__"], "matching_heuristics": True}
            if record is not None:  # a pruned model shared in that layout: its widths, checked where applied
                data[ARCHITECTURE_KEY] = _plain_record(record)
        else:  # a Caffe2 conversion: {"blobs": {name: array}} or the blobs themselves
            blobs = data.get("blobs", data)
            if not isinstance(blobs, dict):
                raise UserInputError(f"cannot read checkpoint '{path}': its 'blobs' entry is not a dict of weights")
            blobs = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
            data = {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
    else:
        data = _load_pth(path, trusted)
        if not isinstance(data, dict):
            raise UserInputError(f"cannot read checkpoint '{path}': it holds a {type(data).__name__}, not a dict of weights")
        if "model" not in data:
            data = {"model": data}
    model = data["model"]
    if not isinstance(model, dict) or not model:
        raise UserInputError(f"cannot read checkpoint '{path}': its 'model' entry holds no weights")
    bad = next((k for k, v in model.items() if not isinstance(k, str) or not _is_weights(v)), None)
    if bad is not None:
        raise UserInputError(
            f"cannot read checkpoint '{path}': model entry {bad!r} is a {type(model[bad]).__name__}, not a tensor"
        )
    return data

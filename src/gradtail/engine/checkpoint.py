"""RNG state capture and seeding for checkpoints, and the conversion of checkpoints written by earlier
versions (the files themselves: :mod:`gradtail.rundir`).

Checkpoints hold only tensors and plain data, so they load with ``torch.load(weights_only=True)``
(:func:`gradtail.rundir.load_checkpoint`): the random-number states are stored as

- ``torch``: the CPU generator's state (a uint8 tensor, as ``torch.get_rng_state`` returns it);
- ``numpy``: ``{"bit_generator", "key", "pos", "has_gauss", "cached_gaussian"}``, the legacy
  ``np.random.get_state()`` tuple with its uint32 key as an int64 tensor;
- ``python``: ``{"version", "internal", "gauss_next"}``, ``random.getstate()`` with its 625 integers as a
  list;
- ``cuda`` (when CUDA was initialised): the list of per-device state tensors.

:func:`restore_rng_state` puts every generator back exactly (a resumed run stays bit-identical).
:func:`upgrade_checkpoint` converts a checkpoint of format 2 (NumPy arrays and tuples pickled as
objects) for ``gradtail checkpoint upgrade PATH --trust``: it unpickles the file, which runs whatever
code the file holds, so it runs only on the user's explicit ``--trust``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.errors import ConfigError, DataError
from gradtail.rundir import (
    CHECKPOINT_VERSION,
    UnsafeCheckpointError,
    load_checkpoint,
    plain_data_problem,
    safe_load,
    save_checkpoint,
)


def capture_rng_state() -> dict[str, Any]:
    """Every generator a run draws from, as tensors and plain data (module docstring).

    Example:
        >>> import random
        >>> state = capture_rng_state()
        >>> a = random.random(), float(np.random.rand()), float(torch.rand(()))
        >>> restore_rng_state(state)
        >>> (random.random(), float(np.random.rand()), float(torch.rand(()))) == a
        True
    """
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "internal": [int(v) for v in internal],
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators :func:`capture_rng_state` recorded; a state of another layout (a
    checkpoint of an earlier format) is a one-line :class:`DataError`."""
    try:
        numpy_state, python_state = state["numpy"], state["python"]
        key = torch.as_tensor(numpy_state["key"]).numpy().astype(np.uint32)
        np_tuple = (
            str(numpy_state["bit_generator"]),
            key,
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
        gauss = python_state["gauss_next"]
        py_tuple = (
            int(python_state["version"]),
            tuple(int(v) for v in python_state["internal"]),
            None if gauss is None else float(gauss),
        )
    except (KeyError, TypeError, IndexError, ValueError):
        raise DataError(
            "the checkpoint's random-number state has an unknown layout (written by another gradtail "
            "version); convert it with gradtail checkpoint upgrade PATH --trust"
        ) from None
    torch.set_rng_state(state["torch"])
    np.random.set_state(np_tuple)
    random.setstate(py_tuple)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- earlier formats


def _legacy_rng(rng: Any) -> dict[str, Any]:
    """Format 2's RNG entry (NumPy's state tuple, ``random.getstate()``'s tuple) in the current layout."""
    if not isinstance(rng, dict):
        raise DataError(f"checkpoint['rng'] (a {type(rng).__module__}.{type(rng).__qualname__})")
    out: dict[str, Any] = {"torch": torch.as_tensor(rng["torch"])}
    numpy_state = rng.get("numpy")
    if isinstance(numpy_state, (tuple, list)):
        kind, key, pos, has_gauss, cached_gaussian = numpy_state[:5]
        numpy_state = {
            "bit_generator": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    python_state = rng.get("python")
    if isinstance(python_state, (tuple, list)):
        version, internal, gauss_next = python_state
        python_state = {
            "version": int(version),
            "internal": [int(v) for v in internal],
            "gauss_next": None if gauss_next is None else float(gauss_next),
        }
    out["numpy"], out["python"] = numpy_state, python_state
    if rng.get("cuda") is not None:
        out["cuda"] = [torch.as_tensor(t) for t in rng["cuda"]]
    return out


def _plain(value: Any, where: str) -> Any:
    """``value`` with NumPy arrays as tensors and NumPy scalars as Python numbers (recursively); any
    other object is a :class:`DataError` naming where it is and its type."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if value is None or type(value) in (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size):
        return value
    raise DataError(f"{where} (a {type(value).__module__}.{type(value).__qualname__})")


def upgrade_checkpoint(path: Path, output: Path | None = None, trust: bool = False) -> str:
    """Rewrite a checkpoint of an earlier format as tensors and plain data (format
    :data:`gradtail.rundir.CHECKPOINT_VERSION`), into ``output`` (default: ``path`` itself, replaced
    atomically); returns a line saying what was done.

    The file is unpickled with ``weights_only=False``, which runs any code it holds: only with ``trust``
    (``--trust``: the user knows where the file comes from). A file that already loads safely is
    rewritten only when its format is older. Anything that is not a tensor, NumPy data or plain data is a
    :class:`DataError` naming it; nothing is written then.
    """
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    target = output if output is not None else path
    try:
        state = safe_load(path)
    except UnsafeCheckpointError:
        if not trust:
            raise ConfigError(
                f"{path} holds pickled objects: upgrading it unpickles it, which runs whatever code it "
                "holds; pass --trust only for a file whose source you trust"
            ) from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # whatever the pickle raises
            raise DataError(f"{path} cannot be unpickled ({e.__class__.__name__}: {e})") from None
    else:
        if isinstance(state, dict) and int(state.get("version", 0)) >= CHECKPOINT_VERSION:
            load_checkpoint(path)  # a complete gradtail checkpoint
            if output is None:
                return f"{path} is already a format-{CHECKPOINT_VERSION} checkpoint: nothing to do"
            save_checkpoint(state, target)
            return f"{path} is already a format-{CHECKPOINT_VERSION} checkpoint: copied to {target}"
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DataError(f"{path} is not a gradtail checkpoint (missing model/config entries)")
    before = int(state.get("version", 0))
    converted = dict(state)
    try:
        if "rng" in converted:
            converted["rng"] = _legacy_rng(converted["rng"])
        converted = _plain(converted, "checkpoint")
    except DataError as e:  # an object that is not NumPy or plain data: nothing is written
        raise DataError(f"{path}: cannot convert {e}: it is not a checkpoint gradtail wrote") from None
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot convert its state ({e.__class__.__name__}: {e})") from None
    converted["version"] = CHECKPOINT_VERSION
    problem = plain_data_problem(converted)
    if problem is not None:
        raise DataError(f"{path}: cannot convert {problem}")
    save_checkpoint(converted, target)
    return f"{path}: format {before} -> {CHECKPOINT_VERSION} (tensors and plain data) -> {target}"


__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything", "upgrade_checkpoint"]

"""What every task's exporter shares: where files go, the ONNX and TorchScript writers, the per-class
affine map a post-hoc adjustment (or a loss's test-time transform) becomes, and the onnxruntime check.

A linear adjustment of the logits, z -> z * scale + offset per class, is folded into a linear
classifier's weights and bias: W' = scale * W, b' = scale * b + offset (computed in float64, stored in
float32); after any other head it is a :class:`ClassAffine` layer in the exported graph. Either way the
exported model's output already includes it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtail.errors import ConfigError, DataError, OutputError
from gradtail.rundir import EXPORTS, make_directory, write_json

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
EXTRA = "pip install 'gradtail[export]'"
EXPORT_DIR = EXPORTS  # <run>/export/model.onnx by default


def check_format(fmt: str) -> None:
    """One of :data:`FORMATS`, or a one-line :class:`ConfigError`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def output_paths(fmt: str, output: str | None, checkpoint: Path) -> tuple[Path, Path]:
    """(model file, JSON sidecar): ``output`` (its sidecar beside it, ``<stem>.json``), by default
    ``<run>/export/model.onnx`` (``model.pt`` for TorchScript) of the checkpoint's run."""
    check_format(fmt)
    if output is None:
        model = checkpoint.parent.parent / EXPORT_DIR / f"model{SUFFIXES[fmt]}"
    else:
        model = Path(output)
        if model.suffix.lower() == ".json":
            raise ConfigError(
                f"--output {model}: the model file cannot be .json (the sidecar is written beside it)"
            )
    return model, model.with_name(model.stem + ".json")


# --------------------------------------------------------------------------- linear adjustments


class ClassAffine(nn.Module):
    """z -> z * scale + offset along the class dimension (``dim`` 1: (N, C) or (N, C, H, W))."""

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.broadcast_to(scale.double(), (num_classes,)).float().clone())
        self.register_buffer("offset", torch.broadcast_to(offset.double(), (num_classes,)).float().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return z * self.scale.view(shape) + self.offset.view(shape)


def affine_of(
    fn: Callable[[torch.Tensor], torch.Tensor], num_classes: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset), float64 (C,), of a per-class affine map of (N, C) logits, read from its values at 0
    and at the unit vectors, then checked on random logits; a map that is not one (it mixes classes or
    is not linear) is a one-line :class:`ConfigError` naming ``what``."""
    c = num_classes
    with torch.no_grad():
        offset = fn(torch.zeros(1, c)).double()[0]
        unit = fn(torch.eye(c)).double()
        scale = torch.diagonal(unit) - offset
        gen = torch.Generator().manual_seed(0)
        probe = 4.0 * torch.randn(16, c, generator=gen)
        got = fn(probe).double()
    want = probe.double() * scale + offset
    off_diagonal = unit - torch.diag(torch.diagonal(unit)) - (1 - torch.eye(c, dtype=torch.float64)) * offset
    tol = 1e-5 * (1.0 + want.abs().max())
    if float((got - want).abs().max()) > tol or float(off_diagonal.abs().max()) > tol:
        raise ConfigError(
            f"{what} is not a per-class affine map of the logits: it cannot be folded into an export"
        )
    return scale, offset


def fold_affine(
    head: nn.Module, scale: torch.Tensor, offset: torch.Tensor, num_classes: int
) -> tuple[nn.Module, str]:
    """``head`` followed by z -> z * scale + offset, as one module, and how it was applied: folded into the
    weights and bias of a linear head (``nn.Linear``), a :class:`ClassAffine` after any other head, or
    nothing at all for the identity."""
    scale = torch.broadcast_to(scale.double(), (num_classes,))
    offset = torch.broadcast_to(offset.double(), (num_classes,))
    if bool((scale == 1).all()) and bool((offset == 0).all()):
        return copy.deepcopy(head), "none (the identity)"
    if isinstance(head, nn.Linear):
        w = head.weight.detach().double() * scale[:, None]
        zero = torch.zeros(num_classes, dtype=torch.float64)
        b = head.bias.detach().double() if head.bias is not None else zero
        folded = nn.Linear(w.shape[1], w.shape[0], bias=True)
        with torch.no_grad():
            folded.weight.copy_(w.to(head.weight.dtype))
            folded.bias.copy_((b * scale + offset).to(head.weight.dtype))
        return folded, "folded into the classifier's weights and bias"
    return nn.Sequential(copy.deepcopy(head), ClassAffine(scale, offset, num_classes)), (
        f"a per-class affine layer after the {type(head).__name__} (not linear: nothing to fold into)"
    )


def linear_head(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (C, D) and ``bias`` (C,) or None."""
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            assert head.bias is not None
            head.bias.copy_(bias.float())
    return head


# --------------------------------------------------------------------------- writers


def require_onnx() -> None:
    """The ONNX exporter's packages, or a one-line :class:`ConfigError` naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(f"--format onnx needs the ONNX exporter: {EXTRA}") from None


def _replace(tmp: Path, path: Path, what: str) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {what} {path}: {e.strerror or e}") from None


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{error.__class__.__name__}: {text[:240]}"


def write_onnx(
    module: nn.Module,
    example: tuple[Any, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Any = None,
    dynamic_axes: Mapping[str, Sequence[int]] | None = None,
    legacy: bool = False,
    what: str = "the model",
) -> None:
    """Export ``module`` traced on ``example`` to ``path`` (atomically). By default through
    ``torch.export`` (``dynamo=True``, ``dynamic_shapes``); with ``legacy``, through the TorchScript-based
    exporter torchvision's detectors are documented with (opset 17, ``dynamic_axes``). A model the
    exporter cannot take is a one-line :class:`ConfigError`."""
    require_onnx()
    make_directory(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    module.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            if legacy:
                torch.onnx.export(module, example, str(tmp), dynamo=False, opset_version=17,
                                  input_names=list(input_names), output_names=list(output_names),
                                  dynamic_axes=dict(dynamic_axes or {}))  # fmt: skip
            else:
                program = torch.onnx.export(module, example, dynamo=True, input_names=list(input_names),
                                            output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                            verbose=False)  # fmt: skip
                assert program is not None
                program.save(str(tmp))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write ONNX model {path}: {e.strerror or e}") from None
    except Exception as e:  # the exporter's many failure types: one line
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{what} does not export to ONNX ({_first_line(e)})") from None
    _replace(tmp, path, "ONNX model")


def write_torchscript(
    module: nn.Module, example: tuple[Any, ...], path: Path, what: str = "the model"
) -> None:
    """Trace ``module`` on ``example`` with ``torch.jit.trace`` and save it to ``path`` (atomically)."""
    make_directory(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False)
            traced.save(str(tmp))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write TorchScript model {path}: {e.strerror or e}") from None
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{what} does not export to TorchScript ({_first_line(e)})") from None
    _replace(tmp, path, "TorchScript model")


def run_exported(fmt: str, path: Path, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor] | None:
    """The outputs of the exported file on ``inputs``: onnxruntime (None when it is not installed) or
    ``torch.jit.load``."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            loaded = torch.jit.load(str(path))
        with torch.no_grad():
            out = loaded(*inputs.values())
        return [t.detach() for t in (out if isinstance(out, (tuple, list)) else [out])]
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


def max_float_difference(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between corresponding floating outputs (exact-match required of
    the others: a differing integer output is reported as infinity)."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return float("inf")
        if a.dtype.is_floating_point:
            worst = max(worst, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
        elif not torch.equal(a.long(), b.long()):
            return float("inf")
    return worst


def check_exported(
    fmt: str, path: Path, inputs: Mapping[str, torch.Tensor], want: Sequence[torch.Tensor], tolerance: float
) -> dict[str, Any]:
    """Run the written file on ``inputs`` and compare with ``want`` (the eager model's outputs); a file
    whose outputs differ by more than ``tolerance`` is a :class:`DataError` (and is removed)."""
    got = run_exported(fmt, path, inputs)
    runtime = "onnxruntime" if fmt == "onnx" else "torch.jit"
    if got is None:
        return {"runtime": None, "note": "onnxruntime is not installed: the file was not run"}
    diff = max_float_difference(got, want)
    if not diff <= tolerance:
        path.unlink(missing_ok=True)
        raise DataError(
            f"the exported {fmt} model differs from the PyTorch model by {diff:.3g} (> {tolerance}) under "
            f"{runtime}; nothing was written"
        )
    return {"runtime": runtime, "max_abs_difference": diff, "tolerance": tolerance,
            "inputs": {k: list(v.shape) for k, v in inputs.items()}}  # fmt: skip


def write_sidecar(path: Path, record: dict[str, Any]) -> None:
    """The JSON sidecar beside the model file (atomically)."""
    write_json(path, record, "export sidecar")


def describe_module_output(fmt: str, path: Path, sidecar: Path) -> str:
    return f"{fmt} model -> {path} (sidecar {sidecar})"


__all__ = [
    "EXPORT_DIR",
    "FORMATS",
    "ClassAffine",
    "affine_of",
    "check_exported",
    "check_format",
    "fold_affine",
    "linear_head",
    "max_float_difference",
    "output_paths",
    "require_onnx",
    "run_exported",
    "write_onnx",
    "write_sidecar",
    "write_torchscript",
]

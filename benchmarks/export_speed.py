"""``gradtail export``: how long an export takes, and images/s of the exported model under onnxruntime
against PyTorch eager (and the TorchScript file), in the same run on the same machine. Writes JSON.

Two runs, trained here unless given (``--run``, ``--seg-run``; a finished run is reused):

- classification: Fashion-MNIST-LT IF100, the small CNN of ``configs/fashion_mnist_lt/base.yaml`` (2
  epochs, float32), exported with ``--posthoc posthoc_la`` folded in;
- segmentation: the Fashion-MNIST canvases of ``configs/segmentation/fmnist_seg_ce.yaml`` (``seg_small``,
  64 x 64, 2 epochs).

For each, ``gradtail export`` to ONNX and to TorchScript is timed (in this process; the first export
also imports the ONNX exporter), then images/s at each ``--batch-sizes`` on the same random inputs for:
PyTorch eager (the exported module itself, float32, ``torch.inference_mode``; in contiguous and in
channels-last memory format, the runs' training format), the TorchScript file (``torch.jit.load``) and the
ONNX file (onnxruntime, CPU execution provider, as many intra-op threads as PyTorch uses);
``onnxruntime_vs_eager`` divides by the faster eager figure. Each figure is the median of ``--repeats``
timings of at least ``--seconds`` each.

    python benchmarks/export_speed.py --output runs/bench/export_speed.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_output import write_result

from gradtail.cli.main import main as gradtail
from gradtail.config import load_config
from gradtail.contracts import create_task
from gradtail.environment import environment_info
from gradtail.export import classification as classification_export
from gradtail.export import segmentation as segmentation_export
from gradtail.predict import Predictor
from gradtail.rundir import RunDirectory, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _train(config: Path, output: Path, overrides: dict[str, Any]) -> Path:
    """A finished run of ``config`` with ``overrides`` in ``output`` (reused when it is there)."""
    if RunDirectory(output).is_finished():
        return output
    output.mkdir(parents=True, exist_ok=True)
    cfg = output.parent / f"{output.name}.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(config), **overrides}))
    assert gradtail(["train", str(cfg), "--output", str(output), "--overwrite", "--no-progress"]) == 0
    return output


def _rate(fn: Callable[[], Any], images: int, seconds: float, repeats: int) -> float:
    """Median images/s of ``fn`` (one call scores ``images`` images) over ``repeats`` timings of at least
    ``seconds`` each, after a warm-up."""
    for _ in range(3):
        fn()
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(calls * images / elapsed)
    return statistics.median(rates)


def _export_seconds(run: Path, fmt: str, output: Path, posthoc: str | None) -> float:
    argv = ["export", str(run), "--format", fmt, "--output", str(output)]
    start = time.perf_counter()
    assert gradtail([*argv, *(["--posthoc", posthoc] if posthoc else [])]) == 0
    return time.perf_counter() - start


def _speeds(module: torch.nn.Module, onnx_file: Path, script_file: Path, shape: tuple[int, ...],
            batch_sizes: list[int], seconds: float, repeats: int) -> dict[str, Any]:  # fmt: skip
    """images/s of eager PyTorch, TorchScript and onnxruntime at each batch size, on the same inputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(script_file))
    module.eval()
    channels_last = copy.deepcopy(module).to(memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    for n in batch_sizes:
        x = torch.randn(n, *shape, generator=gen)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        feed = {"input": x.numpy()}

        def eager(x: torch.Tensor = x) -> Any:
            with torch.inference_mode():
                return module(x)

        def eager_cl(x: torch.Tensor = x_cl) -> Any:
            with torch.inference_mode():
                return channels_last(x)

        def script(x: torch.Tensor = x) -> Any:
            with torch.inference_mode():
                return scripted(x)

        def onnx(feed: dict[str, Any] = feed) -> Any:
            return session.run(None, feed)

        timed = (("pytorch_eager", eager), ("pytorch_eager_channels_last", eager_cl),
                 ("torchscript", script), ("onnxruntime", onnx))  # fmt: skip
        rates = {name: _rate(fn, n, seconds, repeats) for name, fn in timed}
        best = max(rates["pytorch_eager"], rates["pytorch_eager_channels_last"])
        rates["onnxruntime_vs_eager"] = rates["onnxruntime"] / best
        out[f"batch_{n}"] = {k: round(v, 3) for k, v in rates.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a finished classification run (default: train Fashion-MNIST-LT, 2 epochs)")
    p.add_argument("--seg-run", help="a finished segmentation run (default: train the canvases, 2 epochs)")
    p.add_argument("--posthoc", default="posthoc_la", help="the adjuster folded into the classifier")
    p.add_argument("--work-dir", default="runs/bench/export_speed", help="where runs and exports go")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--seconds", type=float, default=2.0, help="minimum length of one timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure (the median is kept)")
    p.add_argument("--seg-size", type=int, default=64, help="segmentation input height and width")
    p.add_argument("--output", default="runs/bench/export_speed.json")
    args = p.parse_args()

    work = Path(args.work_dir)
    float32 = {"train": {"amp": "none", "progress": False}}
    fm = Path(args.run) if args.run else _train(
        REPO / "configs" / "fashion_mnist_lt" / "base.yaml", work / "fm_lt",
        {"name": "export_speed_fm", "optim": {"epochs": 2}, "eval": {"posthoc": [args.posthoc]}, **float32},
    )  # fmt: skip
    seg = Path(args.seg_run) if args.seg_run else _train(
        REPO / "configs" / "segmentation" / "fmnist_seg_ce.yaml", work / "seg",
        {"name": "export_speed_seg", "optim": {"epochs": 2}, **float32},
    )  # fmt: skip
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "batch_sizes": args.batch_sizes}

    # classification: the exported module (model + folded adjustment) is the eager reference
    exports = {fmt: _export_seconds(fm, fmt, work / "export" / f"fm{ext}", args.posthoc)
               for fmt, ext in (("onnx", ".onnx"), ("torchscript", ".pt"))}  # fmt: skip
    checkpoint = RunDirectory(fm).last_checkpoint
    predictor = Predictor.from_checkpoint(checkpoint, posthoc=args.posthoc, device="cpu")
    module, _ = classification_export.build(predictor)
    shape = classification_export.input_shape(predictor.preprocessing)
    result["classification"] = {
        "run": str(fm), "model": load_config(fm / "config.yaml").model.name, "posthoc": args.posthoc,
        "input": list(shape), "export_seconds": {k: round(v, 2) for k, v in exports.items()},
        "images_per_second": _speeds(module, work / "export" / "fm.onnx", work / "export" / "fm.pt", shape,
                                     args.batch_sizes, args.seconds, args.repeats),
    }  # fmt: skip

    # segmentation
    exports = {fmt: _export_seconds(seg, fmt, work / "export" / f"seg{ext}", None)
               for fmt, ext in (("onnx", ".onnx"), ("torchscript", ".pt"))}  # fmt: skip
    cfg = load_config(seg / "config.yaml")
    checkpoint = RunDirectory(seg).last_checkpoint
    state = load_checkpoint(checkpoint)
    seg_module, data, _ = segmentation_export.build(create_task(cfg), state, checkpoint)
    seg_shape = (data.in_channels, args.seg_size, args.seg_size)
    result["segmentation"] = {
        "run": str(seg), "model": cfg.model.name, "input": list(seg_shape),
        "export_seconds": {k: round(v, 2) for k, v in exports.items()},
        "images_per_second": _speeds(seg_module, work / "export" / "seg.onnx", work / "export" / "seg.pt",
                                     seg_shape, args.batch_sizes, args.seconds, args.repeats),
    }  # fmt: skip
    result["environment"] = environment_info(torch.device("cpu"))
    write_result(result, args.output)


if __name__ == "__main__":
    main()

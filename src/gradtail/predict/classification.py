"""``gradtail predict`` for classification: class probabilities for image files from a checkpoint alone
(no training data).

:meth:`Predictor.from_checkpoint` rebuilds what the run evaluates with, from the checkpoint only:

- the model: :func:`gradtail.models.create_model` with the config's model, the checkpoint's class count
  (its ``class_counts``) and input channels (its ``preprocessing`` mode), then its weights;
- the loss, for :meth:`~gradtail.contracts.LossContract.inference_logits` (the logits as the run's loss
  reads them at test time, e.g. LDAM's scale);
- the input pipeline: the checkpoint's ``preprocessing`` through :mod:`gradtail.data.preprocess`;
- the autocast precision the run's ``train.amp`` resolves to on the prediction device (as
  :meth:`gradtail.engine.trainer.Trainer.predict`);
- with ``posthoc``: the adjuster the run fitted on validation at its end, from
  ``<run>/extras/posthoc/<name>.pt`` (:meth:`gradtail.rundir.RunDirectory.save_posthoc`), constructed as
  the trainer constructed it and restored with ``load_state_dict``. A logits adjuster (``posthoc_la``,
  ``gala_rebalance``) transforms the inference logits; a features adjuster (``tau_norm``) transforms the
  backbone features ``model.features(x)`` into logits, exactly as the run's ``final.json`` post-hoc
  numbers were computed.

**Probabilities** are the softmax of those logits: of the model's inference logits without ``posthoc``,
of the *adjusted* logits with it (``posthoc_la``: the prior-corrected posterior p_j pi_j^-tau,
renormalised; ``tau_norm``: the softmax of the tau-normalised head). The top-1 class is the argmax of
the scores the run's post-hoc metrics use. ``gala_rebalance`` is transductive: its class mass q comes
from the images of the call itself, so a prediction depends on the other images given with it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtail.config import RunConfig, config_from_dict
from gradtail.contracts import LossContract, PosthocAdjuster
from gradtail.data.preprocess import check_preprocessing, input_channels, load_images
from gradtail.environment import resolve_amp, resolve_device
from gradtail.errors import ConfigError, DataError, GradtailError
from gradtail.losses import create_loss
from gradtail.models import LongTailClassifier, create_model
from gradtail.posthoc import POSTHOC, create_posthoc
from gradtail.rundir import RunDirectory, load_checkpoint

#: the output formats, by the extension of ``--output``
FORMATS = (".csv", ".json")


@dataclass
class PredictionSet:
    """Scores and probabilities of a set of images, rows in the order of ``paths``.

    ``logits``: float32 (N, C), the scores predictions are made from (post-hoc adjusted when an adjuster
    is applied); ``probs``: float64 softmax of ``logits``.
    """

    paths: list[Path]
    logits: torch.Tensor
    probs: torch.Tensor
    class_names: list[str]

    def top_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, probabilities) of the ``k`` most probable classes per image, most probable first;
        ties go to the lower class index (as the argmax)."""
        c = self.probs.shape[1]
        if not 1 <= k <= c:
            raise ConfigError(f"--top-k must be between 1 and the number of classes ({c}), got {k}")
        order = torch.sort(self.probs, dim=1, descending=True, stable=True).indices[:, :k]
        return order, self.probs.gather(1, order)

    def to_csv(self, k: int) -> str:
        """``path,class_1,prob_1,...,class_k,prob_k``, one row per image (probabilities as Python floats
        print them: shortest exact round trip)."""
        indices, probs = self.top_k(k)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", *(f"{kind}_{i}" for i in range(1, k + 1) for kind in ("class", "prob"))])
        for path, idx, pr in zip(self.paths, indices.tolist(), probs.tolist(), strict=True):
            cells = [cell for j, p in zip(idx, pr, strict=True) for cell in (self.class_names[j], repr(p))]
            writer.writerow([str(path), *cells])
        return buf.getvalue()

    def to_json(self, k: int, meta: dict[str, Any] | None = None) -> str:
        """``{...meta, "top_k": k, "predictions": [{"path", "top": [{"class", "index", "prob"}, ...]}]}``."""
        indices, probs = self.top_k(k)
        predictions = [
            {
                "path": str(path),
                "top": [
                    {"class": self.class_names[j], "index": j, "prob": p}
                    for j, p in zip(idx, pr, strict=True)
                ],
            }
            for path, idx, pr in zip(self.paths, indices.tolist(), probs.tolist(), strict=True)
        ]
        return json.dumps({**(meta or {}), "top_k": k, "predictions": predictions}, indent=2) + "\n"


class Predictor:
    """A trained run's model, input pipeline and (optionally) fitted post-hoc adjuster, ready to score
    image files. Build it with :meth:`from_checkpoint`."""

    def __init__(
        self,
        model: LongTailClassifier,
        loss_fn: LossContract,
        preprocessing: dict[str, Any],
        class_names: Sequence[str],
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        batch_size: int = 256,
        adjuster: PosthocAdjuster | None = None,
        posthoc: str | None = None,
        checkpoint: Path | None = None,
        epoch: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.loss_fn = loss_fn.to(device).eval()
        self.preprocessing = check_preprocessing(preprocessing)
        self.class_names = [str(n) for n in class_names]
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.batch_size = int(batch_size)
        self.adjuster = adjuster
        self.posthoc = posthoc
        self.checkpoint = checkpoint
        self.epoch = epoch

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        posthoc: str | None = None,
        device: str = "auto",
        batch_size: int | None = None,
    ) -> Predictor:
        """Rebuild a run's predictor from its checkpoint (module docstring); ``posthoc`` names an
        adjuster the run fitted (``<checkpoint>/../../extras/posthoc/<name>.pt``)."""
        path = Path(checkpoint)
        state = load_checkpoint(path)
        missing = [k for k in ("class_counts", "class_names", "preprocessing") if state.get(k) is None]
        if missing:
            raise DataError(
                f"checkpoint {path} lacks {', '.join(missing)} (written before gradtail predict existed); "
                "train the run again with a current gradtail"
            )
        try:
            cfg = config_from_dict(state["config"])
        except GradtailError as e:
            raise DataError(f"checkpoint {path}: its config does not load ({e})") from None
        preprocessing = check_preprocessing(state["preprocessing"])
        counts = [int(n) for n in state["class_counts"]]
        names = [str(n) for n in state["class_names"]]
        if len(names) != len(counts):
            raise DataError(f"checkpoint {path}: {len(names)} class names for {len(counts)} classes")
        dev = resolve_device(device)
        model = create_model(
            cfg.model.name,
            len(counts),
            in_channels=input_channels(preprocessing),
            head=cfg.model.head,
            head_scale=cfg.model.head_scale,
            **cfg.model.params,
        )
        loss_fn = create_loss(cfg.loss.name, len(counts), class_counts=counts, **cfg.loss.params)
        try:
            model.load_state_dict(state["model"])
            loss_fn.load_state_dict(state["loss"])
        except (RuntimeError, KeyError) as e:
            first = str(e).strip().split("\n")[0]
            raise DataError(
                f"checkpoint {path}: the weights do not fit the model of its config ({first})"
            ) from None
        adjuster = None
        if posthoc is not None:
            adjuster = _load_adjuster(path, state, posthoc, counts, model)
        return cls(
            model,
            loss_fn,
            preprocessing,
            names,
            dev,
            autocast_dtype=_precision(cfg, dev),
            channels_last=cfg.train.channels_last,
            batch_size=batch_size if batch_size is not None else cfg.eval.batch_size,
            adjuster=adjuster,
            posthoc=posthoc,
            checkpoint=path,
            epoch=int(state["epoch"]),
        )

    # ------------------------------------------------------------------ scoring
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def scores(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """float32 (N, C) on the CPU: the inference logits of the images, post-hoc adjusted when the
        predictor has an adjuster (applied once to the whole set: transductive adjusters see all of it)."""
        if not paths:
            raise DataError("no images to predict")
        logits, feats = [], []
        for start in range(0, len(paths), self.batch_size):
            x = load_images(paths[start : start + self.batch_size], self.preprocessing).to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                h = self.model.features(x)
                z = self.model.classifier(h)
            logits.append(self.loss_fn.inference_logits(z.float()))
            feats.append(h.float())
        z_all = torch.cat(logits)
        if self.adjuster is None:
            out = z_all
        elif self.adjuster.input_kind == "features":
            out = self.adjuster.transform(torch.cat(feats))
        else:
            out = self.adjuster.transform(z_all)
        return out.detach().float().cpu()

    def predict(self, paths: Sequence[str | Path]) -> PredictionSet:
        """Scores and softmax probabilities of the image files ``paths`` (module docstring)."""
        paths = [Path(p) for p in paths]
        logits = self.scores(paths)
        probs = torch.softmax(logits.double(), dim=1)
        return PredictionSet(paths, logits, probs, self.class_names)

    def describe(self) -> dict[str, Any]:
        """What a JSON output records besides the predictions."""
        what = "softmax of the model's logits as the run's loss reads them"
        if self.adjuster is not None:
            what = f"softmax of the logits after the post-hoc adjuster {self.posthoc!r} fitted on validation"
        return {
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
            "epoch": self.epoch,
            "posthoc": self.posthoc,
            "posthoc_params": self.adjuster.fitted_params() if self.adjuster is not None else None,
            "probability": what,
            "classes": self.class_names,
        }


def _precision(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` resolves to on ``device`` (fp16 off CUDA: the ``auto`` choice)."""
    amp = cfg.train.amp
    if amp == "fp16" and device.type != "cuda":
        amp = "auto"
    return resolve_amp(amp, device).dtype


def _load_adjuster(
    checkpoint: Path, state: dict[str, Any], name: str, counts: list[int], model: nn.Module
) -> PosthocAdjuster:
    """The adjuster ``name`` as the run fitted it: constructed as the trainer did, then restored."""
    run_dir = RunDirectory(checkpoint.parent.parent, writer=False)
    record = run_dir.load_posthoc(name)
    where = run_dir.posthoc_file(name)
    if record.get("epoch") != state.get("epoch") or record.get("subset_sha256") != state.get("subset_sha256"):
        raise DataError(
            f"{where} was fitted on the model of epoch {record.get('epoch')}, but {checkpoint} holds "
            f"epoch {state.get('epoch')}: predict with the run's final checkpoint "
            f"({run_dir.last_checkpoint})"
        )
    kind = POSTHOC.get(name)
    args: dict[str, Any] = {}
    if "class_counts" in kind.construction_inputs:
        args["class_counts"] = counts
    if "classifier" in kind.construction_inputs:
        args["classifier"] = model.classifier
    adjuster = create_posthoc(name, **args, **dict(record.get("params") or {}))
    if adjuster.input_kind not in ("logits", "features"):
        raise ConfigError(
            f"post-hoc adjuster {name!r} works on {adjuster.input_kind!r}: predict takes logits or features"
        )
    adjuster.load_state_dict(record["state"])
    return adjuster


def output_format(path: str | Path | None) -> str:
    """``"csv"`` or ``"json"`` from the extension of ``--output`` (CSV on stdout without one)."""
    if path is None:
        return "csv"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--output {path}: the extension must be .csv or .json (it chooses the format)")
    return suffix[1:]


def run(state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """``gradtail predict`` of a classification checkpoint: top-k classes and probabilities of the images
    (CSV, or JSON by the extension of ``request.output``); the text when there is no output file."""
    from gradtail.data.preprocess import collect_image_paths
    from gradtail.rundir import RunDirectory, write_text

    if request.split is not None:
        raise ConfigError("--split: classification predicts image files (give them as inputs)")
    if request.draw:
        raise ConfigError("--draw draws detection boxes; classification writes classes and probabilities")
    fmt = output_format(request.output)  # a wrong extension fails before any work
    predictor = Predictor.from_checkpoint(
        checkpoint, posthoc=request.posthoc, device=request.device, batch_size=request.batch_size
    )
    c = predictor.num_classes
    k = request.top_k if request.top_k is not None else min(5, c)
    if not 1 <= k <= c:
        raise ConfigError(f"--top-k {k}: the model has {c} classes (give 1 to {c})")
    out = Path(request.output) if request.output else None
    if out is not None:  # an output that cannot be written fails before the images are read
        RunDirectory(out.parent).ensure_writable()
    paths = collect_image_paths(request.inputs)
    result = predictor.predict(paths)
    text = result.to_csv(k) if fmt == "csv" else result.to_json(k, predictor.describe())
    if out is None:
        return text
    write_text(out, text, "predictions")
    return ""


__all__ = ["FORMATS", "PredictionSet", "Predictor", "output_format", "run"]

"""``gradtail export`` for classification: the run's model as ONNX or TorchScript whose outputs are the
scores and probabilities ``gradtail predict`` gives (the same post-hoc adjuster folded in).

The model, its loss's test-time transform and the adjuster are rebuilt exactly as ``gradtail predict``
rebuilds them (:meth:`gradtail.predict.classification.Predictor.from_checkpoint`); then:

- the loss's test-time transform (:meth:`~gradtail.contracts.LossContract.inference_logits`: the identity,
  LDAM's scale) and a ``logits`` adjuster's fitted transform
  (:meth:`~gradtail.contracts.PosthocAdjuster.logit_affine`: logit adjustment z - tau log pi, temperature
  z / T, GALA re-balancing z - tau log q_val) compose into one per-class affine map, folded into a linear
  classifier's weights and bias (:func:`gradtail.export.common.fold_affine`);
- a ``features`` adjuster (tau-norm) replaces the classifier by its fitted head
  (:meth:`~gradtail.contracts.PosthocAdjuster.feature_head`), as ``gradtail predict`` applies it.

The exported graph takes ``input`` (N, C, H, W) float32, normalised as the sidecar says, and returns
``logits`` (N, classes) and ``probabilities`` (their softmax). GALA re-balancing is transductive in
``gradtail predict`` (q from the images of the call); a model scoring one image at a time uses the
validation split's class mass, kept when the adjuster was fitted (:mod:`gradtail.posthoc.rebalance`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtail.errors import ConfigError
from gradtail.export.common import (
    affine_of,
    check_exported,
    fold_affine,
    linear_head,
    output_paths,
    write_onnx,
    write_sidecar,
    write_torchscript,
)
from gradtail.predict.classification import Predictor

TOLERANCE = 1e-4  # max |difference| of logits / probabilities between the written file and PyTorch


class ExportedClassifier(nn.Module):
    """``input`` -> (``logits``, ``probabilities``): the backbone's features through the (adjusted) head."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        backbone: Any = copy.deepcopy(model)
        backbone.classifier = nn.Identity()  # the head below replaces it (not exported twice)
        self.model = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.model.features(x)).float()
        return logits, torch.softmax(logits, dim=1)


def input_shape(preprocessing: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the model input the run's test-time pipeline makes (``gradtail.data.preprocess``)."""
    channels = 1 if preprocessing.get("mode") == "L" else 3
    if preprocessing.get("transform") == "imagenet":
        size = int(preprocessing["image_size"])
        return 3, size, size
    pad_to = preprocessing.get("pad_to")
    if pad_to:
        return channels, int(pad_to), int(pad_to)
    h, w = (int(v) for v in preprocessing["size"])
    return channels, h, w


def build(predictor: Predictor) -> tuple[ExportedClassifier, dict[str, Any]]:
    """The module to export and the record of the adjustment in it (for the sidecar)."""
    model: Any = predictor.model.cpu().eval()
    loss = predictor.loss_fn.cpu().eval()
    c = predictor.num_classes
    adjuster = predictor.adjuster
    record: dict[str, Any] = {"name": predictor.posthoc}
    if adjuster is not None and adjuster.input_kind == "features":
        form = adjuster.feature_head()
        if form is None:
            raise ConfigError(
                f"post-hoc adjuster {predictor.posthoc!r} is not a linear head: it cannot be exported"
            )
        head: nn.Module = linear_head(*form)
        scale, offset = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        record["applied"] = "its fitted head in place of the classifier (weights and bias)"
    else:
        head = model.classifier
        what = f"the test-time transform of loss {type(loss).__name__}"
        scale, offset = affine_of(loss.inference_logits, c, what)
        if adjuster is not None:
            form2 = adjuster.logit_affine()
            if form2 is None:
                raise ConfigError(
                    f"post-hoc adjuster {predictor.posthoc!r} has no fitted linear form to fold into an "
                    "export "
                    "(a gala_rebalance state saved before runs kept its validation class mass: train the run "
                    "again)"
                )
            a, b = (t.double().expand(c) for t in form2)
            scale, offset = scale * a, offset * a + b
    head, how = fold_affine(head, scale, offset, c)
    if adjuster is not None and adjuster.input_kind != "features":
        record["applied"] = f"z * scale + offset per class, {how}"
        record |= {"scale": scale.tolist(), "offset": offset.tolist()}
    if adjuster is not None:
        record |= {"input_kind": adjuster.input_kind, "params": adjuster.fitted_params()}
    else:
        record = {"name": None, "applied": f"the loss's test-time transform only: {how}"}
    return ExportedClassifier(model, head).eval(), record


def reference(
    predictor: Predictor, exported: ExportedClassifier, x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """What the exported graph must compute on ``x``: ``gradtail predict``'s scores where its adjuster is
    not transductive (checked here against the folded module), else the folded module itself."""
    with torch.no_grad():
        logits, probs = exported(x)
        h = predictor.model.features(x)
        z = predictor.loss_fn.inference_logits(predictor.model.classifier(h).float())
        adjuster = predictor.adjuster
        if adjuster is None:
            want = z
        elif adjuster.input_kind == "features":
            want = adjuster.transform(h.float())
        else:
            form = adjuster.logit_affine()
            assert form is not None
            want = z.double() * form[0] + form[1]
        diff = float((logits.double() - want.double()).abs().max())
    if not diff <= TOLERANCE:  # the folding is exact up to float32 rounding
        raise ConfigError(f"folding the adjustment changed the scores by {diff:.3g}: nothing was exported")
    return logits, probs


def run(state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """``gradtail export`` of a classification checkpoint (module docstring); returns what was written."""
    model_path, sidecar = output_paths(request.format, request.output, checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, posthoc=request.posthoc, device="cpu")
    exported, adjustment = build(predictor)
    shape = input_shape(predictor.preprocessing)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, *shape, generator=gen)
    want = reference(predictor, exported, x)
    if request.format == "onnx":
        batch = torch.export.Dim("batch", min=1, max=65536)
        write_onnx(exported, (x,), model_path, ["input"], ["logits", "probabilities"],
                   dynamic_shapes=({0: batch},), what=f"the model of {checkpoint}")  # fmt: skip
    else:
        write_torchscript(exported, (x,), model_path, what=f"the model of {checkpoint}")
    check = check_exported(request.format, model_path, {"input": x}, want, TOLERANCE)
    prep = predictor.preprocessing
    write_sidecar(sidecar, {
        "gradtail_export": 1,
        "task": state["config"].get("task", "classification"),
        "format": request.format,
        "model": model_path.name,
        "checkpoint": str(checkpoint),
        "epoch": predictor.epoch,
        "inputs": [{"name": "input", "shape": ["batch", *shape], "dtype": "float32"}],
        "outputs": [
            {"name": "logits", "shape": ["batch", predictor.num_classes], "dtype": "float32"},
            {"name": "probabilities", "shape": ["batch", predictor.num_classes], "dtype": "float32",
             "what": "softmax of logits"},
        ],
        "input_size": list(shape),
        "normalisation": {"formula": "(pixel / 255 - mean) / std, per channel", "mean": prep["mean"],
                          "std": prep["std"]},
        "preprocessing": prep,
        "class_names": predictor.class_names,
        "posthoc": adjustment,
        "check": check,
    })  # fmt: skip
    return f"{request.format} model -> {model_path} (sidecar {sidecar})"


__all__ = ["ExportedClassifier", "build", "input_shape", "run"]

"""``gradtail export``: a trained run's model outside Python, one module per task (docs/export.md):

- :mod:`~gradtail.export.classification`: ONNX or TorchScript, outputs ``logits`` and ``probabilities``
  with the run's fitted post-hoc adjuster folded in (logit adjustment, tau-norm, temperature, GALA
  re-balancing with the validation class mass);
- :mod:`~gradtail.export.segmentation`: ONNX or TorchScript, outputs dense ``logits`` and per-pixel
  ``labels`` for any image size;
- :mod:`~gradtail.export.detection`: ONNX, the format torchvision's detectors export to (one image in,
  ``boxes`` / ``labels`` / ``scores`` out).

Each writes the model file and a JSON sidecar beside it (``model.onnx`` + ``model.json``): class names,
input size and normalisation, the adjustment applied, the checks made. The task of the checkpoint's
config picks the module (:meth:`gradtail.contracts.TaskContract.export`); shared pieces are in
:mod:`~gradtail.export.common`. The exporters are an optional extra (``pip install 'gradtail[export]'``).
"""

from __future__ import annotations

from gradtail.export.common import FORMATS, ClassAffine, fold_affine, output_paths

__all__ = ["FORMATS", "ClassAffine", "fold_affine", "output_paths"]

"""Long-tailed object detection: gradtail losses inside torchvision's detectors (docs/detection.md).

- :mod:`gradtail.detection.heads`: the classification term of Faster R-CNN (``ce``, ``sigmoid_eql``,
  ``softmax_eql``, ``seesaw``), RetinaNet and FCOS (``focal``, ``efl``, ``eqfl``) made pluggable by
  overriding one method of torchvision's heads;
- :mod:`gradtail.detection.models`: :func:`build_detector` (tiny CPU backbone or ResNet-50-FPN,
  ``weights=None``);
- :mod:`gradtail.detection.training`: one training step / epoch, prediction to COCO/LVIS records,
  evaluation (through :mod:`gradtail.metrics.detection`).
"""

from gradtail.detection.models import ARCHS, Detector, DetectorSpec, build_detector

__all__ = ["ARCHS", "Detector", "DetectorSpec", "build_detector"]

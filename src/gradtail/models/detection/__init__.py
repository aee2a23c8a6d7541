"""Detectors: torchvision's Faster R-CNN, RetinaNet and FCOS with a gradtail classification term
(docs/detection.md).

- :mod:`gradtail.models.detection.heads`: the classification term of Faster R-CNN (``ce``,
  ``sigmoid_eql``, ``softmax_eql``, ``seesaw``), RetinaNet and FCOS (``sigmoid_focal``, ``efl``,
  ``eqfl``), made pluggable by overriding torchvision's heads;
- :mod:`gradtail.models.detection.detectors`: :func:`build_detector` (tiny CPU backbone or
  ResNet-50-FPN, ``weights=None``).
"""

from gradtail.models.detection.detectors import ARCHS, Detector, DetectorSpec, build_detector

__all__ = ["ARCHS", "Detector", "DetectorSpec", "build_detector"]

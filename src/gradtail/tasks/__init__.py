"""Tasks: what differs between classification, semantic segmentation and detection, behind
:class:`gradtail.contracts.TaskContract` (docs/architecture.md, "Tasks").

Each module registers one task in :data:`gradtail.contracts.TASKS` (imported on the first lookup):

- :mod:`~gradtail.tasks.classification`: image classification (the default);
- :mod:`~gradtail.tasks.segmentation`: semantic segmentation, any loss per pixel;
- :mod:`~gradtail.tasks.detection`: object detection, the loss per RoI / anchor inside torchvision's
  detectors.

A config names its task once (``task:``); :func:`gradtail.contracts.create_task` builds it. Adding a task
adds a module here; the engine, the CLI, ``bench``, ``tune`` and the report know tasks only through the
contract.
"""

from gradtail.contracts import TASKS, create_task

__all__ = ["TASKS", "create_task"]

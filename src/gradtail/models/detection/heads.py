"""gradtail losses as the classification term of torchvision's detectors (docs/detection.md §Design).

Nothing of torchvision's code is copied: each head is a subclass that overrides one method.

- Two-stage (Faster R-CNN): :class:`GradtailRoIHeads` subclasses ``RoIHeads``. torchvision computes its
  cross-entropy inside ``RoIHeads.forward`` (the module-level ``fastrcnn_loss``), so the training path of
  ``forward`` is composed here from the head's own parts: ``select_training_samples``, ``box_roi_pool``,
  ``box_head``, ``box_predictor``, then the gradtail loss on the sampled RoIs' class logits and
  torchvision's box-regression term (smooth L1, beta 1/9, summed over the positives and divided by the
  sampled RoIs, as ``fastrcnn_loss``); no stock classification loss is computed. A mask branch, when the
  model has one, trains as in torchvision (``maskrcnn_loss``). Inference is torchvision's ``forward``
  with ``postprocess_detections`` overridden, whose only loss-specific step is the score: the same
  pipeline (decode, clip, score threshold, small-box removal, per-class NMS, top-k) is composed from
  torchvision's public
  ``box_coder`` and ``box_ops``, with the scores of the loss (:meth:`TwoStageTerm.scores`); with ``ce`` it
  reproduces torchvision's output exactly (tested).
- One-stage RetinaNet: :class:`GradtailRetinaNetHead` overrides ``RetinaNetHead.compute_loss`` only to
  hand the anchors (EQFL's quality target needs the decoded boxes) to
  :class:`GradtailRetinaNetClassificationHead`, whose ``compute_loss`` is the override of
  ``RetinaNetClassificationHead.compute_loss``; the regression term is torchvision's.
- One-stage FCOS: :class:`GradtailFCOSHead` overrides ``FCOSHead.compute_loss``: the gradtail term for
  ``classification``, torchvision's GIoU box and centre-ness terms (the same code as ``FCOSHead``'s,
  without its focal loss).

Observers. Each term hands the (logits, labels) its loss gets to the run's step observers (the
gradient-ratio diagnostics), set by the detection task in ``term.observers``.

Label conventions. torchvision's two-stage heads use 0 = background, 1..C = classes, logits
[bg, 1..C]; gradtail's detection losses use labels 0..C-1 and C = background with the background /
objectness channel *last* (docs/methods/eql.md §2). :class:`TwoStageTerm` maps one to the other (a
column permutation, no copy of the logits' content). One-stage heads use labels 0..C-1 directly; an
anchor torchvision matches to no box is background (label C of the loss: all class channels 0), one
between the IoU thresholds is ignored (label -1: out of the loss, the normaliser and the statistics).

Normalisers (docs/methods/eql.md §9). EQLv2: the mean over the step's sampled RoIs (all images of the
rank), statistics summed without it (official accumulation). EFL / EQFL: the number of positive anchors
of the whole step, averaged over ranks (an all-reduce; the official codes do the same), so W ranks
train on and accumulate exactly what one process with the whole batch does. The stock RetinaNet focal
loss keeps torchvision's per-image normalisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from gradtail.distributed import all_reduce_sum_, world_size
from gradtail.errors import ConfigError
from gradtail.losses import create_loss
from gradtail.losses.base import LongTailLoss
from gradtail.losses.equalization import sigmoid_eql_scores

TWO_STAGE_LOSSES = ("ce", "sigmoid_eql", "softmax_eql", "seesaw", "federated")
# sigmoid_focal: torchvision's own head and loss (the stock one-stage baseline); efl / eqfl: gradtail terms
ONE_STAGE_LOSSES = ("sigmoid_focal", "efl", "eqfl")


def two_stage_loss(
    loss_name: str,
    num_classes: int,
    loss_params: dict[str, Any] | None = None,
    class_counts: Any = None,
) -> LongTailLoss:
    """The registry's loss as a two-stage RoI classifier applies it (:class:`TwoStageTerm`): EQLv2 on C + 1
    sigmoid channels with the background / objectness channel last (label C); the federated loss on the C
    category columns of C + 1 logits (the background column unused, detectron2's layout; ``class_counts``:
    the training images per class, its sampling weights); the softmax losses over C + 1 classes,
    background = class C."""
    params = dict(loss_params or {})
    if loss_name == "sigmoid_eql":
        params.setdefault("objectness", True)
        params.setdefault("background_label", True)
        return create_loss("sigmoid_eql", num_classes, **params)
    if loss_name == "federated":
        params.setdefault("background_column", True)
        params.setdefault("background_label", True)
        counts = params.pop("class_counts", class_counts)
        return create_loss("federated", num_classes, counts, **params)
    return create_loss(loss_name, num_classes + 1, **params)


def one_stage_loss(
    loss_name: str, num_classes: int, loss_params: dict[str, Any] | None = None
) -> LongTailLoss:
    """The registry's loss as a one-stage head applies it (:class:`OneStageTerm`): C sigmoid channels, the
    background label C (all channels 0), ignored anchors -1."""
    params = {"background_label": True, "ignore_index": -1, **(loss_params or {})}
    return create_loss(loss_name, num_classes, **params)


# ------------------------------------------------------------------------------------------ two-stage
class TwoStageTerm(nn.Module):
    """The RoI classifier's loss and scores for ``loss_name`` in :data:`TWO_STAGE_LOSSES`.

    - ``sigmoid_eql`` (EQLv2): C + 1 sigmoid channels, the last the background / objectness channel
      (label C), ``objectness=True, background_label=True``; score_j = sigmoid(z_j) (1 - sigmoid(z_bg))
      (docs/methods/eql.md §2, §9).
    - ``federated``: C + 1 logits, BCE on the C category columns over the step's class set, the background
      column unused (docs/instance.md §2); score_j = sigmoid(z_j).
    - ``ce``, ``softmax_eql``, ``seesaw``: a softmax over C + 1 classes, background = class C (what
      torchvision's cross-entropy does, with the background moved last); score_j = softmax(z)_j (raw
      logits at test time). For ``softmax_eql`` and ``seesaw`` the background is thus one more class of
      their statistics / sample counts.
    """

    def __init__(
        self,
        loss_name: str,
        num_classes: int,
        loss_params: dict[str, Any] | None = None,
        loss: LongTailLoss | None = None,
    ) -> None:
        super().__init__()
        if loss_name not in TWO_STAGE_LOSSES:
            raise ConfigError(
                f"two-stage detectors take the losses {', '.join(TWO_STAGE_LOSSES)}, got {loss_name!r}"
            )
        self.loss_name = loss_name
        self.num_classes = num_classes
        self.observers: list[Any] = []
        self.loss: LongTailLoss = (
            loss if loss is not None else two_stage_loss(loss_name, num_classes, loss_params)
        )

    @staticmethod
    def to_gradtail(tv_logits: torch.Tensor, tv_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's [bg, 1..C] logits and labels (0 = bg) -> [1..C, bg] logits, labels 0..C-1 / C."""
        c = tv_logits.shape[1] - 1
        logits = torch.cat([tv_logits[:, 1:], tv_logits[:, :1]], dim=1)
        labels = torch.where(tv_labels > 0, tv_labels - 1, torch.full_like(tv_labels, c))
        return logits, labels

    def forward(self, tv_logits: torch.Tensor, tv_labels: torch.Tensor) -> torch.Tensor:
        """The classification loss of the sampled RoIs (statistics updated by the loss)."""
        logits, labels = self.to_gradtail(tv_logits, tv_labels)
        for obs in self.observers:
            obs.observe(logits, labels)
        return self.loss(logits, labels)

    def scores(self, tv_logits: torch.Tensor) -> torch.Tensor:
        """(n, C) class scores from torchvision-ordered logits, as the loss defines them."""
        logits = torch.cat([tv_logits[:, 1:], tv_logits[:, :1]], dim=1)
        if self.loss_name == "sigmoid_eql":
            return sigmoid_eql_scores(logits)
        if self.loss_name == "federated":  # sigmoid of the category columns (detectron2's use_sigmoid_ce)
            return torch.sigmoid(logits[:, :-1])
        return F.softmax(logits, dim=-1)[:, :-1]


def box_regression_loss(
    box_regression: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor
) -> torch.Tensor:
    """torchvision's Fast R-CNN box term (``fastrcnn_loss``'s second half): smooth L1 (beta 1/9) of the
    positives' class-specific deltas, summed and divided by the number of sampled RoIs. ``labels`` in
    torchvision's convention (0 = background)."""
    pos = torch.where(labels > 0)[0]
    n = box_regression.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    loss = F.smooth_l1_loss(
        box_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9, reduction="sum"
    )
    return loss / labels.numel()


class RecordingPredictor(nn.Module):
    """Wraps a box predictor; keeps the class logits of the last training forward for the loss."""

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor
        self.last_class_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        class_logits, box_regression = self.predictor(x)
        if self.training:
            self.last_class_logits = class_logits
        return class_logits, box_regression


class GradtailRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with a gradtail classification term (module docstring).

    ``GradtailRoIHeads(term, **kwargs)``: ``kwargs`` are ``RoIHeads``'s own arguments; the box predictor
    is wrapped in a :class:`RecordingPredictor`.
    """

    def __init__(self, term: TwoStageTerm, **kwargs: Any) -> None:
        kwargs["box_predictor"] = RecordingPredictor(kwargs["box_predictor"])
        super().__init__(**kwargs)
        self.term = term
        self._sampled_labels: list[torch.Tensor] | None = None

    def select_training_samples(self, proposals, targets):  # type: ignore[no-untyped-def]
        out = super().select_training_samples(proposals, targets)
        self._sampled_labels = out[2]
        return out

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[no-untyped-def]
        """Inference: torchvision's ``forward``; training: composed from the head's parts (module
        docstring), so the only classification loss computed is the gradtail term's."""
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        self.box_predictor.last_class_logits = None
        labels_all = torch.cat(labels, dim=0)
        losses = {
            "loss_classifier": self.term(class_logits, labels_all),
            "loss_box_reg": box_regression_loss(box_regression, labels_all, torch.cat(regression_targets, 0)),
        }
        if self.has_mask():
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, pos, strict=True)]
            pos_matched = [m[i] for m, i in zip(matched_idxs, pos, strict=True)]
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            )
            gt_masks = [t["masks"] for t in targets]
            gt_labels = [t["labels"] for t in targets]
            losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_proposals, gt_masks, gt_labels, pos_matched)
        return [], losses

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):  # type: ignore[no-untyped-def]
        """torchvision's pipeline with the loss's scores (module docstring)."""
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)[:, 1:]  # drop the background's box
        pred_scores = self.term.scores(class_logits).to(pred_boxes.dtype)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(
            pred_boxes.split(boxes_per_image, 0),
            pred_scores.split(boxes_per_image, 0),
            image_shapes,
            strict=True,
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            # torchvision's labels: 1..C (0 = background)
            labels = torch.arange(1, scores.shape[1] + 1, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels


# ------------------------------------------------------------------------------------------ one-stage
def global_normalizer(num_pos: torch.Tensor) -> torch.Tensor:
    """max(1, positives of the whole step averaged over ranks): the official one-stage normaliser (§9)."""
    total = num_pos.detach().to(torch.float64).reshape(1).clone()
    all_reduce_sum_(total)
    return (total[0] / world_size()).clamp(min=1.0)


class OneStageTerm(nn.Module):
    """EFL / EQFL on all anchors of a step (``efl``, ``eqfl``; the stock ``sigmoid_focal`` is torchvision's
    own head)."""

    def __init__(
        self,
        loss_name: str,
        num_classes: int,
        loss_params: dict[str, Any] | None = None,
        loss: LongTailLoss | None = None,
    ) -> None:
        super().__init__()
        if loss_name not in ("efl", "eqfl"):
            raise ConfigError(f"one-stage gradtail terms are efl and eqfl, got {loss_name!r}")
        self.loss_name = loss_name
        self.num_classes = num_classes
        self.observers: list[Any] = []
        self.loss: LongTailLoss = (
            loss if loss is not None else one_stage_loss(loss_name, num_classes, loss_params)
        )

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logits`` (n, C), ``labels`` (n,) in 0..C-1, C = background, -1 = ignored."""
        for obs in self.observers:
            obs.observe(logits, labels)
        norm = global_normalizer(((labels >= 0) & (labels < self.num_classes)).sum())
        if self.loss_name == "eqfl":
            return self.loss(logits, labels, quality=quality, normalizer=norm)
        return self.loss(logits, labels, normalizer=norm)


def anchor_labels(
    targets: list[dict[str, torch.Tensor]], matched_idxs: list[torch.Tensor], num_classes: int, ignore: int
) -> torch.Tensor:
    """(sum of anchors,) labels: the matched box's class, ``num_classes`` for background (matched -1),
    -1 for the ``ignore`` match value (torchvision's BETWEEN_THRESHOLDS)."""
    out = []
    for t, m in zip(targets, matched_idxs, strict=True):
        lab = t["labels"][m.clamp(min=0)] if t["labels"].numel() else torch.zeros_like(m)
        lab = torch.where(m >= 0, lab, torch.full_like(lab, num_classes))
        out.append(torch.where(m == ignore, torch.full_like(lab, -1), lab))
    return torch.cat(out)


class GradtailRetinaNetClassificationHead(RetinaNetClassificationHead):
    """``RetinaNetClassificationHead`` whose ``compute_loss`` is a gradtail term (module docstring)."""

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, term: OneStageTerm, **kwargs: Any
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, **kwargs)
        self.term = term

    def compute_loss(self, targets, head_outputs, matched_idxs, quality=None):  # type: ignore[no-untyped-def]
        logits = head_outputs["cls_logits"].reshape(-1, self.num_classes)
        labels = anchor_labels(targets, matched_idxs, self.num_classes, self.BETWEEN_THRESHOLDS)
        return self.term(logits, labels, quality)


def _quality(
    box_coder: Any,
    bbox_regression: torch.Tensor,
    anchors: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    matched_idxs: list[torch.Tensor],
) -> torch.Tensor:
    """EQFL's quality target: IoU of each anchor's decoded box with its matched box (0 elsewhere)."""
    out = []
    for reg, anc, t, m in zip(bbox_regression, anchors, targets, matched_idxs, strict=True):
        q = torch.zeros(m.shape[0], dtype=reg.dtype, device=reg.device)
        pos = torch.where(m >= 0)[0]
        if pos.numel():
            if isinstance(box_coder, BoxLinearCoder):  # FCOS
                pred = box_coder.decode(reg[pos].detach(), anc[pos])
            else:  # RetinaNet's BoxCoder
                pred = box_coder.decode_single(reg[pos].detach(), anc[pos])
            gt = t["boxes"][m[pos]].to(pred.dtype)
            q[pos] = box_ops.box_iou(pred, gt).diagonal().clamp(0, 1)
        out.append(q)
    return torch.cat(out)


class GradtailRetinaNetHead(RetinaNetHead):
    """``RetinaNetHead`` handing the anchors to the classification term (EQFL's quality)."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        term: OneStageTerm,
        prior_probability: float = 0.01,
        norm_layer: Any = None,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.classification_head = GradtailRetinaNetClassificationHead(
            in_channels,
            num_anchors,
            num_classes,
            term,
            prior_probability=prior_probability,
            norm_layer=norm_layer,
        )

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # type: ignore[no-untyped-def]
        quality = None
        if self.classification_head.term.loss_name == "eqfl":
            quality = _quality(
                self.regression_head.box_coder,
                head_outputs["bbox_regression"],
                anchors,
                targets,
                matched_idxs,
            )
        return {
            "classification": self.classification_head.compute_loss(
                targets, head_outputs, matched_idxs, quality
            ),
            "bbox_regression": self.regression_head.compute_loss(
                targets, head_outputs, anchors, matched_idxs
            ),
        }


class GradtailFCOSHead(FCOSHead):
    """``FCOSHead`` whose classification term is a gradtail loss; box and centre-ness terms from ``super``."""

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, term: OneStageTerm, num_convs: int = 4
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.term = term

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # type: ignore[no-untyped-def]
        """The gradtail classification term, then ``FCOSHead``'s GIoU box and centre-ness terms (the same
        computation, each divided by max(1, foreground locations) as torchvision does)."""
        cls_logits = head_outputs["cls_logits"]
        bbox_regression = head_outputs["bbox_regression"]
        num_classes = cls_logits.shape[-1]
        gt_classes, gt_boxes = [], []
        for t, m in zip(targets, matched_idxs, strict=True):
            if len(t["labels"]) == 0:
                classes = t["labels"].new_zeros((len(m),))
                boxes = t["boxes"].new_zeros((len(m), 4))
            else:
                classes = t["labels"][m.clip(min=0)]
                boxes = t["boxes"][m.clip(min=0)]
            classes[m < 0] = -1  # background
            gt_classes.append(classes)
            gt_boxes.append(boxes)
        all_boxes, all_classes, stacked = torch.stack(gt_boxes), torch.stack(gt_classes), torch.stack(anchors)
        foreground = all_classes >= 0
        num_foreground = max(1, int(foreground.sum().item()))
        labels = anchor_labels(targets, matched_idxs, num_classes, ignore=-2)  # FCOS ignores nothing
        quality = None
        if self.term.loss_name == "eqfl":
            quality = _quality(self.box_coder, bbox_regression, anchors, targets, matched_idxs)
        pred_boxes = self.box_coder.decode(bbox_regression, stacked)
        loss_box = generalized_box_iou_loss(pred_boxes[foreground], all_boxes[foreground], reduction="sum")
        reg_targets = self.box_coder.encode(stacked, all_boxes)
        if len(reg_targets) == 0:
            ctrness = reg_targets.new_zeros(reg_targets.size()[:-1])
        else:
            lr, tb = reg_targets[:, :, [0, 2]], reg_targets[:, :, [1, 3]]
            ctrness = torch.sqrt(
                (lr.min(dim=-1)[0] / lr.max(dim=-1)[0]) * (tb.min(dim=-1)[0] / tb.max(dim=-1)[0])
            )
        pred_ctrness = head_outputs["bbox_ctrness"].squeeze(dim=2)
        loss_ctrness = F.binary_cross_entropy_with_logits(
            pred_ctrness[foreground], ctrness[foreground], reduction="sum"
        )
        return {
            "classification": self.term(cls_logits.reshape(-1, num_classes), labels, quality),
            "bbox_regression": loss_box / num_foreground,
            "bbox_ctrness": loss_ctrness / num_foreground,
        }

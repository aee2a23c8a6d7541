"""torchvision detectors with a gradtail classification term and a backbone small enough for 2 CPU cores
(docs/detection.md §Detectors).

:func:`build_detector` returns a :class:`Detector`: torchvision's ``FasterRCNN``, ``RetinaNet`` or ``FCOS``
(``weights=None``, ``weights_backbone=None``: nothing is downloaded), built with the heads of
:mod:`gradtail.models.detection.heads` unless the stock loss is asked for, around either

- ``backbone: tiny`` (default): four stride-2 conv stages (3x3 conv, GroupNorm, ReLU; GroupNorm rather
  than BatchNorm so a rank's features do not depend on the other images of its batch, which keeps
  W processes equal to one) and torchvision's ``FeaturePyramidNetwork`` on the last three
  (strides 4, 8, 16, plus a max-pooled level for the two-stage RPN), ``width`` channels; or
- ``backbone: resnet50_fpn`` (the LVIS recipes'), torchvision's ``resnet_fpn_backbone`` with
  ``weights=None`` and FrozenBatchNorm.

Mask R-CNN (``arch: mask_rcnn``, docs/instance.md §1): torchvision's ``MaskRCNN`` with the same box head
as Faster R-CNN plus torchvision's mask branch (``MaskRCNNHeads``, ``MaskRCNNPredictor``, 14 x 14 RoIAlign),
around ``tiny`` (``mask_layers`` convolutions of ``width`` channels) or ResNet-50-FPN built as torchvision's
``maskrcnn_resnet50_fpn`` (``resnet50_fpn``) / ``maskrcnn_resnet50_fpn_v2`` (``resnet50_fpn_v2``: BatchNorm
FPN, two-conv RPN head, 4-conv + 1-fc box head, BatchNorm mask head) build them: BatchNorm from scratch,
FrozenBatchNorm (v1) and 3 trainable stages when ``checkpoint`` / ``backbone_checkpoint`` name local
weights (torchvision's choice for trained weights). ``checkpoint``: a torchvision state dict of the same
architecture (e.g. torchvision's COCO weights saved locally; class-specific layers whose shape differs are
left at their initialisation), for every architecture; ``backbone_checkpoint``: a ResNet-50 state dict.
Seesaw in the two-stage head (``seesaw_form``): ``objectness`` is mmdetection's LVIS head (a normed-linear
classifier with C + 2 outputs, :mod:`gradtail.models.detection.objectness`), ``softmax`` the softmax over
C + 1 classes; ``auto``: ``objectness`` in Mask R-CNN, ``softmax`` in Faster R-CNN.

One-stage options: RetinaNet's ``anchor_scales`` anchors per level and size s (s 2^(k / anchor_scales),
each with aspect ratios 0.5, 1, 2) and ``box_loss``, the loss of torchvision's regression head (``l1`` by
default, ``giou`` in the Fashion-MNIST one-stage recipe, docs/detection.md §One-stage recipe).

:class:`Detector` hides torchvision's label conventions: it takes and returns labels 0..C-1 (the
dataset's contiguous class indices) whatever the architecture (two-stage heads reserve 0 for the
background, so labels are shifted by one inside).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from gradtail.errors import ConfigError, DataError
from gradtail.losses.base import LongTailLoss
from gradtail.models.detection.heads import (
    ONE_STAGE_LOSSES,
    TWO_STAGE_LOSSES,
    GradtailFCOSHead,
    GradtailRetinaNetHead,
    GradtailRoIHeads,
    OneStageTerm,
    TwoStageTerm,
)
from gradtail.models.detection.objectness import SeesawObjectnessPredictor, SeesawObjectnessTerm

ARCHS = ("faster_rcnn", "retinanet", "fcos")
STOCK_LOSS = {"faster_rcnn": "ce", "retinanet": "sigmoid_focal", "fcos": "sigmoid_focal", "mask_rcnn": "ce"}
INSTANCE_ARCHS = ("mask_rcnn",)  # detectors with a mask branch (task instance_segmentation)
TWO_STAGE_ARCHS = ("faster_rcnn", "mask_rcnn")  # heads.GradtailRoIHeads; label 0 = background inside
BACKBONES = ("tiny", "resnet50_fpn", "resnet50_fpn_v2")  # resnet50_fpn_v2: Mask R-CNN only
SEESAW_FORMS = ("auto", "objectness", "softmax")
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")  # torchvision.models.detection._utils._box_loss


@dataclass
class DetectorSpec:
    """What :func:`build_detector` builds. Sizes in pixels of the network input."""

    arch: str = "faster_rcnn"
    num_classes: int = 10
    loss: str | None = None  # None: the architecture's stock loss
    loss_params: dict[str, Any] = field(default_factory=dict)
    backbone: str = "tiny"
    width: int = 64
    min_size: int = 64  # torchvision's internal resize: shortest side ...
    max_size: int = 64  # ... and longest side (equal to the canvas: no resizing)
    image_mean: tuple[float, float, float] = (0.1, 0.1, 0.1)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    anchor_sizes: tuple[int, ...] = (12, 24, 48)
    score_thresh: float = 1e-3
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    # two-stage
    rpn_pre_nms_top_n_train: int = 300
    rpn_post_nms_top_n_train: int = 150
    rpn_pre_nms_top_n_test: int = 200
    rpn_post_nms_top_n_test: int = 100
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 128
    box_positive_fraction: float = 0.25
    representation: int = 256
    # one-stage
    prior_probability: float = 0.01
    topk_candidates: int = 300
    anchor_scales: int = 2  # RetinaNet anchors per level: s 2^(k / scales), k < scales (2: s, s sqrt(2))
    box_loss: str = "l1"  # RetinaNet's box loss: one of BOX_LOSSES (torchvision's _box_loss)
    # two-stage seesaw: objectness (mmdetection's normed-linear C + 2 head) | softmax (C + 1) | auto
    seesaw_form: str = "auto"
    cls_temperature: float = 20.0  # the normed-linear classifier's temperature (seesaw_form objectness)
    # Mask R-CNN
    mask_layers: int = 4  # convolutions of the tiny backbone's mask head (torchvision's: 4 x 256)
    # local weights (nothing is downloaded): a torchvision state dict of the architecture / a ResNet-50's
    checkpoint: str | None = None
    backbone_checkpoint: str | None = None
    trainable_backbone_layers: int | None = None  # ResNet-50 stages trained (torchvision's default)

    def check(self) -> None:
        if self.arch not in ARCHS + INSTANCE_ARCHS:
            archs = ", ".join(ARCHS + INSTANCE_ARCHS)
            raise ConfigError(f"detector arch must be one of {archs}, got {self.arch!r}")
        allowed = TWO_STAGE_LOSSES if self.arch in TWO_STAGE_ARCHS else ONE_STAGE_LOSSES
        if self.loss is not None and self.loss not in allowed:
            raise ConfigError(f"{self.arch} takes the losses {', '.join(allowed)}, got {self.loss!r}")
        if self.backbone not in BACKBONES:
            choices = ", ".join(BACKBONES)
            raise ConfigError(f"detector backbone must be one of {choices}, got {self.backbone!r}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.box_loss not in BOX_LOSSES:
            raise ConfigError(
                f"detector box_loss must be one of {', '.join(BOX_LOSSES)}, got {self.box_loss!r}"
            )
        if self.anchor_scales < 1:
            raise ConfigError(f"detector anchor_scales must be >= 1, got {self.anchor_scales}")
        self.check_instance_options()

    def check_instance_options(self) -> None:
        """The options added with Mask R-CNN (docs/instance.md §1): backbone, seesaw head, local weights."""
        if self.backbone == "resnet50_fpn_v2" and self.arch != "mask_rcnn":
            raise ConfigError("detector backbone resnet50_fpn_v2 is Mask R-CNN's (maskrcnn_resnet50_fpn_v2)")
        if self.seesaw_form not in SEESAW_FORMS:
            raise ConfigError(
                f"detector seesaw_form must be one of {', '.join(SEESAW_FORMS)}, got {self.seesaw_form!r}"
            )
        if self.seesaw_form == "objectness" and self.arch not in TWO_STAGE_ARCHS:
            raise ConfigError("detector seesaw_form objectness is a two-stage head (faster_rcnn, mask_rcnn)")
        if not self.cls_temperature > 0:
            raise ConfigError(f"detector cls_temperature must be > 0, got {self.cls_temperature}")
        if self.mask_layers < 1:
            raise ConfigError(f"detector mask_layers must be >= 1, got {self.mask_layers}")
        if self.trainable_backbone_layers is not None and not 0 <= self.trainable_backbone_layers <= 5:
            raise ConfigError(
                f"detector trainable_backbone_layers must be in 0..5, got {self.trainable_backbone_layers}"
            )
        if self.backbone_checkpoint is not None and self.backbone == "tiny":
            raise ConfigError("detector backbone_checkpoint is a ResNet-50 state dict (backbone resnet50_*)")

    def missing_weights(self) -> list[str]:
        """The local weight files (``checkpoint``, ``backbone_checkpoint``) that do not exist, as
        ``key: path`` (checked before a run reads its data; the build names them too)."""
        named = (("checkpoint", self.checkpoint), ("backbone_checkpoint", self.backbone_checkpoint))
        return [f"{key}: {path}" for key, path in named if path is not None and not Path(path).is_file()]

    @property
    def seesaw_objectness(self) -> bool:
        """Whether seesaw uses mmdetection's normed-linear head with two objectness channels."""
        if self.loss_name != "seesaw" or self.arch not in TWO_STAGE_ARCHS:
            return False
        if self.seesaw_form == "auto":
            return self.arch == "mask_rcnn"
        return self.seesaw_form == "objectness"

    @property
    def loss_name(self) -> str:
        return self.loss or STOCK_LOSS[self.arch]


class TinyFPNBackbone(nn.Module):
    """Four stride-2 conv stages (GroupNorm) + FPN on the last three: features '0', '1', '2' at strides
    4, 8, 16 (and 'pool', stride 32, when ``extra_pool``), ``out_channels`` each."""

    def __init__(self, width: int = 64, extra_pool: bool = True) -> None:
        super().__init__()
        chans = [width // 2, width, width * 3 // 2, width * 2]
        stages, c_in = [], 3
        for c in chans:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                    nn.GroupNorm(8 if c % 8 == 0 else 1, c),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c, c, 3, padding=1, bias=False),
                    nn.GroupNorm(8 if c % 8 == 0 else 1, c),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(
            chans[1:], width, extra_blocks=LastLevelMaxPool() if extra_pool else None
        )
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                feats[str(i - 1)] = x
        return self.fpn(feats)


def _backbone(spec: DetectorSpec, extra_pool: bool) -> nn.Module:
    if spec.backbone == "tiny":
        return TinyFPNBackbone(spec.width, extra_pool=extra_pool)
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    # two-stage: C2-C5 + max-pool (P2-P6, torchvision's Faster R-CNN); one-stage: C3-C5 + P6, P7 (RetinaNet)
    extra = None if extra_pool else LastLevelP6P7(256, 256)
    return resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        trainable_layers=5,
        returned_layers=[1, 2, 3, 4] if extra_pool else [2, 3, 4],
        extra_blocks=extra,
    )


def _levels(spec: DetectorSpec, backbone: nn.Module, extra_pool: bool) -> int:
    return 3 + int(extra_pool) if spec.backbone == "tiny" else 5


class Detector(nn.Module):
    """A torchvision detector taking and returning labels 0..C-1 (module docstring).

    ``forward(images, targets)`` in training mode returns torchvision's loss dict; in eval mode a list of
    ``{"boxes", "scores", "labels"}`` per image. ``loss_module`` is the gradtail loss inside (its
    statistics: ``loss_module.stats``), ``None`` for a stock loss; :meth:`set_observers` lets step observers
    see the (logits, labels) the classification term gives its loss.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: DetectorSpec,
        loss_module: nn.Module | None,
        term: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.loss_module = loss_module
        self._term = [term]  # in a list: the term is already a submodule of ``model``
        self.label_offset = 1 if spec.arch in TWO_STAGE_ARCHS else 0

    def set_observers(self, observers: list[Any]) -> bool:
        """Hand the classification term's (logits, labels) to ``observers`` every training step; False for
        a stock head (one-stage ``sigmoid_focal``), which has no term to observe."""
        term = self._term[0]
        if term is None:
            return False
        term.observers = list(observers)
        return True

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> Any:
        if targets is not None and self.label_offset:
            targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        out = self.model(images, targets)
        if self.training:
            return out
        if self.label_offset:
            out = [{**o, "labels": o["labels"] - self.label_offset} for o in out]
        return out


def build_detector(spec: DetectorSpec, loss: LongTailLoss | None = None) -> Detector:
    """The detector of ``spec`` (module docstring). ``loss``: the classification term's loss, built by the
    caller as the head applies it (:func:`~gradtail.models.detection.heads.two_stage_loss`,
    :func:`~gradtail.models.detection.heads.one_stage_loss`); by default built here from ``spec.loss`` and
    ``spec.loss_params``. One-stage ``sigmoid_focal`` is torchvision's own head and loss (``loss`` unused)."""
    spec.check()
    c = spec.num_classes
    common = {
        "min_size": spec.min_size,
        "max_size": spec.max_size,
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
    }
    loss_module: nn.Module | None = None
    if spec.arch in TWO_STAGE_ARCHS:
        two_stage = _mask_rcnn if spec.arch == "mask_rcnn" else _faster_rcnn
        model, two_stage_head = two_stage(spec, loss, common)
        loss_module = two_stage_head.loss if spec.loss_name != "ce" else None
        head_term: nn.Module | None = two_stage_head
    else:
        backbone = _backbone(spec, extra_pool=False)
        levels = _levels(spec, backbone, False)
        if spec.arch == "retinanet":
            base = _pad(spec.anchor_sizes, levels)
            k = spec.anchor_scales
            sizes = tuple(tuple(round(s * 2 ** (i / k)) for i in range(k)) for s in base)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
        else:
            sizes = tuple((s,) for s in _pad(tuple(s // 2 for s in spec.anchor_sizes), levels))
            anchors = AnchorGenerator(sizes, ((1.0,),) * levels)
        n_anchors = anchors.num_anchors_per_location()[0]
        term = (
            None
            if spec.loss_name == "sigmoid_focal"
            else OneStageTerm(spec.loss_name, c, spec.loss_params, loss=loss)
        )
        ch = backbone.out_channels
        options = {
            "num_classes": c,
            "anchor_generator": anchors,
            "score_thresh": spec.score_thresh,
            "nms_thresh": spec.nms_thresh,
            "detections_per_img": spec.detections_per_img,
            "topk_candidates": spec.topk_candidates,
            **common,
        }
        if spec.arch == "retinanet":
            head: nn.Module | None = None
            if term is not None:
                head = GradtailRetinaNetHead(ch, n_anchors, c, term, prior_probability=spec.prior_probability)
            model = RetinaNet(backbone, head=head, **options)
            if term is None:  # stock: torchvision's head, only the prior adjusted
                _set_prior(model.head.classification_head.cls_logits, spec.prior_probability)
            model.head.regression_head._loss_type = spec.box_loss
        else:
            head = GradtailFCOSHead(ch, n_anchors, c, term) if term is not None else None
            model = FCOS(backbone, head=head, **options)
            _set_prior(model.head.classification_head.cls_logits, spec.prior_probability)
        loss_module = term.loss if term is not None else None
        head_term = term
    if spec.checkpoint is not None:
        load_detector_checkpoint(model, spec.checkpoint, f"{spec.arch} ({spec.backbone})")
    return Detector(model, spec, loss_module, head_term)


# ------------------------------------------------------------- two-stage detectors: Faster / Mask R-CNN
def two_stage_predictor(spec: DetectorSpec, in_channels: int) -> nn.Module:
    """The box predictor of a two-stage head: torchvision's ``FastRCNNPredictor`` (C + 1 classes), or the
    seesaw head's normed-linear C + 2 predictor (``spec.seesaw_objectness``)."""
    if spec.seesaw_objectness:
        return SeesawObjectnessPredictor(in_channels, spec.num_classes, spec.cls_temperature)
    return FastRCNNPredictor(in_channels, spec.num_classes + 1)


def two_stage_term(spec: DetectorSpec, loss: LongTailLoss | None) -> TwoStageTerm:
    """The classification term of a two-stage head for ``spec`` (the loss built by the caller, or here)."""
    if spec.seesaw_objectness:
        return SeesawObjectnessTerm(spec.num_classes, spec.loss_params, loss=loss)
    return TwoStageTerm(spec.loss_name, spec.num_classes, spec.loss_params, loss=loss)


def _two_stage_anchors(spec: DetectorSpec, levels: int) -> AnchorGenerator:
    """The RPN's anchors: one size per level (:func:`_pad`), aspect ratios 0.5, 1, 2."""
    sizes = tuple((s,) for s in _pad(spec.anchor_sizes, levels))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)


def _roi_align(levels: int, output_size: int) -> MultiScaleRoIAlign:
    """RoIAlign over the FPN levels of the two-stage heads (all but the extra max-pooled one)."""
    names = [str(i) for i in range(levels - 1)]
    return MultiScaleRoIAlign(featmap_names=names, output_size=output_size, sampling_ratio=2)


def _two_stage_options(spec: DetectorSpec) -> dict[str, Any]:
    """The RPN and box-head settings torchvision's ``FasterRCNN`` and ``MaskRCNN`` take from ``spec``."""
    return {
        "rpn_pre_nms_top_n_train": spec.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": spec.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": spec.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": spec.rpn_post_nms_top_n_test,
        "rpn_batch_size_per_image": spec.rpn_batch_size_per_image,
        "box_score_thresh": spec.score_thresh,
        "box_nms_thresh": spec.nms_thresh,
        "box_detections_per_img": spec.detections_per_img,
        "box_batch_size_per_image": spec.box_batch_size_per_image,
        "box_positive_fraction": spec.box_positive_fraction,
    }


def _with_gradtail_heads(
    detector: type[FasterRCNN],
    spec: DetectorSpec,
    loss: LongTailLoss | None,
    common: dict[str, Any],
    backbone: nn.Module,
    anchors: AnchorGenerator,
    rpn_head: nn.Module | None = None,
    **heads: nn.Module,
) -> tuple[nn.Module, TwoStageTerm]:
    """torchvision's two-stage ``detector`` (``FasterRCNN`` or its subclass ``MaskRCNN``) around
    ``backbone``, with ``heads`` (the box, and Mask R-CNN's mask, RoI pools, heads and predictors) and the
    RPN (``rpn_head``: None for torchvision's), whose RoI heads are then replaced by
    :class:`GradtailRoIHeads` around the classification term: every loss (stock CE included) goes through
    them, one code path for scores and NMS."""
    model = detector(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        **heads,
        **_two_stage_options(spec),
        **common,
    )
    term = two_stage_term(spec, loss)
    model.roi_heads = GradtailRoIHeads(
        term,
        **heads,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=spec.box_batch_size_per_image,
        positive_fraction=spec.box_positive_fraction,
        bbox_reg_weights=None,
        score_thresh=spec.score_thresh,
        nms_thresh=spec.nms_thresh,
        detections_per_img=spec.detections_per_img,
    )
    return model, term


def _faster_rcnn(
    spec: DetectorSpec, loss: LongTailLoss | None, common: dict[str, Any]
) -> tuple[nn.Module, TwoStageTerm]:
    """torchvision's ``FasterRCNN`` with :class:`GradtailRoIHeads` (module docstring)."""
    backbone = _backbone(spec, extra_pool=True)
    levels = _levels(spec, backbone, True)
    anchors = _two_stage_anchors(spec, levels)
    pool = _roi_align(levels, 7)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, spec.representation)
    predictor = two_stage_predictor(spec, spec.representation)
    heads = {"box_roi_pool": pool, "box_head": box_head, "box_predictor": predictor}
    return _with_gradtail_heads(FasterRCNN, spec, loss, common, backbone, anchors, **heads)


def _resnet50_fpn(spec: DetectorSpec) -> nn.Module:
    """ResNet-50-FPN as torchvision's ``maskrcnn_resnet50_fpn`` / ``_v2`` build it (module docstring)."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, _validate_trainable_layers
    from torchvision.ops.misc import FrozenBatchNorm2d

    trained = spec.checkpoint is not None or spec.backbone_checkpoint is not None
    layers = _validate_trainable_layers(trained, spec.trainable_backbone_layers, 5, 3)
    v2 = spec.backbone == "resnet50_fpn_v2"
    norm = FrozenBatchNorm2d if trained and not v2 else nn.BatchNorm2d
    body = resnet50(weights=None, norm_layer=norm)
    if spec.backbone_checkpoint is not None:
        state = _read_state_dict(spec.backbone_checkpoint)
        try:
            body.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise DataError(f"{spec.backbone_checkpoint}: not a ResNet-50 state dict ({first})") from None
    return _resnet_fpn_extractor(body, layers, norm_layer=nn.BatchNorm2d if v2 else None)


def _mask_rcnn(
    spec: DetectorSpec, loss: LongTailLoss | None, common: dict[str, Any]
) -> tuple[nn.Module, TwoStageTerm]:
    """torchvision's ``MaskRCNN`` with :class:`GradtailRoIHeads` (module docstring)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead

    if spec.backbone == "tiny":
        backbone: nn.Module = TinyFPNBackbone(spec.width, extra_pool=True)
        levels = 4
    else:
        backbone = _resnet50_fpn(spec)
        levels = 5
    ch = int(backbone.out_channels)  # type: ignore[arg-type]
    anchors = _two_stage_anchors(spec, levels)
    box_pool = _roi_align(levels, 7)
    mask_pool = _roi_align(levels, 14)
    rpn_head: nn.Module | None = None
    if spec.backbone == "resnet50_fpn_v2":
        rpn_head = RPNHead(ch, anchors.num_anchors_per_location()[0], conv_depth=2)
        box_head: nn.Module = FastRCNNConvFCHead((ch, 7, 7), [256, 256, 256, 256], [spec.representation],
                                                 norm_layer=nn.BatchNorm2d)  # fmt: skip
        mask_head = MaskRCNNHeads(ch, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)
        mask_dim = 256
    elif spec.backbone == "resnet50_fpn":
        box_head = TwoMLPHead(ch * 7 * 7, spec.representation)
        mask_head = MaskRCNNHeads(ch, [256, 256, 256, 256], 1)
        mask_dim = 256
    else:
        box_head = TwoMLPHead(ch * 7 * 7, spec.representation)
        mask_head = MaskRCNNHeads(ch, [ch] * spec.mask_layers, 1)
        mask_dim = ch
    predictor = two_stage_predictor(spec, spec.representation)
    mask_predictor = MaskRCNNPredictor(mask_dim, mask_dim, spec.num_classes + 1)
    heads = {
        "box_roi_pool": box_pool,
        "box_head": box_head,
        "box_predictor": predictor,
        "mask_roi_pool": mask_pool,
        "mask_head": mask_head,
        "mask_predictor": mask_predictor,
    }
    return _with_gradtail_heads(MaskRCNN, spec, loss, common, backbone, anchors, rpn_head, **heads)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save`` (tensors only), or a one-line :class:`DataError` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except Exception as e:  # unpickling / zip errors of every kind: one line naming the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot read the checkpoint ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # {"model": state_dict, ...}
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return state


def load_detector_checkpoint(model: nn.Module, path: str, what: str) -> list[str]:
    """Load a torchvision state dict of the same architecture into ``model`` (torchvision's detector):
    the box predictor's keys are mapped onto gradtail's wrapped predictor, layers whose shape differs (the
    class-specific ones, for another number of classes or the seesaw head) keep their initialisation and
    are returned; any other mismatch is a one-line :class:`DataError` naming the file."""
    state = _read_state_dict(path)
    own = model.state_dict()
    prefix, wrapped = "roi_heads.box_predictor.", "roi_heads.box_predictor.predictor."
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix) and not key.startswith(wrapped):
            key = wrapped + key[len(prefix) :]
        mapped[key] = value
    unexpected = [k for k in mapped if k not in own and not k.endswith("num_batches_tracked")]
    kept = {k: v for k, v in mapped.items() if k in own}
    skipped = [k for k, v in kept.items() if tuple(v.shape) != tuple(own[k].shape)]
    missing = [  # a torchvision checkpoint holds no gradtail loss (its statistics: the term's buffers)
        k for k in own if k not in kept and not k.endswith("num_batches_tracked") and ".term." not in f".{k}"
    ]
    if unexpected or missing:
        detail = f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}"
        raise DataError(f"{path}: not a state dict of {what} ({detail})")
    for k in skipped:
        del kept[k]
    model.load_state_dict(kept, strict=False)
    return skipped


def _pad(sizes: tuple[int, ...], levels: int) -> tuple[int, ...]:
    """One anchor size per level: the given ones, doubled for the extra levels."""
    out = list(sizes[:levels])
    while len(out) < levels:
        out.append(out[-1] * 2)
    return tuple(out)


def _set_prior(conv: nn.Conv2d, prior: float) -> None:
    import math

    with torch.no_grad():
        conv.bias.fill_(-math.log((1 - prior) / prior))

"""BCL: balanced supervised contrastive learning with class centres (docs/methods/gbg.md §3), as a
regularizer.

Zhu et al., "Balanced Contrastive Learning for Long-Tailed Visual Recognition" (CVPR 2022), the term that
GBG's released code trains with. Two pieces:

- :class:`BalancedContrastiveLoss`, the loss alone: anchors are the V x B view embeddings; candidates are
  the V x B embeddings plus the C class centres; positives of an anchor are the other candidates of its
  class (its other views, same-class samples, its class centre), the anchor itself excluded. In the
  denominator each class's exp-similarities are averaged over that class's members among the candidates
  (class-averaging: divided by the class's count, the anchor itself not counted):

      log p_ij = s_ij / T - log sum_{k != i} exp(s_ik / T) / (n_{y_k} - [y_k = y_i])
      loss     = mean_i  -(1 / |P_i|) sum_{j in P_i} log p_ij

  with s the cosine similarity (embeddings are L2-normalised), T = 0.1, n_c the number of candidates of
  class c (its views in the batch plus its centre).
- :class:`BCLRegularizer`, the term added to a classification loss: a projection head on the views'
  backbone features (feature_dim -> 512 -> BN -> ReLU -> 128, L2-normalised) and a second head of the
  same shape mapping the classifier's weight rows (C, feature_dim) to the class centres. It returns
  ``(ce_weight - 1) * loss + scl_weight * L_BCL``, so the step's total is
  ``ce_weight * loss + scl_weight * L_BCL`` (docs/methods/gbg.md §3: lambda_ce 2.0, lambda_scl 1.6 on CIFAR);
  under GBG ``loss`` is the balanced sum_g alpha_g L_g (docs/methods/gbg.md §2.5).

The views (``num_views``, default 2; SimCLR-style, ``gradtail.data.contrastive_views``) are made by the
data loader (``data.augment.views: 2``) and their features come from the same forward as the batch.
BCL's recipe pairs this with a cosine classifier (``model.head: cosine``, ``head_scale: 30``) and a
logit-adjusted cross-entropy (``loss.name: logit_adjust``); those are the config's choices, not this term's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.contracts import Regularizer, unwrap_model
from gradtail.errors import ConfigError, InputError
from gradtail.losses.base import check_label_range
from gradtail.models.base import LongTailClassifier
from gradtail.regularizers import register_regularizer
from gradtail.search_space import FloatRange, SearchSpace


class BalancedContrastiveLoss(nn.Module):
    """The balanced contrastive loss of BCL (see the module docstring for the formula).

    ``forward(views, centres, targets)``: ``views`` (B, V, d) L2-normalised embeddings of V >= 1 views of
    each of B samples, ``centres`` (C, d) L2-normalised class centres, ``targets`` (B,) in [0, C).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> views = F.normalize(torch.randn(4, 2, 8), dim=2)  # B=4 samples, V=2 views, d=8
        >>> centres = F.normalize(torch.randn(3, 8), dim=1)  # C=3 class centres
        >>> loss = BalancedContrastiveLoss(temperature=0.1)(views, centres, torch.tensor([0, 1, 2, 0]))
        >>> loss.dim(), round(float(loss), 4)
        (0, 5.3295)
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"bcl: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, views: torch.Tensor, centres: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if views.dim() != 3 or centres.dim() != 2 or views.shape[2] != centres.shape[1]:
            raise InputError(
                f"bcl: views must be (B, V, d) and centres (C, d); got {tuple(views.shape)}, "
                f"{tuple(centres.shape)}"
            )
        b, v, _ = views.shape
        c = centres.shape[0]
        if targets.shape != (b,):
            raise InputError(f"bcl: targets {tuple(targets.shape)} do not match {b} samples")
        check_label_range(targets, c)  # no device sync on accelerators
        anchors = views.transpose(0, 1).reshape(v * b, -1)  # view-major, as BCL's torch.unbind(dim=1)
        candidates = torch.cat([anchors, centres.to(anchors.dtype)])
        labels = torch.cat([targets.repeat(v), torch.arange(c, device=targets.device)])
        counts = torch.bincount(labels, minlength=c).to(anchors.dtype)  # n_c: views + the centre
        n = v * b
        same = labels[:n, None] == labels[None, :]
        not_self = torch.ones_like(same)
        not_self[:, :n].fill_diagonal_(False)
        positives = (same & not_self).to(anchors.dtype)
        logits = anchors @ candidates.T / self.temperature
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # stability; cancels exactly
        weight = counts[labels][None, :] - positives  # class-averaging, the anchor not counted
        denom = (logits.exp() * not_self / weight).sum(dim=1, keepdim=True)
        log_prob = logits - denom.log()
        per_anchor = -(positives * log_prob).sum(dim=1) / positives.sum(dim=1)
        return per_anchor.mean()


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """in -> hidden -> BN -> ReLU -> out (BCL's MLP head; its output is L2-normalised by the caller)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


@register_regularizer("bcl")
class BCLRegularizer(Regularizer):
    """BCL's contrastive term with its two projection heads (docs/methods/gbg.md §3); see the module
    docstring.

    Args:
        ce_weight: lambda_ce, the weight of the classification loss in the total (default 2.0).
        scl_weight: lambda_scl, the weight of the contrastive loss (default 1.6).
        temperature: T (default 0.1).
        hidden_dim, out_dim: the heads' widths (512, 128).
        num_views: extra views per image (2); ``data.augment.views`` must match.
        start_epoch: first epoch the term is added.

    Example:
        >>> import torch
        >>> from gradtail.models import create_model
        >>> from gradtail.regularizers import create_regularizer
        >>> _ = torch.manual_seed(0)
        >>> model, reg = create_model("small_cnn", num_classes=3, width=8), create_regularizer("bcl")
        >>> reg.setup(model, num_classes=3)  # creates the two projection heads (the trainer calls it)
        >>> x, views, y = torch.randn(4, 1, 28, 28), torch.randn(8, 1, 28, 28), torch.tensor([0, 1, 2, 0])
        >>> h = model.features(torch.cat([x, views])); logits = model.classifier(h[:4])  # views follow x
        >>> loss = torch.nn.functional.cross_entropy(logits, y)
        >>> term = reg(h[:4], logits, y, loss, model, view_features=h[4:])  # (ce_w - 1) loss + scl_w L_BCL
        >>> reg.num_views, term.dim(), bool(torch.isfinite(term))
        (2, 0, True)
    """

    search_space: ClassVar[SearchSpace] = {
        "ce_weight": FloatRange(0.5, 4.0),
        "scl_weight": FloatRange(0.2, 3.2),
        "temperature": FloatRange(0.05, 0.5, log=True),
    }

    report_note = (
        "BCL (docs/methods/gbg.md §3): balanced contrastive term with class centres on two SimCLR-style "
        "views; the views are drawn by gradtail's batched augmentation (fixed colour-jitter order)."
    )

    def __init__(
        self,
        ce_weight: float = 2.0,
        scl_weight: float = 1.6,
        temperature: float = 0.1,
        hidden_dim: int = 512,
        out_dim: int = 128,
        num_views: int = 2,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        if ce_weight < 0 or scl_weight < 0:
            raise ConfigError(f"bcl: ce_weight and scl_weight must be >= 0, got {ce_weight}, {scl_weight}")
        if int(num_views) < 1 or int(hidden_dim) < 1 or int(out_dim) < 1:
            raise ConfigError("bcl: num_views, hidden_dim and out_dim must be >= 1")
        self.ce_weight = float(ce_weight)
        self.scl_weight = float(scl_weight)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = int(out_dim)
        self.num_views = int(num_views)
        self.start_epoch = int(start_epoch)
        self.contrastive = BalancedContrastiveLoss(temperature)
        self.head: nn.Module | None = None
        self.centre_head: nn.Module | None = None

    def setup(self, model: nn.Module, num_classes: int) -> None:
        """Create the two heads for the model's feature width (called once, before the optimizer)."""
        if not isinstance(model, LongTailClassifier):
            raise ConfigError(f"bcl needs a gradtail classifier model, got {type(model).__name__}")
        feature_dim = int(model.feature_dim)
        weight = model.classifier.weight
        if not isinstance(weight, torch.Tensor) or weight.shape != (num_classes, feature_dim):
            raise ConfigError(
                "bcl needs a model with feature_dim and a classifier whose weight is (num_classes, "
                "feature_dim) (the class centres are computed from its rows)"
            )
        self.head = projection_head(feature_dim, self.hidden_dim, self.out_dim)
        self.centre_head = projection_head(feature_dim, self.hidden_dim, self.out_dim)

    def embed_views(self, view_features: torch.Tensor, batch: int) -> torch.Tensor:
        """(V * B, F) view-major backbone features -> (B, V, out_dim) L2-normalised embeddings."""
        assert self.head is not None
        z = F.normalize(self.head(view_features.float()), dim=1)
        return z.view(self.num_views, batch, -1).transpose(0, 1)

    def centres(self, model: nn.Module) -> torch.Tensor:
        """(C, out_dim) L2-normalised class centres from the classifier's weight rows."""
        assert self.centre_head is not None
        inner: Any = unwrap_model(model)
        return F.normalize(self.centre_head(inner.classifier.weight.float()), dim=1)

    def forward(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        model: nn.Module,
        view_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.head is None:
            raise ConfigError("bcl: setup(model, num_classes) was not called (the trainer calls it)")
        b = targets.shape[0]
        if view_features is None or view_features.shape[0] != self.num_views * b:
            got = None if view_features is None else tuple(view_features.shape)
            raise InputError(
                f"bcl needs the features of {self.num_views} extra views of each of the {b} images "
                f"(set data.augment.views: {self.num_views}); got {got}"
            )
        scl = self.contrastive(self.embed_views(view_features, b), self.centres(model), targets)
        return (self.ce_weight - 1.0) * loss + self.scl_weight * scl


__all__ = ["BCLRegularizer", "BalancedContrastiveLoss", "projection_head"]

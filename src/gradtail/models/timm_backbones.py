"""timm backbones as :class:`LongTailClassifier`s: the model name ``timm:<name>`` (``timm:resnet18``,
``timm:efficientnet_b0``, ``timm:vit_tiny_patch16_224``, any name of ``timm.list_models()``).

timm is an optional dependency (``pip install gradtail[timm]``); nothing here imports it until a
``timm:`` name is used. The backbone is ``timm.create_model(name, pretrained=False, num_classes=0,
in_chans=<the data's channels>, **model.params)``: timm's own head is removed, so the network maps images
to its pooled pre-logits feature (``head_hidden_size`` wide, else ``num_features``), and the classifier
is gradtail's linear or cosine head (:func:`gradtail.models.heads.create_head`), as for every model.

Weights. Nothing is downloaded (``pretrained=False`` always): the weights are random unless
``model.params.checkpoint`` names a local file holding a state dict of the same timm architecture (a
``torch.save``'d ``model.state_dict()``, also wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``,
or a ``.safetensors`` file as timm publishes; torchvision ResNets share timm's key names). The
checkpoint's classifier (timm's ``pretrained_cfg["classifier"]`` keys, e.g. ``fc.*``) is dropped; a
first convolution trained on another number of input channels is adapted as timm does for its pretrained
weights (``adapt_input_conv``: summed for one channel); any other missing, unexpected or mis-shaped key
is a one-line :class:`~gradtail.errors.ConfigError`.

Other ``model.params`` keys go to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ``img_size``
for ViTs trained on small images, ...). What is not timm's to set is refused when the config is checked
(:data:`TIMM_ARGS_SET_BY_GRADTAIL`); a key the timm model does not take is a ``ConfigError`` when the model
is built (timm's model classes take ``**kwargs``, so their keys cannot be listed beforehand).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from gradtail.errors import ConfigError
from gradtail.models.base import LongTailClassifier
from gradtail.models.registry import MODELS

TIMM_PREFIX = "timm"
INSTALL_HINT = "pip install 'gradtail[timm]' (or pip install timm)"
CHECKPOINT_KEY = "model.params.checkpoint"

# Keyword arguments of timm.create_model that gradtail sets itself -> where their value comes from.
TIMM_ARGS_SET_BY_GRADTAIL: Mapping[str, str] = {
    "in_chans": "the dataset (its image channels)",
    "pretrained": "gradtail (always False: nothing is downloaded; load local weights with "
    "model.params.checkpoint)",
    "pretrained_cfg": "gradtail (nothing is downloaded; load local weights with model.params.checkpoint)",
    "pretrained_cfg_overlay": "gradtail (nothing is downloaded; load local weights with "
    "model.params.checkpoint)",
    "checkpoint_path": "model.params.checkpoint",
    "cache_dir": "gradtail (nothing is downloaded)",
    "features_only": "gradtail (the backbone must give pooled features)",
}


def import_timm() -> ModuleType:
    """The ``timm`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"timm models need the timm library, which is not installed: {INSTALL_HINT}"
        ) from None
    return timm


def _close_names(timm: ModuleType, name: str) -> list[str]:
    """Up to 5 timm names like ``name``: those that start with it, contain it, then the closest spellings."""
    stem = re.sub(r"[^0-9A-Za-z_]", "*", name)
    candidates = [*timm.list_models(stem + "*"), *timm.list_models("*" + stem + "*")] if stem else []
    candidates += difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return list(dict.fromkeys(candidates))[:5]


def _check_timm_name(timm: ModuleType, name: str) -> None:
    if name and timm.is_model(name):
        return
    if not name:
        raise ConfigError(f"model '{TIMM_PREFIX}:' needs a timm model name, e.g. {TIMM_PREFIX}:resnet18")
    close = _close_names(timm, name)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ConfigError(
        f"unknown timm model {name!r} (model {TIMM_PREFIX}:{name}){hint}; timm.list_models() lists them all"
    )


class TimmClassifier(LongTailClassifier):
    """A timm network with its head removed (``num_classes=0``) and a gradtail head on its pooled feature.

    Args:
        timm_name: a timm model name (``resnet18``, ``efficientnet_b0``; a ``.tag`` suffix selects the
            pretrained config, e.g. ``resnet18.a1_in1k``; never downloaded).
        num_classes: classes of the gradtail head.
        in_channels: image channels (timm's ``in_chans``).
        head: ``"linear"`` or ``"cosine"``; head_scale: the cosine head's scale.
        checkpoint: a local state-dict file to initialise the backbone from (module docstring).
        **timm_kwargs: more keyword arguments of ``timm.create_model`` (``drop_path_rate``, ``img_size``).
    """

    def __init__(
        self,
        timm_name: str,
        num_classes: int,
        in_channels: int = 3,
        head: str = "linear",
        head_scale: float = 16.0,
        checkpoint: str | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        timm = import_timm()
        _check_timm_name(timm, timm_name)
        what = f"model {TIMM_PREFIX}:{timm_name}"
        for key in timm_kwargs:
            if key in TIMM_ARGS_SET_BY_GRADTAIL:
                source = TIMM_ARGS_SET_BY_GRADTAIL[key]
                raise ConfigError(
                    f"config key 'model.params.{key}' cannot be set: {what} gets it from {source}"
                )
        try:
            net = timm.create_model(
                timm_name, pretrained=False, num_classes=0, in_chans=int(in_channels), **timm_kwargs
            )
        except TypeError as e:  # a keyword the model class does not take
            raise ConfigError(
                f"config key 'model.params': {what} does not take them: {_one_line(e)}"
            ) from None
        self.timm_name = timm_name
        self.feature_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
        if checkpoint is not None:
            load_backbone_checkpoint(net, checkpoint, timm_name)
        self.backbone = net
        self._make_head(num_classes, head, head_scale)

    def convert_sync_batchnorm(self) -> nn.Module:
        """timm's converter: PyTorch's would turn timm's BatchNormAct2d (BatchNorm + activation, in
        EfficientNet, MobileNet, ...) into a plain SyncBatchNorm and silently drop the activation."""
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(self)

    def extra_repr(self) -> str:
        return f"timm={self.timm_name}, feature_dim={self.feature_dim}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _load_failure(error: BaseException) -> str:
    """Why ``torch.load`` / safetensors failed, in a few words (torch's own messages run for lines)."""
    text = " ".join(str(error).split())
    unpickler = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed| Check the doc|$)", text)
    if unpickler:
        detail = unpickler.group(1).strip().rstrip(".")
        if detail.startswith("Unsupported global"):
            return f"it holds pickled objects besides tensors ({detail}); save the model's state_dict() alone"
        return f"not a torch.save or .safetensors file ({detail})"
    return f"{type(error).__name__}: {text.split('. ')[0][:200]}"


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (``.safetensors``, or ``torch.load`` with ``weights_only``; a
    ``state_dict`` / ``model`` wrapper and a DDP ``module.`` prefix removed), or a one-line
    :class:`ConfigError` naming ``model.params.checkpoint`` and the file. Shared by every model family that
    takes a local checkpoint (timm backbones, torchvision segmentation models)."""
    where = f"config key {CHECKPOINT_KEY!r}: {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # a dependency of timm

            state: Any = load_file(str(path), device="cpu")
        else:
            # timm's train.py stores its argparse Namespace next to the weights
            allow = getattr(torch.serialization, "safe_globals", None)
            with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, not a checkpoint, or pickled objects besides tensors
        raise ConfigError(f"{where} cannot be read as a state dict: {_load_failure(e)}") from None
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"{where} holds no state dict (expected a mapping of parameter names to tensors)")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        bad = next(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise ConfigError(f"{where} is not a state dict: entry {bad!r} is not a tensor")
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _as_tuple(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:4])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > 4 else shown


def load_backbone_checkpoint(net: nn.Module, path: str | Path, timm_name: str) -> None:
    """Load the local state-dict file ``path`` into the head-less timm network ``net`` (module docstring):
    the checkpoint's classifier keys are dropped, a first convolution for other input channels is adapted,
    and every remaining key must match the network's in name and shape (else a one-line ConfigError)."""
    state = read_state_dict_file(Path(path).expanduser())
    own = net.state_dict()
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    heads = _as_tuple(cfg.get("classifier"))
    state = {
        k: v for k, v in state.items() if k in own or not any(k == h or k.startswith(h + ".") for h in heads)
    }
    from timm.models import adapt_input_conv

    for conv in _as_tuple(cfg.get("first_conv")):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].dim() == 4 and state[key].shape != own[key].shape:
            w, target = state[key], own[key]
            if w.shape[0] == target.shape[0] and w.shape[2:] == target.shape[2:]:
                state[key] = adapt_input_conv(target.shape[1], w.float()).to(w.dtype)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"shapes (checkpoint vs model) {_listing(mis_shaped)}")
    if problems:
        raise ConfigError(
            f"config key {CHECKPOINT_KEY!r}: {path} does not match timm model {timm_name!r}: "
            + "; ".join(problems)
        )
    net.load_state_dict(state, strict=True)


def timm_factory(timm_name: str) -> Callable[..., TimmClassifier]:
    """The model factory behind ``timm:<timm_name>`` (checks that timm is installed and knows the name)."""
    _check_timm_name(import_timm(), timm_name)

    def factory(
        num_classes: int,
        in_channels: int = 3,
        head: str = "linear",
        head_scale: float = 16.0,
        checkpoint: str | None = None,
        **timm_kwargs: Any,
    ) -> TimmClassifier:
        return TimmClassifier(
            timm_name, num_classes, in_channels, head, head_scale, checkpoint, **timm_kwargs
        )

    factory.__name__ = factory.__qualname__ = f"timm_{re.sub(r'[^0-9A-Za-z_]', '_', timm_name)}"
    factory.__doc__ = f"timm model {timm_name!r} (timm.create_model, pretrained=False) with a gradtail head."
    return factory


MODELS.register_prefix(
    TIMM_PREFIX,
    timm_factory,
    reserved=TIMM_ARGS_SET_BY_GRADTAIL,
    description="timm:<name>: any timm model, e.g. timm:resnet18 (needs pip install 'gradtail[timm]')",
)

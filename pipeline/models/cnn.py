"""Part 3: torchvision CNNs, from scratch or from ImageNet weights, with a head for our classes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.data.fetch import file_digest
from pipeline.errors import StageError
from pipeline.params import CNN_MODELS

# Smallest input each network runs on (DenseNet121's pooling needs 32 px).
MIN_SIZE = {"resnet18": 16, "densenet121": 32}
IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights", "densenet121": "DenseNet121_Weights"}

# torchvision's DenseNet checkpoints use old key names ('norm.1'); torchvision remaps them the same way.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class ModelError(StageError):
    """A model cannot be built as asked; the message says why and what to do."""


def _check_name(name: str) -> None:
    if name not in CNN_MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(CNN_MODELS)}")


def check_image_size(name: str, size: int) -> None:
    _check_name(name)
    if size < MIN_SIZE[name]:
        raise ModelError(f"{name} needs images of at least {MIN_SIZE[name]} px, the data has {size} px; "
                         "use a larger data.images.size")


def _imagenet_state_dict(name: str, weights_file: str, weights_sha256: str) -> dict:
    """ImageNet weights: a local file (param or $FINETUNE_WEIGHTS), else torchvision's download
    (which uses the torch hub cache when the file is already there)."""
    path = os.environ.get("FINETUNE_WEIGHTS") or weights_file
    if path:
        path = Path(path).expanduser()
        if not path.exists():
            raise ModelError(f"weights file {path} (cnn weights_file / $FINETUNE_WEIGHTS) does not exist")
        if weights_sha256 and file_digest(path) != weights_sha256:
            raise ModelError(f"weights file {path} has sha256 {file_digest(path)}, expected {weights_sha256} "
                             "(cnn weights_sha256); refusing to load it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ModelError(f"weights file {path} does not hold a state dict")
        return state
    weights = getattr(torchvision.models, IMAGENET_WEIGHTS[name]).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # noqa: BLE001 - URLError, hash mismatch, ...
        raise ModelError(
            f"could not get ImageNet weights for {name} ({type(error).__name__}: {error}). Offline, save "
            f"them on a connected machine with `python -c \"import torch, torchvision; torch.save("
            f"torchvision.models.{name}(weights='IMAGENET1K_V1').state_dict(), '{name}_imagenet.pt')\"` "
            f"and set cnn weights_file (or $FINETUNE_WEIGHTS) to that file, or copy {weights.url.rsplit('/', 1)[-1]} "
            f"into the torch hub cache ({torch.hub.get_dir()}/checkpoints/).") from None


def build(name: str, n_classes: int, pretrained: bool = False, weights_file: str = "",
          weights_sha256: str = "") -> nn.Module:
    """A torchvision model with a fresh `n_classes` head; ImageNet weights for the body if asked."""
    _check_name(name)
    model = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        state = {(_OLD_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in
                 _imagenet_state_dict(name, weights_file, weights_sha256).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"weights do not fit torchvision's {name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if name == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, n_classes)
    else:
        model.classifier = nn.Linear(model.classifier.in_features, n_classes)
    return model


def head(model: nn.Module) -> nn.Linear:
    return model.fc if hasattr(model, "fc") else model.classifier

"""Part 3: torchvision CNNs, from scratch or from ImageNet weights, with a head for our classes."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.data.fetch import file_digest
from pipeline.errors import StageError
from pipeline.models.registry import MODELS, CnnSpec
from pipeline.paths import weights_path

# torchvision's DenseNet checkpoints use old key names ('norm.1'); torchvision remaps them the same way.
# No other model's keys match, so it applies to every checkpoint.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class ModelError(StageError):
    """A model cannot be built as asked; the message says why and what to do."""


def spec(name: str) -> CnnSpec:
    """The registry entry of `name` (pipeline.models.registry), or a ModelError naming the choices."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def check_image_size(name: str, size: int, upsample_to: int = 0) -> int:
    """The size the network will see: `size`, or `upsample_to` when given; refuses one below the
    model's minimum, naming both ways out."""
    minimum = spec(name).min_size
    if upsample_to:
        if upsample_to < size:
            raise ModelError(f"cnn upsample_to {upsample_to} is smaller than the images ({size} px); it only "
                             "enlarges: set it to 0 or to at least the image size")
        if upsample_to < minimum:
            raise ModelError(f"{name} needs images of at least {minimum} px; cnn upsample_to "
                             f"{upsample_to} is below that")
        return upsample_to
    if size < minimum:
        raise ModelError(f"{name} needs images of at least {minimum} px, the data has {size} px; "
                         f"use a larger data.images.size, or let the device enlarge each batch with "
                         f"`-S cnn.defaults.upsample_to={minimum}`")
    return size


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """A float NCHW batch resized on the device to size x size (bilinear, no antialiasing: it only
    enlarges). A batch already at that size is returned as is."""
    if size == x.shape[-1] and size == x.shape[-2]:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def imagenet_weights(name: str):
    """torchvision's ImageNet weights of `name` (their URL, hash and loader)."""
    return getattr(torchvision.models, spec(name).weights).IMAGENET1K_V1


def hub_file(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of `name` once downloaded (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_weights(name).url.rsplit("/", 1)[-1]


def _imagenet_state_dict(name: str, weights_file: str, weights_sha256: str) -> dict:
    """ImageNet weights: a local file (param or $FINETUNE_WEIGHTS), else torchvision's download
    (which uses the torch hub cache when the file is already there)."""
    path = weights_path(weights_file)
    if path:
        if not path.exists():
            raise ModelError(f"weights file {path} (cnn weights_file / $FINETUNE_WEIGHTS) does not exist")
        if weights_sha256 and file_digest(path) != weights_sha256:
            raise ModelError(f"weights file {path} has sha256 {file_digest(path)}, expected {weights_sha256} "
                             "(cnn weights_sha256); refusing to load it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ModelError(f"weights file {path} does not hold a state dict")
        return state
    weights = imagenet_weights(name)
    try:
        # weights_only: a file already in the hub cache is not hash-checked, so it must not unpickle code
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(f"refusing the ImageNet weights for {name} in the torch hub cache ({hub_file(name)}): the file "
                         f"holds more than tensors ({str(error).splitlines()[0]}). Delete it (it is downloaded "
                         "again), or set cnn weights_file (or $FINETUNE_WEIGHTS) to a state dict you trust.") from None
    except Exception as error:  # noqa: BLE001 - URLError, hash mismatch, ...
        raise ModelError(
            f"could not get ImageNet weights for {name} ({type(error).__name__}: {error}). Offline, save "
            f"them on a connected machine with `python -c \"import torch, torchvision; torch.save("
            f"torchvision.models.{spec(name).builder}(weights='IMAGENET1K_V1').state_dict(), '{name}_imagenet.pt')\"` "
            f"and set cnn weights_file (or $FINETUNE_WEIGHTS) to that file, or copy {weights.url.rsplit('/', 1)[-1]} "
            f"into the torch hub cache ({torch.hub.get_dir()}/checkpoints/).") from None


def build(name: str, n_classes: int, pretrained: bool = False, weights_file: str = "",
          weights_sha256: str = "", in_channels: int = 3) -> nn.Module:
    """A torchvision model with a fresh `n_classes` head, for `in_channels` (1 or 3) input channels;
    ImageNet weights for the body if asked."""
    entry = spec(name)
    if in_channels not in (1, 3):
        raise ModelError(f"images have {in_channels} channels; the models take 1 (grayscale) or 3 (RGB)")
    model = getattr(torchvision.models, entry.builder)(weights=None)
    if pretrained:
        state = {(_OLD_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in
                 _imagenet_state_dict(name, weights_file, weights_sha256).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"weights do not fit torchvision's {name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if in_channels != 3:
        _grayscale_stem(model, name, pretrained)
    model.set_submodule(entry.head, nn.Linear(head(model, name).in_features, n_classes))
    return model


def _grayscale_stem(model: nn.Module, name: str, pretrained: bool) -> None:
    """Make the first convolution take 1 channel. With ImageNet weights its kernel is the sum of the
    pretrained RGB kernels over the colour axis (the standard adaptation, as timm's `adapt_input_conv`
    does): a grey image x, seen as RGB (x, x, x), gives exactly the response it gave before, so the
    pretrained features carry over (a stem's bias is kept). From scratch it is initialised as
    torchvision initialises every convolution of these models (Kaiming normal, fan-out; a bias at 0)."""
    path = spec(name).first_conv
    old = model.get_submodule(path)
    if not isinstance(old, nn.Conv2d):
        raise ModelError(f"{name}'s first_conv {path!r} (pipeline/models/registry.py) is a {type(old).__name__}, "
                         "not an nn.Conv2d: name the convolution that sees the image")
    new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    with torch.no_grad():
        if pretrained:
            new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
    model.set_submodule(path, new)


def head(model: nn.Module, name: str) -> nn.Linear:
    """The classifier layer of a `name` model (its registry `head`)."""
    path = spec(name).head
    layer = model.get_submodule(path)
    if not isinstance(layer, nn.Linear):
        raise ModelError(f"{name}'s head {path!r} (pipeline/models/registry.py) is a {type(layer).__name__}, "
                         "not an nn.Linear: name the classifier's last linear layer")
    return layer


@torch.no_grad()
def feature_maps(model: nn.Module, name: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The activations of `name`'s registry `feature_maps` nodes for `image`, by label, in order
    (torchvision's feature extraction traces the model, so no forward pass is rewritten here)."""
    nodes = spec(name).feature_maps
    extractor = create_feature_extractor(model, return_nodes={node: label for label, node in nodes})
    maps = extractor(image)
    return {label: maps[label] for label, _ in nodes}

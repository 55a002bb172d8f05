"""Batched, seeded augmentation on the device: no per-image PIL work."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.params import AUGMENTATIONS

INTERPOLATIONS = ("nearest", "bilinear")


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]: the assignment's mean 0.5 / std 0.5 normalisation."""
    return images.float().div_(127.5).sub_(1.0)


def hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability p (by mask, one pass)."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def rotate(x: torch.Tensor, degrees: float, generator: torch.Generator,
           interpolation: str = "nearest") -> torch.Tensor:
    """Rotate each image by its own angle in [-degrees, degrees], as torchvision's RandomRotation
    (nearest by default, like it; `cnn.rotation_interpolation: bilinear` for smooth sampling)."""
    angles = (torch.rand(x.shape[0], device=x.device, generator=generator) * 2 - 1) * math.radians(degrees)
    return rotate_by(x, angles, interpolation)


def rotate_by(x: torch.Tensor, angles: torch.Tensor, interpolation: str = "nearest") -> torch.Tensor:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown rotation interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    sampled = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    # Pad with black (-1 after normalisation), as RandomRotation's default fill of 0 in pixel space:
    # `inside` is the weight of in-image pixels (exactly 0 or 1 for nearest, so its values stay
    # exactly the input's).
    inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode=interpolation, padding_mode="zeros",
                           align_corners=False)
    return sampled + (inside - 1)


def apply(x: torch.Tensor, names: list[str], degrees: float, generator: torch.Generator,
          interpolation: str = "nearest") -> torch.Tensor:
    for name in names:
        if name == "hflip":
            x = hflip(x, generator)
        elif name == "rotation":
            x = rotate(x, degrees, generator, interpolation)
        else:
            raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
    return x

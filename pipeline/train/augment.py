"""Batched, seeded augmentation on the device: no per-image PIL work."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.params import AUGMENTATIONS


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]: the assignment's mean 0.5 / std 0.5 normalisation."""
    return images.float().div_(127.5).sub_(1.0)


def hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability p (by mask, one pass)."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle in [-degrees, degrees] (affine grid + bilinear sampling)."""
    angles = (torch.rand(x.shape[0], device=x.device, generator=generator) * 2 - 1) * math.radians(degrees)
    return rotate_by(x, angles)


def rotate_by(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with black (-1 after normalisation), as RandomRotation's default fill of 0 in pixel space.
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def apply(x: torch.Tensor, names: list[str], degrees: float, generator: torch.Generator) -> torch.Tensor:
    for name in names:
        if name == "hflip":
            x = hflip(x, generator)
        elif name == "rotation":
            x = rotate(x, degrees, generator)
        else:
            raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
    return x

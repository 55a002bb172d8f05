"""Claims about the augmentations: each does what its name says and nothing when not asked for."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train import augment


def _images(n=6, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_no_augmentation_returns_the_batch_untouched_and_draws_nothing():
    x, g = _images(), torch.Generator().manual_seed(1)
    assert augment.apply(x, [], 15.0, g) is x
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())


def test_hflip_flips_exactly_the_images_its_draw_picks_with_probability_p():
    x = _images(n=4000, size=4)
    for p in (0.0, 0.25, 0.5, 1.0):
        out = augment.hflip(x, torch.Generator().manual_seed(2), p)
        mask = torch.rand(len(x), generator=torch.Generator().manual_seed(2)) < p
        assert torch.equal(out[mask], x[mask].flip(-1)) and torch.equal(out[~mask], x[~mask])
        assert abs(mask.float().mean().item() - p) < 0.03
    assert torch.equal(augment.apply(x[:8], ["hflip"], 15.0, torch.Generator().manual_seed(2)),
                       augment.hflip(x[:8], torch.Generator().manual_seed(2), 0.5))


def test_rotation_angle_is_drawn_uniformly_within_plus_minus_degrees():
    x = _images(n=5)
    out = augment.rotate(x, 30.0, torch.Generator().manual_seed(4))
    angles = (torch.rand(5, generator=torch.Generator().manual_seed(4)) * 2 - 1) * math.radians(30.0)
    assert torch.allclose(out, augment.rotate_by(x, angles), atol=1e-6)
    draws = (torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 30.0
    assert draws.min() >= -30 and draws.max() <= 30 and draws.min() < -29.9 and draws.max() > 29.9
    assert abs(draws.mean()) < 0.5
    assert torch.allclose(augment.rotate(x, 0.0, torch.Generator()), x, atol=1e-5)
    assert torch.equal(augment.apply(x, ["rotation"], 30.0, torch.Generator().manual_seed(4)), out)


def test_rotation_by_an_angle_turns_the_image_counter_clockwise_and_pads_with_black():
    x = torch.full((1, 3, 9, 9), -1.0)
    x[0, :, 4, 6:] = 1.0                       # a bright bar from the centre to the right edge
    quarter = augment.rotate_by(x, torch.tensor([math.pi / 2]))
    assert torch.allclose(quarter, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5) or \
        torch.allclose(quarter, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(augment.rotate_by(x, torch.tensor([math.pi])), x.flip(-1).flip(-2), atol=1e-5)
    white = torch.ones(1, 3, 16, 16)
    turned = augment.rotate_by(white, torch.tensor([math.pi / 4]))
    assert torch.allclose(turned[0, :, 0, 0], torch.tensor(-1.0), atol=1e-5)     # corner: padding, black
    assert torch.allclose(turned[0, :, 8, 8], torch.tensor(1.0), atol=1e-5)      # centre: kept
    assert turned.min() >= -1 - 1e-6 and turned.max() <= 1 + 1e-6


def test_each_image_gets_its_own_angle():
    x = _images(n=2).repeat(2, 1, 1, 1)[:2]
    x[1] = x[0]
    out = augment.rotate(x, 45.0, torch.Generator().manual_seed(5))
    assert not torch.allclose(out[0], out[1])


def test_augmentations_apply_in_the_order_named():
    x = _images()
    both = augment.apply(x, ["rotation", "hflip"], 20.0, torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    assert torch.equal(both, augment.hflip(augment.rotate(x, 20.0, g), g))
    with pytest.raises(ValueError, match="unknown augmentation 'jitter'; choose from hflip, rotation"):
        augment.apply(x, ["jitter"], 15.0, torch.Generator())


def test_to_input_maps_pixels_to_minus_one_one():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8)
    out = augment.to_input(u8)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))

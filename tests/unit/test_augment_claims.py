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


def _reference_rotation(x: torch.Tensor, angle: float, mode: str) -> torch.Tensor:
    """Rotation written out pixel by pixel (float64): each output pixel centre, in coordinates
    normalised to [-1, 1] over the pixel edges (align_corners=False), maps through the rotation
    [[cos, -sin], [sin, cos]] into the input; nearest takes the closest pixel, bilinear weighs the
    four around it; outside the image counts as black (-1)."""
    n, c, h, w = x.shape
    src = x.double()
    out = torch.full_like(src, -1.0)
    cos, sin = math.cos(angle), math.sin(angle)
    for i in range(h):
        for j in range(w):
            xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            xs, ys = cos * xn - sin * yn, sin * xn + cos * yn
            px, py = ((xs + 1) * w - 1) / 2, ((ys + 1) * h - 1) / 2
            if mode == "nearest":
                taps = [(round(py), round(px), 1.0)]
            else:
                x0, y0 = math.floor(px), math.floor(py)
                fx, fy = px - x0, py - y0
                taps = [(y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                        (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)]
            value = torch.zeros(n, c, dtype=torch.float64)
            inside = 0.0
            for yy, xx, weight in taps:
                if 0 <= yy < h and 0 <= xx < w:
                    value += weight * src[:, :, yy, xx]
                    inside += weight
            out[:, :, i, j] = value + inside - 1
    return out


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("degrees", [35.0, -65.0, 90.0])
def test_rotate_by_is_the_rotation_written_out_pixel_by_pixel(mode, degrees):
    x = _images(n=2, size=7, seed=3)
    x[:, :, 0, :] = 1.0                     # not symmetric under any reflection
    angle = math.radians(degrees)
    got = augment.rotate_by(x, torch.tensor([angle, angle]), mode)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), _reference_rotation(x, angle, mode), atol=2e-5)


def test_nearest_keeps_the_input_values_and_bilinear_blends_them():
    x = _images(n=1, size=8, seed=9)
    angle = torch.tensor([math.radians(25.0)])
    nearest, bilinear = augment.rotate_by(x, angle, "nearest"), augment.rotate_by(x, angle, "bilinear")
    allowed = torch.cat([x.reshape(-1), torch.tensor([-1.0])])
    assert torch.isin(nearest, allowed).all()
    assert not torch.isin(bilinear, allowed).all()
    assert torch.equal(augment.rotate_by(x, angle), nearest)        # nearest by default


def test_rotate_uses_the_interpolation_it_is_given():
    x = _images(n=3, size=8, seed=10)
    for mode in ("nearest", "bilinear"):
        out = augment.rotate(x, 40.0, torch.Generator().manual_seed(1), mode)
        angles = (torch.rand(3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * math.radians(40.0)
        assert torch.equal(out, augment.rotate_by(x, angles, mode))
        assert torch.equal(augment.apply(x, ["rotation"], 40.0, torch.Generator().manual_seed(1), mode), out)
    assert not torch.equal(augment.rotate(x, 40.0, torch.Generator().manual_seed(1), "bilinear"),
                           augment.rotate(x, 40.0, torch.Generator().manual_seed(1), "nearest"))
    with pytest.raises(ValueError, match="unknown rotation interpolation 'cubic'; choose from nearest, bilinear"):
        augment.rotate_by(x, torch.zeros(3), "cubic")


def test_rotation_keeps_the_batchs_float_dtype():
    x = _images(n=2, size=6).double()
    angles = torch.tensor([0.3, -0.7])              # float32 angles, float64 images
    out = augment.rotate_by(x, angles, "bilinear")
    assert out.dtype == torch.float64
    assert torch.allclose(out[:1], _reference_rotation(x[:1], float(angles[0]), "bilinear"), atol=1e-6)


def test_rotation_and_flip_emit_no_warnings():
    import warnings
    x = _images(n=2, size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("nearest", "bilinear"):
            augment.apply(x, ["rotation", "hflip"], 20.0, torch.Generator().manual_seed(0), mode)


def test_a_flip_probability_of_zero_never_flips_even_on_a_zero_draw(monkeypatch):
    x = _images(n=3, size=4)
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.tensor([0.0, 0.25, 0.7]))
    assert torch.equal(augment.hflip(x, torch.Generator(), 0.0), x)
    out = augment.hflip(x, torch.Generator(), 0.25)      # only the draw below p flips
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1:], x[1:])


def test_the_random_draws_are_made_on_the_batchs_device(monkeypatch):
    x = _images(n=2, size=4)
    devices, rand = [], torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: (devices.append(k.get("device")), rand(*a, **k))[1])
    augment.hflip(x, torch.Generator())
    augment.rotate(x, 10.0, torch.Generator())
    assert devices == [x.device, x.device]

"""Claims about the torchvision model factory: `build` gives the named architecture with an
`n_classes` head and the asked input channels; ImageNet weights come from a local file (checked
against its sha256, old DenseNet key names remapped) or from torchvision's download; a grayscale
stem is the sum of the RGB kernels (pretrained) or Kaiming normal (from scratch); the image-size
rules of `check_image_size`; `resize_batch`; `head`.

Model builds are few and shared (module-scoped fixtures); inputs are tiny."""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import StageError
from pipeline.models import cnn, registry


@pytest.fixture(autouse=True)
def _no_env_weights(monkeypatch):
    monkeypatch.delenv("FINETUNE_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def resnet_ref():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


@pytest.fixture(scope="module")
def resnet_file(resnet_ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet18_imagenet.pt"
    torch.save(resnet_ref.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A small state dict: enough for the file checks that come before any model sees it."""
    path = tmp_path_factory.mktemp("s") / "small.pt"
    torch.save({"conv1.weight": torch.arange(6.0).reshape(2, 3), "fc.weight": torch.ones(2)}, path)
    return path


@pytest.fixture(scope="module")
def resnet_scratch():
    torch.manual_seed(1)
    return cnn.build("resnet18", 7)


@pytest.fixture(scope="module")
def densenet_ref():
    torch.manual_seed(0)
    return torchvision.models.densenet121(weights=None)


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- architecture -----------------------------------------------------------------------------

def test_resnet18_from_scratch_is_torchvisions_resnet18_with_an_n_classes_head(resnet_scratch, resnet_ref):
    model = resnet_scratch
    assert type(model) is torchvision.models.ResNet
    expected = _shapes(resnet_ref)
    expected["fc.weight"], expected["fc.bias"] = (7, 512), (7,)
    assert _shapes(model) == expected
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert type(model.fc) is nn.Linear and (model.fc.in_features, model.fc.out_features) == (512, 7)
    assert cnn.head(model, "resnet18") is model.fc
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)


def test_from_scratch_the_body_is_freshly_initialised_not_loaded(resnet_scratch, resnet_ref):
    # different seeds: a body that came from some checkpoint would not differ like this
    assert not torch.equal(resnet_scratch.conv1.weight, resnet_ref.conv1.weight)


def test_grayscale_resnet_from_scratch_has_a_one_channel_kaiming_fan_out_stem():
    torch.manual_seed(2)
    model = cnn.build("resnet18", 4, in_channels=1)
    conv = model.conv1
    assert type(conv) is nn.Conv2d and conv.in_channels == 1 and conv.out_channels == 64
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((7, 7), (2, 2), (3, 3), None)
    w = conv.weight.detach()
    assert w.shape == (64, 1, 7, 7)
    # Kaiming normal, fan-out, ReLU gain: std = sqrt(2 / (64 * 7 * 7)); a normal has kurtosis 3
    std = math.sqrt(2 / (64 * 49))
    assert w.std().item() == pytest.approx(std, rel=0.06)
    assert abs(w.mean().item()) < 0.1 * std
    assert ((w / w.std()) ** 4).mean().item() == pytest.approx(3.0, abs=0.4)
    assert (model.fc.in_features, model.fc.out_features) == (512, 4)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 4)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_build_refuses_channel_counts_other_than_1_and_3(channels):
    with pytest.raises(cnn.ModelError, match=f"images have {channels} channels"):
        cnn.build("resnet18", 3, in_channels=channels)


def test_build_refuses_an_unknown_model_naming_the_choices():
    with pytest.raises(cnn.ModelError, match="unknown model 'vgg16'; choose one of: resnet18, densenet121"):
        cnn.build("vgg16", 3)
    assert issubclass(cnn.ModelError, StageError)


# --- ImageNet weights from a local file -------------------------------------------------------

def test_pretrained_resnet_loads_the_local_state_dict_and_checks_its_sha256(resnet_file, resnet_ref):
    digest = hashlib.sha256(resnet_file.read_bytes()).hexdigest()
    with pytest.raises(cnn.ModelError, match="refusing to load it"):
        cnn.build("resnet18", 5, pretrained=True, weights_file=str(resnet_file), weights_sha256="f" * 64)
    model = cnn.build("resnet18", 5, pretrained=True, weights_file=str(resnet_file), weights_sha256=digest)
    saved, state = resnet_ref.state_dict(), model.state_dict()
    body = [k for k in saved if not k.startswith("fc.")]
    assert body and all(torch.equal(state[k], saved[k]) for k in body)
    assert tuple(model.fc.weight.shape) == (5, 512) and cnn.head(model, "resnet18") is model.fc


def test_a_wrong_sha256_is_refused_with_both_digests(small_file):
    actual = hashlib.sha256(small_file.read_bytes()).hexdigest()
    with pytest.raises(cnn.ModelError) as caught:
        cnn._imagenet_state_dict("resnet18", str(small_file), "0" * 64)
    message = str(caught.value)
    assert f"has sha256 {actual}, expected {'0' * 64}" in message and "refusing to load it" in message
    assert str(small_file) in message
    # the right digest, or none, loads the same state dict
    for sha in (actual, ""):
        state = cnn._imagenet_state_dict("resnet18", str(small_file), sha)
        assert torch.equal(state["conv1.weight"], torch.arange(6.0).reshape(2, 3)) and set(state) == {"conv1.weight", "fc.weight"}


def test_finetune_weights_env_overrides_the_weights_file_param(small_file, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_WEIGHTS", str(small_file))
    state = cnn._imagenet_state_dict("resnet18", str(tmp_path / "absent.pt"), "")
    assert "fc.weight" in state
    monkeypatch.setenv("FINETUNE_WEIGHTS", str(tmp_path / "absent.pt"))
    with pytest.raises(cnn.ModelError, match="absent.pt .cnn weights_file / \\$FINETUNE_WEIGHTS. does not exist"):
        cnn._imagenet_state_dict("resnet18", str(small_file), "")


def test_a_home_relative_weights_file_is_expanded(small_file, monkeypatch):
    monkeypatch.setenv("HOME", str(small_file.parent))
    assert "conv1.weight" in cnn._imagenet_state_dict("resnet18", "~/" + small_file.name, "")


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(cnn.ModelError, match="does not hold a state dict"):
        cnn._imagenet_state_dict("resnet18", str(path), "")


class _Payload:
    """Anything but tensors and containers: loading it would run arbitrary unpickling."""


def test_weights_are_loaded_with_weights_only_no_arbitrary_pickles(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Payload()}, path)
    # explicitly: even where the environment turns torch's weights_only default off
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        cnn._imagenet_state_dict("resnet18", str(path), "")


def test_weights_saved_on_another_device_are_loaded_onto_the_cpu(tmp_path, monkeypatch):
    """A checkpoint whose tensors are tagged with a device this machine does not have (as one
    saved from a GPU is on a CPU-only machine) loads, onto the CPU."""
    tagging = {"on": True}
    entry = (1, lambda obj: "elsewhere" if tagging["on"] else None, lambda obj, location: None)
    monkeypatch.setattr(torch.serialization, "_package_registry", [entry, *torch.serialization._package_registry])
    path = tmp_path / "elsewhere.pt"
    torch.save({"fc.weight": torch.arange(4.0)}, path)
    tagging["on"] = False
    with pytest.raises(RuntimeError, match="elsewhere"):
        torch.load(path, weights_only=True)                 # what loading without map_location does
    state = cnn._imagenet_state_dict("resnet18", str(path), "")
    assert state["fc.weight"].device.type == "cpu" and torch.equal(state["fc.weight"], torch.arange(4.0))


def test_weights_that_do_not_fit_the_architecture_are_refused(resnet_ref, tmp_path):
    # one key too many is enough to refuse (the load is not strict, the check is)
    state = dict(resnet_ref.state_dict())
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(cnn.ModelError) as caught:
        cnn.build("resnet18", 3, pretrained=True, weights_file=str(path))
    assert "weights do not fit torchvision's resnet18: missing [], unexpected ['extra.weight']" in str(caught.value)


def test_pretrained_grayscale_stem_is_the_sum_of_the_rgb_kernels(resnet_file, resnet_ref):
    model = cnn.build("resnet18", 3, pretrained=True, weights_file=str(resnet_file), in_channels=1)
    rgb = resnet_ref.conv1.weight.detach()
    assert torch.equal(model.conv1.weight.detach(), rgb.sum(dim=1, keepdim=True))
    assert model.conv1.bias is None and model.conv1.stride == (2, 2) and model.conv1.padding == (3, 3)
    # a grey image gives exactly the response the RGB stem gave to (x, x, x)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.conv1(x), resnet_ref.conv1(x.expand(1, 3, 16, 16)), atol=1e-5)
    # the rest of the body is the checkpoint's
    assert torch.equal(model.layer4[1].conv2.weight, resnet_ref.layer4[1].conv2.weight)


def test_pretrained_densenet_with_old_key_names_loads_and_gets_a_grayscale_stem(densenet_ref, tmp_path):
    saved = densenet_ref.state_dict()
    # torchvision's own checkpoint (2017) names 'denselayer1.norm.1.weight' and has no num_batches_tracked
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in saved.items()
           if not ("denselayer" in k and k.endswith("num_batches_tracked"))}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    assert "features.denseblock1.denselayer1.conv.2.weight" in old and "features.norm0.weight" in old
    path = tmp_path / "densenet121_imagenet.pt"
    torch.save(old, path)
    model = cnn.build("densenet121", 5, pretrained=True, weights_file=str(path), in_channels=1)
    assert type(model) is torchvision.models.DenseNet
    state = model.state_dict()
    assert set(state) == set(saved)
    body = [k for k in saved if not k.startswith("classifier") and k != "features.conv0.weight"]
    assert all(torch.equal(state[k], saved[k]) for k in body)
    assert torch.equal(state["features.conv0.weight"], saved["features.conv0.weight"].sum(dim=1, keepdim=True))
    conv0 = model.features.conv0
    assert (conv0.in_channels, conv0.out_channels, conv0.kernel_size, conv0.stride, conv0.padding) == \
           (1, 64, (7, 7), (2, 2), (3, 3)) and conv0.bias is None
    assert cnn.head(model, "densenet121") is model.classifier and type(model.classifier) is nn.Linear
    assert (model.classifier.in_features, model.classifier.out_features) == (1024, 5)
    assert not hasattr(model, "fc")
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 5)


# --- ImageNet weights from torchvision's download ---------------------------------------------

def _fake_download(monkeypatch, result):
    calls = []
    weights_type = type(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)

    def fake(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(weights_type.__mro__[1], "get_state_dict", fake)   # WeightsEnum
    return calls


def test_pretrained_without_a_file_builds_from_torchvisions_download_with_its_hash_checked(monkeypatch, resnet_ref):
    state = resnet_ref.state_dict()
    calls = _fake_download(monkeypatch, state)
    model = cnn.build("resnet18", 6, pretrained=True)
    assert calls == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, (), {"progress": False, "check_hash": True,
                                                                               "weights_only": True})]
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert model.fc.out_features == 6


@pytest.mark.parametrize("name,file", [("resnet18", "resnet18-f37072fd.pth"),
                                       ("densenet121", "densenet121-a639ec97.pth")])
def test_a_failed_download_says_exactly_what_to_do_offline(monkeypatch, tmp_path, name, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = _fake_download(monkeypatch, urllib.error.URLError("no network"))
    with pytest.raises(cnn.ModelError) as caught:
        cnn._imagenet_state_dict(name, "", "")
    weights = getattr(torchvision.models, registry.MODELS[name].weights).IMAGENET1K_V1
    assert calls[0][0] is weights
    message = str(caught.value)
    assert message.startswith(f"could not get ImageNet weights for {name} (URLError: <urlopen error no network>). ")
    assert (f"torch.save(torchvision.models.{name}(weights='IMAGENET1K_V1').state_dict(), '{name}_imagenet.pt')"
            in message)
    assert "set cnn weights_file (or $FINETUNE_WEIGHTS) to that file" in message
    assert f"or copy {file} into the torch hub cache ({tmp_path}/hub/checkpoints/)." in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# --- image sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,minimum", [("resnet18", 16), ("densenet121", 32)])
def test_check_image_size_accepts_the_minimum_and_refuses_one_below_naming_both_ways_out(name, minimum):
    assert registry.MODELS[name].min_size == minimum
    assert cnn.check_image_size(name, minimum) == minimum
    assert cnn.check_image_size(name, minimum + 36) == minimum + 36
    with pytest.raises(cnn.ModelError) as caught:
        cnn.check_image_size(name, minimum - 1)
    assert str(caught.value) == (
        f"{name} needs images of at least {minimum} px, the data has {minimum - 1} px; use a larger "
        f"data.images.size, or let the device enlarge each batch with `-S cnn.defaults.upsample_to={minimum}`")


@pytest.mark.parametrize("name,minimum", [("resnet18", 16), ("densenet121", 32)])
def test_upsample_to_replaces_the_size_when_it_enlarges_to_at_least_the_minimum(name, minimum):
    assert cnn.check_image_size(name, 8, upsample_to=minimum) == minimum         # small images, enlarged
    assert cnn.check_image_size(name, minimum, upsample_to=minimum) == minimum   # same size: allowed
    assert cnn.check_image_size(name, 28, upsample_to=64) == 64
    assert cnn.check_image_size(name, 64, upsample_to=0) == 64                   # 0: off
    with pytest.raises(cnn.ModelError) as caught:
        cnn.check_image_size(name, 8, upsample_to=minimum - 1)
    assert str(caught.value) == f"{name} needs images of at least {minimum} px; cnn upsample_to {minimum - 1} is below that"
    with pytest.raises(cnn.ModelError) as caught:
        cnn.check_image_size(name, 64, upsample_to=48)
    assert str(caught.value) == ("cnn upsample_to 48 is smaller than the images (64 px); it only enlarges: "
                                 "set it to 0 or to at least the image size")


def test_check_image_size_refuses_an_unknown_model():
    with pytest.raises(cnn.ModelError, match="unknown model 'alexnet'"):
        cnn.check_image_size("alexnet", 64)


# --- resize_batch -----------------------------------------------------------------------------

def _bilinear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear, align_corners=False, no antialiasing: each output pixel's centre maps to
    (i + 0.5) * in / out - 0.5 in the input (clamped at 0), interpolated from its 2x2 neighbours."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    h_lo, h_hi, h_w = axis(img.shape[-2], out_h)
    w_lo, w_hi, w_w = axis(img.shape[-1], out_w)
    rows = img[..., h_lo, :] * (1 - h_w)[:, None] + img[..., h_hi, :] * h_w[:, None]
    return rows[..., w_lo] * (1 - w_w) + rows[..., w_hi] * w_w


def test_resize_batch_enlarges_bilinearly_without_corner_alignment():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) ** 1.5
    out = cnn.resize_batch(x, 10)
    assert out.shape == (2, 3, 10, 10) and out.dtype == torch.float32
    assert np.allclose(out.numpy(), _bilinear_reference(x.numpy(), 10, 10), rtol=1e-5, atol=1e-4)


def test_resize_batch_shrinks_without_antialiasing():
    x = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    out = cnn.resize_batch(x, 5)
    assert out.shape == (1, 2, 5, 5)
    assert np.allclose(out.numpy(), _bilinear_reference(x.numpy(), 5, 5), rtol=1e-5, atol=1e-5)


def test_resize_batch_at_the_same_size_returns_the_batch_itself_and_resizes_non_square_ones():
    x = torch.randn(1, 3, 8, 8)
    assert cnn.resize_batch(x, 8) is x
    wide = torch.randn(1, 1, 6, 8, generator=torch.Generator().manual_seed(1))
    tall = torch.randn(1, 1, 8, 6, generator=torch.Generator().manual_seed(2))
    for batch in (wide, tall):
        out = cnn.resize_batch(batch, 8)
        assert out.shape == (1, 1, 8, 8)
        assert np.allclose(out.numpy(), _bilinear_reference(batch.numpy(), 8, 8), rtol=1e-5, atol=1e-5)


class _RunsCode:
    """Unpickling this (weights_only=False) would create the marker file: arbitrary code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_in_the_torch_hub_cache_is_refused_and_nothing_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # even where the environment turns it off
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "executed"
    torch.save({"features.conv0.weight": _RunsCode(marker)}, cached)
    with pytest.raises(cnn.ModelError) as caught:
        cnn.build("densenet121", 9, pretrained=True)
    assert not marker.exists()
    message = str(caught.value)
    assert message.startswith(f"refusing the ImageNet weights for densenet121 in the torch hub cache ({cached})")
    assert "Delete it" in message and "$FINETUNE_WEIGHTS" in message

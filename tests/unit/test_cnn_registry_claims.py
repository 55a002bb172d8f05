"""Claims about the CNN registry (pipeline.models.registry) and the code it drives: each entry
names real parts of its torchvision model (a Linear head, a Conv2d stem, ImageNet weights,
feature-map nodes); a third model registered here, in the test only, is built, adapted to 1
channel, size-checked and feature-mapped by `pipeline.models.cnn` with no other change; the
registry module stays torch-free (pipeline.params reads it); wrong paths are refused by name."""

from __future__ import annotations

import ast
import inspect
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn

from pipeline.models import cnn, registry
from pipeline.models.registry import CnnSpec

# A third model, registered only in these tests: its head and stem sit deeper ("classifier.3",
# "features.0.0") than either real entry's, so a path that worked only one level deep would fail.
MOBILENET = CnnSpec(builder="mobilenet_v3_small", title="MobileNetV3-Small", head="classifier.3",
                    first_conv="features.0.0", min_size=32, weights="MobileNet_V3_Small_Weights",
                    feature_maps=(("stem", "features.0"), ("stage1", "features.1"), ("stage3", "features.3"),
                                  ("last", "features.12")))


@pytest.fixture
def third_model(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "mobilenet", MOBILENET)
    return "mobilenet"


# --- the real entries -------------------------------------------------------------------------

def test_the_registry_holds_the_assignments_two_models_a_and_b():
    assert list(registry.MODELS) == ["resnet18", "densenet121"]
    assert (registry.MODEL_A, registry.MODEL_B) == ("resnet18", "densenet121")
    assert registry.MODELS["resnet18"].title == "ResNet-18" and registry.MODELS["densenet121"].title == "DenseNet-121"


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_each_entry_names_real_parts_of_its_torchvision_model(name):
    entry = registry.MODELS[name]
    model = getattr(torchvision.models, entry.builder)(weights=None)
    head, stem = model.get_submodule(entry.head), model.get_submodule(entry.first_conv)
    assert type(head) is nn.Linear and head.out_features == 1000        # ImageNet's classifier
    assert type(stem) is nn.Conv2d and stem.in_channels == 3
    # the stem is the first convolution the image meets
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)) is stem
    weights = getattr(torchvision.models, entry.weights).IMAGENET1K_V1
    assert weights.meta["num_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_feature_maps_shrink_in_space_and_grow_in_channels_stage_by_stage(name):
    torch.manual_seed(0)
    model = cnn.build(name, 4).eval()
    maps = cnn.feature_maps(model, name, torch.randn(1, 3, 64, 64))
    assert list(maps) == [label for label, _ in registry.MODELS[name].feature_maps]
    sizes = [m.shape[-1] for m in maps.values()]
    channels = [m.shape[1] for m in maps.values()]
    assert sizes[0] == 16 and sizes[-1] == 2 and sizes == sorted(sizes, reverse=True)
    assert channels[0] == 64 and channels == sorted(channels)


@pytest.mark.parametrize("pretrained", [True, False])
def test_a_stem_with_a_bias_keeps_it_when_made_grayscale(monkeypatch, pretrained):
    # SqueezeNet's first convolution has a bias (neither real entry's does); only its stem is used here
    monkeypatch.setitem(registry.MODELS, "squeezenet", CnnSpec(
        builder="squeezenet1_1", title="SqueezeNet", head="classifier.1", first_conv="features.0", min_size=32,
        weights="SqueezeNet1_1_Weights", feature_maps=()))
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None)
    old = model.features[0]
    nn.init.normal_(old.bias)                                   # torchvision starts it at 0: make it count
    cnn._grayscale_stem(model, "squeezenet", pretrained)
    new = model.features[0]
    assert new.in_channels == 1 and new.bias is not None
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        if pretrained:   # a grey image gives the response its RGB copy gave, bias included
            torch.testing.assert_close(new(grey), old(grey.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(new.bias, torch.zeros_like(new.bias))


def test_resnet18_feature_maps_are_its_stem_and_each_residual_stage():
    torch.manual_seed(0)
    model = cnn.build("resnet18", 4).eval()
    x = torch.randn(1, 3, 32, 32)
    maps = cnn.feature_maps(model, "resnet18", x)
    with torch.no_grad():
        expected = {"stem": model.maxpool(model.relu(model.bn1(model.conv1(x))))}
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            expected[layer] = getattr(model, layer)(list(expected.values())[-1])
    assert list(maps) == list(expected)
    assert all(torch.equal(maps[k], expected[k]) for k in expected)


def test_densenet121_feature_maps_are_its_stem_and_each_dense_block_after_the_transitions():
    torch.manual_seed(0)
    model = cnn.build("densenet121", 4).eval()
    x = torch.randn(1, 3, 32, 32)
    maps = cnn.feature_maps(model, "densenet121", x)
    layers = dict(model.features.named_children())
    order = list(layers)
    with torch.no_grad():
        out, expected = x, {}
        for name in order[:order.index("denseblock4") + 1]:
            out = layers[name](out)
            if name == "pool0":
                expected["stem"] = out
            elif name.startswith("denseblock"):
                expected[f"block{name[-1]}"] = out
    assert list(maps) == ["stem", "block1", "block2", "block3", "block4"]
    assert all(torch.equal(maps[k], expected[k]) for k in expected)


def test_the_registry_module_imports_no_torch():
    # pipeline.params reads the names, and every stage imports pipeline.params
    tree = ast.parse(inspect.getsource(registry))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported = {name for name in imported if not name.startswith("mutmut.")}   # make mutate's trampoline
    assert imported == {"__future__", "dataclasses"}


# --- a third model is one entry ---------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_a_third_registered_model_builds_with_a_fresh_head_for_1_and_3_channels(third_model, channels):
    torch.manual_seed(0)
    model = cnn.build(third_model, 5, in_channels=channels)
    assert type(model) is torchvision.models.MobileNetV3
    assert cnn.head(model, third_model) is model.classifier[3]
    assert type(model.classifier[3]) is nn.Linear and (model.classifier[3].in_features,
                                                       model.classifier[3].out_features) == (1024, 5)
    stem = model.features[0][0]
    assert type(stem) is nn.Conv2d and (stem.in_channels, stem.out_channels) == (channels, 16)
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == ((3, 3), (2, 2), (1, 1), None)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, channels, 32, 32)).shape == (2, 5)
    maps = cnn.feature_maps(model, third_model, torch.zeros(1, channels, 32, 32))
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {
        "stem": (16, 16, 16), "stage1": (16, 8, 8), "stage3": (24, 4, 4), "last": (576, 1, 1)}


def test_a_third_registered_model_gets_the_summed_pretrained_stem(third_model, tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "mobilenet.pt"
    torch.save(reference.state_dict(), path)
    model = cnn.build(third_model, 3, pretrained=True, weights_file=str(path), in_channels=1)
    rgb = reference.features[0][0].weight
    assert torch.equal(model.features[0][0].weight, rgb.sum(dim=1, keepdim=True))
    assert torch.equal(model.features[12][0].weight, reference.features[12][0].weight)   # the body is the file's


def test_a_third_registered_model_has_its_own_minimum_size_and_name_in_the_choices(third_model):
    assert cnn.check_image_size(third_model, 32) == 32
    assert cnn.check_image_size(third_model, 28, upsample_to=32) == 32
    with pytest.raises(cnn.ModelError, match=r"^mobilenet needs images of at least 32 px, the data has 31 px"):
        cnn.check_image_size(third_model, 31)
    with pytest.raises(cnn.ModelError, match="choose one of: resnet18, densenet121, mobilenet$"):
        cnn.build("vgg16", 3)
    assert cnn.imagenet_weights(third_model) is torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    assert cnn.hub_file(third_model).name == "mobilenet_v3_small-047dcff4.pth"


# --- wrong entries ----------------------------------------------------------------------------

def test_an_entry_whose_head_is_not_a_linear_layer_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "mobilenet", replace(MOBILENET, head="classifier"))
    with pytest.raises(cnn.ModelError) as caught:
        cnn.build("mobilenet", 3)
    assert str(caught.value) == ("mobilenet's head 'classifier' (pipeline/models/registry.py) is a Sequential, not "
                                 "an nn.Linear: name the classifier's last linear layer")


def test_an_entry_whose_first_conv_is_not_a_convolution_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "mobilenet", replace(MOBILENET, first_conv="features.0"))
    with pytest.raises(cnn.ModelError) as caught:
        cnn.build("mobilenet", 3, in_channels=1)
    assert str(caught.value) == ("mobilenet's first_conv 'features.0' (pipeline/models/registry.py) is a "
                                 "Conv2dNormActivation, not an nn.Conv2d: name the convolution that sees the image")

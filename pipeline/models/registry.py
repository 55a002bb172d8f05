"""The CNNs this project trains: one entry per torchvision model, read by every place that lists
or handles models (the params schema, `pipeline.models.cnn`, the features stage, the GPU check).
A new model is one entry here (plus its experiment in params.yaml).

Torch-free on purpose: `pipeline.params` reads the names for its schema, and every stage imports
that. The torch work (building, the head, the stem, feature maps) is `pipeline.models.cnn`'s,
driven by the attribute paths below (`nn.Module.get_submodule` paths: "fc", "features.conv0").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CnnSpec:
    """How to build and adapt one torchvision classifier."""

    builder: str            # torchvision.models.<builder>(weights=None)
    title: str              # the name figures and the report print
    head: str               # the nn.Linear classifier, replaced by one with n_classes outputs
    first_conv: str         # the nn.Conv2d that sees the image, replaced for 1-channel images
    min_size: int           # the smallest input (px) the network runs on
    weights: str            # torchvision's ImageNet weights enum (its IMAGENET1K_V1 member is loaded)
    # label -> graph node (torchvision.models.feature_extraction names) whose output is one feature map,
    # in the order the features stage draws them: spatial size shrinks while channels grow.
    feature_maps: tuple[tuple[str, str], ...]


MODELS: dict[str, CnnSpec] = {
    "resnet18": CnnSpec(
        builder="resnet18", title="ResNet-18", head="fc", first_conv="conv1", min_size=16,
        weights="ResNet18_Weights",
        feature_maps=(("stem", "maxpool"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"),
                      ("layer4", "layer4"))),
    "densenet121": CnnSpec(
        # its pooling needs 32 px
        builder="densenet121", title="DenseNet-121", head="classifier", first_conv="features.conv0", min_size=32,
        weights="DenseNet121_Weights",
        feature_maps=(("stem", "features.pool0"), ("block1", "features.denseblock1"),
                      ("block2", "features.denseblock2"), ("block3", "features.denseblock3"),
                      ("block4", "features.denseblock4"))),
}

# The assignment's two models: the report compares A with B and every other experiment with B.
MODEL_A, MODEL_B = "resnet18", "densenet121"

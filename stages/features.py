"""Stage features: one channel of the feature map after each stage of the trained ResNet-18
(stem, layer1..layer4) for one test image: spatial size shrinks while channels grow."""

from pathlib import Path

import numpy as np
import torch

from pipeline import figures, params as P
from pipeline.data import pathmnist
from pipeline.models import cnn
from pipeline.paths import MODELS, pathmnist_npz
from pipeline.errors import StageError
from pipeline.runtime import run_stage
from pipeline.train.augment import to_input

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


@torch.no_grad()
def feature_maps(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations after the stem (conv, bn, relu, maxpool) and each residual stage."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(image))))
    maps = {"stem": x}
    for name in STAGES[1:]:
        x = getattr(model, name)(x)
        maps[name] = x
    return maps


def main(argv):
    params = P.load()
    data = pathmnist.load(pathmnist_npz(params.data.images.size))
    index, channel = params.features.image_index, params.features.channel
    if not 0 <= index < len(data.labels["test"]):
        raise StageError(f"features.image_index {index} is outside the {len(data.labels['test'])} test images")
    model = cnn.build("resnet18", data.n_classes)
    model.load_state_dict(torch.load(MODELS / "cnn" / "resnet18.pt", map_location="cpu", weights_only=True))
    model.eval()
    image = to_input(torch.from_numpy(data.images["test"][index:index + 1]).permute(0, 3, 1, 2))
    maps = feature_maps(model, image)
    if channel >= min(m.shape[1] for m in maps.values()):
        raise StageError(f"features.channel {channel} is beyond the stem's {maps['stem'].shape[1]} channels")
    panels = [("input", data.images["test"][index])]
    panels += [(f"{name}: {m.shape[2]}×{m.shape[3]}, {m.shape[1]} channels (#{channel})", m[0, channel].numpy())
               for name, m in maps.items()]
    source = "synthetic" if data.source == "synthetic" else "PathMNIST"
    figures.panels(panels, f"ResNet-18 feature maps, test image {index} ({source}, label "
                           f"{data.labels['test'][index]})", Path("figures/features/feature_maps.png"))
    print("figures/features/feature_maps.png: " + ", ".join(f"{n} {tuple(m.shape[1:])}" for n, m in maps.items()))


if __name__ == "__main__":
    run_stage(main)

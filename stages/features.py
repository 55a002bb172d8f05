"""Stage features: one channel of the feature map after each stage of the trained ResNet-18 (its
registry `feature_maps`: stem, layer1..layer4) for one test image: spatial size shrinks while
channels grow."""

from pathlib import Path

import numpy as np
import torch

from pipeline import figures, params as P
from pipeline.data import images
from pipeline.models import cnn
from pipeline.paths import MODELS, images_npz
from pipeline.errors import StageError
from pipeline.runtime import run_stage
from pipeline.train.augment import to_input

# The trained model whose maps are drawn (dvc.yaml's deps name its checkpoint and experiment params).
MODEL = "resnet18"


def main(argv):
    params = P.load()
    data = images.load(images_npz(params.data.images.name, params.data.images.size))
    index, channel = params.features.image_index, params.features.channel
    if not 0 <= index < len(data.labels["test"]):
        raise StageError(f"features.image_index {index} is outside the {len(data.labels['test'])} test images")
    model = cnn.build(MODEL, data.n_classes, in_channels=data.channels)
    model.load_state_dict(torch.load(MODELS / "cnn" / f"{MODEL}.pt", map_location="cpu", weights_only=True))
    model.eval()
    # The input as the experiment saw it: normalised, and enlarged when it asked for that.
    size = cnn.check_image_size(MODEL, data.size, params.cnn_experiment(MODEL).upsample_to)
    image = cnn.resize_batch(to_input(torch.from_numpy(data.images["test"][index:index + 1]).permute(0, 3, 1, 2)), size)
    maps = cnn.feature_maps(model, MODEL, image)
    fewest = min(maps, key=lambda label: maps[label].shape[1])
    if channel >= maps[fewest].shape[1]:
        raise StageError(f"features.channel {channel} is beyond the {fewest}'s {maps[fewest].shape[1]} channels; "
                         f"use 0 to {maps[fewest].shape[1] - 1}")
    shown = data.images["test"][index]
    panels = [("input", shown[..., 0] if data.channels == 1 else shown)]
    panels += [(f"{name}: {m.shape[2]}×{m.shape[3]}, {m.shape[1]} channels (#{channel})", m[0, channel].numpy())
               for name, m in maps.items()]
    label = data.labels["test"][index]
    label = f"labels {np.flatnonzero(label).tolist()}" if data.multi_label else f"label {int(label[0])}"
    source = f"{data.title} {data.size}px" + (", synthetic" if data.source == "synthetic" else "")
    figures.panels(panels, f"{cnn.spec(MODEL).title} feature maps, test image {index} ({source}, {label})",
                   Path("figures/features/feature_maps.png"))
    print("figures/features/feature_maps.png: " + ", ".join(f"{n} {tuple(m.shape[1:])}" for n, m in maps.items()))


if __name__ == "__main__":
    run_stage(main)

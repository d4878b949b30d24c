"""Fine-tuning a library's pretrained weights to another class count (issue 25, item 3).

No network here: torchvision's own download path is used with its cache already filled
(`$TORCH_HOME/hub/checkpoints/<file>`), as after a download elsewhere; the planted weights are
a real torchvision state dict of random values, so every loaded tensor can be checked."""

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from erde.config.schema import load_config
from erde.models import create_model
from erde.train.engine import fit

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ImageNet statistics
NAME = "mobilenet_v3_small"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """torchvision's weights for NAME, as if downloaded: (the 1000-class state dict, its file)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    weights = torchvision.models.get_model_weights(NAME).DEFAULT
    torch.manual_seed(123)
    state = torchvision.models.get_model_builder(NAME)().state_dict()
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    return state, path


def test_pretrained_true_with_another_class_count_resets_only_the_classifier(planted):
    state, _ = planted
    net = create_model(f"torchvision/{NAME}", num_classes=4, input_size=32, pretrained=True)
    mine = net.state_dict()
    classifier = {k for k in state if k.startswith("classifier.3.")}  # its last Linear
    assert classifier == {"classifier.3.weight", "classifier.3.bias"}
    copied = [k for k in state if k not in classifier]
    assert copied and all(k in net.source_keys for k in copied)
    for k in copied:
        torch.testing.assert_close(mine[net.source_keys[k]], state[k], rtol=0, atol=0)
    fresh = mine[net.source_keys["classifier.3.weight"]]
    assert fresh.shape == (4, state["classifier.3.weight"].shape[1])
    assert net.weights == f"torchvision/{NAME} MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert net.weights_normalization == IMAGENET


def write_rgb_folder(root, per_class=6):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{k}.png")
    return root


@pytest.mark.parametrize("own_stats", [False, True])
def test_a_fine_tuned_run_keeps_the_weights_normalisation_and_says_where_they_came_from(
    planted, tmp_path, own_stats
):
    root = write_rgb_folder(tmp_path / "photos")
    overrides = [
        "data.source=imagefolder",
        f"data.root={root}",
        "data.val_size=4",
        f"model.name=torchvision/{NAME}",
        "model.pretrained=true",
        "train.epochs=1",
        "train.warmup_epochs=0",
        "train.batch_size=4",
        "data.workers=0",
    ]
    if own_stats:
        overrides += ["data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]
    fit(load_config("digits-teacher", overrides), tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["weights"] == f"torchvision/{NAME} MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    mean, std = ((0.5,) * 3, (0.25,) * 3) if own_stats else IMAGENET  # data.mean/std still win
    assert info["data"]["mean"] == pytest.approx(mean) and info["data"]["std"] == pytest.approx(std)


def test_timm_weights_from_a_local_file_keep_their_data_config(tmp_path):
    """timm's own route for weights on disk (`pretrained_cfg_overlay=dict(file=...)`)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    state = timm.create_model("resnet10t").state_dict()  # 1000 classes
    path = tmp_path / "resnet10t.pth"
    torch.save(state, path)
    net = create_model(
        "timm/resnet10t",
        num_classes=4,
        input_size=32,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
    )
    mine = net.state_dict()
    torch.testing.assert_close(mine[net.source_keys["conv1.0.weight"]], state["conv1.0.weight"])
    assert mine[net.source_keys["fc.weight"]].shape == (4, state["fc.weight"].shape[1])
    cfg = timm.get_pretrained_cfg("resnet10t")  # timm's record of the default weights
    assert net.weights_normalization == (tuple(cfg.mean), tuple(cfg.std))
    assert net.weights.startswith("timm/resnet10t")

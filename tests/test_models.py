"""models.py: architectures, backbone/head split, ImageNet weights (offline), Lite0's real weights."""

from __future__ import annotations

import os
import re

import matplotlib
import numpy as np
import pytest
import sklearn.datasets
import torch
import torchvision
from PIL import Image

from transfer_study import models
from transfer_study.config import ConfigError, UserError

CATEGORIES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
SMALL_SIZE = {"resnet18": 64, "vgg19": 64, "inception_v3": 75, "efficientnet_lite0": 64, "small_cnn": 28}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME, so nothing from the real cache is found; downloads fail loudly."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(url, dst, *args, **kwargs):
        raise OSError(f"network disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return home


def save_fake_imagenet_resnet18(folder) -> dict[str, torch.Tensor]:
    """A freshly initialised torchvision resnet18's state_dict, saved under torchvision's file name."""
    folder.mkdir(parents=True, exist_ok=True)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, folder / "resnet18-f37072fd.pth")
    return state


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "vgg19", "inception_v3", "efficientnet_lite0", "small_cnn"])
def test_each_architecture_gives_six_logits(arch):
    model = models.build_model(arch, 6, pretrained=False).eval()
    size = SMALL_SIZE[arch]
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
        features = model.forward_features(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 6)
    assert features.shape == (2, models.FEATURE_DIMS[arch])
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 6


def test_forward_equals_features_then_head():
    model = models.build_model("resnet18", 6, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_head(model.forward_features(x)), atol=1e-6)


def test_inception_aux_logits_in_training_mode():
    model = models.build_model("inception_v3", 6, pretrained=False, aux_logits=True).train()
    logits, aux = model(torch.randn(2, 3, 299, 299))
    assert logits.shape == (2, 6) and aux.shape == (2, 6)
    assert model.aux_head.fc.out_features == 6


def test_inception_without_aux_gives_plain_logits_and_no_aux_weights():
    model = models.build_model("inception_v3", 6, pretrained=False, aux_logits=False).train()
    out = model(torch.randn(2, 3, 75, 75))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6)
    assert model.aux_head is None
    assert not any("AuxLogits" in k for k in model.state_dict())


@pytest.mark.parametrize("size", [32, 74])
def test_inception_below_75_px_is_a_config_error(size):
    message = (f"Inception V3 needs images of at least 75 px, got {size}; raise train.image_size.inception_v3 "
               "(299 is its native size)")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        models.check_input_size("inception_v3", size)
    model = models.build_model("inception_v3", 6, pretrained=False, aux_logits=False).eval()
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        model(torch.randn(1, 3, size, size))


def test_inception_aux_in_training_needs_299_px():
    models.check_input_size("inception_v3", 75)  # fine without aux
    models.check_input_size("resnet18", 32)  # other archs have no minimum here
    with pytest.raises(ConfigError, match="auxiliary classifier needs images of at least 299"):
        models.check_input_size("inception_v3", 224, aux_logits=True)


def test_freeze_backbone_trains_only_the_head_and_keeps_batchnorm_statistics():
    model = models.freeze_backbone(models.build_model("resnet18", 6, pretrained=False))
    assert models.backbone_is_frozen(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    models.train_mode(model, "frozen")
    assert model.training and model.head.training and not model.backbone.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(model.backbone.bn1.running_mean, before)
    models.train_mode(model, "finetune")
    assert model.backbone.training


def test_frozen_inception_has_no_aux_head():
    model = models.freeze_backbone(models.build_model("inception_v3", 6, pretrained=False, aux_logits=True))
    assert model.aux_head is None
    models.train_mode(model, "frozen")
    out = model(torch.randn(2, 3, 75, 75))  # 75 px is fine: no aux classifier
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6)


def test_restore_model_round_trips_inception_with_aux():
    model = models.build_model("inception_v3", 6, pretrained=False, aux_logits=True)
    restored = models.restore_model("inception_v3", 6, model.state_dict())
    assert restored.aux_head is not None and not restored.training
    assert torch.equal(restored.head.weight, model.head.weight)


@pytest.mark.parametrize("size", [16, 28, 45, 96])
def test_small_cnn_takes_any_size_from_16_px_and_has_about_0_1_m_parameters(size):
    model = models.build_model("small_cnn", 6, pretrained=False).eval()
    assert 80_000 < sum(p.numel() for p in model.parameters()) < 120_000
    models.check_input_size("small_cnn", size)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, size, size)).shape == (2, models.FEATURE_DIMS["small_cnn"])


def test_small_cnn_below_16_px_is_a_config_error():
    with pytest.raises(ConfigError, match="train.image_size.small_cnn"):
        models.check_input_size("small_cnn", 15)


def test_small_cnn_has_no_weights_and_never_fetches_any(torch_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    for attempt in (lambda: models.build_for_condition("small_cnn", 6, "frozen"),
                    lambda: models.resolve_weights("small_cnn", None),
                    lambda: models.fetch_weights(["small_cnn"], None)):
        with pytest.raises(UserError, match="small_cnn has no pretrained weights.*small_cnn-frozen"):
            attempt()


def test_restore_model_round_trips_small_cnn_with_batchnorm_statistics():
    model = models.build_model("small_cnn", 6, pretrained=False)
    model.train()(torch.randn(4, 3, 28, 28))  # moves the running statistics off their initial values
    restored = models.restore_model("small_cnn", 6, model.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(restored(x), model.eval()(x))


# --------------------------------------------------------------------------------------------
# Weights resolution (offline: TORCH_HOME is pre-filled, downloads are disabled)
# --------------------------------------------------------------------------------------------


def test_weights_file_names_are_torchvision_s():
    assert models.weights_file("resnet18") == "resnet18-f37072fd.pth"
    assert models.weights_file("vgg19") == "vgg19-dcbb9e9d.pth"
    assert models.weights_file("inception_v3") == "inception_v3_google-0cc3c7bd.pth"
    assert models.weights_file("efficientnet_lite0") == "efficientnet-lite0-57934424.pth"


def test_pretrained_resnet18_loads_the_cached_weights(torch_home):
    saved = save_fake_imagenet_resnet18(torch_home / "hub" / "checkpoints")
    pretrained = models.build_model("resnet18", 6, pretrained=True)
    backbone = pretrained.backbone.state_dict()
    for key, value in saved.items():
        if not key.startswith("fc."):
            assert torch.equal(backbone[key], value), key
    assert pretrained.head.out_features == 6
    scratch = models.build_model("resnet18", 6, pretrained=False)
    assert not torch.equal(scratch.backbone.conv1.weight, saved["conv1.weight"])


def test_weights_dir_is_searched_before_the_cache(torch_home, tmp_path):
    save_fake_imagenet_resnet18(torch_home / "hub" / "checkpoints")
    mine = save_fake_imagenet_resnet18(tmp_path / "mine")
    path = models.resolve_weights("resnet18", tmp_path / "mine")
    assert path == tmp_path / "mine" / "resnet18-f37072fd.pth"
    model = models.build_model("resnet18", 6, pretrained=True, weights_dir=tmp_path / "mine")
    assert torch.equal(model.backbone.conv1.weight, mine["conv1.weight"])


def test_missing_weights_fail_before_building_anything(torch_home, tmp_path, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before its weights were found")

    monkeypatch.setattr(torchvision.models, "get_model", must_not_build)
    with pytest.raises(models.WeightsMissing) as err:
        models.build_model("vgg19", 6, pretrained=True, weights_dir=tmp_path / "nowhere")
    message = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in message
    assert str(tmp_path / "nowhere") in message and str(torch_home / "hub" / "checkpoints") in message
    assert "transfer-study weights fetch" in message
    assert isinstance(err.value, UserError)


def test_missing_weights_without_download(torch_home):
    with pytest.raises(models.WeightsMissing, match="inception_v3_google-0cc3c7bd.pth"):
        models.resolve_weights("inception_v3", None, download=False)


def test_download_goes_into_the_torch_hub_cache(torch_home, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    paths = models.fetch_weights(["resnet18"], None)
    assert paths == [torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"] and paths[0].is_file()
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]


def test_corrupt_weights_file_is_a_user_error_naming_it(torch_home):
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="resnet18-f37072fd.pth"):
        models.build_model("resnet18", 6, pretrained=True)


def test_weights_of_another_architecture_are_refused(torch_home):
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(1)}, cache / "resnet18-f37072fd.pth")
    with pytest.raises(UserError, match="does not hold resnet18's ImageNet weights"):
        models.build_model("resnet18", 6, pretrained=True)


def test_build_for_condition(torch_home):
    save_fake_imagenet_resnet18(torch_home / "hub" / "checkpoints")
    frozen = models.build_for_condition("resnet18", 6, "frozen")
    assert models.backbone_is_frozen(frozen)
    finetune = models.build_for_condition("resnet18", 6, "finetune")
    assert not models.backbone_is_frozen(finetune)
    assert torch.equal(frozen.backbone.conv1.weight, finetune.backbone.conv1.weight)  # same ImageNet weights
    with pytest.raises(ConfigError, match="unknown condition"):
        models.build_for_condition("resnet18", 6, "partly")


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0's real ImageNet weights
# --------------------------------------------------------------------------------------------


def test_garment_class_indices_match_imagenet_names():
    for index, name in models.IMAGENET_GARMENT_CLASSES.items():
        assert CATEGORIES[index] == name
    assert len(models.IMAGENET_GARMENT_CLASSES) >= 25


def test_lite0_pretrained_backbone_holds_the_packaged_weights():
    state = models.load_state_dict(models.resolve_weights("efficientnet_lite0", None), "efficientnet_lite0")
    model = models.build_model("efficientnet_lite0", 6, pretrained=True)
    assert torch.equal(model.backbone._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])
    assert torch.equal(model.backbone._bn1.running_var, state["_bn1.running_var"])


def sample_photos() -> dict[str, torch.Tensor]:
    """sklearn's china.jpg and flower.jpg and matplotlib's grace_hopper.jpg, resized to 256, centre 224, normalised."""
    paths = list(sklearn.datasets.load_sample_images().filenames)
    paths.append(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    photos = {}
    mean = torch.tensor(models.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(3, 1, 1)
    for path in paths:
        img = Image.open(path).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        left, top = (img.width - 224) // 2, (img.height - 224) // 2
        img = img.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        photos[os.path.basename(path)] = (x - mean) / std
    return photos


def test_lite0_classifies_real_photos():
    photos = sample_photos()
    net = models.imagenet_lite0()
    with torch.no_grad():
        probs = net(torch.stack(list(photos.values()))).softmax(1)
    top5 = {
        name: [CATEGORIES[i] for i in p.topk(5).indices.tolist()] for name, p in zip(photos, probs)
    }
    print("\nLite0 top-5:", top5)
    assert top5["china.jpg"][0] == "palace"
    assert {"bell cote", "monastery", "castle", "church"} & set(top5["china.jpg"][1:])
    assert top5["flower.jpg"][0] == "daisy"  # a dahlia: ImageNet's nearest flower class
    assert "military uniform" in top5["grace_hopper.jpg"][:3]
    assert set(top5["grace_hopper.jpg"][:3]) <= {"military uniform", "academic gown", "mortarboard", "suit"}
    assert probs[0].max() > 0.25 and probs[1].max() > 0.25

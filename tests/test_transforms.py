"""One definition of the model's input: training (crops → store → batch) and serving (upload →
crop → batch) give the model the same tensor for the same image file."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from transfer_study import imagestore, serve, transforms
from transfer_study.config import PreprocessParams
from transfer_study.data import open_rgb
from transfer_study.preprocess import make_cropper, preprocess_dataset


def _photo(path) -> None:
    """A garment-like shape, off-centre on a plain background, not square: the crop matters."""
    rng = np.random.default_rng(0)
    img = Image.new("RGB", (90, 60), (20, 20, 24))
    ImageDraw.Draw(img).rectangle((50, 10, 80, 50), fill=(200, 120, 40))
    noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (60, 90, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path)


def test_training_and_serving_give_the_model_the_same_input(tmp_path):
    raw = tmp_path / "raw" / "jacket"
    raw.mkdir(parents=True)
    _photo(raw / "a.png")
    params = PreprocessParams(cropper="foreground", size=64)
    preprocess_dataset(tmp_path / "raw", tmp_path / "cropped", params)

    size = 40
    crop = tmp_path / "cropped" / "jacket" / "a.png"
    store = imagestore.build_store([crop], ["x"], size, tmp_path / "stores")
    batch, _ = imagestore.DeviceImages(store, np.array([0]), torch.device("cpu")).batch(torch.tensor([0]))
    trained = transforms.model_input(batch, torch.device("cpu"))

    classifier = serve.ImageClassifier()
    classifier.preprocess, classifier.cropper, classifier.image_size = params, make_cropper(params), size
    served = classifier.model_input([open_rgb(raw / "a.png")])

    assert served.shape == trained.shape == (1, 3, size, size)
    assert torch.equal(served, trained)
    # The crop changed the picture: a whole-image resize would give another tensor.
    uncropped = transforms.model_input(transforms.uint8_batch([open_rgb(raw / "a.png")], size), torch.device("cpu"))
    assert not torch.equal(uncropped, trained)


def test_normalize_uses_imagenet_statistics():
    grey = torch.full((1, 3, 2, 2), 0.5)
    out = transforms.normalize(grey)
    expected = (0.5 - torch.tensor(transforms.IMAGENET_MEAN)) / torch.tensor(transforms.IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], expected)


def test_device_augment_warp_matches_kornia():
    """affine_warp is kornia's warp_affine for the same rotation (degrees) and shift (pixels)."""
    import kornia

    images = torch.rand(3, 3, 33, 33, generator=torch.Generator().manual_seed(0))
    angle = torch.tensor([0.3, -0.5, 0.0])
    shift = torch.tensor([[0.1, -0.2], [0.0, 0.3], [0.05, 0.05]])
    ours = transforms.affine_warp(images, angle, shift, torch.ones(3))
    matrix = kornia.geometry.transform.get_affine_matrix2d(
        translations=shift * 33 / 2, center=torch.full((3, 2), 16.0), scale=torch.ones(3, 2),
        angle=torch.rad2deg(angle))
    theirs = kornia.geometry.transform.warp_affine(images, matrix[:, :2], (33, 33), mode="bilinear",
                                                   padding_mode="border", align_corners=False)
    assert torch.allclose(ours, theirs, atol=1e-4)
    flipped = transforms.affine_warp(images, torch.zeros(3), torch.zeros(3, 2), -torch.ones(3))
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)


def test_device_augment_draws_per_sample_within_the_params():
    from transfer_study.config import AugmentParams

    torch.manual_seed(0)
    images = torch.rand(1, 3, 16, 16).expand(64, 3, 16, 16).contiguous()
    out = transforms.DeviceAugment(AugmentParams(rotation=15.0, translate=0.1, hflip=True))(images)
    differences = (out - out[:1]).flatten(1).abs().amax(1)
    assert (differences[1:] > 1e-3).all(), "every image should get its own draw"
    assert torch.equal(transforms.DeviceAugment(AugmentParams(0.0, 0.0, False))(images), images)
    flipped = transforms.DeviceAugment(AugmentParams(0.0, 0.0, True))(images)
    mirrored = [torch.equal(o, images[0].flip(-1)) for o in flipped]
    assert all(m or torch.equal(o, images[0]) for m, o in zip(mirrored, flipped)) and 10 < sum(mirrored) < 54


def test_a_known_photo_gives_known_model_input_values():
    """Fixed numbers, not training against serving (a bug both share, e.g. a lost /255, passes that test):
    a 31×41 px garment of one colour on a plain background of another, through serving's whole input
    path (crop, letterbox, resize to 40 px, /255, ImageNet mean and std)."""
    img = Image.new("RGB", (90, 60), (20, 20, 24))
    ImageDraw.Draw(img).rectangle((50, 10, 80, 50), fill=(200, 120, 40))
    params = PreprocessParams(cropper="foreground", size=64)
    classifier = serve.ImageClassifier()
    classifier.preprocess, classifier.cropper, classifier.image_size = params, make_cropper(params), 40
    batch = classifier.model_input([img])
    assert batch.shape == (1, 3, 40, 40) and batch.dtype == torch.float32
    # (value / 255 - mean) / std by hand, mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)
    background, garment = torch.tensor([-1.77541, -1.68557, -1.38614]), torch.tensor([1.30705, 0.06513, -1.10728])
    torch.testing.assert_close(batch[0, :, 0, 0], background, atol=1e-4, rtol=0)  # letterbox padding
    torch.testing.assert_close(batch[0, :, 20, 20], garment, atol=1e-4, rtol=0)
    # The crop: the garment box plus an 8% margin (about 36 × 47.6 px), letterboxed into a square of
    # 47.6 px, so the garment spans 31 / 47.6 of the 40 columns, centred: about 26 (resizing blends its edges).
    row = batch[0, 0, 20]
    garment_columns = torch.nonzero(row > (garment[0] + background[0]) / 2).flatten()
    assert 25 <= len(garment_columns) <= 27 and abs(garment_columns.float().mean().item() - 19.5) <= 1

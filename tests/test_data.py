"""Tests for data.py: fetching Fashion-MNIST, validating a raw folder, and open_rgb."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import struct
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from transfer_study import data
from transfer_study.config import ConfigError, DataParams, UserError, ValidateParams
from transfer_study.data import (
    DEBIAN_DIR,
    fetch_dataset,
    list_images,
    load_fmnist,
    open_rgb,
    validate_dataset,
    write_validation_report,
)

requires_debian = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)",
)
SMALL = DataParams(per_class=5)


def tree(root: Path) -> dict[str, bytes]:
    """Relative POSIX path -> bytes of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# fetch_dataset
# --------------------------------------------------------------------------------------------


@requires_debian
def test_fetch_is_byte_identical_across_runs(tmp_path):
    first = fetch_dataset(tmp_path / "a", SMALL)
    fetch_dataset(tmp_path / "b", SMALL)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert len(tree(tmp_path / "a")) == 6 * 5
    assert first["source"] == str(DEBIAN_DIR)
    assert first["classes"] == dict.fromkeys(SMALL.classes, 5)


@requires_debian
def test_fetch_honours_classes_and_per_class_and_writes_the_right_pixels(tmp_path):
    params = DataParams(classes=("shirt", "trouser"), per_class=4, seed=3)
    fetch_dataset(tmp_path, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shirt", "trouser"]
    images, labels = load_fmnist(DEBIAN_DIR)
    for name, label in (("shirt", 6), ("trouser", 1)):
        files = sorted((tmp_path / name).iterdir())
        assert len(files) == 4
        for file in files:
            index = int(file.stem.split("-")[1])
            assert labels[index] == label
            with Image.open(file) as image:
                assert image.mode == "L" and image.size == (28, 28)
                assert np.array_equal(np.asarray(image), images[index])
                assert set(image.info) <= {"dpi"}  # no text chunks or other metadata


@requires_debian
def test_fetch_rerun_is_a_no_op(tmp_path):
    fetch_dataset(tmp_path, SMALL)
    before = tree(tmp_path)
    summary = fetch_dataset(tmp_path, SMALL)
    assert summary["written"] == 0
    assert tree(tmp_path) == before


@requires_debian
def test_a_different_seed_chooses_different_images(tmp_path):
    fetch_dataset(tmp_path / "s0", SMALL)
    fetch_dataset(tmp_path / "s1", DataParams(per_class=5, seed=1))
    assert set(tree(tmp_path / "s0")) != set(tree(tmp_path / "s1"))


def test_non_garment_class_is_rejected(tmp_path):
    with pytest.raises(ConfigError) as error:
        fetch_dataset(tmp_path, DataParams(classes=("coat", "sandal")))
    assert str(error.value) == ("data.classes: sandal not in Fashion-MNIST's garments; choose from t-shirt_top, "
                                "trouser, pullover, dress, coat, shirt")
    assert not tmp_path.joinpath("coat").exists()


@requires_debian
def test_user_files_in_dest_stop_the_fetch_and_survive(tmp_path):
    user_file = tmp_path / "coat" / "my-photo.jpg"
    user_file.parent.mkdir()
    user_file.write_bytes(b"precious")
    with pytest.raises(UserError, match="my-photo.jpg"):
        fetch_dataset(tmp_path, SMALL)
    assert user_file.read_bytes() == b"precious"
    assert tree(tmp_path) == {"coat/my-photo.jpg": b"precious"}  # nothing written either


@requires_debian
def test_an_edited_fetched_file_counts_as_user_data(tmp_path):
    fetch_dataset(tmp_path, SMALL)
    edited = sorted((tmp_path / "coat").iterdir())[0]
    edited.write_bytes(b"edited by hand")
    with pytest.raises(UserError, match=edited.name):
        fetch_dataset(tmp_path, SMALL)
    assert edited.read_bytes() == b"edited by hand"


def test_source_missing_a_file_names_it(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(UserError, match="train-labels-idx1-ubyte"):
        fetch_dataset(tmp_path / "out", SMALL, source=tmp_path)


@requires_debian
def test_corrupted_source_is_refused_naming_the_file(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(DEBIAN_DIR / "train-labels-idx1-ubyte.gz", source)
    (source / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0" * 100)
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*sha256"):
        fetch_dataset(tmp_path / "out", SMALL, source=source)
    assert not (tmp_path / "out").exists()


@requires_debian
def test_source_folder_with_plain_and_gzipped_files_is_used(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(DEBIAN_DIR / "train-labels-idx1-ubyte.gz", source)
    with gzip.open(DEBIAN_DIR / "train-images-idx3-ubyte.gz") as packed:
        (source / "train-images-idx3-ubyte").write_bytes(packed.read())
    summary = fetch_dataset(tmp_path / "out", SMALL, source=source)
    fetch_dataset(tmp_path / "ref", SMALL)
    assert summary["source"] == str(source)
    assert tree(tmp_path / "out") == tree(tmp_path / "ref")


def test_failed_download_tells_how_to_install(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as caught:
        fetch_dataset(tmp_path / "out", SMALL, cache_dir=tmp_path / "cache")
    assert "apt-get install dataset-fashion-mnist" in str(caught.value)
    assert "--source" in str(caught.value)


@requires_debian
def test_download_goes_to_the_cache_and_is_verified(tmp_path, monkeypatch):
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO((DEBIAN_DIR / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    summary = fetch_dataset(tmp_path / "out", SMALL, cache_dir=tmp_path / "cache")
    assert summary["source"] == str(tmp_path / "cache")
    assert sorted(u.rsplit("/", 1)[1] for u in requested) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert len(tree(tmp_path / "out")) == 30


# --------------------------------------------------------------------------------------------
# Helpers for making datasets
# --------------------------------------------------------------------------------------------


def random_rgb(seed: int, size=(32, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


@pytest.fixture
def raw(tmp_path) -> Path:
    """A clean dataset: classes a, b, c with 4 distinct 32x32 RGB PNGs each."""
    root = tmp_path / "raw"
    for c, label in enumerate("abc"):
        for i in range(4):
            save(random_rgb(10 * c + i), root / label / f"{i}.png")
    return root


def only(report, kind: str):
    found = [p for p in report.problems if p.kind == kind]
    assert len(found) == 1, report.problems
    return found[0]


def exif_jpeg(path: Path, size=(40, 20), orientation=6) -> Path:
    image = random_rgb(99, size)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return save(image, path, exif=exif.tobytes())


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# validate_dataset
# --------------------------------------------------------------------------------------------


def test_clean_dataset_has_no_problems(raw):
    report = validate_dataset(raw, ValidateParams())
    assert report.problems == []
    assert not report.fails(strict=True)
    assert report.summary["classes"] == {"a": 4, "b": 4, "c": 4}
    assert report.summary["total_images"] == 12
    assert report.summary["width"] == {"min": 32, "median": 32.0, "max": 32}


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.jpg", b"this is a text file, not a JPEG"),
        ("truncated.png", png_bytes(random_rgb(5))[:200]),
    ],
)
def test_unreadable_files_are_excluded_with_a_warning(raw, name, content):
    bad = raw / "a" / name
    bad.write_bytes(content)
    report = validate_dataset(raw, ValidateParams())
    problem = only(report, "unreadable")
    assert problem.severity == "warning"
    assert problem.path == str(bad)
    assert "PNG/JPEG/WebP" in problem.fix
    assert str(bad) in report.excluded
    assert report.summary["classes"]["a"] == 4 and report.summary["excluded_images"] == 1
    assert not report.fails()
    assert report.fails(strict=True)


def test_an_empty_file_is_called_empty_not_corrupt(raw):
    (raw / "a" / "copied.jpg").write_bytes(b"")
    problem = only(validate_dataset(raw, ValidateParams()), "unreadable")
    assert f"'{raw / 'a' / 'copied.jpg'}' is an empty file (0 bytes)" in problem.message
    assert "corrupt" not in problem.message


def test_strict_turns_warnings_into_errors(raw):
    (raw / "a" / "notes.jpg").write_bytes(b"text")
    for report in (validate_dataset(raw, ValidateParams(strict=True)), validate_dataset(raw, ValidateParams(), strict=True)):
        assert only(report, "unreadable").severity == "error"
        assert report.fails()
        assert report.summary["passed"] is False


def test_unsupported_suffix_is_reported(raw):
    bad = raw / "b" / "readme.txt"
    bad.write_text("hello")
    save(random_rgb(1), raw / "b" / "photo.bmp")
    report = validate_dataset(raw, ValidateParams())
    problems = [p for p in report.problems if p.kind == "unsupported_file"]
    assert sorted(p.path for p in problems) == sorted([str(bad), str(raw / "b" / "photo.bmp")])
    assert all(p.severity == "warning" for p in problems)


def make_mode_image(mode: str) -> tuple[Image.Image, str]:
    """A 20x20 image in `mode` and the suffix to save it with."""
    if mode == "P+transparency":
        image = Image.new("P", (20, 20), 0)
        image.putpalette([255, 0, 0] * 256)
        image.info["transparency"] = 0
        return image, ".png"
    if mode == "CMYK":
        return Image.new("CMYK", (20, 20), (0, 255, 255, 0)), ".jpg"
    if mode == "I;16":
        return Image.new("I;16", (20, 20), 40000), ".png"
    return random_rgb(7, (20, 20)).convert(mode), ".png"


# mode -> the conversions open_rgb applies, as problem kinds, in order
CONVERSIONS = {
    "L": ["converted_grayscale"], "LA": ["converted_grayscale", "converted_transparency"],
    "RGBA": ["converted_transparency"], "P": ["converted_palette"],
    "P+transparency": ["converted_palette", "converted_transparency"], "CMYK": ["converted_cmyk"],
    "I;16": ["converted_16bit"], "1": ["converted_grayscale"],
}


@pytest.mark.parametrize("mode", CONVERSIONS)
def test_each_conversion_is_an_info_naming_the_file(raw, mode):
    image, suffix = make_mode_image(mode)
    path = raw / "c" / f"odd{suffix}"
    save(image, path, transparency=0) if mode == "P+transparency" else save(image, path)
    report = validate_dataset(raw, ValidateParams())
    assert [p.kind for p in report.problems] == CONVERSIONS[mode]
    assert all(p.severity == "info" and p.path == str(path) for p in report.problems)
    words = " ".join(p.message for p in report.problems)
    assert {"CMYK": "CMYK", "I;16": "16-bit", "RGBA": "transparency composited onto white"}.get(mode, "") in words
    assert report.summary["classes"]["c"] == 5
    assert not report.fails(strict=True)


def test_exif_rotation_is_reported_and_applied(raw):
    path = exif_jpeg(raw / "a" / "rotated.jpg", size=(40, 20))
    report = validate_dataset(raw, ValidateParams())
    problem = only(report, "exif_rotated")
    assert problem.severity == "info" and problem.path == str(path)
    assert report.summary["height"]["max"] == 40  # the 40x20 image stands upright: 20 wide, 40 high


def test_tiny_images_are_warned_about(raw):
    path = save(random_rgb(3, (8, 30)), raw / "b" / "tiny.png")
    report = validate_dataset(raw, ValidateParams(min_side=16))
    problem = only(report, "tiny")
    assert problem.severity == "warning" and problem.path == str(path)
    assert "8x30" in problem.message
    assert validate_dataset(raw, ValidateParams(min_side=16), strict=True).fails()
    assert not [p for p in validate_dataset(raw, ValidateParams(min_side=8)).problems if p.kind == "tiny"]


def test_empty_class_is_an_error(raw):
    (raw / "empty").mkdir()
    report = validate_dataset(raw, ValidateParams())
    problem = only(report, "empty_class")
    assert problem.severity == "error" and problem.path == str(raw / "empty")
    assert problem.fix
    assert report.fails()


def test_single_image_class_is_an_error(raw):
    save(random_rgb(50), raw / "lonely" / "one.png")
    report = validate_dataset(raw, ValidateParams(max_imbalance=10))
    problem = only(report, "too_few_images")
    assert problem.severity == "error" and problem.path == str(raw / "lonely")
    assert "train/val/test" in problem.message
    assert report.fails()


def test_class_of_only_corrupt_files_is_too_small(raw):
    for i in range(3):
        (raw / "broken" / f"{i}.png").parent.mkdir(exist_ok=True)
        (raw / "broken" / f"{i}.png").write_bytes(b"junk")
    report = validate_dataset(raw, ValidateParams())
    assert only(report, "empty_class").path == str(raw / "broken")


def test_heavy_imbalance_is_warned_about(raw):
    for i in range(9):
        save(random_rgb(100 + i), raw / "a" / f"extra{i}.png")
    report = validate_dataset(raw, ValidateParams(max_imbalance=3.0))
    problem = only(report, "imbalance")
    assert problem.severity == "warning" and "'a' has 13" in problem.message
    assert not [p for p in validate_dataset(raw, ValidateParams(max_imbalance=4.0)).problems if p.kind == "imbalance"]


def test_duplicate_across_classes_is_a_warning_naming_both(raw):
    original = raw / "a" / "0.png"
    # Same pixels, different bytes: duplicates are found on decoded pixels, not file bytes.
    with Image.open(original) as image:
        copy = save(image.copy(), raw / "b" / "copy.png", compress_level=1)
    assert copy.read_bytes() != original.read_bytes()
    report = validate_dataset(raw, ValidateParams())
    problem = only(report, "duplicate_across_classes")
    assert problem.severity == "warning"
    assert str(original) in problem.message and str(copy) in problem.message
    assert report.fails(strict=True)


def test_duplicate_within_a_class_is_an_info(raw):
    shutil.copy(raw / "a" / "0.png", raw / "a" / "again.png")
    problem = only(validate_dataset(raw, ValidateParams()), "duplicate_within_class")
    assert problem.severity == "info" and str(raw / "a" / "again.png") in problem.message


def test_missing_raw_folder_says_how_to_get_data(tmp_path):
    report = validate_dataset(tmp_path / "nothing", ValidateParams())
    problem = only(report, "missing_raw")
    assert problem.severity == "error" and "transfer-study data fetch" in problem.fix
    assert report.fails()


def test_raw_without_class_folders_is_an_error(tmp_path):
    save(random_rgb(1), tmp_path / "loose.png")
    report = validate_dataset(tmp_path, ValidateParams())
    assert only(report, "no_classes").severity == "error"
    assert only(report, "outside_class").path == str(tmp_path / "loose.png")
    assert "<class>" in only(report, "no_classes").fix


def test_report_is_written_as_json(raw, tmp_path):
    (raw / "a" / "notes.jpg").write_bytes(b"text")
    save(Image.new("L", (32, 32), 5), raw / "c" / "gray.png")
    out = tmp_path / "out" / "validation.json"
    write_validation_report(validate_dataset(raw, ValidateParams()), out)
    written = json.loads(out.read_text())
    assert written["classes"] == {"a": 4, "b": 4, "c": 5}
    assert written["total_images"] == 13 and written["excluded_images"] == 1
    assert written["problems_by_severity"] == {"error": 0, "warning": 1, "info": 1}
    assert written["problems_by_kind"] == {"converted_grayscale": 1, "unreadable": 1}
    assert written["excluded"] == [str(raw / "a" / "notes.jpg")]
    assert {p["kind"] for p in written["problems"]} == {"converted_grayscale", "unreadable"}


@pytest.mark.parametrize("size, input_size, expected", [
    ((28, 28), 224, "28x28 is far below the model's 224 px input: upscaled at least 8.0x, to 224x224"),
    ((30, 60), 299, "30x60 is far below the model's 299 px input: upscaled at least 5.0x, to 150x299"),
    ((32, 32), 64, "32x32 is far below the model's 64 px input: upscaled at least 2.0x, to 64x64"),
    ((33, 20), 64, None),  # under 2x: not far below
])
def test_images_far_below_the_model_input_say_what_they_are_upscaled_to(raw, size, input_size, expected):
    path = save(random_rgb(5, size), raw / "b" / "small.png")
    report = validate_dataset(raw, ValidateParams(), input_size=input_size)
    upscaled = {p.path: p for p in report.problems if p.kind == "upscaled"}
    if expected is None:
        assert str(path) not in upscaled
    else:
        assert upscaled[str(path)].message == expected and upscaled[str(path)].severity == "info"
    assert not [p for p in validate_dataset(raw, ValidateParams()).problems if p.kind == "upscaled"]  # no size: none


def test_verbose_lists_each_conversion_per_file_and_quiet_counts_them(raw, tmp_path, capsys):
    """Issue 11: the conversions (CMYK, 16-bit, RGBA, EXIF) were only a count."""
    for mode in ("CMYK", "I;16", "RGBA"):
        image, suffix = make_mode_image(mode)
        save(image, raw / "a" / f"{mode.replace(';', '')}{suffix}")
    rotated = exif_jpeg(raw / "b" / "rotated.jpg")
    out = tmp_path / "validation.json"
    data.validate_and_report(raw, out, ValidateParams(), input_size=224)
    quiet = capsys.readouterr().out
    assert "INFO" not in quiet
    assert ("info: 1 converted 16bit, 1 converted cmyk, 1 converted transparency, 1 exif rotated, 16 upscaled "
            "(--verbose lists each file)") in quiet
    data.validate_and_report(raw, out, ValidateParams(), verbose=True, input_size=224)
    lines = capsys.readouterr().out.splitlines()
    for name, words in (("CMYK.jpg", "CMYK colours converted to RGB"), ("I16.png", "16-bit gray"),
                        ("RGBA.png", "transparency composited onto white"), ("rotated.jpg", "rotated per EXIF")):
        assert [line for line in lines if line.startswith(f"INFO: {raw}/") and name in line and words in line], name
    assert f"INFO: {rotated}: 20x40 is far below the model's 224 px input: upscaled at least 5.6x, to 112x224" in "\n".join(lines)


def test_hidden_files_are_ignored(raw):
    (raw / "a" / ".DS_Store").write_bytes(b"junk")
    (raw / ".cache").mkdir()
    assert validate_dataset(raw, ValidateParams()).problems == []


# --------------------------------------------------------------------------------------------
# open_rgb and list_images
# --------------------------------------------------------------------------------------------


def pixel(image: Image.Image) -> tuple:
    assert image.mode == "RGB"
    return image.getpixel((0, 0))


def test_open_rgb_converts_every_mode_to_the_right_colour(tmp_path):
    cases = {
        "gray.png": (Image.new("L", (4, 4), 100), {}, (100, 100, 100)),
        "clear.png": (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), {}, (255, 255, 255)),
        "half.png": (Image.new("RGBA", (4, 4), (0, 0, 0, 128)), {}, (127, 127, 127)),
        "opaque.webp": (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), {"lossless": True}, (255, 0, 0)),
        "palette.png": (Image.new("P", (4, 4), 0), {}, (0, 0, 0)),
        "white16.png": (Image.new("I;16", (4, 4), 65535), {}, (255, 255, 255)),
        "mid16.png": (Image.new("I;16", (4, 4), 32896), {}, (128, 128, 128)),
        "cmyk.jpg": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), {"quality": 100}, (255, 255, 255)),
    }
    for name, (image, options, expected) in cases.items():
        got = pixel(open_rgb(save(image, tmp_path / name, **options)))
        assert np.allclose(got, expected, atol=2), (name, got)


def test_open_rgb_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 255] * 256)
    assert pixel(open_rgb(save(image, tmp_path / "t.png", transparency=0))) == (255, 255, 255)
    assert pixel(open_rgb(save(image, tmp_path / "o.png"))) == (0, 0, 255)


def test_open_rgb_scales_32_bit_gray_without_clipping():
    buffer = io.BytesIO()
    Image.new("I", (4, 4), 65535).save(buffer, format="TIFF")
    assert pixel(open_rgb(buffer.getvalue())) == (255, 255, 255)
    buffer = io.BytesIO()
    Image.new("I", (4, 4), 514).save(buffer, format="TIFF")
    assert pixel(open_rgb(buffer.getvalue())) == (2, 2, 2)


def test_open_rgb_applies_exif_rotation(tmp_path):
    path = exif_jpeg(tmp_path / "r.jpg", size=(40, 20), orientation=6)
    with Image.open(path) as plain:
        assert plain.size == (40, 20)
    assert open_rgb(path).size == (20, 40)


def test_open_rgb_accepts_bytes_and_streams(tmp_path):
    payload = png_bytes(Image.new("RGB", (3, 2), (1, 2, 3)))
    assert pixel(open_rgb(payload)) == (1, 2, 3)
    assert open_rgb(io.BytesIO(payload)).size == (3, 2)


def test_open_rgb_names_the_bad_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(UserError, match="notes.jpg"):
        open_rgb(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes(random_rgb(1))[:300])
    with pytest.raises(UserError, match="cut.png"):
        open_rgb(truncated)
    with pytest.raises(UserError, match=r"^the file is not an image \(PNG, JPEG or WebP\) Pillow can read") as bytes_error:
        open_rgb(b"garbage")
    assert "BytesIO" not in str(bytes_error.value)
    with pytest.raises(UserError, match=r"^'.*notes.jpg' is not an image \(PNG, JPEG or WebP\) Pillow can read"):
        open_rgb(text)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixel data: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_open_rgb_refuses_oversized_images_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoded an image over the pixel cap")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(UserError, match="7000x7000.*more than the limit"):
        open_rgb(png_header_only(7000, 7000))
    with pytest.raises(UserError, match="more than the limit of 100"):
        open_rgb(png_bytes(Image.new("RGB", (20, 20))), max_pixels=100)


def test_list_images_sorts_and_skips_hidden_and_non_images(tmp_path):
    for name in ("b.png", "a.JPG", ".hidden.png", "notes.txt", "c.webp"):
        (tmp_path / "coat" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "coat" / name).write_bytes(b"")
    (tmp_path / "alpha").mkdir()
    (tmp_path / ".git").mkdir()
    found = list_images(tmp_path)
    assert list(found) == ["alpha", "coat"]
    assert [p.name for p in found["coat"]] == ["a.JPG", "b.png", "c.webp"]
    assert found["alpha"] == []
    assert list_images(tmp_path / "missing") == {}


def test_validate_and_report_writes_then_fails_on_errors(raw, tmp_path, capsys):
    out = tmp_path / "validation.json"
    data.validate_and_report(raw, out, ValidateParams())
    assert json.loads(out.read_text())["passed"] is True
    (raw / "a" / "notes.jpg").write_bytes(b"text")
    data.validate_and_report(raw, out, ValidateParams())  # a warning alone passes
    failed = f"dataset validation failed with 1 error(s); fix them (see {out}) and run it again"
    with pytest.raises(UserError, match=f"^{re.escape(failed)}$"):
        data.validate_and_report(raw, out, ValidateParams(), strict=True)
    assert json.loads(out.read_text())["passed"] is False
    with pytest.raises(UserError, match=f"^{re.escape(failed)}$"):  # validate.strict, as --strict
        data.validate_and_report(raw, out, ValidateParams(strict=True))
    assert "notes.jpg" in capsys.readouterr().out


def test_every_dataset_of_a_profile_is_validated_and_the_external_set_needs_no_split_minimum(tmp_path, raw, capsys):
    from transfer_study.config import Dataset

    few = tmp_path / "few"
    for c, label in enumerate("abc"):
        for i in range(2):
            save(random_rgb(100 + 10 * c + i), few / label / f"{i}.png")
    out = tmp_path / "validation.json"
    reports = data.validate_datasets([Dataset("rep00", 0, str(raw), "c0"), Dataset("external", None, str(few), "c1")],
                                     out, ValidateParams())
    assert set(reports) == {"rep00", "external"} and set(json.loads(out.read_text())) == {"rep00", "external"}
    assert f"external ({few}): " in capsys.readouterr().out
    with pytest.raises(UserError, match="validation failed for rep01"):
        data.validate_datasets([Dataset("rep00", 0, str(raw), "c0"), Dataset("rep01", 1, str(few), "c1")],
                               out, ValidateParams())
    assert json.loads(out.read_text())["rep01"]["passed"] is False  # written before the error

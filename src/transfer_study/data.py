"""The raw dataset: fetch the default one from Fashion-MNIST, validate any one, open images safely.

Stages `data fetch` and `data validate`. The raw layout is `raw/<class>/<image files>`.
`open_rgb` is the one image loader that preprocess and serving share.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from transfer_study.config import ConfigError, DataParams, UserError, ValidateParams

# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------

# Class folder name -> Fashion-MNIST label. Sandal (5), sneaker (7), bag (8) and ankle boot (9)
# are left out: the study is about garments.
FMNIST_LABELS: dict[str, int] = {
    "t-shirt_top": 0,
    "trouser": 1,
    "pullover": 2,
    "dress": 3,
    "coat": 4,
    "shirt": 6,
}

IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"
# sha256 of the decompressed files: Debian recompressed the .gz files, so their hashes differ.
FMNIST_SHA256: dict[str, str] = {
    IMAGES_FILE: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    LABELS_FILE: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
UPSTREAM_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 15
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "transfer-study" / "fashion-mnist"
FETCH_HELP = "install the Debian package (`apt-get install dataset-fashion-mnist`) or pass --source DIR"

_TMP_SUFFIX = ".fetch-tmp"
# Fixed PNG options and no metadata, so the bytes are the same on every machine.
_PNG_OPTIONS = {"format": "PNG", "compress_level": 9, "optimize": False}


def fetch_dataset(
    dest: Path, params: DataParams, source: Path | None = None, cache_dir: Path | None = None
) -> dict:
    """Write `params.per_class` seeded Fashion-MNIST images per class to `dest/<class>/fmnist-<index>.png`.

    The idx files come from `source` (else `params.source`), else the Debian package folder, else
    a download into `cache_dir`. Refuses to run if `dest` holds files this fetch would not
    write. Returns {"source", "classes": {class: count}, "total", "written"}.
    """
    labels_of = _check_classes(params)
    folder = _resolve_source(source if source is not None else params.source, cache_dir or DEFAULT_CACHE_DIR)
    images, labels = load_fmnist(folder)
    chosen = choose_indices(labels, labels_of, params.per_class, params.seed)
    planned = {
        Path(name) / f"fmnist-{index:05d}.png": encode_png(images[index])
        for name, indices in chosen.items()
        for index in indices
    }
    _refuse_foreign_files(Path(dest), planned)
    written = _write_files(Path(dest), planned)
    return {
        "source": str(folder),
        "classes": {name: len(indices) for name, indices in chosen.items()},
        "total": len(planned),
        "written": written,
    }


def _check_classes(params: DataParams) -> dict[str, int]:
    """Map each class in params.classes to its Fashion-MNIST label; ConfigError for unknown or repeated names."""
    unknown = [name for name in params.classes if name not in FMNIST_LABELS]
    if unknown:
        raise ConfigError(
            f"data.classes: {', '.join(unknown)} not in Fashion-MNIST's garments; "
            f"choose from {', '.join(FMNIST_LABELS)}"
        )
    if not params.classes or len(set(params.classes)) != len(params.classes):
        raise ConfigError("data.classes must list at least one class, each once")
    if not 1 <= params.per_class <= 6000:
        raise ConfigError(f"data.per_class = {params.per_class}; Fashion-MNIST has 1 to 6000 train images per class")
    return {name: FMNIST_LABELS[name] for name in params.classes}


def _find_idx_file(folder: Path, name: str) -> Path | None:
    """The plain or gzipped idx file `name` in `folder`, or None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _resolve_source(source: str | Path | None, cache_dir: Path) -> Path:
    """The folder holding both idx files: the given source, else Debian's, else a fresh download."""
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise UserError(f"--source '{folder}' is not a folder; give the folder holding {IMAGES_FILE}.gz")
        for name in FMNIST_SHA256:
            if _find_idx_file(folder, name) is None:
                raise UserError(f"--source '{folder}' has no {name} or {name}.gz; copy it there or drop --source")
        return folder
    if all(_find_idx_file(DEBIAN_DIR, name) for name in FMNIST_SHA256):
        return DEBIAN_DIR
    return _download(cache_dir)


def _download(cache_dir: Path) -> Path:
    """Download the gzipped idx files into cache_dir unless they are there; return cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_SHA256:
        if _find_idx_file(cache_dir, name) is not None:
            continue
        url = f"{UPSTREAM_URL}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"Fashion-MNIST is not installed and downloading {url} failed ({exc}); {FETCH_HELP}") from None
        _write_atomically(cache_dir / f"{name}.gz", payload)
    return cache_dir


def _read_verified(folder: Path, name: str) -> bytes:
    """The decompressed content of idx file `name` in `folder`, checked against its known sha256."""
    path = _find_idx_file(folder, name)
    if path is None:
        raise UserError(f"'{folder}' has no {name} or {name}.gz; {FETCH_HELP}")
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read '{path}' ({exc}); replace it with an intact copy") from None
    if hashlib.sha256(data).hexdigest() != FMNIST_SHA256[name]:
        raise UserError(
            f"'{path}' is not the Fashion-MNIST {name} (sha256 mismatch); replace it with an intact copy or {FETCH_HELP}"
        )
    return data


def parse_idx(data: bytes) -> np.ndarray:
    """Parse an unsigned-byte idx file (magic 0x0000080N) into an array of shape dims."""
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError("not an unsigned-byte idx file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return body.reshape(dims)


def load_fmnist(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The verified Fashion-MNIST train set in `folder`: images (60000, 28, 28) and labels (60000,), uint8."""
    images = parse_idx(_read_verified(folder, IMAGES_FILE))
    labels = parse_idx(_read_verified(folder, LABELS_FILE))
    return images, labels


def choose_indices(labels: np.ndarray, labels_of: dict[str, int], per_class: int, seed: int) -> dict[str, list[int]]:
    """Seeded choice of `per_class` indices per class, without replacement, sorted; classes in the given order."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for name, label in labels_of.items():
        candidates = np.flatnonzero(labels == label)
        chosen[name] = sorted(int(i) for i in rng.choice(candidates, size=per_class, replace=False))
    return chosen


def encode_png(pixels: np.ndarray) -> bytes:
    """A 2-D uint8 array as grayscale ("L") PNG bytes, with fixed options and no metadata."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, **_PNG_OPTIONS)
    return buffer.getvalue()


def _refuse_foreign_files(dest: Path, planned: dict[Path, bytes]) -> None:
    """Raise UserError if dest holds any file that is not exactly one this fetch writes."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"'{dest}' is a file, not a folder; choose another destination")
    if not dest.exists():
        return
    foreign = []
    for path in sorted(p for p in dest.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(dest)
        if path.name.endswith(_TMP_SUFFIX):
            continue  # left over by an interrupted fetch; rewritten below
        if relative not in planned or path.is_symlink() or path.read_bytes() != planned[relative]:
            foreign.append(str(path))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"'{dest}' holds {len(foreign)} file(s) this fetch would not write ({shown}); "
            f"move them elsewhere or fetch into another folder"
        )


def _write_files(dest: Path, planned: dict[Path, bytes]) -> int:
    """Write each planned file under dest that is not already there; return how many were written."""
    for leftover in dest.rglob(f"*{_TMP_SUFFIX}") if dest.exists() else ():
        leftover.unlink()
    written = 0
    for relative, payload in planned.items():
        path = dest / relative
        if path.is_file() and path.read_bytes() == payload:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, payload)
        written += 1
    return written


def _write_atomically(path: Path, payload: bytes) -> None:
    """Write payload to a temporary file beside path, then rename it over path."""
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Opening images
# --------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: the JPEG variant many cameras write
DEFAULT_MAX_PIXELS = 40_000_000
# What Pillow raises for data it cannot decode, depending on the format plugin.
_DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _describe(source: Path | bytes | BinaryIO) -> str:
    """How to name the source in an error message ("the file" for bytes: the server says which row)."""
    if isinstance(source, (str, Path)):
        return f"'{source}'"
    name = getattr(source, "name", None)
    return f"'{name}'" if isinstance(name, str) else "the file"


def _is_empty(source: Path | bytes | BinaryIO) -> bool:
    """Whether a file or bytes hold nothing (a stream is left to Pillow)."""
    if isinstance(source, (bytes, bytearray)):
        return len(source) == 0
    if isinstance(source, (str, Path)):
        try:
            return Path(source).stat().st_size == 0
        except OSError:
            return False  # missing or unreadable: Pillow's open says so
    return False


def open_lazily(source: Path | bytes | BinaryIO, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image without decoding its pixels; UserError if it is empty, not an image or exceeds max_pixels."""
    if _is_empty(source):  # Pillow would call it unreadable or corrupt; an empty file is a failed copy
        raise UserError(f"{_describe(source)} is an empty file (0 bytes); copy the photo again or delete it")
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        image = Image.open(fp)
    except UnidentifiedImageError:  # its message names the stream object (<_io.BytesIO object at 0x…>)
        raise UserError(f"{_describe(source)} is not an image (PNG, JPEG or WebP) Pillow can read; "
                        f"use a JPEG, PNG or WebP file") from None
    except _DECODE_ERRORS as exc:
        raise UserError(f"{_describe(source)} is not a readable image ({exc}); use a JPEG, PNG or WebP file") from None
    width, height = image.size
    # Checked on the header, before decoding, so a decompression bomb never reaches memory.
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise UserError(
            f"{_describe(source)} is {width}x{height} pixels, more than the limit of {max_pixels}; downscale it first"
        )
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) of an opened image; 1 when absent or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit gray (0..65535) down to 8 bits; Pillow's own conversion clips above 255."""
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def has_transparency(image: Image.Image) -> bool:
    """Whether the image has an alpha channel or a transparent colour."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB: 16-bit scaled down, transparency composited onto white, CMYK converted."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(image).convert("RGB")
    if image.mode == "F":
        return image.convert("L").convert("RGB")
    if has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(image: Image.Image, source: Path | bytes | BinaryIO) -> Image.Image:
    """Decode an image from open_lazily to upright 8-bit RGB and close it; UserError naming source if corrupt."""
    try:
        with image:
            image.load()  # decode now, so corrupt data fails here with a clear message
            return to_rgb(ImageOps.exif_transpose(image))
    except _DECODE_ERRORS as exc:
        raise UserError(f"{_describe(source)} is corrupt or truncated ({exc}); re-export it as PNG, JPEG or WebP") from None


def open_rgb(source: Path | bytes | BinaryIO, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file, bytes or binary stream as upright 8-bit RGB.

    Refuses images over max_pixels before decoding (None: no limit of ours), applies the EXIF
    orientation and converts any mode to RGB. Raises UserError, naming the file when there is
    one, for data that is not a readable image.
    """
    return decode_rgb(open_lazily(source, max_pixels), source)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def list_images(raw: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image paths (by suffix) in raw/<class>/; classes sorted, hidden entries ignored.

    Classes with no images map to an empty list. Returns {} if raw is missing.
    """
    raw = Path(raw)
    if not raw.is_dir():
        return {}
    classes = sorted(p for p in raw.iterdir() if p.is_dir() and not _is_hidden(p))
    return {
        folder.name: sorted(
            p for p in folder.iterdir() if p.is_file() and not _is_hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for folder in classes
    }


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

Severity = Literal["error", "warning", "info"]
FETCH_OR_ADD = "run `transfer-study data fetch` or put images under {raw}/<class>/"
REEXPORT = "delete it or re-export it as PNG/JPEG/WebP"
# What to_rgb does to each mode: (kind, words). RGB needs nothing; RGBA only loses its
# transparency, reported on its own (an LA or P image can need both).
_GRAY = ("grayscale", "grayscale copied to the three RGB channels")
_PALETTE = ("palette", "palette colours expanded to RGB")
_MODE_CONVERSIONS = {
    "L": _GRAY, "LA": _GRAY, "La": _GRAY, "P": _PALETTE, "PA": _PALETTE,
    "1": ("grayscale", "black-and-white (1-bit) copied to the three RGB channels"),
    "CMYK": ("cmyk", "CMYK colours converted to RGB"),
    "F": ("float", "32-bit float gray clipped to 8 bits"),
    **{mode: ("16bit", f"16-bit gray ({mode}) scaled down to 8 bits") for mode in _SIXTEEN_BIT_MODES},
}
# Reported when the model input is at least this many times the image's longer side: such an
# image is upscaled at least that much (letterboxing scales the longer side to the input size).
UPSCALE_REPORT_FACTOR = 2.0


@dataclass(frozen=True)
class Problem:
    """One finding about the dataset: what, where, and how to fix it. `kind` groups findings in the summary."""

    severity: Severity
    path: str
    message: str
    fix: str
    kind: str = "other"


@dataclass
class ValidationReport:
    """All problems found, the summary (a DVC metric) and the paths excluded from the dataset."""

    problems: list[Problem]
    summary: dict
    excluded: list[str] = field(default_factory=list)

    def fails(self, strict: bool = False) -> bool:
        """True if there is an error, or, when strict, a warning."""
        failing = ("error", "warning") if strict else ("error",)
        return any(p.severity in failing for p in self.problems)

    def by_severity(self, severity: Severity) -> list[Problem]:
        return [p for p in self.problems if p.severity == severity]


@dataclass
class _ImageCheck:
    """What reading one image found; pixel_hash is None when it could not be used."""

    path: Path
    label: str
    problems: list[Problem]
    width: int = 0
    height: int = 0
    pixel_hash: str | None = None


def _conversions(mode: str, transparent: bool) -> list[tuple[str, str]]:
    """What open_rgb does to a decoded image of this mode: (kind, words) per step; [] for plain RGB."""
    steps = []
    if mode not in ("RGB", "RGBA", "RGBa"):
        steps.append(_MODE_CONVERSIONS.get(mode, ("mode", f"{mode} converted to RGB")))
    if transparent:
        steps.append(("transparency", "transparency composited onto white"))
    return steps


def _upscale_problem(name: str, width: int, height: int, input_size: int) -> Problem | None:
    """An info for an image far smaller than the model input, with the size it is upscaled to; else None."""
    longer = max(width, height)
    if longer * UPSCALE_REPORT_FACTOR > input_size:
        return None
    scale = input_size / longer
    return Problem(
        "info", name,
        f"{width}x{height} is far below the model's {input_size} px input: upscaled at least {scale:.1f}x, "
        f"to {round(width * scale)}x{round(height * scale)}",
        "none needed; a larger original gives the model more detail", "upscaled",
    )


def _check_image(path: Path, label: str, min_side: int, input_size: int | None = None) -> _ImageCheck:
    """Decode one image the way open_rgb does and report what was converted or wrong.

    input_size: the model's input size in px; None: no upscaling report."""
    name = str(path)
    try:
        image = open_lazily(path)
        mode, image_format, orientation = image.mode, image.format, exif_orientation(image)
        transparent = has_transparency(image)
        rgb = decode_rgb(image, path)
    except UserError as exc:
        return _ImageCheck(path, label, [Problem("warning", name, f"excluded: {exc}", REEXPORT, "unreadable")])
    problems = []
    if image_format not in ACCEPTED_FORMATS:
        problems.append(
            Problem("info", name, f"is a {image_format} file despite its name; read anyway", "re-export it as PNG", "format_mismatch")
        )
    for kind, words in _conversions(mode, transparent):
        problems.append(Problem("info", name, words, "none needed", f"converted_{kind}"))
    if orientation != 1:
        problems.append(Problem("info", name, f"rotated per EXIF (orientation {orientation})", "none needed", "exif_rotated"))
    width, height = rgb.size
    if min(width, height) < min_side:
        problems.append(
            Problem(
                "warning", name, f"tiny image ({width}x{height}, under {min_side} px on a side)",
                "replace it with a larger image or delete it", "tiny",
            )
        )
    if input_size and (upscaled := _upscale_problem(name, width, height, input_size)):
        problems.append(upscaled)
    digest = hashlib.sha256(f"{width}x{height}:".encode() + rgb.tobytes()).hexdigest()
    return _ImageCheck(path, label, problems, width, height, digest)


def _scan_layout(raw: Path) -> tuple[dict[str, list[Path]], list[Problem], list[str]]:
    """Class folders and their image files, plus problems and exclusions for everything else in raw."""
    problems, excluded = [], []
    for entry in sorted(raw.iterdir()):
        if entry.is_file() and not _is_hidden(entry):
            problems.append(Problem("warning", str(entry), "file outside any class folder; ignored",
                                    f"move it into {raw}/<class>/", "outside_class"))
            excluded.append(str(entry))
    images = list_images(raw)
    for label, paths in images.items():
        listed = set(paths)
        for entry in sorted((raw / label).iterdir()):
            if _is_hidden(entry) or entry in listed:
                continue
            if entry.is_dir():
                message, fix = "subfolder ignored (only files directly in a class folder are used)", f"move its images into {raw / label}/"
            else:
                message, fix = f"not a JPEG/PNG/WebP file ({entry.suffix or 'no suffix'}); excluded", REEXPORT
            problems.append(Problem("warning", str(entry), message, fix, "unsupported_file"))
            excluded.append(str(entry))
    return images, problems, excluded


def _class_count_problems(raw: Path, counts: dict[str, int], params: ValidateParams) -> list[Problem]:
    """Errors for classes too small to split three ways; a warning for heavy imbalance."""
    problems = []
    for label, count in counts.items():
        folder = str(raw / label)
        if count == 0:
            problems.append(Problem("error", folder, "empty class folder: it cannot be split into train/val/test",
                                    f"add at least {params.min_per_class} images or remove the folder", "empty_class"))
        elif count < params.min_per_class:
            problems.append(Problem(
                "error", folder,
                f"class has {count} usable image(s); at least {params.min_per_class} are needed to split into train/val/test",
                f"add {params.min_per_class - count} or more images or remove the folder", "too_few_images",
            ))
    non_empty = {label: n for label, n in counts.items() if n > 0}
    if len(non_empty) >= 2:
        largest = max(non_empty, key=non_empty.get)
        smallest = min(non_empty, key=non_empty.get)
        ratio = non_empty[largest] / non_empty[smallest]
        if ratio > params.max_imbalance:
            problems.append(Problem(
                "warning", str(raw),
                f"heavy class imbalance: '{largest}' has {non_empty[largest]} images, '{smallest}' {non_empty[smallest]} "
                f"(ratio {ratio:.1f} > {params.max_imbalance})",
                f"add images to '{smallest}', subsample '{largest}', or raise validate.max_imbalance", "imbalance",
            ))
    return problems


def _duplicate_problems(checks: Iterable[_ImageCheck]) -> list[Problem]:
    """A warning per group of identical images spread over classes; info for copies within one class."""
    groups: dict[str, list[_ImageCheck]] = {}
    for check in checks:
        if check.pixel_hash is not None:
            groups.setdefault(check.pixel_hash, []).append(check)
    problems = []
    for group in groups.values():
        if len(group) < 2:
            continue
        paths = ", ".join(str(c.path) for c in group)
        labels = sorted({c.label for c in group})
        if len(labels) > 1:
            problems.append(Problem(
                "warning", str(group[0].path),
                f"identical images in classes {', '.join(labels)}: {paths}; split excludes them all",
                "delete the copy that is in the wrong class", "duplicate_across_classes",
            ))
        else:
            problems.append(Problem(
                "info", str(group[0].path), f"identical images within class '{labels[0]}': {paths}; split keeps them together",
                "delete the extra copies if they were not meant to be there", "duplicate_within_class",
            ))
    return problems


def _size_stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def _summarise(counts: dict[str, int], checks: list[_ImageCheck], problems: list[Problem], excluded: list[str]) -> dict:
    usable = [c for c in checks if c.pixel_hash is not None]
    return {
        "classes": counts,
        "num_classes": len(counts),
        "total_images": sum(counts.values()),
        "excluded_images": len(excluded),
        "width": _size_stats([c.width for c in usable]),
        "height": _size_stats([c.height for c in usable]),
        "problems_by_severity": {s: sum(p.severity == s for p in problems) for s in ("error", "warning", "info")},
        "problems_by_kind": dict(sorted(Counter(p.kind for p in problems).items())),
    }


def _promote_warnings(problems: list[Problem]) -> list[Problem]:
    """Strict mode: every warning becomes an error."""
    return [Problem("error", p.path, p.message, p.fix, p.kind) if p.severity == "warning" else p for p in problems]


def validate_dataset(raw: Path, params: ValidateParams, strict: bool | None = None, workers: int = 4,
                     input_size: int | None = None) -> ValidationReport:
    """Check every file under raw/<class>/ and the class counts; never raises for bad data.

    strict (default params.strict) turns warnings into errors. input_size (the model's input, px)
    adds an info for each image far smaller than it. Returns a ValidationReport whose `fails()`
    says whether training should stop.
    """
    raw = Path(raw)
    strict = params.strict if strict is None else strict
    if not raw.is_dir():
        problem = Problem("error", str(raw), "raw data folder not found", FETCH_OR_ADD.format(raw=raw), "missing_raw")
        return ValidationReport([problem], _summarise({}, [], [problem], []))
    images, problems, excluded = _scan_layout(raw)
    if not images:
        problems.append(Problem("error", str(raw), "no class folders in the raw data folder",
                                FETCH_OR_ADD.format(raw=raw), "no_classes"))
    jobs = [(path, label) for label, paths in images.items() for path in paths]
    # Pillow releases the GIL while decoding, so threads help on large photos.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = list(pool.map(lambda job: _check_image(job[0], job[1], params.min_side, input_size), jobs))
    for check in checks:
        problems.extend(check.problems)
        if check.pixel_hash is None:
            excluded.append(str(check.path))
    counts = {label: sum(c.label == label and c.pixel_hash is not None for c in checks) for label in images}
    problems += _class_count_problems(raw, counts, params)
    problems += _duplicate_problems(checks)
    if strict:
        problems = _promote_warnings(problems)
    summary = _summarise(counts, checks, problems, excluded)
    summary["strict"] = strict
    summary["passed"] = not any(p.severity == "error" for p in problems)
    return ValidationReport(problems, summary, sorted(excluded))


def write_validation_report(report: ValidationReport, path: Path) -> None:
    """Write the summary, the excluded paths and the problem list as JSON to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {**report.summary, "excluded": report.excluded, "problems": [asdict(p) for p in report.problems]}
    _write_atomically(path, (json.dumps(content, indent=2) + "\n").encode())


def format_report(report: ValidationReport, show_info: bool = False) -> str:
    """Human-readable lines: one per error/warning (and per info if asked, else a count per kind),
    then a one-line total."""
    lines = [
        f"{p.severity.upper()}: {p.path}: {p.message} (fix: {p.fix})"
        for p in report.problems
        if show_info or p.severity != "info"
    ]
    infos = Counter(p.kind.replace("_", " ") for p in report.by_severity("info"))
    if infos and not show_info:
        lines.append(f"info: {', '.join(f'{n} {kind}' for kind, n in sorted(infos.items()))} "
                     f"(--verbose lists each file)")
    counts = report.summary["problems_by_severity"]
    lines.append(
        f"{report.summary['total_images']} images in {len(report.summary['classes'])} classes, "
        f"{report.summary['excluded_images']} excluded; "
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
    )
    return "\n".join(lines)


def validate_and_report(raw: Path, out: Path, params: ValidateParams, strict: bool = False, verbose: bool = False,
                        input_size: int | None = None) -> ValidationReport:
    """Stage `data validate`: validate raw, write the JSON report to out, print the findings.

    strict (or params.strict) turns warnings into errors; verbose prints every info (each
    conversion and upscaled image, per file); input_size is the model's input in px. Raises
    UserError when the dataset fails, after the report is written, so the user can read every problem.
    """
    report = validate_dataset(raw, params, strict=strict or params.strict, input_size=input_size)
    write_validation_report(report, out)
    print(format_report(report, show_info=verbose))
    if report.fails():
        errors = len(report.by_severity("error"))
        raise UserError(f"dataset validation failed with {errors} error(s); fix them (see {out}) and run it again")
    return report

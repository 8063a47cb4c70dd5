"""A small HTTP client for a running `mlflow models serve` of the servable model (serve.py).

It sends each file's bytes, base64-encoded, as one row of MLflow's `inputs` form, so it needs
neither MLflow nor the model's code: `transfer-study predict` starts fast and prints no library
warnings. Files are checked here first with the loader the server uses (data.open_rgb): one that
would be refused is named and left out, and the others are still classified. A server's refusal
("row 3: ...", serve.decode_image) is reported with the file sent as that row.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import UserError
from .data import open_rgb

# MLflow's scoring server prefixes the model's message with the whole request:
# "Failed to predict data '<the DataFrame>'. \nError: <message>" (mlflow/pyfunc/scoring_server).
_MLFLOW_REQUEST_DUMP = re.compile(r"^Failed to predict data .*?\nError: ", re.DOTALL)
_ROW = re.compile(r"^row (\d+): (.*)$", re.DOTALL)
MAX_MESSAGE_CHARS = 500


def encode_file(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def check_images(images: list[Path]) -> tuple[list[Path], list[str]]:
    """Open each file as the server will: the readable ones, and one message (naming the file) per
    file that is not a readable image."""
    readable, problems = [], []
    for path in images:
        try:
            open_rgb(path)
            readable.append(path)
        except UserError as exc:
            problems.append(str(exc))
    return readable, problems


@dataclass(frozen=True)
class Predictions:
    """The server's answers, one row per readable file, and why each other file was left out."""

    frame: pd.DataFrame
    skipped: list[str]


def server_message(body: str) -> str:
    """The model's own message in an error answer: its JSON `message`, without MLflow's dump of the request."""
    try:
        message = json.loads(body).get("message", body)
    except (json.JSONDecodeError, AttributeError):
        message = body
    return _MLFLOW_REQUEST_DUMP.sub("", str(message)).strip()[:MAX_MESSAGE_CHARS]


def refusal(url: str, status: int, message: str, images: list[Path]) -> UserError:
    """A server's refusal, naming the file when the message names a row of the request."""
    match = _ROW.match(message)
    if match and int(match[1]) < len(images):
        return UserError(f"the server at {url} refused '{images[int(match[1])]}' ({status}): {match[2]}")
    return UserError(f"the server at {url} refused the request ({status}): {message}")


def predict_images(url: str, images: list[Path], timeout: float = 60.0) -> Predictions:
    """POST the readable images to a running `mlflow models serve`: its predictions, one row per
    file, and the files left out. UserError when no file is readable, or the server refuses."""
    images, skipped = check_images(images)
    if not images:
        raise UserError(skipped[0] if len(skipped) == 1 else
                        f"none of the {len(skipped)} files is a readable image: {'; '.join(skipped)}")
    body = json.dumps({"inputs": [encode_file(p) for p in images]})
    request = urllib.request.Request(
        url.rstrip("/") + "/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise refusal(url, exc.code, server_message(exc.read().decode(errors="replace")), images) from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot reach a model server at {url} ({exc}); start one with `make serve` "
                        f"(the champion of the profile you ran), or pass --url") from None
    frame = pd.DataFrame(answer["predictions"])
    frame.insert(0, "image", [str(p) for p in images])
    return Predictions(frame, skipped)

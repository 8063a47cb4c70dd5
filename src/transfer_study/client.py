"""A small HTTP client for a running `mlflow models serve` of the servable model (serve.py)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd

from .config import UserError
from .serve import IMAGE_COLUMN


def encode_file(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


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

"""The prediction client: files checked before sending, the server's refusals naming the file, and
no library warnings from `transfer-study predict` (the real server: tests/test_serve.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from postgres import free_port
from PIL import Image

from transfer_study import client
from transfer_study.config import UserError

CLI = str(Path(sys.executable).parent / "transfer-study")
# What MLflow's scoring server answers when the model raises for row 1 of a two-image request.
MLFLOW_ANSWER = json.dumps({
    "error_code": "INVALID_PARAMETER_VALUE",
    "message": "Failed to predict data '                                            image\n0  /9j/4AAQSkZJRgABAQAAAQABAAD"
               "...\n1  aGVsbG8gd29ybGQ='. \nError: row 1: the file is not an image (PNG, JPEG or WebP) Pillow can "
               "read; use a JPEG, PNG or WebP file",
})


def _photos(folder: Path) -> tuple[Path, Path, Path]:
    """A good PNG, a text file named .jpg and a PNG cut short."""
    good, text, broken = folder / "shirt.png", folder / "notes.jpg", folder / "cut.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(good)
    text.write_text("a shopping list, not a photo")
    broken.write_bytes(good.read_bytes()[:60])
    return good, text, broken


def test_server_message_drops_mlflows_dump_of_the_request():
    message = client.server_message(MLFLOW_ANSWER)
    assert message == "row 1: the file is not an image (PNG, JPEG or WebP) Pillow can read; use a JPEG, PNG or WebP file"
    assert client.server_message("<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert client.server_message(json.dumps({"message": "the request holds no images"})) == "the request holds no images"


def test_a_refusal_names_the_file_sent_as_that_row(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "b.jpg"]
    error = client.refusal("http://srv", 400, client.server_message(MLFLOW_ANSWER), images)
    assert str(error) == (f"the server at http://srv refused '{images[1]}' (400): the file is not an image "
                          f"(PNG, JPEG or WebP) Pillow can read; use a JPEG, PNG or WebP file")
    whole = client.refusal("http://srv", 400, "the request holds no images", images)
    assert str(whole) == "the server at http://srv refused the request (400): the request holds no images"
    assert "row 5" in str(client.refusal("http://srv", 400, "row 5: odd", images))  # not a row we sent


class _Answer:
    """What urlopen gives back: the server's predictions for the rows sent."""

    def __init__(self, request):
        self.rows = len(json.loads(request.data)["inputs"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        return json.dumps({"predictions": [{"label": "red", "prob_red": 1.0}] * self.rows}).encode()


def test_a_bad_file_is_named_and_left_out_and_the_others_are_classified(tmp_path, monkeypatch):
    """The issue's case: one bad file no longer stops the batch."""
    good, text, broken = _photos(tmp_path)
    sent = []
    monkeypatch.setattr(client.urllib.request, "urlopen", lambda request, timeout: sent.append(request) or _Answer(request))
    predictions = client.predict_images("http://127.0.0.1:1", [good, text, broken, good])
    assert predictions.frame["image"].tolist() == [str(good), str(good)] and len(sent) == 1
    assert predictions.skipped[0].startswith(f"'{text}' is not an image (PNG, JPEG or WebP) Pillow can read")
    assert predictions.skipped[1].startswith(f"'{broken}' is corrupt or truncated") and len(predictions.skipped) == 2
    with pytest.raises(UserError, match=r"none of the 2 files is a readable image"):
        client.predict_images("http://127.0.0.1:1", [text, broken])
    assert len(sent) == 1  # nothing sent when no file is readable


def test_an_empty_file_is_called_empty(tmp_path):
    empty = tmp_path / "photo.jpg"
    empty.write_bytes(b"")
    _, (problem,) = client.check_images([empty])
    assert problem == f"'{empty}' is an empty file (0 bytes); copy the photo again or delete it"


def test_predict_prints_no_library_warnings(tmp_path):
    """The client imports neither MLflow nor the model; a call prints its answer or one error line."""
    imported = subprocess.run(
        [sys.executable, "-W", "default", "-c",
         "import sys, transfer_study.client; print(sorted({'mlflow', 'torch', 'transfer_study.serve'} & set(sys.modules)))"],
        capture_output=True, text=True, timeout=120)
    assert (imported.stdout.strip(), imported.stderr) == ("[]", "")
    helped = subprocess.run([CLI, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stderr == ""
    good, text, _ = _photos(tmp_path)
    for image, expected in ((good, "error: cannot reach a model server"), (text, f"error: '{text}' is not an image")):
        called = subprocess.run([CLI, "predict", "--url", f"http://127.0.0.1:{free_port()}", str(image)],
                                capture_output=True, text=True, timeout=120)
        assert called.returncode == 1 and called.stdout == ""
        assert len(called.stderr.splitlines()) == 1 and called.stderr.startswith(expected), called.stderr

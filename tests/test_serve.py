"""The servable pyfunc, in process and behind a real `mlflow models serve` process: a single
trained model, the calibrated champion the register stage builds, and an ensemble."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import make_raw_project, tiny_params
from PIL import Image, ImageDraw

from transfer_study import client
from transfer_study.calibration import temperature_scaled
from transfer_study.cells import Cell
from transfer_study.config import PreprocessParams
from transfer_study.evaluate import evaluate_runs
from transfer_study.launch import tool_environment
from transfer_study.preprocess import write_crop_record
from transfer_study.registry import RegisterPaths, promote_champion
from transfer_study.serve import ImageClassifier, classifier_files, with_serving_options
from transfer_study.train import train_cell

COLOURS = {"blue": (30, 60, 200), "red": (210, 30, 30)}


def _garment(colour: str, jitter: int) -> Image.Image:
    """A coloured blob on a white background: trivially separable classes."""
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    offset = 10 + 3 * jitter
    draw.rectangle([offset, offset + 5, offset + 50, offset + 60], fill=COLOURS[colour])
    return img


def _colour_images() -> list:
    return [_garment("red", 3).convert("RGB"), _garment("blue", 4).convert("RGB")]


def _make_colour_project(root: Path, per_class: int = 8) -> None:
    rows = []
    for name in COLOURS:
        folder = root / "data" / "cropped" / name
        folder.mkdir(parents=True)
        for n in range(per_class):
            path = folder / f"{name}{n}.png"
            _garment(name, n).resize((80, 80)).save(path)
            split = "train" if n < per_class - 2 else ("val" if n == per_class - 2 else "test")
            rows.append({"path": path.relative_to(root).as_posix(), "label": name, "split": split,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    (root / "data" / "split").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data" / "split" / "manifest.csv", index=False)
    write_crop_record(root / "data" / "cropped", PreprocessParams(size=80), {"written": len(rows)})


def _png_b64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


COLOUR_PARAMS = {"epochs": 4, "lr": 3e-3, "batch_size": 6}


@pytest.fixture(scope="module")
def colour_project(tmp_path_factory, empty_mlflow_db) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("serve_project")
    _make_colour_project(root)
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def trained_model(colour_project) -> tuple[str, str]:
    """Train Lite0 (frozen, real ImageNet weights) on the colour classes: (tracking URI, model URI)."""
    root, uri = colour_project
    run_dir = train_cell(tiny_params(**COLOUR_PARAMS), Cell("efficientnet_lite0", "frozen", 0), root, uri)
    return uri, json.loads((run_dir / "run.json").read_text())["model_uri"]


@pytest.fixture(scope="module")
def served_models(colour_project, trained_model) -> dict:
    """The pipeline's last stages on two trained runs (the second: another seed at another input
    size, 40 px): evaluate, then register, which makes @champion the calibrated model it chose on
    validation; plus an ensemble of both runs (flips on the first, temperature 2) at @ensemble."""
    from transfer_study.ensemble import log_ensemble_model

    root, uri = colour_project
    sizes = {"resnet18": 32, "vgg19": 32, "inception_v3": 75, "efficientnet_lite0": 40}
    # seed 2 and lr 1e-2: this tiny set's second head learns red from blue within 4 epochs
    train_cell(tiny_params(**(COLOUR_PARAMS | {"lr": 1e-2}), image_size=sizes), Cell("efficientnet_lite0", "frozen", 2),
               root, uri)
    out = root / "out"
    runs = evaluate_runs(out / "models", out / "evaluation", tiny_params().evaluate, uri)
    champion = promote_champion(RegisterPaths(out / "evaluation" / "runs.csv", out / "models", root, out / "registry"),
                                "colour-classifier", uri)

    mlflow.set_tracking_uri(uri)
    files = {}  # run → its logged model's weights file and config.json content
    for run, model_uri in sorted(zip(runs["run"], runs["model_uri"])):
        weights, config = classifier_files(Path(mlflow.artifacts.download_artifacts(
            model_uri, dst_path=str(root / "members" / run))))
        files[run] = (weights, json.loads(config.read_text()))
    members = [(weights, with_serving_options(config, tta=n == 0, temperature=1.0))
               for n, (weights, config) in enumerate(files.values())]
    spec = {"class_names": ["blue", "red"], "temperature": 2.0,
            "members": [{"run": run, "tta": n == 0} for n, run in enumerate(files)]}
    experiment = mlflow.get_experiment_by_name(tiny_params().tracking.experiment)
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="ensemble"):
        info = log_ensemble_model(members, spec)
    version = mlflow.register_model(info.model_uri, "colour-classifier")
    mlflow.MlflowClient(uri).set_registered_model_alias("colour-classifier", "ensemble", version.version)
    return {"uri": uri, "champion": champion, "files": files, "members": members}


def test_pyfunc_classifies_raw_images_in_process(trained_model):
    uri, model_uri = trained_model
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    answer = model.predict(pd.DataFrame({"image": [_png_b64(_garment("red", 1)), _png_b64(_garment("blue", 2))]}))
    assert list(answer["label"]) == ["red", "blue"]
    assert set(answer.columns) == {"label", "prob_blue", "prob_red"}


def test_flips_and_temperature_act_on_the_networks_output_in_process(trained_model, tmp_path):
    import torch

    uri, model_uri = trained_model
    mlflow.set_tracking_uri(uri)
    weights, config = classifier_files(Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path))))
    config = json.loads(config.read_text())
    assert config["tta"] is False and config["temperature"] == 1.0  # what training logs
    plain = _member(weights, config, tmp_path / "plain")
    batch = plain.model_input(_colour_images())
    with torch.inference_mode():
        network, mirrored = (torch.softmax(plain.model(x), 1).numpy() for x in (batch, batch.flip(-1)))
    assert np.allclose(plain.probabilities(_colour_images()), network, atol=1e-6)
    flipping = _member(weights, with_serving_options(config, tta=True, temperature=3.0), tmp_path / "flipping")
    assert np.allclose(flipping.probabilities(_colour_images()), temperature_scaled((network + mirrored) / 2, 3.0),
                       atol=1e-6)


def test_a_model_that_answers_wrongly_is_not_logged(monkeypatch):
    """log_pyfunc's own answer check (in place of MLflow's input-example round trip) stops a model
    whose answer breaks the signature before anything is logged."""
    from transfer_study import serve

    class Shuffled(serve.ServedClassifier):
        class_names = ["blue", "red"]

        def probabilities(self, images):
            return np.full((len(images), 2), 0.7)  # rows do not sum to 1

    monkeypatch.setattr(mlflow.pyfunc, "log_model", lambda **kwargs: pytest.fail("logged anyway"))
    with pytest.raises(RuntimeError, match=r"probability sums \[1.4 1.4\]"):
        serve.log_pyfunc(Shuffled(), {}, ["blue", "red"], ("none",), loaded=Shuffled())
    serve.check_answer(type("Fine", (Shuffled,), {"probabilities": lambda self, im: np.full((len(im), 2), 0.5)})(),
                       ["blue", "red"])


def test_bad_inputs_raise_a_clear_error_in_process(trained_model):
    from mlflow.exceptions import MlflowException

    uri, model_uri = trained_model
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame({"image": ["%%% not base64 %%%"]}))
    assert error.value.message == "row 0: 'image' is not valid base64; encode the file bytes with base64"
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"plain text, not an image").decode()]}))
    assert error.value.message == ("row 0: the file is not an image (PNG, JPEG or WebP) Pillow can read; use a JPEG, "
                                   "PNG or WebP file")


@pytest.fixture(scope="module")
def refused() -> dict[str, tuple[list[str], str]]:
    """Requests that MLflow's schema accepts (strings in column 'image') but the pyfunc's own checks
    (serve.images_from_request, decode_image) refuse: name -> (images, start of the project's message)."""
    huge = io.BytesIO()
    Image.new("L", (7100, 7100)).save(huge, format="PNG")  # 50 megapixels, a few hundred KB compressed
    good = _png_b64(_garment("red", 0))
    return {
        "not base64": (["@@@ not base64 @@@"], "row 0: 'image' is not valid base64; encode the file bytes with base64"),
        "empty": ([""], "row 0: 'image' must be a non-empty base64 string of a PNG, JPEG or WebP file"),
        "not an image": ([base64.b64encode(b"hello world").decode()],
                         "row 0: the file is not an image (PNG, JPEG or WebP) Pillow can read; use a JPEG, PNG or "
                         "WebP file"),
        "second row": ([good, "@@@"], "row 1: 'image' is not valid base64; encode the file bytes with base64"),
        "50 megapixels": ([base64.b64encode(huge.getvalue()).decode()],
                          "row 0: the file is 7100x7100 pixels, more than the limit of 40000000; downscale it first"),
        "40 M characters": (["A" * 40_000_001],
                            "row 0: the encoded image is 40,000,001 characters; the limit is 40,000,000"),
        # each under the 40 M per-image cap; together over the 64 M request cap (serve.py's constants)
        "66 M characters": (["A" * 33_000_000] * 2,
                            "the request's images are 66,000,000 base64 characters together; the limit is "
                            "64,000,000: send fewer images per request"),
    }


def test_request_checks_refuse_with_the_users_message(refused):
    """The checks every served model runs before its network (serve.images_from_request): each refusal
    is a BadRequest, answered as HTTP 400, whose whole message is the one the user reads."""
    from transfer_study.serve import BadRequest, images_from_request

    blank = "row 0: 'image' must be a non-empty base64 string of a PNG, JPEG or WebP file"
    cases = {name: (pd.DataFrame({"image": images}), message) for name, (images, message) in refused.items()} | {
        "blank": (pd.DataFrame({"image": ["  \n"]}), blank),
        "not text": (pd.DataFrame({"image": [None]}), blank),
        "no rows": (pd.DataFrame({"image": []}), "the request holds no images"),
        "wrong column": (pd.DataFrame({"picture": ["x"]}), "the request needs a column named 'image'; got ['picture']"),
        "a mapping without 'image'": ({"picture": ["x"]}, "unsupported input of type dict; send a column 'image'"),
        "a number": (5, "unsupported input of type int; send a column 'image'"),
        # at the caps, not over them: the length checks pass it on, and the bytes are no image
        "40 M characters exactly": (pd.DataFrame({"image": ["A" * 40_000_000]}), refused["not an image"][1]),
        "64 M characters exactly": (pd.DataFrame({"image": ["A" * 32_000_000] * 2}), refused["not an image"][1]),
    }
    for name, (request, message) in cases.items():
        with pytest.raises(BadRequest) as error:
            images_from_request(request)
        assert str(error.value) == message, name

    good = _png_b64(_garment("red", 0))
    # The forms MLflow hands a pyfunc: a frame, the `inputs` list, a mapping, an array, a Series.
    forms = [pd.DataFrame({"image": [good, good]}), [good, good], {"image": [good, good]}, np.array([good, good]),
             pd.Series([good, good]), {"image": good}]
    for form, count in zip(forms, [2, 2, 2, 2, 2, 1]):
        images = images_from_request(form)
        assert [(img.size, img.mode) for img in images] == [((96, 96), "RGB")] * count, type(form)


def test_weights_are_checked_against_the_checksum_logged_with_them(tmp_path):
    import warnings

    from transfer_study.serve import CorruptModel, verify_weights

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"the weights")
    digest = hashlib.sha256(b"the weights").hexdigest()
    verify_weights(weights, digest)
    with pytest.raises(CorruptModel) as error:
        verify_weights(weights, "0" * 64)
    assert str(error.value) == (f"model artifact '{weights}' is corrupt: checksum mismatch (SHA-256 {digest[:16]}…, "
                                f"config.json records {'0' * 16}…); log or download the model again")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verify_weights(weights, None)  # logged before checksums were recorded: loads, with a warning
    assert [str(w.message) for w in caught] == [
        f"model weights '{weights}' have no recorded checksum and cannot be verified"]


def test_the_answer_names_the_most_probable_class_and_every_probability():
    from transfer_study.serve import prediction_frame

    probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.2, 0.3]], dtype=np.float32)
    frame = prediction_frame(probs, ["coat", "shirt", "trouser"])
    assert list(frame.columns) == ["label", "prob_coat", "prob_shirt", "prob_trouser"]
    assert frame["label"].tolist() == ["shirt", "coat"]
    assert (frame.dtypes[1:] == "float64").all() and np.allclose(frame.iloc[:, 1:].to_numpy(), probs)


def test_the_pyfuncs_own_checks_refuse_what_the_schema_lets_through(trained_model, refused):
    from mlflow.exceptions import MlflowException

    uri, model_uri = trained_model
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()  # no MLflow schema check in front
    assert list(model.predict(None, pd.DataFrame({"image": [_png_b64(_garment("blue", 1))]}))["label"]) == ["blue"]
    cases = dict(refused) | {"no image column": (None, "the request needs a column named 'image'; got ['picture']")}
    for name, (images, message) in cases.items():
        frame = pd.DataFrame({"image": images} if images else {"picture": ["x"]})
        with pytest.raises(MlflowException) as error:
            model.predict(None, frame)
        assert error.value.message == message, name
        assert error.value.error_code == "INVALID_PARAMETER_VALUE", name  # served as HTTP 400


def test_served_small_cnn_sees_what_training_saw(tmp_path, tracking_uri):
    """Raw 28 px garments through preprocess, split and training at 28 px; the served model, given the
    raw files, resizes them to 28 px as training did and returns predictions.csv's probabilities."""
    import numpy as np

    from transfer_study.client import encode_file
    from transfer_study.config import SplitParams
    from transfer_study.preprocess import preprocess_dataset
    from transfer_study.split import write_manifest

    params = tiny_params(epochs=1)
    raw = make_raw_project(tmp_path)
    preprocess_dataset(raw, tmp_path / "data" / "cropped", params.preprocess)
    write_manifest(tmp_path / "data" / "cropped", tmp_path / params.paths.manifest, SplitParams())
    run_dir = train_cell(params, Cell("small_cnn", "scratch", 0), tmp_path, tracking_uri)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["image_size"] == 28

    predictions = pd.read_csv(run_dir / "predictions.csv")
    raw_files = sorted(raw.glob("*/*.png"))
    answer = mlflow.pyfunc.load_model(info["model_uri"]).predict(
        pd.DataFrame({"image": [encode_file(f) for f in raw_files]}))
    for file, (_, served) in zip(raw_files, answer.iterrows()):
        trained = predictions[predictions["path"].str.endswith(f"{file.parent.name}/{file.stem}.png")]
        assert len(trained) == 1, file
        expected = trained[[f"prob_{k}" for k in range(len(info["class_names"]))]].to_numpy()[0]
        np.testing.assert_allclose(served[[f"prob_{n}" for n in info["class_names"]]].to_numpy(float), expected,
                                   atol=1e-5, err_msg=str(file))
    assert len(raw_files) == len(predictions) == 18


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _serve(model_uri: str, tracking_uri: str, log_dir: Path):
    """`mlflow models serve` of model_uri on a free loopback port: yields its base URL, then stops it."""
    port = _free_port()
    # As `make serve` / `transfer-study serve` run it: the environment's tools first on PATH (uvicorn).
    env = tool_environment(dict(os.environ), Path(sys.executable).parent, tracking_uri)
    log = (log_dir / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
         "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited early; see {log.name}")
        try:
            with urllib.request.urlopen(base + "/ping", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("mlflow models serve did not answer /ping within 180 s")
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(served_models, tmp_path_factory):
    """The registered model's @champion: the calibrated model the register stage chose."""
    yield from _serve("models:/colour-classifier@champion", served_models["uri"], tmp_path_factory.mktemp("serve_log"))


@pytest.fixture(scope="module")
def ensemble_server(served_models, tmp_path_factory):
    yield from _serve("models:/colour-classifier@ensemble", served_models["uri"], tmp_path_factory.mktemp("serve_log"))


def _good_request() -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[_png_b64(_garment("red", 2))]]}}).encode()


def _check_answers_and_bad_requests(server: str, tmp_path: Path) -> pd.DataFrame:
    """Good requests in both forms get the right label, bad ones a 4xx JSON message, and the
    server keeps serving; gives back `transfer-study predict`'s answer for a red and a blue image."""
    invocations = server + "/invocations"
    status, answer = _post(invocations, _good_request())
    assert status == 200 and answer["predictions"][0]["label"] == "red"

    status, answer = _post(invocations, json.dumps({"inputs": [_png_b64(_garment("blue", 1))]}).encode())
    assert status == 200 and answer["predictions"][0]["label"] == "blue"

    huge = io.BytesIO()
    Image.new("L", (7100, 7100)).save(huge, format="PNG")  # 50 megapixels, a few hundred KB compressed
    bad_requests = {
        "not base64": {"dataframe_split": {"columns": ["image"], "data": [["@@@ not base64 @@@"]]}},
        "not an image": {"dataframe_split": {"columns": ["image"],
                                             "data": [[base64.b64encode(b"hello world").decode()]]}},
        "wrong column": {"dataframe_split": {"columns": ["picture"], "data": [[_png_b64(_garment("red", 0))]]}},
        "50 megapixels": {"inputs": [base64.b64encode(huge.getvalue()).decode()]},
    }
    for name, body in bad_requests.items():
        status, answer = _post(invocations, json.dumps(body).encode())
        assert 400 <= status < 500, f"{name}: status {status}"
        assert "Traceback" not in json.dumps(answer), f"{name}: traceback in the answer"
        assert answer.get("message"), f"{name}: no message"
    status, _ = _post(invocations, b"")
    assert 400 <= status < 500, f"empty body: status {status}"

    status, answer = _post(invocations, _good_request())
    assert status == 200 and answer["predictions"][0]["label"] == "red", "the server stopped serving"

    paths = [tmp_path / "red.png", tmp_path / "blue.png"]
    _garment("red", 3).save(paths[0])
    _garment("blue", 4).save(paths[1])
    frame = client.predict_images(server, paths).frame
    assert frame["label"].tolist() == ["red", "blue"]
    probs = frame[["prob_blue", "prob_red"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0) and ((probs >= 0) & (probs <= 1)).all()
    return frame


def _member(weights: Path, config: dict, folder: Path) -> ImageClassifier:
    """An ImageClassifier loaded from weights and a config.json written to folder (a fresh one)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return ImageClassifier().load(weights, folder / "config.json")


@pytest.mark.slow
def test_real_server_answers_with_the_calibrated_champion_and_survives_bad_requests(server, served_models, tmp_path):
    frame = _check_answers_and_bad_requests(server, tmp_path)

    # The champion is its members' networks with the flips and the temperature register chose.
    champion, files = served_models["champion"], served_models["files"]
    members = [_member(files[m["run"]][0], with_serving_options(files[m["run"]][1], m["tta"], 1.0), tmp_path / m["run"])
               for m in champion["members"]]
    mean = np.mean([m.probabilities(_colour_images()) for m in members], axis=0)
    # register serves its fitted T only when the fit can be trusted (calibration.choose_temperature): the
    # colour runs make few validation mistakes, so T = 1 may be served here; the answer must be the
    # members' mean at whichever T champion.json names (test_registry serves a fitted T end to end).
    assert champion["temperature"] == (1.0 if champion["temperature_note"] else champion["temperature_fitted"])
    assert np.allclose(frame[["prob_blue", "prob_red"]].to_numpy(), temperature_scaled(mean, champion["temperature"]),
                       atol=1e-5)


@pytest.mark.slow
def test_real_server_answers_with_the_ensemble_as_with_a_single_model(ensemble_server, served_models, tmp_path):
    frame = _check_answers_and_bad_requests(ensemble_server, tmp_path)

    # The mean of the members (each at its own input size, the first flipping), at temperature 2.
    members = [_member(weights, config, tmp_path / str(n))
               for n, (weights, config) in enumerate(served_models["members"])]
    assert [m.image_size for m in members] == [32, 40] and [m.tta for m in members] == [True, False]
    mean = np.mean([m.probabilities(_colour_images()) for m in members], axis=0)
    assert np.allclose(frame[["prob_blue", "prob_red"]].to_numpy(), temperature_scaled(mean, 2.0), atol=1e-5)
    assert not np.allclose(mean, members[1].probabilities(_colour_images()), atol=1e-3)


@pytest.mark.slow
def test_real_server_answers_and_survives_bad_requests(server, refused, tmp_path):
    invocations = server + "/invocations"
    status, answer = _post(invocations, _good_request())
    assert status == 200 and answer["predictions"][0]["label"] == "red"

    status, answer = _post(invocations, json.dumps({"inputs": [_png_b64(_garment("blue", 1))]}).encode())
    assert status == 200 and answer["predictions"][0]["label"] == "blue"

    for name, (images, message) in refused.items():
        body = {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}
        status, answer = _post(invocations, json.dumps(body).encode())
        assert status == 400, f"{name}: status {status}"
        assert f"Error: {message}" in answer.get("message", ""), f"{name}: not the pyfunc's refusal"
        assert "Traceback" not in json.dumps(answer), f"{name}: traceback in the answer"
    # MLflow's schema check, before the pyfunc: a wrong column
    wrong_column = {"dataframe_split": {"columns": ["picture"], "data": [[_png_b64(_garment("red", 0))]]}}
    status, answer = _post(invocations, json.dumps(wrong_column).encode())
    assert 400 <= status < 500 and answer.get("message") and "Traceback" not in json.dumps(answer)
    status, _ = _post(invocations, b"")
    assert 400 <= status < 500, f"empty body: status {status}"

    status, answer = _post(invocations, _good_request())
    assert status == 200 and answer["predictions"][0]["label"] == "red", "the server stopped serving"

    image = tmp_path / "red.png"
    _garment("red", 3).save(image)
    frame = client.predict_images(server, [image]).frame
    assert frame["label"].tolist() == ["red"]


@pytest.mark.slow
def test_predict_names_the_file_the_server_refused(server, tmp_path, monkeypatch):
    """A text file and a cut-short PNG: left out before sending, naming the file, while the good one is
    classified; and, when sent anyway, the server's "row 1: ..." comes back naming the file, without
    MLflow's dump of the request."""
    from transfer_study.config import UserError

    good, text, broken = tmp_path / "red.png", tmp_path / "notes.png", tmp_path / "cut.png"
    _garment("red", 1).save(good)
    text.write_text("a shopping list, not a photo")
    broken.write_bytes(good.read_bytes()[:100])
    for bad, why in ((text, "is not an image (PNG, JPEG or WebP) Pillow can read"), (broken, "is corrupt or truncated")):
        checked = client.predict_images(server, [good, bad])
        assert checked.frame["image"].tolist() == [str(good)] and checked.frame["label"].tolist() == ["red"]
        (skipped,) = checked.skipped
        assert skipped.startswith(f"'{bad}' {why}")
        with monkeypatch.context() as unchecked:
            unchecked.setattr(client, "check_images", lambda images: (images, []))
            with pytest.raises(UserError) as refused:
                client.predict_images(server, [good, bad])
        message = str(refused.value)
        assert message.startswith(f"the server at {server} refused '{bad}' (400): the file {why}"), message
        assert "Failed to predict" not in message and "iVBOR" not in message and "row 1" not in message


def test_importing_the_model_prints_no_warning():
    """Training, serving and loading import serve.py; MLflow's type-hint advice does not apply to it."""
    result = subprocess.run([sys.executable, "-W", "default", "-c", "import transfer_study.serve"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == ""


def test_predict_client_reports_an_unreachable_server(tmp_path):
    from transfer_study.config import UserError

    image = tmp_path / "x.png"
    _garment("red", 0).save(image)
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(UserError) as error:
        client.predict_images(url, [image], timeout=5)
    # the middle is the system's reason (connection refused), worded by the OS
    advice = "); start one with `make serve` (the champion of the profile you ran), or pass --url"
    assert re.fullmatch(re.escape(f"cannot reach a model server at {url} (") + ".+" + re.escape(advice),
                        str(error.value)), str(error.value)


def test_requirements_add_what_the_cropper_needs():
    from transfer_study import serve

    plain = serve.requirements(("foreground",))
    assert any(r.startswith(("mlflow==", "mlflow-skinny==")) for r in plain)
    assert not any(r.startswith("scikit-image==") for r in plain)
    assert any(r.startswith("scikit-image==") for r in serve.requirements(("foreground", "proposals")))

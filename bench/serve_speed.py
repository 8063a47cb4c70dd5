"""Section `serve`: latency and throughput of `mlflow models serve --env-manager local`.

Two models are served the same way, one at a time, on loopback:
- the classifier: the quick profile's `@champion` in the given tracking store if there is one,
  else a Lite0-frozen model trained here for 1 epoch on data/cropped into a temporary store;
- the baseline, bench/noop_model.py, which returns its input's length: the server's own floor.

Each gets 1 and then 8 concurrent clients (threads + urllib, a new connection per request)
for a fixed time, each request one real base64 PNG from data/raw. The classifier's in-process
`pyfunc.predict` on that image is timed too, for the target
"p50 ≤ forward + 1.5 × no-op p50" (1 client) and "no errors under 8 clients".

mlflow is imported inside the functions: the GPU machine has no mlflow, and the other sections
must still import.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from table import Row
from timing import median_seconds, percentile

BENCH_DIR = Path(__file__).resolve().parent
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound on each client's loop besides the deadline
SERVER_START_TIMEOUT_S = 180


def request_body(image: Path) -> bytes:
    """One image as the server's `dataframe_split` JSON, as `transfer-study predict` sends it."""
    encoded = base64.b64encode(image.read_bytes()).decode("ascii")
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}).encode()


def load_test(url: str, body: bytes, clients: int, seconds: float) -> dict:
    """`clients` threads POST `body` to `url` back to back until `seconds` pass.

    Returns p50/p99 latency (ms, successful requests), requests/s (successful) and the error count.
    """
    deadline = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(i: int) -> None:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= deadline:
                return
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                latencies[i].append(time.perf_counter() - started)
            except (urllib.error.URLError, OSError):
                errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    elapsed = time.perf_counter() - started
    ok = [x for per_client in latencies for x in per_client]
    return {
        "clients": clients, "seconds": elapsed, "requests": len(ok), "errors": sum(errors),
        "p50_ms": percentile(ok, 50) * 1000 if ok else float("nan"),
        "p99_ms": percentile(ok, 99) * 1000 if ok else float("nan"),
        "req_s": len(ok) / elapsed,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelServer:
    """`mlflow models serve` in a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, model_uri: str, tracking_uri: str, log_path: Path):
        self.model_uri, self.tracking_uri, self.log_path = model_uri, tracking_uri, log_path

    def __enter__(self) -> str:
        port = _free_port()
        # mlflow starts `uvicorn` by name: put this interpreter's bin folder (the venv's) first on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = dict(os.environ, MLFLOW_TRACKING_URI=self.tracking_uri, PATH=path)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + SERVER_START_TIMEOUT_S
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2):
                    return base + "/invocations"
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"mlflow models serve did not answer /ping in {SERVER_START_TIMEOUT_S} s; "
                           f"see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def champion_uri(tracking_uri: str, registered_model: str) -> str | None:
    """`models:/<name>@champion` if that alias exists in the store; never creates a store."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri).get_model_version_by_alias(registered_model, "champion")
    except MlflowException:
        return None
    return f"models:/{registered_model}@champion"


def train_tiny_model(root: Path, params, tmp: Path) -> tuple[str, str]:
    """Lite0-frozen, 1 epoch on the project's crops, in a temporary project and MLflow store.

    The temporary project links the real data/ folder, so train_cell reads the same manifest
    and crops but writes its checkpoints, outputs and artifacts under `tmp`.
    Returns (model URI, tracking URI).
    """
    from transfer_study.cells import Cell
    from transfer_study.train import train_cell

    project = tmp / "serve-project"
    project.mkdir(parents=True, exist_ok=True)
    if not (project / "data").exists():
        (project / "data").symlink_to(root / "data")
    tracking = f"sqlite:///{project / 'mlflow.db'}"
    train = dataclasses.replace(params.train, architectures=("efficientnet_lite0",), conditions=("frozen",),
                                seeds=(0,), exclude=(), epochs=1)
    params = dataclasses.replace(params, train=train, paths=dataclasses.replace(params.paths, outputs="outputs"))
    run_dir = train_cell(params, Cell("efficientnet_lite0", "frozen", 0), project, tracking)
    return json.loads((run_dir / "run.json").read_text())["model_uri"], tracking


def save_noop_model(tmp: Path) -> str:
    import mlflow

    path = tmp / "noop-model"
    if not path.exists():
        mlflow.pyfunc.save_model(str(path), python_model=str(BENCH_DIR / "noop_model.py"))
    return str(path)


def in_process_predict_ms(model_uri: str, tracking_uri: str, body: bytes, repeats: int = 30) -> float:
    """Median ms of the classifier's own pyfunc.predict on the request's image, in this process."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    split = json.loads(body)["dataframe_split"]
    frame = pd.DataFrame(split["data"], columns=split["columns"])
    seconds, _ = median_seconds(lambda: model.predict(frame), repeats, warmup=3)
    return seconds * 1000


def run(root: Path, params, tracking_uri: str, seconds: float, tmp: Path,
        concurrency: tuple[int, ...] = (1, 8)) -> list[Row]:
    image = sorted((root / params.paths.raw).rglob("*.png"))[0]
    body = request_body(image)
    model_uri = champion_uri(tracking_uri, params.tracking.registered_model)
    if model_uri is not None:
        source = f"{model_uri} from {tracking_uri}"
    else:
        started = time.perf_counter()
        model_uri, tracking_uri = train_tiny_model(root, params, tmp)
        source = f"no champion in the store: Lite0-frozen trained 1 epoch here ({time.perf_counter() - started:.0f} s)"
    forward_ms = in_process_predict_ms(model_uri, tracking_uri, body)
    noop_uri = save_noop_model(tmp)

    results = {}
    for name, uri in (("model", model_uri), ("noop", noop_uri)):
        with ModelServer(uri, tracking_uri, tmp / f"serve-{name}.log") as url:
            load_test(url, body, 1, min(3.0, seconds))  # warm-up: first requests load lazily
            results[name] = {c: load_test(url, body, c, seconds) for c in concurrency}

    rows = []
    for c in concurrency:
        m, n = results["model"][c], results["noop"][c]
        clients = f"{c} client{'s' if c > 1 else ''}"
        rows += [
            Row("serve", f"p50 latency, {clients}", "ms", m["p50_ms"], n["p50_ms"], extra={"model": m, "noop": n},
                note=f"{m['requests']:,} requests in {m['seconds']:.0f} s"),
            Row("serve", f"p99 latency, {clients}", "ms", m["p99_ms"], n["p99_ms"]),
            Row("serve", f"requests/s, {clients}", "req/s", m["req_s"], n["req_s"]),
            Row("serve", f"errors, {clients}", "count", m["errors"], n["errors"], target="= 0",
                met=m["errors"] == 0 if c == max(concurrency) else None),
        ]
    one = results["model"][min(concurrency)]
    budget = forward_ms + 1.5 * results["noop"][min(concurrency)]["p50_ms"]
    rows.append(Row("serve", "in-process pyfunc.predict, 1 image", "ms", forward_ms, one["p50_ms"],
                    note="baseline: served p50 (1 client); ratio = share of it spent in the model"))
    rows.append(Row("serve", "served p50 vs forward + 1.5 × no-op p50", "ms", one["p50_ms"], budget,
                    target="ratio ≤ 1", met=one["p50_ms"] <= budget, note=source))
    return rows

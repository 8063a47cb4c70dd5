"""What a Ray task does on a node of the cluster for the `ray` executor (fanout.py is the driver).

`train_run` trains one run: it unpacks the data the driver shipped through Ray's object store
(params, manifest, crops) once per node, under `<tmp>/transfer-study-fanout/<node>/<bundle>/`,
runs the same one-run command as the local executor there in a fresh subprocess, and returns the
run folder's files. A run's resume state stays on its node, so a retry on the same node resumes
its MLflow run; a retry elsewhere marks the run its dead node left RUNNING as FAILED first.

`time_on_node` is the preflight's part: the weights check and the timed steps, on a node's device.

Nothing here imports torch in the Ray worker itself except `time_on_node`: a run's GPU memory
belongs to its subprocess and is freed when it exits, which is why the worker may be reused.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import config, tracking

PARAMS_FILE = "params.yaml"  # the driver's params file, under this name in the node's project
NODE_ROOT = "transfer-study-fanout"
# Variables a run must not take from the node: another run's MLflow run or experiment (`mlflow run`
# sets MLFLOW_RUN_ID), a DVC stage's or torchrun's settings, and tracking settings, which come
# from the driver (NodeJob.environment).
DROPPED_PREFIXES = ("MLFLOW_TRACKING_", "DVC_")
DROPPED_VARIABLES = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_CONTEXT",
                     "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")
GRACE_S = 30.0  # after SIGINT, how long a run has to mark its MLflow run and stop, before SIGKILL


class RunCrashed(Exception):
    """The run's process was killed (a signal): Ray retries the task (executor.max_retries)."""


class RunFailed(Exception):
    """The run stopped with an error of its own (bad data, missing weights ...): not retried."""


@dataclass(frozen=True)
class NodeJob:
    """One run, as the driver hands it to a node."""

    run_name: str  # cells.Cell.name
    args: tuple[str, ...]  # the transfer-study command line that trains this run alone
    run_folder: str  # where that command writes the run folder, relative to the project
    resume_marker: str  # checkpoints.WorkDir.run_id_file, relative to the project: there, the run resumes
    fingerprint: str  # the run's result fingerprint, as the driver computed it
    experiment: str
    bundle_key: str
    code_digest: str  # the driver's transfer_study source; the node's must be the same
    environment: dict[str, str]  # MLFLOW_TRACKING_URI and the tracking credentials
    tags: dict[str, str]  # tags every run gets (the driver's git commit ...)
    num_gpus: float
    threads: int  # OMP_NUM_THREADS for the run


# --------------------------------------------------------------------------------------------
# Pure: files as bytes, the run's environment
# --------------------------------------------------------------------------------------------


def pack_files(files: dict[str, Path]) -> bytes:
    """A tar of `files` (name in the tar: file), the same bytes for the same files (sorted, no times or owners)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in sorted(files):
            data = files[name].read_bytes()
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), 0o644
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def pack_folder(folder: Path) -> bytes:
    """Every file under `folder`, named relative to it."""
    return pack_files({p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()})


def unpack(data: bytes, dest: Path) -> None:
    """Write pack_files' tar under `dest` (regular files only, nothing outside it)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def write_folder(dest: Path, fill: Callable[[Path], object]) -> None:
    """Replace folder `dest` with what `fill` writes into a new folder: whole or not at all (the
    new one is filled beside it, then renamed)."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    fill(partial)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def code_digest() -> str:
    """A hash of this package's source: the driver's and every node's must agree."""
    package = Path(__file__).parent
    return digest(b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in sorted(package.glob("*.py"))))


def run_environment(base: dict[str, str], job: NodeJob, tags: dict[str, str]) -> dict[str, str]:
    """The run's environment: the node's (`base`, with CUDA_VISIBLE_DEVICES as Ray set it for the
    task) without DROPPED_*, the driver's tracking settings, `tags` for every run it creates
    (MLflow's MLFLOW_RUN_CONTEXT) and its threads. A run without a GPU sees none."""
    env = {k: v for k, v in base.items() if k not in DROPPED_VARIABLES and not k.startswith(DROPPED_PREFIXES)}
    env |= job.environment
    env["MLFLOW_RUN_CONTEXT"] = json.dumps(tags)
    env["OMP_NUM_THREADS"] = str(job.threads)
    env["PYTHONUNBUFFERED"] = "1"
    if job.num_gpus == 0:  # Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def failure_summary(log: str, lines: int = 15) -> str:
    """What to show of a failed run's log: its `error:` line (a UserError), else its last lines."""
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    return errors[-1] if errors else "\n".join(log.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Edges: the node's project folder, the run's process
# --------------------------------------------------------------------------------------------


def node_identity() -> tuple[str, str]:
    """(node id, node name) of the node this task runs on; the name is `ray start --node-name`, by default its IP."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    name = next((n.get("NodeName") or n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), node_id)
    return node_id, name


def project_on_node(node_id: str, bundle_key: str, bundle: list) -> Path:
    """The node's copy of the driver's project files, unpacked once per node and bundle under a file
    lock (runs start on a node together). `bundle` holds the object store's reference to the tar."""
    import ray

    base = Path(tempfile.gettempdir()) / NODE_ROOT / node_id[:16]
    base.mkdir(parents=True, exist_ok=True)
    project = base / bundle_key
    with open(base / f"{bundle_key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not project.is_dir():
            write_folder(project, lambda partial: unpack(ray.get(bundle[0]), partial))
    return project


@contextmanager
def environment_of(variables: dict[str, str]) -> Iterator[None]:
    """Set `variables` in this process for the body (MLflow's client reads the credentials there)."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interrupt_with_parent() -> None:
    """In the run's process, before exec: SIGINT when the Ray worker dies (the driver cancelled the
    task), which train.py answers by marking its MLflow run KILLED and keeping its resume state."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def run_process(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> int:
    """Run `command` with its output in `log`; interrupted, it gets SIGINT and GRACE_S to stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=_interrupt_with_parent)
        try:
            return child.wait()
        except BaseException:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
            raise


def check_code(expected: str, node: str) -> None:
    if code_digest() != expected:
        raise RunFailed(f"node {node} runs other transfer_study code than the driver; check out the driver's "
                        f"commit there (git checkout <commit> && make setup) and rerun")


def train_run(job: NodeJob, bundle: list) -> dict:
    """Train one run on this node; return its run folder's files (pack_folder) and where it ran.

    Raises RunFailed for the run's own errors and RunCrashed when its process was killed."""
    node_id, node = node_identity()
    check_code(job.code_digest, node)
    project = project_on_node(node_id, job.bundle_key, bundle)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "") if job.num_gpus else ""
    abandoned: list[str] = []
    if not (project / job.resume_marker).is_file():
        # No resume state here: a RUNNING run of these params was left by a node that died.
        with environment_of(job.environment):
            abandoned = tracking.fail_abandoned_runs(job.environment["MLFLOW_TRACKING_URI"], job.experiment,
                                                     job.run_name, job.fingerprint)
    tags = job.tags | {"executor": "ray", "ray_node": node, "ray_node_id": node_id, "cuda_visible_devices": gpus}
    log = project / "logs" / f"{job.run_name}.log"
    started = time.monotonic()
    code = run_process([sys.executable, "-m", "transfer_study.cli", *job.args], project,
                       run_environment(config.environment(), job, tags), log)
    summary = failure_summary(log.read_text(errors="replace"))
    if code < 0:
        raise RunCrashed(f"{job.run_name} on node {node}: its process was killed (signal {-code}); last lines:\n{summary}")
    if code != 0:
        raise RunFailed(f"{job.run_name} on node {node}: {summary} (its log: {log})")
    folder = project / job.run_folder
    info = json.loads((folder / "run.json").read_text())
    if info["fingerprint"] != job.fingerprint:
        raise RunFailed(f"{job.run_name} on node {node} trained under fingerprint {info['fingerprint']}, the driver "
                        f"expected {job.fingerprint}: the node's data or code differ from the driver's")
    files = pack_folder(folder)
    shutil.rmtree(folder)  # the driver keeps it; the node keeps only what resumes and what others reuse
    return {"files": files, "node": node, "gpus": gpus, "seconds": time.monotonic() - started,
            "abandoned": abandoned, "run_id": info["run_id"]}


def weights_on_node(cells, t) -> tuple[str, list]:
    """The preflight's weights check (plan.ThisMachine) on this node: (its name, the statuses)."""
    from .plan import ThisMachine

    return node_identity()[1], ThisMachine().check_weights(cells, t)


def time_on_node(params, cells, sizes, num_classes: int, thorough: bool) -> dict:
    """The preflight's timing on this node: its device, each cell's estimate (plan.ThisMachine),
    and the seconds a run's process takes to start (its imports)."""
    from .plan import ThisMachine

    device, estimates = ThisMachine().estimate(params, cells, sizes, num_classes, thorough)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import transfer_study.train"], check=True)
    return {"node": node_identity()[1], "device": device, "estimates": estimates,
            "start_s": time.monotonic() - started}

"""The `ray` executor's driver: every run of a profile as one task on a Ray cluster (`executor.kind: ray`).

Each task runs the local executor's one-run command (`transfer-study train --arch A --condition C
--run V`) in a fresh process on a node (fanout_node.py), with `executor.num_gpus` (Ray gives it its
own CUDA_VISIBLE_DEVICES) and `executor.num_cpus`, and is retried up to `executor.max_retries`
times when its node or process dies. Here, on the driver:

- what cannot work is refused before any run starts: no node can take a run (Ray would wait for
  ever), or a tracking store that the nodes cannot share (SQLite, or an experiment whose artifacts
  go to a local folder) while runs may land on another machine;
- a run that already finished with the same result fingerprint (its run folder, or the copy kept
  under `checkpoints/fanout/`, names a FINISHED run of the experiment) is not trained again;
- the files the runs read (params, manifest, crops) go to the nodes once, through Ray's object
  store, since they do not share this machine's disk;
- the cells' parent runs are created before the runs start, so runs of a cell that start at
  once on several nodes nest under one;
- each run folder comes back through the object store and is kept under
  `checkpoints/fanout/<run>-<fingerprint>/` (outside DVC's outs), then written where the local
  executor writes it, so evaluate, report and register read the same files.

A train command fans out every run of the profile that is not done, whichever cell it names: DVC
runs the train stages one after another, so the first trains them all at once and the later ones
find their results kept.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from . import config, fanout_node, tracking
from .cells import Cell, cells_for, runs_per_group
from .checkpoints import CHECKPOINT_DIR, WorkDir
from .config import ExecutorParams, Params, UserError
from .plan import CellEstimate, SplitSizes, WeightsStatus, format_duration
from .runs import RUN_JSON, run_dir_for

RESULTS_DIR = "fanout"  # under checkpoints/: every run folder a fan-out brought back
WATCH_S = 5.0  # while no run finishes, how often the driver checks that some node can still take the rest


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Pure: the cluster's capacity, what the tracking store must be, the fan-out's wall time
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    node_id: str
    name: str  # `ray start --node-name`, by default its IP
    address: str
    gpus: float
    cpus: float


@dataclass(frozen=True)
class Cluster:
    address: str
    nodes: tuple[Node, ...]  # the alive ones
    driver_node_id: str  # the node this driver runs on

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)


def runs_at_once(node: Node, e: ExecutorParams) -> int:
    """How many runs asking for executor.num_gpus and .num_cpus the node runs at the same time."""
    limits = [math.floor(have / need + 1e-9) for have, need in ((node.gpus, e.num_gpus), (node.cpus, e.cpus_per_run))
              if need > 0]
    return min(limits)


def describe_request(e: ExecutorParams) -> str:
    return f"{e.num_gpus:g} GPU and {e.cpus_per_run:g} CPU"


def check_resources(cluster: Cluster, e: ExecutorParams) -> None:
    """UserError unless some node can take a run: Ray would otherwise keep the runs waiting for ever."""
    if any(runs_at_once(n, e) for n in cluster.nodes):
        return
    nodes = "; ".join(f"{n.name}: {n.gpus:g} GPUs, {n.cpus:g} CPUs" for n in cluster.nodes)
    fix = ("start the GPU hosts with `ray start --address <head> --num-gpus N`, or set executor.num_gpus: 0 to "
           "train on CPUs" if e.num_gpus > 0 else "lower executor.num_cpus")
    raise UserError(f"no node of the Ray cluster at {cluster.address} can take a run asking for {describe_request(e)} "
                    f"(executor.num_gpus, executor.num_cpus); its nodes: {nodes}; {fix}")


def spans_machines(cluster: Cluster, e: ExecutorParams) -> bool:
    """Whether runs may land on a node other than the driver's (on another machine's disk)."""
    takers = [n for n in cluster.nodes if runs_at_once(n, e)]
    return len(takers) > 1 or any(n.node_id != cluster.driver_node_id for n in takers)


def is_local_uri(uri: str) -> bool:
    """A path or file:/sqlite: URI: storage that lives on one machine's disk."""
    return urlparse(uri).scheme in ("", "file", "sqlite")


def check_tracking(tracking_uri: str, artifact_location: str | None, cluster: Cluster, e: ExecutorParams) -> None:
    """UserError when runs on other machines could not share the tracking store or its artifacts
    (`artifact_location`: the experiment's, None when it does not exist yet)."""
    if not spans_machines(cluster, e):
        return
    server = ("start the team's tracking server (scripts/tracking-server.sh, which serves the artifacts) and set "
              "MLFLOW_TRACKING_URI=http://<host>:5000 here")
    if is_local_uri(tracking_uri):
        raise UserError(f"the tracking store {tracking_uri} is on this machine's disk, and the Ray cluster at "
                        f"{cluster.address} runs on {len(cluster.nodes)} nodes that cannot write it; {server}")
    if artifact_location is not None and is_local_uri(artifact_location):
        raise UserError(f"the experiment's artifacts go to {artifact_location}, a folder on one machine, so each "
                        f"node would write its models to its own disk; serve artifacts through the tracking server "
                        f"(scripts/tracking-server.sh) and name a new experiment (tracking.experiment): an "
                        f"experiment's artifact location is fixed when it is created")


def fanout_seconds(durations: list[float], slots: int) -> float:
    """The wall time of running `durations` on `slots` at once, longest first, each on the slot free
    first (within 4/3 of the best order)."""
    if not durations:
        return 0.0
    finish = [0.0] * max(slots, 1)
    for seconds in sorted(durations, reverse=True):
        heapq.heapreplace(finish, finish[0] + seconds)
    return max(finish)


def cluster_lines(cluster: Cluster, e: ExecutorParams, estimates: list[CellEstimate], start_s: float) -> list[str]:
    """What `transfer-study plan` adds with the ray executor: the nodes, and the fan-out's wall time
    from the runs' estimates (timed on a node) and the seconds a run's process takes to start."""
    slots = sum(runs_at_once(n, e) for n in cluster.nodes)
    lines = [f"ray cluster at {cluster.address}: {len(cluster.nodes)} nodes, {cluster.gpus:g} GPUs",
             "  node                 address            GPUs  CPUs  runs at once"]
    lines += [f"  {n.name:<20} {n.address:<17} {n.gpus:>5g} {n.cpus:>5g}  {runs_at_once(n, e):>12}"
              for n in cluster.nodes]
    wall = fanout_seconds([est.total_s + start_s for est in estimates], slots)
    lines.append(f"fan-out: {len(estimates)} runs of {describe_request(e)} each, {slots} at once: about "
                 f"{format_duration(wall)} (each run's estimate above + {start_s:.0f} s to start its process; "
                 f"logging its model and returning its files are not counted)")
    return lines


def is_done(folder: Path, fingerprint: str, finished: set[str]) -> bool:
    """Whether `folder` holds a run folder of this fingerprint whose MLflow run finished."""
    try:
        info = json.loads((folder / RUN_JSON).read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint and info.get("run_id") in finished


# --------------------------------------------------------------------------------------------
# Edges: the cluster, the files the runs read, results
# --------------------------------------------------------------------------------------------


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("executor.kind is ray, but the ray package is not installed here; run `make setup` "
                        "(requirements.lock pins it) or `pip install ray`") from None
    return ray


def connect(address: str) -> Cluster:
    """Join the Ray cluster at `address` as its driver (once per process); its alive nodes."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            # Task output stays in each node's logs; a failed run's lines come back with its error.
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot join the Ray cluster at {address} ({exc}); start its head with "
                            "`ray start --head` (README, Team setup) and set RAY_ADDRESS or executor.ray_address "
                            "to it") from None
    return cluster_state(address)


def cluster_state(address: str) -> Cluster:
    ray = _ray()
    nodes = tuple(Node(n["NodeID"], n.get("NodeName") or n["NodeManagerAddress"], n["NodeManagerAddress"],
                       n["Resources"].get("GPU", 0.0), n["Resources"].get("CPU", 0.0))
                  for n in ray.nodes() if n["Alive"])
    return Cluster(address, nodes, ray.get_runtime_context().get_node_id())


def _relative(params: Params) -> None:
    for name in ("cropped", "manifest", "outputs"):
        if Path(getattr(params.paths, name)).is_absolute():
            raise UserError(f"paths.{name} = {getattr(params.paths, name)} is absolute; the ray executor rebuilds "
                            f"the project on each node, so give it relative to the project root")


def project_bundle(params: Params, params_path: str, root: Path) -> bytes:
    """The files a run reads, as one tar for the object store: the params file (as params.yaml), the
    manifest, the crops it lists with their crop record, and data.dvc (the dataset's version)."""
    from .preprocess import CROP_RECORD
    from .split import read_manifest

    _relative(params)
    manifest = read_manifest(root / params.paths.manifest)
    names = [params.paths.manifest, (Path(params.paths.cropped) / CROP_RECORD).as_posix(), *manifest["path"]]
    files = {name: root / name for name in names} | {fanout_node.PARAMS_FILE: Path(params_path)}
    if (root / "data.dvc").is_file():
        files["data.dvc"] = root / "data.dvc"
    return fanout_node.pack_files(files)


def result_dir(root: Path, cell: Cell, fingerprint: str) -> Path:
    """Where the driver keeps a run folder that came back: `checkpoints/fanout/<run>-<fingerprint>/`."""
    return root / CHECKPOINT_DIR / RESULTS_DIR / f"{cell.name}-{fingerprint}"


def keep_result(files: bytes, dest: Path) -> None:
    """Unpack a run folder's files (fanout_node.pack_folder) to `dest`, whole or not at all."""
    fanout_node.write_folder(dest, lambda partial: fanout_node.unpack(files, partial))


def write_run_folder(kept: Path, run_dir: Path) -> None:
    """Copy a kept run folder where the local executor writes it (replacing an outdated one)."""
    fanout_node.write_folder(run_dir, lambda partial: shutil.copytree(kept, partial))


@dataclass(frozen=True)
class Fanout:
    """What one fan-out is about: the params, their file (shipped to the nodes) and the project."""

    params: Params
    params_path: str
    root: Path
    tracking_uri: str

    def run_dir(self, cell: Cell) -> Path:
        return run_dir_for(self.root / self.params.paths.outputs / "models", cell.group, cell.variant)

    @cached_property
    def code(self) -> str:
        return fanout_node.code_digest()

    @cached_property
    def commit(self) -> str:
        return tracking.git_commit(self.root)

    def job(self, cell: Cell, fingerprint: str, bundle_key: str) -> fanout_node.NodeJob:
        """The node's instructions for `cell`: the local executor's command for this one run."""
        e, p = self.params.executor, self.params
        work = WorkDir.for_run(Path(), cell.name, fingerprint)
        return fanout_node.NodeJob(
            run_name=cell.name,
            args=("--params", fanout_node.PARAMS_FILE, "train", "--arch", cell.architecture, "--condition",
                  cell.condition, "--run", cell.variant, "--executor", "local"),
            run_folder=run_dir_for(Path(p.paths.outputs) / "models", cell.group, cell.variant).as_posix(),
            resume_marker=work.run_id_file.as_posix(), fingerprint=fingerprint, experiment=p.tracking.experiment,
            bundle_key=bundle_key, code_digest=self.code, environment=config.tracking_environment(self.tracking_uri),
            tags={"git_commit": self.commit}, num_gpus=e.num_gpus,
            threads=max(1, math.floor(e.cpus_per_run)))


def fan_out(params: Params, params_path: str, requested: list[Cell], root: Path, tracking_uri: str,
            address: str) -> None:
    """Train every run of the profile that is not done on the Ray cluster at `address`, then write
    the run folders of `requested`. Raises UserError before any run for what cannot work, and after
    the others finished when runs failed."""
    e = params.executor
    cluster = connect(address)
    check_resources(cluster, e)
    check_tracking(tracking_uri, None, cluster, e)  # before a SQLite store is created
    from .train import cell_data  # torch and MLflow: after the checks, which must be quick

    job = Fanout(params, params_path, root, tracking_uri)
    fingerprints = {cell: cell_data(params, cell, root)[1] for cell in cells_for(params)}
    experiment = params.tracking.experiment
    experiment_id = tracking.ensure_experiment(tracking_uri, experiment, tracking.artifact_location_for(tracking_uri))
    check_tracking(tracking_uri, tracking.experiment_artifact_location(tracking_uri, experiment), cluster, e)
    finished = tracking.finished_run_ids(tracking_uri, experiment_id)
    todo = [cell for cell, fp in fingerprints.items()
            if not (is_done(job.run_dir(cell), fp, finished) or is_done(result_dir(root, cell, fp), fp, finished))]
    log(f"ray: {len(todo)} of {len(fingerprints)} runs to train on {len(cluster.nodes)} nodes ({cluster.gpus:g} GPUs) "
        f"at {address}, {describe_request(e)} each; {len(fingerprints) - len(todo)} finished before")
    failures = _train_on_cluster(job, todo, fingerprints, cluster, experiment_id) if todo else []
    for cell in requested:
        fp = fingerprints[cell]
        kept = result_dir(root, cell, fp)
        if not is_done(job.run_dir(cell), fp, finished) and kept.is_dir():
            write_run_folder(kept, job.run_dir(cell))
    if failures:
        listed = "\n".join(f"  {cell.name}: {message}" for cell, message in failures)
        raise UserError(f"{len(failures)} of {len(todo)} runs failed on the Ray cluster (the others are kept; "
                        f"rerun to train only the failed ones):\n{listed}")


def _train_on_cluster(job: Fanout, todo: list[Cell], fingerprints: dict[Cell, str], cluster: Cluster,
                      experiment_id: str) -> list[tuple[Cell, str]]:
    """Submit a task per run in `todo`, keep each run folder as it comes back; the failures."""
    ray = _ray()
    params, e = job.params, job.params.executor
    if runs_per_group(params) > 1:  # made here, once, so runs starting at once on several nodes share them
        flat = config.flatten_params(params)
        for group in dict.fromkeys(cell.group for cell in todo):
            tracking.parent_run(job.tracking_uri, experiment_id, group, flat)
    data = project_bundle(params, job.params_path, job.root)
    bundle_key = fanout_node.digest(data)
    bundle = [ray.put(data)]  # in a list: Ray hands the task the reference, and a node fetches it once
    # Reused workers: each run is its own process, which frees its GPU memory when it exits.
    task = ray.remote(num_gpus=e.num_gpus, num_cpus=e.cpus_per_run, max_retries=e.max_retries,
                      retry_exceptions=[fanout_node.RunCrashed], max_calls=0)(fanout_node.train_run)
    pending = {task.remote(job.job(cell, fingerprints[cell], bundle_key), bundle): cell for cell in todo}
    failures, done = [], 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WATCH_S)
            if not ready:
                check_resources(cluster_state(cluster.address), e)  # nodes died: say so instead of waiting
                continue
            cell = pending.pop(ready[0])
            done += 1
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                failures.append((cell, _reason(exc)))
                log(f"[{done}/{len(todo)}] {cell.name}: failed: {failures[-1][1].splitlines()[0]}")
                continue
            keep_result(result["files"], result_dir(job.root, cell, fingerprints[cell]))
            gpu = f" (GPU {result['gpus']})" if result["gpus"] else ""
            note = "".join(f"; its run {r}, left RUNNING by a dead node, is marked FAILED" for r in result["abandoned"])
            log(f"[{done}/{len(todo)}] {cell.name}: done on {result['node']}{gpu} in {result['seconds']:.0f} s{note}")
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return failures


def _reason(exc: Exception) -> str:
    """A failed task's error in one message: the run's own (fanout_node.RunFailed/RunCrashed), or Ray's."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, (fanout_node.RunFailed, fanout_node.RunCrashed)):
        return str(cause)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@dataclass
class RayNode:
    """Where the preflight checks weights and times the models with the ray executor: on a node of
    the cluster that takes runs, in a task with a run's resources (plan.preflight's `host`).
    `start_s`, after `estimate`: the seconds a run's process took there to start."""

    params: Params
    start_s: float = 0.0

    def _on_node(self, function, *args):
        ray = _ray()
        e = self.params.executor
        task = ray.remote(num_gpus=e.num_gpus, num_cpus=e.cpus_per_run, max_calls=1)(function)
        try:
            return ray.get(task.remote(*args))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise UserError(f"on a node of the Ray cluster: {exc.cause}") from None
            raise

    def check_weights(self, cells: list[Cell], t) -> list[WeightsStatus]:
        if not any(cell.pretrained for cell in cells):
            return []
        node, statuses = self._on_node(fanout_node.weights_on_node, cells, t)
        return [dataclasses.replace(s, architecture=f"{s.architecture} (on {node})") for s in statuses]

    def estimate(self, params: Params, cells: list[Cell], sizes: SplitSizes, num_classes: int,
                 thorough: bool) -> tuple[str, list[CellEstimate]]:
        timing = self._on_node(fanout_node.time_on_node, params, cells, sizes, num_classes, thorough)
        self.start_s = timing["start_s"]
        return f"{timing['device']} on Ray node {timing['node']}", timing["estimates"]


def plan_on_cluster(params: Params, params_path: str, root: Path, skip_data: bool, checks: bool,
                    address: str, tracking_uri: str) -> str:
    """`transfer-study plan` with the ray executor: the cluster refused first when it cannot take a
    run or share the tracking store, then the preflight with the weights checked and the models
    timed on a node, and the cluster's nodes and the fan-out's wall time."""
    from .plan import format_plan, preflight

    e = params.executor
    cluster = connect(address)
    check_resources(cluster, e)
    if checks:
        location = None if is_local_uri(tracking_uri) else \
            tracking.experiment_artifact_location(tracking_uri, params.tracking.experiment)
        check_tracking(tracking_uri, location, cluster, e)
    node = RayNode(params)
    found = preflight(params, params_path, root, skip_data, checks=checks, host=node)
    return "\n".join([format_plan(found), *cluster_lines(cluster, e, found.estimates, node.start_s)])

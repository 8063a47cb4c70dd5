"""Every MLflow call a training run makes, retried while the tracking store is briefly away.

A tracking server restarted mid-training, or a SQLite store busy with another writer, should
cost a pause, not a run. Each call here is retried with exponential backoff for at most
`RetryPolicy.budget_s` seconds, with one line on stderr per retry; then it fails with
`TrackingUnavailable`, and a rerun resumes (train.py saves its state before it logs an epoch).

MLflow's own HTTP retries are switched off for these calls: they would retry silently for about
four minutes per request, and a user would see a training run that hangs without saying why.
Metrics carry the timestamp of their first attempt, so retrying a request that did reach the
store before the connection dropped logs nothing twice (the store ignores identical metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .config import UserError, retry_delay_scale

T = TypeVar("T")

# MLflow error codes that mean "try again later": a server that is down, restarting or busy.
TRANSIENT_ERROR_CODES = frozenset({
    "INTERNAL_ERROR",  # what MLflow raises when it cannot connect at all
    "TEMPORARILY_UNAVAILABLE",  # SQLite locked, database connection lost
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
})
MLFLOW_HTTP_RETRIES_VARIABLE = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
# Set to "true" on the runs the pipeline's current state uses (evaluate.py moves it); the UI filters on it.
PIPELINE_CURRENT_TAG = "pipeline_current"
# What `make ui` opens in MLflow 3's UI. The experiment tag mlflow.experimentKind marks an experiment
# as model training, so the UI opens on its runs table instead of the GenAI overview; a shared view
# state (the experiment tag MLflow's own "share view" writes, opened by ?viewStateShareKey=) sets
# the filter and the metric columns shown.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
CELLS_VIEW = "transfer-study-cells"
# Set on a run that was left RUNNING when its node died, and marked FAILED before the run was retried.
ABANDONED_TAG = "abandoned"


class TrackingUnavailable(UserError):
    """The tracking store did not answer within the retry budget."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying one MLflow call, and how the waits grow."""

    budget_s: float = 120.0
    first_delay_s: float = 1.0
    max_delay_s: float = 15.0


def is_transient(exc: BaseException) -> bool:
    """True for failures a later attempt may not see: no connection, a timeout, a busy store."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_ERROR_CODES
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def _short(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one line; when long, its start and its end (which says why)."""
    text = " ".join(str(exc).split())
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " … " + text[head - limit:]


@contextmanager
def _without_mlflow_http_retries() -> Iterator[None]:
    """Turn off MLflow's silent per-request retries for one call; ours say what they do."""
    previous = os.environ.get(MLFLOW_HTTP_RETRIES_VARIABLE)
    os.environ[MLFLOW_HTTP_RETRIES_VARIABLE] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MLFLOW_HTTP_RETRIES_VARIABLE, None)
        else:
            os.environ[MLFLOW_HTTP_RETRIES_VARIABLE] = previous


def call_with_retry(what: str, call: Callable[[], T], policy: RetryPolicy = RetryPolicy(),
                    sleep: Callable[[float], None] | None = None) -> T:
    """Return call(), retrying transient tracking failures with exponential backoff.

    Raises the call's own exception when it is not transient, and TrackingUnavailable when
    the budget is spent.
    """
    deadline = time.monotonic() + policy.budget_s
    scale = retry_delay_scale()  # the budget stays; only the waits within it shrink (tests)
    delay, attempt = policy.first_delay_s * scale, 1
    while True:
        try:
            with _without_mlflow_http_retries():
                return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailable(
                    f"the MLflow tracking store did not answer for {policy.budget_s:.0f}s ({what}: {_short(exc)}); "
                    "check the server behind MLFLOW_TRACKING_URI and rerun the same command: "
                    "training resumes from its last finished epoch"
                ) from None
            wait = min(delay, policy.max_delay_s * scale, left)
            print(f"tracking store unavailable ({what}: {_short(exc, 120)}); retry {attempt} in {wait:.1f}s",
                  file=sys.stderr, flush=True)
            (sleep or time.sleep)(wait)
            delay, attempt = delay * 2, attempt + 1


def artifact_location_for(tracking_uri: str) -> str | None:
    """For a SQLite store, `mlartifacts/` beside the database file (absolute, so every working
    folder, dvc's temporary experiment copies included, agrees); None lets a server decide."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri()


def prepare_store(tracking_uri: str) -> None:
    """Create a local SQLite store's tables once, under a file lock beside it.

    Processes that open a new store at the same moment (`dvc queue start -j 2` on a fresh
    clone) would otherwise all run MLflow's schema migrations, and all but one fail.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None,
                      policy: RetryPolicy = RetryPolicy()) -> str:
    """The id of experiment `name`, created (with artifact_location) when missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = call_with_retry("get experiment", lambda: client.get_experiment_by_name(name), policy)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return call_with_retry("create experiment",
                               lambda: client.create_experiment(name, artifact_location=artifact_location), policy)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another process (a parallel DVC stage) created it in the meantime.
        return call_with_retry("get experiment", lambda: client.get_experiment_by_name(name), policy).experiment_id


class RunTracker:
    """One MLflow run, with every call retried (see the module docstring).

    The run is also MLflow's active run in this process, because `mlflow.pyfunc.log_model`
    logs to the active run.
    """

    def __init__(self, run_id: str, tracking_uri: str, policy: RetryPolicy = RetryPolicy()):
        from mlflow.tracking import MlflowClient

        self.run_id, self.policy = run_id, policy
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment_id: str, run_name: str, run_id: str | None = None,
              policy: RetryPolicy = RetryPolicy(), tags: dict[str, str] | None = None) -> RunTracker:
        """Create a run (with `tags`), or continue run_id (any status but deleted), and make it the active run."""
        import mlflow
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        mlflow.set_tracking_uri(tracking_uri)
        if run_id is None:
            # Created here, in experiment_id: mlflow.start_run() without a run_id would continue
            # $MLFLOW_RUN_ID instead, which `mlflow run` sets to its own run (in another experiment).
            client = MlflowClient(tracking_uri)
            run_id = call_with_retry("create run", lambda: client.create_run(
                experiment_id, run_name=run_name, tags=resolve_tags(tags)).info.run_id, policy)
        run = call_with_retry("start run", lambda: mlflow.start_run(run_id=run_id), policy)
        return cls(run.info.run_id, tracking_uri, policy)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        return call_with_retry(what, call, self.policy)

    def add_params_and_tags(self, params: dict[str, str], tags: dict[str, str]) -> None:
        """Log the params and tags the run does not have yet.

        A continued run keeps what its first attempt logged, so a param that does not affect
        the result (and so not the resume fingerprint) can change without MLflow refusing it.
        """
        from mlflow.entities import Param, RunTag

        data = self._call("read run", lambda: self.client.get_run(self.run_id)).data
        new_params = [Param(k, str(v)) for k, v in params.items() if k not in data.params]
        new_tags = [RunTag(k, str(v)) for k, v in tags.items() if k not in data.tags]
        if new_params or new_tags:
            self._call("log params", lambda: self.client.log_batch(self.run_id, params=new_params, tags=new_tags))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics at one step; the timestamp is fixed before the first attempt (idempotent retries)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        self._call(f"log metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def logged_steps(self, key: str) -> list[int]:
        """The steps at which metric `key` was logged, in order (repeats kept)."""
        history = self._call(f"read {key} history", lambda: self.client.get_metric_history(self.run_id, key))
        return sorted(m.step for m in history)

    def log_missing_epochs(self, history: list[dict], label: str) -> None:
        """Log the finished epochs (rows with an `epoch` key) the store lacks: the process died
        between saving its resume state and logging."""
        logged = set(self.logged_steps("val_acc"))
        for row in history:
            if row["epoch"] not in logged:
                print(f"[{label}] logging epoch {row['epoch']}'s metrics, which the tracking store lacks",
                      file=sys.stderr, flush=True)
                self.log_metrics(epoch_metrics(row), step=row["epoch"])

    def log_dataset_input(self, manifest, path: Path, name: str, data_md5: str) -> None:
        """Log the split manifest (a DataFrame read from `path`) as the run's training dataset, so
        MLflow's Dataset column names the data the run saw: `name`, with `dataset_digest`'s digest.
        Logging the same dataset again (a resumed run) adds nothing."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns it is ambiguous
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(manifest, source=str(path), name=name,
                                              digest=dataset_digest(data_md5, manifest))
        entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
        self._call("log dataset", lambda: self.client.log_inputs(self.run_id, datasets=[entry]))

    def log_artifact(self, path: str) -> None:
        self._call("log artifact", lambda: self.client.log_artifact(self.run_id, path))

    def log_model(self, log: Callable[[], T]) -> T:
        """Run `log` (a function that logs a model to the active run), retried as one call."""
        return self._call("log model", log)

    def finish(self, status: str = "FINISHED") -> None:
        """Set the run's final status, then leave it as the active run."""
        import mlflow

        self._call("end run", lambda: self.client.set_terminated(self.run_id, status))
        _leave_active_run(mlflow, status)

    def abandon(self, status: str) -> None:
        """Best effort after a failure: mark the run `status` if the store answers within a few
        seconds, never raising (the original error is what the user must see)."""
        import mlflow

        try:
            call_with_retry("end run", lambda: self.client.set_terminated(self.run_id, status),
                            RetryPolicy(budget_s=5.0, first_delay_s=1.0, max_delay_s=2.0))
        except Exception as exc:  # the store is away: the run stays RUNNING; a rerun continues it
            print(f"could not mark MLflow run {self.run_id} {status} ({_short(exc, 120)})", file=sys.stderr)
        _leave_active_run(mlflow, status)


def _leave_active_run(mlflow, status: str) -> None:
    """Pop this process's active run. MLflow pops it before telling the store, so a store that
    is away cannot leave it active; the status was already set, so that error is ignored."""
    if mlflow.active_run() is None:
        return
    try:
        with _without_mlflow_http_retries():
            mlflow.end_run(status=status)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def epoch_metrics(row: dict) -> dict[str, float]:
    """An epoch's history row as MLflow metrics (the epoch is the step, not a metric)."""
    return {k: v for k, v in row.items() if k != "epoch"}


@dataclass(frozen=True)
class CellRun:
    """What a training cell's MLflow run is called and what it logs when it starts."""

    experiment: str
    run_name: str
    params: dict[str, str]
    tags: dict[str, str]


def _check_not_deleted(tracking_uri: str, run_id: str) -> None:
    """Raise MlflowException when run_id is deleted: MLflow refuses to continue it with an
    INTERNAL_ERROR, which call_with_retry would take for an unreachable store and retry."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run = call_with_retry("read run", lambda: MlflowClient(tracking_uri).get_run(run_id))
    if run.info.lifecycle_stage == "deleted":
        raise MlflowException("the run is deleted", error_code="INVALID_STATE")


def start_cell_run(tracking_uri: str, spec: CellRun, resume_run_id: str | None,
                   resume_dir: Path, parent: str | None = None) -> tuple[RunTracker, str]:
    """Start the cell's MLflow run, or continue `resume_run_id` (an interrupted attempt's);
    returns the tracker and the experiment id. With `parent` (a study cell's name), the run is
    nested under that cell's parent run, made once per experiment and params. Raises UserError
    naming `resume_dir` (the resume state to delete) when that run cannot be continued."""
    from mlflow.exceptions import MlflowException

    experiment_id = ensure_experiment(tracking_uri, spec.experiment, artifact_location_for(tracking_uri))
    tags = {}
    if parent is not None and resume_run_id is None:
        tags["mlflow.parentRunId"] = parent_run(tracking_uri, experiment_id, parent, spec.params)
    try:
        if resume_run_id is not None:
            _check_not_deleted(tracking_uri, resume_run_id)
        tracker = RunTracker.start(tracking_uri, experiment_id, spec.run_name, resume_run_id, tags=tags)
    except MlflowException as exc:  # the run was deleted, or this is another store
        if resume_run_id is None:
            raise
        raise UserError(f"cannot continue MLflow run {resume_run_id} of '{resume_dir}' in {tracking_uri} "
                        f"({_short(exc)}); delete '{resume_dir}' to train the cell again") from None
    tracker.add_params_and_tags(spec.params, spec.tags)
    return tracker, experiment_id


def finished_run_ids(tracking_uri: str, experiment_id: str) -> set[str]:
    """The ids of the experiment's FINISHED runs (parent runs included)."""
    from mlflow.tracking import MlflowClient

    client, ids, token = MlflowClient(tracking_uri), set(), None
    while True:
        page = call_with_retry("find finished runs", lambda: client.search_runs(
            [experiment_id], "attributes.status = 'FINISHED'", max_results=1000, page_token=token))
        ids |= {run.info.run_id for run in page}
        token = page.token
        if not token:
            return ids


def fail_abandoned_runs(tracking_uri: str, experiment: str, run_name: str, fingerprint: str) -> list[str]:
    """Mark FAILED the RUNNING runs named `run_name` with this result fingerprint, and return their
    ids: a run whose node died stays RUNNING, and its resume state died with that node's disk.
    Called only where that state would be, when it is not there (fanout_node.py)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = call_with_retry("get experiment", lambda: client.get_experiment_by_name(experiment))
    if found is None:
        return []
    query = (f"attributes.run_name = '{run_name}' and params.`cell.fingerprint` = '{fingerprint}' "
             "and attributes.status = 'RUNNING'")
    runs = call_with_retry("find abandoned runs", lambda: client.search_runs([found.experiment_id], query))
    for run in runs:
        run_id = run.info.run_id
        call_with_retry("tag abandoned run", lambda: client.set_tag(run_id, ABANDONED_TAG, "its node or process died"))
        call_with_retry("fail abandoned run", lambda: client.set_terminated(run_id, "FAILED"))
    return [run.info.run_id for run in runs]


def experiment_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where experiment `experiment`'s runs put their artifacts (fixed when it was created); None
    when it does not exist yet."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = call_with_retry("get experiment", lambda: client.get_experiment_by_name(experiment))
    return None if found is None else found.artifact_location


def dataset_digest(data_md5: str, manifest) -> str:
    """`<data.dvc md5>-<split hash>`, 12 hex digits each (MLflow keeps 36 characters): it changes
    with the raw data's version and with which image is in which split."""
    rows = manifest.sort_values("path")[["path", "split", "sha256"]].to_csv(index=False)
    return f"{data_md5[:12]}-{hashlib.sha256(rows.encode()).hexdigest()[:12]}"


# The params that make runs of one study cell comparable: one parent run per cell and value of these.
PARENT_KEYS = ("train.epochs", "train.batch_size", "train.lr", "train.weight_decay", "train.augment",
               "train.image_size", "train.checkpoint", "preprocess", "split.train", "split.val", "split.seed")


def parent_run(tracking_uri: str, experiment_id: str, cell: str, params: dict[str, str]) -> str:
    """The id of study cell `cell`'s parent run for these params, created (FINISHED, no metrics
    until evaluation) the first time. Its children are the cell's runs over seeds, splits, sizes."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    relevant = {k: v for k, v in sorted(params.items()) if k.startswith(PARENT_KEYS)}
    key = hashlib.sha256(json.dumps(relevant).encode()).hexdigest()[:12]
    client = MlflowClient(tracking_uri)
    query = f"tags.study_cell = '{cell}' and tags.study_cell_params = '{key}'"
    found = call_with_retry("find parent run", lambda: client.search_runs([experiment_id], query, max_results=1))
    if found:
        return found[0].info.run_id
    run = call_with_retry("create parent run", lambda: client.create_run(
        experiment_id, run_name=cell, tags={"study_cell": cell, "study_cell_params": key, "parent": "true"}))
    call_with_retry("log parent params", lambda: client.log_batch(
        run.info.run_id, params=[Param(k, v) for k, v in relevant.items()]))
    call_with_retry("finish parent run", lambda: client.set_terminated(run.info.run_id, "FINISHED"))
    return run.info.run_id


def git_commit(root: Path) -> str:
    """The checked-out commit of `root`, or "unknown" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cells_view_state(metrics: list[str]) -> dict:
    """The runs table MLflow's UI opens with: the runs the pipeline's current state uses, with
    `metrics` as columns (MLflow's view state keys: search facets and UI state)."""
    columns = [f"metrics.`{metric}`" for metric in metrics]
    return {"searchFilter": f"tags.{PIPELINE_CURRENT_TAG} = 'true'", "selectedColumns": columns,
            "columnOrder": columns, "columnWidths": {column: 20 + 7 * len(metric) for column, metric in zip(columns, metrics)}}


def set_cells_view(client, experiment_id: str, metrics: list[str]) -> None:
    """Mark the experiment as model training and store the cells' view (cells_view_state) in it,
    replacing the one an earlier run stored."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG_PREFIX + CELLS_VIEW, json.dumps(cells_view_state(metrics)))

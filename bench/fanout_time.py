"""Wall time of a small profile's runs through the ray executor on two local worker nodes, next to
the local executor, on this machine (issue 22's closing figure).

    .venv/bin/python bench/fanout_time.py                      # the quick profile's small_cnn runs
    .venv/bin/python bench/fanout_time.py --arch efficientnet_lite0 --cpus-per-worker 1

Needs the crops and the profile's manifest (`dvc repro split`, then for the quick profile
`transfer-study --params params.quick.yaml split`), and root: the cluster is tests/raycluster.py's,
a head and worker nodes in a network namespace, with the team's tracking server there.

Both executors train the same runs (`--arch`'s cells of `--params`) from the same files, in two
temporary project folders; the local executor one run after another with torch's default threads
and a SQLite store, the ray executor with `executor.num_gpus: 0`, `num_cpus: 1` (one thread per
run) on `--workers` nodes of `--cpus-per-worker` CPUs each, logging to the tracking server. The
cluster's start is timed apart. Prints one markdown table with the load average before and after:
on a shared machine, rerun it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the one-machine cluster the tests use

import yaml  # noqa: E402
from raycluster import BIN, ray_cluster  # noqa: E402

from transfer_study import config  # noqa: E402
from transfer_study.cells import cells_for  # noqa: E402


def project(folder: Path, params: config.Params, raw: dict) -> Path:
    """A project folder with links to the real crops, a copy of the manifest and data.dvc, and
    `raw` (the params file's content) as params.yaml."""
    folder.mkdir(parents=True)
    cropped = folder / params.paths.cropped
    cropped.parent.mkdir(parents=True, exist_ok=True)
    cropped.symlink_to(REPO / params.paths.cropped)
    manifest = folder / params.paths.manifest
    manifest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / params.paths.manifest, manifest)
    shutil.copyfile(REPO / "data.dvc", folder / "data.dvc")
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {cwd}:\n{done.stderr[-4000:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.quick.yaml")
    parser.add_argument("--arch", default="small_cnn", help="the architecture whose runs are trained")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    args = parser.parse_args()

    params = config.load_params(REPO / args.params)
    for path in (params.paths.cropped, params.paths.manifest):
        if not (REPO / path).exists():
            sys.exit(f"'{path}' is missing: run `dvc repro split` and `transfer-study --params {args.params} split`")
    raw = yaml.safe_load((REPO / args.params).read_text())
    raw["train"]["architectures"] = [args.arch]
    raw["tracking"]["experiment"] = "bench-fanout"
    raw["executor"] = {"kind": "ray", "num_gpus": 0.0, "num_cpus": 1.0, "max_retries": 1}
    runs = len(cells_for(dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                                  architectures=(args.arch,)))))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        local = project(Path(tmp) / "local", params, raw)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
        env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{local / 'mlflow.db'}", "OMP_WAIT_POLICY": "PASSIVE"}
        local_s = timed([str(BIN / "transfer-study"), "train", "--executor", "local"], local, env)

        started = time.monotonic()
        workers = {f"w{n}": f"127.0.0.{n + 2}" for n in range(args.workers)}
        with ray_cluster(workers, gpus=0, cpus=args.cpus_per_worker) as cluster:
            start_s = time.monotonic() - started
            remote = project(Path(tmp) / "ray", params, raw)
            ray_s = timed(cluster.command([str(BIN / "transfer-study"), "train"]), remote,
                          cluster.env(OMP_WAIT_POLICY="PASSIVE"))
    load_after = os.getloadavg()
    print(f"{runs} runs of {args.arch} ({args.params}) on {os.cpu_count()} cores; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print("| executor | wall time | ratio to local |\n|---|---|---|")
    print(f"| local (one after another, torch's default threads) | {local_s:.0f} s | 1.00 |")
    print(f"| ray ({args.workers} local worker nodes × {args.cpus_per_worker} CPU, 1 thread per run) | "
          f"{ray_s:.0f} s | {ray_s / local_s:.2f} |")
    print(f"\nthe cluster (head, {args.workers} workers, tracking server) took {start_s:.0f} s to start, not counted")


if __name__ == "__main__":
    main()

"""A Ray cluster on one machine for the ray executor's tests: a head and worker nodes, each at its
own loopback address (127.0.0.1, .2, .3 ...) inside a fresh network namespace, with the team's
MLflow tracking server on loopback there too.

A namespace of its own because on the host's interfaces Ray replaces 127.0.0.1 with the machine's
outward address and the nodes do not find each other; inside one that has only `lo`, they do.
Every process of the cluster runs in it through `nsenter`, which needs root (CI runs as root).
Each node runs `ray start --block` in a process group of its own, so a test can kill one node,
workers and runs included, as a machine that dies; every group is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parent.parent
RAY_PORT, MLFLOW_PORT = 6379, 5000  # the namespace is empty: fixed ports are free
# Set `lo` up (ioctl SIOCGIFFLAGS / SIOCSIFFLAGS: no `ip` tool needed), say so, then hold the namespace open.
HOLD_NAMESPACE = (
    "import fcntl, socket, struct, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH', b'lo', 0)))[1]\n"
    "fcntl.ioctl(s, 0x8914, struct.pack('16sH', b'lo', flags | 1))\n"
    "print('up', flush=True)\n"
    "time.sleep(10**9)\n"
)
# The head notices a dead node within about 3 s instead of Ray's default 15-30 s.
FAST_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}


def skip_unless_root() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("a Ray cluster on one machine needs root, unshare and nsenter (a network namespace)")


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM:
                time.sleep(0.5)  # the group's other processes (raylet, workers) exit a moment later
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


@dataclass
class RayCluster:
    """A head at 127.0.0.1 and named workers at 127.0.0.2 ..., in network namespace `netns`."""

    folder: Path
    netns: int  # the pid holding the namespace
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)  # head and workers, by node name
    mlflow_db: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{RAY_PORT}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{MLFLOW_PORT}"

    def command(self, args: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.netns}/ns/net", *args]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process in the cluster's namespace: the tracking server, the Ray head."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
        return env | {"MLFLOW_TRACKING_URI": self.tracking_uri, "RAY_ADDRESS": self.address,
                      "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{env['PATH']}"} | extra

    def run(self, args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args), cwd=cwd, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
        with open(log, "w") as out:  # a session of its own: stopping it stops its children too
            return subprocess.Popen(self.command(args), cwd=cwd, env=self.env(**env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def start_node(self, name: str, ip: str, *options: str, timeout: float = 120) -> None:
        """`ray start --block` for one node, waiting until it has joined (nodes join one at a time:
        on two cores, two at once can miss Ray's startup deadline)."""
        log = self.folder / f"{name}.log"
        # TMPDIR: each node's runs unpack their project under the test's folder (which must exist)
        (self.folder / "nodes").mkdir(exist_ok=True)
        proc = self.popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", ip, "--node-name", name,
                           *options], self.folder, log, TMPDIR=str(self.folder / "nodes"))
        self.nodes[name] = proc
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of node `name`, as a machine that dies."""
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes.pop(name).wait()

    def wait_for_tracking_server(self, server: subprocess.Popen, log: Path, timeout: float = 240) -> None:
        probe = ("import sys, time, urllib.request\n"
                 f"deadline = time.monotonic() + {timeout}\n"
                 "while time.monotonic() < deadline:\n"
                 "    try:\n"
                 f"        urllib.request.urlopen('{self.tracking_uri}/health', timeout=5); sys.exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(1)\n"
                 "sys.exit(1)\n")
        if self.run([sys.executable, "-c", probe], self.folder, timeout=timeout + 30).returncode != 0:
            pytest.fail(f"the tracking server did not answer (exit {server.poll()}):\n{log.read_text()[-3000:]}")


@contextmanager
def ray_cluster(workers: dict[str, str], gpus: int = 2, cpus: int = 2) -> Iterator[RayCluster]:
    """A head (no CPUs or GPUs for runs: it coordinates, the driver runs there) and `workers`
    (name: loopback IP), each declaring `gpus` fake GPUs and `cpus` CPUs, plus
    scripts/tracking-server.sh on a SQLite store (`mlflow_db`, which a test reads directly) with
    served artifacts."""
    skip_unless_root()
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, True)
        holder = subprocess.Popen(["unshare", "-n", sys.executable, "-c", HOLD_NAMESPACE], stdout=subprocess.PIPE,
                                  text=True)
        stack.callback(lambda: (holder.kill(), holder.wait()))
        assert holder.stdout.readline().strip() == "up", "could not set up a network namespace"
        cluster = RayCluster(folder, holder.pid, mlflow_db=folder / "mlflow.db")
        server_log = folder / "mlflow-server.log"
        server = cluster.popen(["bash", str(REPO_ROOT / "scripts" / "tracking-server.sh"), "--port", str(MLFLOW_PORT),
                                "--workers", "1"], folder, server_log,
                               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{cluster.mlflow_db}",
                               MLFLOW_ARTIFACTS_DESTINATION=str(folder / "artifacts"))
        stack.callback(stop_group, server)
        stack.callback(lambda: [stop_group(p) for p in reversed(list(cluster.nodes.values()))])
        cluster.start_node("head", "127.0.0.1", "--head", "--port", str(RAY_PORT), "--num-cpus", "0", "--num-gpus",
                           "0", "--include-dashboard=false", "--temp-dir", str(folder / "ray"),
                           "--system-config", json.dumps(FAST_DEATH))
        for name, ip in workers.items():
            cluster.start_node(name, ip, "--address", cluster.address, "--num-gpus", str(gpus), "--num-cpus", str(cpus))
        cluster.wait_for_tracking_server(server, server_log)
        yield cluster

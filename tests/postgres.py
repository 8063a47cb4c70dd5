"""A throwaway PostgreSQL server on loopback for tests: its own cluster in a temporary folder.

PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user
(Debian's package creates it) and its commands run through `runuser`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

USER, PASSWORD = "mlflow", "mlflow-test-password"
DATABASES = ("mlflow", "mlflow_auth")  # the tracking store and the basic-auth users


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of initdb/pg_ctl: Debian's newest /usr/lib/postgresql/<v>/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresCluster:
    """initdb + pg_ctl in `folder`, listening on 127.0.0.1:`port` and a unix socket in `folder`."""

    def __init__(self, bindir: Path, folder: Path, port: int):
        self.bindir, self.folder, self.port = bindir, folder, port
        self.data, self.log = folder / "data", folder / "postgres.log"
        self.owner = "postgres" if os.getuid() == 0 else None

    def uri(self, database: str = "mlflow") -> str:
        """A database's URL, in the form the README gives for the team's server."""
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _pg(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.owner:
            cmd = ["runuser", "-u", self.owner, "--", *cmd]  # runuser keeps PGPASSWORD
        env = os.environ | {"PGPASSWORD": PASSWORD}
        # cwd: the postgres user may not be allowed into the test's working folder (e.g. under /root)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=self.folder)

    def start(self) -> None:
        """Create the cluster (password auth) and DATABASES, start the server; fail with its log."""
        password_file = self.folder / "password"
        password_file.write_text(PASSWORD + "\n")
        if self.owner:
            owner = pwd.getpwnam(self.owner)
            for path in (self.folder, password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        steps = [
            ("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={password_file}", "-A", "scram-sha-256",
             "-E", "UTF8", "--no-sync"),
            ("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
             f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"),
        ] + [("createdb", "-h", str(self.folder), "-p", str(self.port), "-U", USER, db) for db in DATABASES]
        for step in steps:
            result = self._pg(*step)
            if result.returncode != 0:
                log = self.log.read_text()[-2000:] if self.log.is_file() else ""
                pytest.fail(f"PostgreSQL: {step[0]} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                            f"{result.stderr[-2000:]}\n{log}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    """A fresh PostgreSQL server for the module, with empty DATABASES; `.uri(name)` gives their URLs.

    Skipped only when PostgreSQL is not installed (apt-get install postgresql), or when running
    as root without the `postgres` user to run it as; a server that is installed but does not
    start is a failure.
    """
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    if os.getuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run PostgreSQL as")
    # Not under pytest's tmp_path: its root-only parent folders would lock the postgres user out.
    folder = Path(tempfile.mkdtemp(prefix="transfer-study-pg-"))
    cluster = PostgresCluster(bindir, folder, free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)

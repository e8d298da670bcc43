"""Real components for tests: a PostgreSQL 15 server and a dask.distributed cluster, each started by the test on
127.0.0.1 and stopped afterwards. A component that cannot start raises ``ComponentUnavailable`` with the reason
(tests turn that into ``pytest.fail``: CI must install PostgreSQL, never skip it). Also: the small run config with
which the main job finishes in well under a minute.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")
PG_INSTALL_HINT = "install it with: apt-get install -y postgresql-15 (the Debian package ships initdb and pg_ctl)"


class ComponentUnavailable(RuntimeError):
    """A real component (PostgreSQL, Dask) could not start; the message says why."""


@contextlib.contextmanager
def required(what: str) -> Iterator[None]:
    """Turn ``ComponentUnavailable`` into a test failure with the reason (never a skip)."""
    try:
        yield
    except ComponentUnavailable as exc:
        pytest.fail(f"{what} could not start: {exc}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_main_job_config(n_images: int = 200) -> dict:
    """Run config for the main job on a small sample world with the tiny model: tens of seconds, every stage."""
    model = {"preset": "test-tiny", "phases": [0, 1]}
    return {"ops": {"sample_world_images": {"config": {"n_images": n_images, "image_size": 128}}},
            "resources": {"compute": {"config": {"workers": 1}}, "model_run": {"config": model}}}


# ---- PostgreSQL -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str

    def env(self) -> dict[str, str]:
        """The variables deploy/dagster-postgres.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USERNAME": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db}


def pg_bin() -> Path:
    for d in PG_BIN_DIRS:
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    found = shutil.which("pg_ctl")
    if found and Path(found).with_name("initdb").is_file():
        return Path(found).parent
    raise ComponentUnavailable(f"no initdb/pg_ctl in {', '.join(PG_BIN_DIRS)} or on PATH; {PG_INSTALL_HINT}")


def _as_postgres_user(cmd: list[str]) -> tuple[list[str], str | None]:
    """PostgreSQL refuses to run as root: as root, run ``cmd`` as the ``postgres`` user (its owner)."""
    if os.geteuid() != 0:
        return cmd, None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ComponentUnavailable(f"running as root and there is no 'postgres' user; {PG_INSTALL_HINT}") from None
    runuser = shutil.which("runuser")
    return ([runuser, "-u", "postgres", "--", *cmd] if runuser else ["su", "postgres", "-c", " ".join(cmd)]), \
        "postgres"


def _run(cmd: list[str], what: str, timeout: float = 120) -> None:
    full, _ = _as_postgres_user(cmd)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ComponentUnavailable(f"{what} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")


@contextlib.contextmanager
def postgres_server(db: str = "geopak_dagster") -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free loopback port with password (scram) auth over TCP."""
    bindir = pg_bin()
    # not under pytest's tmp_path: its parents are private to root and the server runs as 'postgres'
    base = Path(tempfile.mkdtemp(prefix="geopak-pg-"))
    data, port, password = base / "data", free_port(), secrets.token_urlsafe(16)
    _, owner = _as_postgres_user([])
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    if owner:
        ent = pwd.getpwnam(owner)
        os.chown(base, ent.pw_uid, ent.pw_gid)
        os.chown(pwfile, ent.pw_uid, ent.pw_gid)
    started = False
    try:
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8",
              "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"], "initdb")
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "server.log"), "-w", "-t", "60",
              "start"], f"pg_ctl start (log: {base / 'server.log'})")
        started = True
        _run([str(bindir / "createdb"), "-h", str(base), "-p", str(port), "-U", "postgres", db], "createdb")
        yield Postgres("127.0.0.1", port, "postgres", password, db)
    finally:
        if started:
            with contextlib.suppress(ComponentUnavailable, subprocess.TimeoutExpired):
                _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], "pg_ctl stop", 60)
        shutil.rmtree(base, ignore_errors=True)


# ---- Dask ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DaskCluster:
    address: str
    workers: int


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the processes this module started (each leads its own session), workers first."""
    for proc in reversed(procs):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextlib.contextmanager
def dask_cluster(workers: int = 2, env: dict[str, str] | None = None, log_dir: Path | None = None,
                 timeout_s: float = 90.0) -> Iterator[DaskCluster]:
    """``dask scheduler`` and ``workers`` × ``dask worker`` (one process, one thread each: Dagster steps are not
    thread-safe) as separate processes talking TCP on 127.0.0.1. ``env`` is added to the workers' environment
    (e.g. GEOPAK_DATA_ROOT: a worker reads the data root from its own environment)."""
    dask = Path(sys.executable).with_name("dask")
    if not dask.is_file():
        raise ComponentUnavailable(f"{dask} is missing: install the 'distributed' package (pip install -e .)")
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="geopak-dask-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str, extra: dict[str, str]) -> None:
        with open(log_dir / f"{name}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env={**base_env, **extra}, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], "scheduler",
              {})
        for i in range(workers):
            start([str(dask), "worker", address, "--name", f"geopak-w{i}", "--nthreads", "1", "--no-nanny",
                   "--no-dashboard", "--memory-limit", "0", "--local-directory", str(log_dir / f"w{i}")],
                  f"worker{i}", dict(env or {}))
        _wait_for_workers(address, workers, timeout_s, procs, log_dir)
        yield DaskCluster(address, workers)
    finally:
        _stop(procs)


def _wait_for_workers(address: str, n: int, timeout_s: float, procs: list[subprocess.Popen], log_dir: Path) -> None:
    from distributed import Client

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        dead = [p.args[1] for p in procs if p.poll() is not None]
        if dead:
            break
        try:
            with Client(address, timeout=5, set_as_default=False) as client:
                client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
                return
        except Exception as exc:  # noqa: BLE001 - not up yet: retry until the deadline
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-800:]}" for p in sorted(log_dir.glob("*.log")))
    raise ComponentUnavailable(f"the Dask cluster at {address} did not get {n} workers within {timeout_s:.0f} s "
                               f"({last or 'a process exited'}); logs:\n{logs}")

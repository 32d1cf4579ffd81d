"""Shared fixtures: a real two-node Slurm cluster and a real MLflow tracking server.

``slurm_cluster`` (session): runs ``launch/ci/slurm-cluster.sh up`` in a private state directory
with free ports, yields a :class:`SlurmCluster`, and runs ``down`` at the end. It skips (with the
script's reason) only when Slurm cannot be installed or started; STARS_REQUIRE_SLURM=1 turns
that skip into a failure. Set STARS_SLURM_DIR to reuse a cluster you started yourself (it is
then left running).

``mlflow_server`` (function, backed by one server per session): a running
``mlflow server`` (sqlite backend, proxied artifacts) as a :class:`MlflowServer` with ``uri``,
``stop()`` and ``start()``; a test that stops it gets it restarted for the next test. The store
is shared by the session's tests: use your own experiment names.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "launch" / "ci" / "slurm-cluster.sh"
TERMINAL_JOB_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                       "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port_block(n: int, lo: int = 30000, hi: int = 32700) -> int:
    """First port of `n` consecutive free ports (below Linux's ephemeral range, above the
    20000-29999 rendezvous ports that stars-srun.sh derives from job ids)."""
    for _ in range(200):
        base = random.randrange(lo, hi - n)
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports in [{lo}, {hi})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- Slurm


class SlurmCluster:
    """A cluster brought up by launch/ci/slurm-cluster.sh. Clients need `env` (SLURM_CONF)."""

    partition = "debug"
    nodes = ("n1", "n2")

    def __init__(self, state_dir: Path, port_base: int, first_job_id: int = 1):
        self.state_dir = Path(state_dir)
        self.port_base = port_base
        self.first_job_id = first_job_id
        self.conf = self.state_dir / "slurm.conf"

    @property
    def script_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(STARS_SLURM_DIR=str(self.state_dir), STARS_SLURM_PORT_BASE=str(self.port_base),
                   STARS_SLURM_FIRST_JOB_ID=str(self.first_job_id))
        return env

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: pass to subprocesses that talk to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _script(self, action: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER_SCRIPT), action], env=self.script_env,
                              capture_output=True, text=True, timeout=timeout)

    def up(self) -> subprocess.CompletedProcess:
        return self._script("up", timeout=900)  # includes apt-get on a clean machine

    def down(self) -> subprocess.CompletedProcess:
        return self._script("down", timeout=120)

    def status(self) -> subprocess.CompletedProcess:
        return self._script("status", timeout=60)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (or anything) against this cluster."""
        out = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        info = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_job(self, job_id: str, timeout: float = 240) -> str:
        """Wait until the job (every task of an array) has ended; return its final state.

        For arrays the result is COMPLETED only when every task completed."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
            states = [tok.split("=", 1)[1] for line in out.stdout.splitlines()
                      for tok in line.split() if tok.startswith("JobState=")]
            if states and all(s in TERMINAL_JOB_STATES for s in states):
                bad = [s for s in states if s != "COMPLETED"]
                return bad[0] if bad else "COMPLETED"
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {states} after {timeout:.0f} s\n"
                                     + self.logs_tail())
            time.sleep(0.5)

    def logs_tail(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.state_dir / "log").glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {f}\n" + "\n".join(text))
        return "\n".join(out)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running 2-node Slurm cluster (n1, n2; partition debug) on this host."""
    given = os.environ.get("STARS_SLURM_DIR")
    if given:
        cluster = SlurmCluster(Path(given), int(os.environ.get("STARS_SLURM_PORT_BASE", "17000")),
                               int(os.environ.get("STARS_SLURM_FIRST_JOB_ID", "1")))
    else:
        state = Path(tempfile.mkdtemp(prefix="stars-slurm-", dir="/tmp"))
        state.chmod(0o755)  # munged runs as user munge and must reach its files in here
        # A random first job id spreads the rendezvous ports (derived from job ids) of
        # concurrent test sessions on this host.
        cluster = SlurmCluster(state, free_port_block(3), random.randrange(1000, 9000))
    res = cluster.up()
    if res.returncode != 0:
        cluster.down()
        reason = (f"Slurm could not be {'installed' if res.returncode == 3 else 'started'} "
                  f"(launch/ci/slurm-cluster.sh up exited {res.returncode}): "
                  + " | ".join((res.stderr or res.stdout).strip().splitlines()[-6:]))
        if not given:
            shutil.rmtree(cluster.state_dir, ignore_errors=True)
        if os.environ.get("STARS_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        if not given:
            cluster.down()
            shutil.rmtree(cluster.state_dir, ignore_errors=True)


# --------------------------------------------------------------------------- MLflow


class MlflowServer:
    """`mlflow server` in its own process group on a fixed port; stop() and start() keep the
    URI and the store, so a test can take the server down for part of a run."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 180.0) -> "MlflowServer":
        if self.running:
            return self
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=self.root)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and every process it started (its whole process group)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            pgid = self.proc.pid  # leader of its own session and process group
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(pgid, signal.SIGKILL)  # stragglers: workers outliving the parent
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None
        # The port is free again once nothing answers on it.
        deadline = time.monotonic() + 10
        while self.healthy(timeout=0.5) and time.monotonic() < deadline:
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def _mlflow_server_session(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(_mlflow_server_session):
    """A healthy MLflow server (restarted if an earlier test stopped it)."""
    server = _mlflow_server_session
    if not (server.running and server.healthy()):
        server.stop()
        server.start()
    return server


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: a slow end-to-end test (it still runs in CI)")

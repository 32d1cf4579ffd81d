"""MLflow tracking that never stalls or crashes training.

One run per training job. Metrics are queued and a background thread delivers them in batches
(`MlflowClient.log_batch`); if the tracking server is unreachable the batch stays buffered
(bounded: the oldest points are dropped with a warning when the buffer is full) and is retried
with backoff, so the training step never waits on the server. `close()` flushes what it can
within a timeout.

Default store: a sqlite database in the working directory (`sqlite:///$PWD/mlflow.db`, artifacts
in `$PWD/mlruns`); `MLFLOW_TRACKING_URI` or `tracking.tracking_uri` overrides it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import sys
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("stars_scale.tracking")


def _warn(msg: str) -> None:
    """One `warning:` line on stderr (an exception's text can span lines: joined, and cut at 400
    characters); `warnings.warn` would add the source line and print two."""
    text = " ".join(msg.split())
    print(f"warning: {text if len(text) <= 400 else text[:397] + '...'}", file=sys.stderr, flush=True)


def default_tracking_uri(configured: str | None = None) -> str:
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    # MLflow's own HTTP retries (7 tries, exponential backoff, 120 s timeouts) would hold a request
    # for minutes when the server is down; the tracker retries on its own schedule instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def _probe(uri: str, timeout: float) -> None:
    """Fail fast (ConnectionError) when a remote server's port does not accept connections."""
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot connect to {parts.hostname}:{port} ({e.strerror or e})") from None


def _bounded(fn, timeout: float | None, what: str):
    """Run `fn` on a helper thread and wait at most `timeout` seconds (None: no bound) for it."""
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="mlflow-connect", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextlib.contextmanager
def _store_lock(uri: str):
    """For a local sqlite store: hold an exclusive lock on its directory while a run opens it, so
    runs that start together on a new store do not race MLflow's schema migration or the
    experiment's creation (measured without it: 'Online migration expected to match one row')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    folder = Path(uri[len("sqlite:///"):]).parent
    fd = os.open(folder, os.O_RDONLY) if folder.is_dir() else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


class MlflowTracker:
    """Async, buffered MLflow logging for one run (create it on the metrics rank only).

    Opening the run against a remote server is bounded: a port that refuses connections fails
    at once, and a server that does not answer within `connect_timeout` seconds is given up
    (the request finishes or fails on a helper thread), so a dead server costs training seconds,
    not minutes.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None = None,
                 run_id: str | None = None, tags: dict[str, str] | None = None,
                 max_buffer: int = 100_000, batch_size: int = 500, flush_interval: float = 1.0,
                 parent_run_id: str | None = None, mark_running: bool = True, connect_timeout: float = 5.0):
        remote = _is_remote(tracking_uri)
        if remote:  # before importing mlflow (seconds on a busy machine)
            _probe(tracking_uri, min(connect_timeout, 3.0))
        _quiet_mlflow()
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        with _store_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.run_id = _bounded(lambda: self._open(experiment, run_name, run_id, tags, parent_run_id, mark_running),
                                   connect_timeout if remote else None, f"MLflow at {tracking_uri}")
        self._mlflow = mlflow
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._max_buffer = max_buffer
        self._batch_size = batch_size
        self._interval = flush_interval
        self._dropped = 0
        self._failures = 0
        self._delivered = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the worker and flush() both deliver
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def _open(self, experiment: str, run_name: str | None, run_id: str | None, tags: dict[str, str] | None,
              parent_run_id: str | None, mark_running: bool) -> str:
        """Create (or reopen) the run on the server; returns its id."""
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                artifact_location = None
                if self.tracking_uri.startswith("sqlite:///"):
                    db = Path(self.tracking_uri[len("sqlite:///"):])
                    artifact_location = (db.parent / "mlruns").resolve().as_uri()
                exp_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            else:
                exp_id = exp.experiment_id
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
        elif mark_running:  # a resumed run (e.g. a requeued job) continues as the same MLflow run
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.get_run(run_id)  # fail now (and warn upstream) if the server is unreachable
            if tags:
                for k, v in tags.items():
                    self.client.set_tag(run_id, k, v)
        return run_id

    # ------------------------------------------------------------------ producer side (cheap)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            self._queue.put((k, float(v), now, int(step)))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call(lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk),
                       "log_params")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), "log_artifact")

    def _call(self, fn, what: str) -> None:
        try:
            fn()
        except Exception as e:  # tracking must never stop training
            _warn(f"MLflow {what} failed ({type(e).__name__}: {e}); training continues")

    # ------------------------------------------------------------------ consumer thread

    def _drain_queue(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        overflow = len(self._pending) - self._max_buffer
        if overflow > 0:
            for _ in range(overflow):
                self._pending.popleft()
            self._dropped += overflow
            _warn(f"MLflow buffer full: dropped {overflow} oldest metric points")

    def _deliver(self) -> bool:
        from mlflow.entities import Metric

        while self._pending:
            chunk = [self._pending[i] for i in range(min(self._batch_size, len(self._pending)))]
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in chunk])
            except Exception as e:
                self._failures += 1
                if self._failures == 1 or self._failures % 20 == 0:
                    _warn(f"MLflow unreachable ({type(e).__name__}); {len(self._pending)} metric points "
                          "buffered, retrying")
                return False
            for _ in chunk:
                self._pending.popleft()
            self._delivered += len(chunk)
            self._failures = 0
        return True

    def _worker(self) -> None:
        backoff = self._interval
        while not self._stop.is_set():
            with self._lock:
                self._drain_queue()
                ok = self._deliver()
            backoff = self._interval if ok else min(backoff * 2, 10.0)
            self._stop.wait(backoff)

    # ------------------------------------------------------------------ lifecycle

    @property
    def buffered(self) -> int:
        return len(self._pending) + self._queue.qsize()

    def flush(self, timeout: float = 30.0) -> bool:
        """Deliver everything queued so far (from the caller's thread). True if all arrived."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                self._drain_queue()
                if self._deliver() and self._queue.empty():
                    return True
            time.sleep(min(1.0, max(0.0, deadline - time.time())))
        return False

    def close(self, status: str = "FINISHED", timeout: float = 20.0, terminate: bool = True) -> None:
        """Flush (within `timeout`) and, unless `terminate=False`, mark the run ended with `status`."""
        self._stop.set()
        self._thread.join(timeout=10)
        delivered = self.flush(timeout)
        if not delivered:
            _warn(f"MLflow: {self.buffered} metric points could not be delivered")
        if terminate:
            self._call(lambda: self.client.set_terminated(self.run_id, status=status), "set_terminated")


class NodeSystemMetrics:
    """System metrics (CPU, memory, disk, network, GPU) of one node, sampled into the run.

    One per node (local rank 0); names are `system/<node_id>/<metric>` so the nodes of a
    multi-node run stay apart. MLflow's own sampler stops for good at the first failed request
    and drops the last interval at shutdown, so this samples with MLflow's monitors but delivers
    through a buffered `MlflowTracker` (an outage delays the points, it does not lose them) and
    always publishes a sample at start and at close.
    """

    def __init__(self, run_id: str, tracking_uri: str, node_id: str, interval: float = 10.0):
        self.prefix = f"system/{node_id}/"
        self.interval = interval
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tracker: MlflowTracker | None = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, node_id=node_id,
                                                 tracking_uri=tracking_uri)
            self._tracker = MlflowTracker(tracking_uri, "", run_id=run_id, flush_interval=interval,
                                          mark_running=False)
        except Exception as e:
            _warn(f"MLflow system metrics unavailable ({type(e).__name__}: {e})")
            return
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _publish(self) -> None:
        try:
            self._monitor.collect_metrics()
            metrics = self._monitor.aggregate_metrics()
            for m in self._monitor.monitors:
                m.clear_metrics()
        except Exception as e:  # a sensor that fails must not stop anything
            _warn(f"system metrics: {type(e).__name__}: {e}")
            return
        self._tracker.log_metrics({self.prefix + k: v for k, v in metrics.items()}, self._step)
        self._step += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._publish()

    def close(self) -> None:
        if self._tracker is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._publish()
        self._tracker.close(terminate=False)
        self._tracker = None

"""The CPU-side parts of bench/gpu/check.sh: argument parsing, the offline wheel-folder install and
the JSON report (a CPU smoke run of the whole script with a tiny model; the GPU steps report
themselves as skipped)."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench/gpu/check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

TINY = ["model.hidden=32", "model.heads=2", "model.vocab_size=512", "model.mlp_hidden=64", "model.max_seq_len=16",
        "model.n_core=1", "model.n_prelude=1", "model.n_coda=1", "model.embed_scale=1.0", "data.batch_size=4"]


def make_wheel(folder: Path, name: str = "stars_dummy_pkg", version: str = "0.1") -> Path:
    """A minimal valid wheel (what `pip download` leaves in the folder), written by hand."""
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return whl


def test_parse_args_defaults_and_out_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path / "o"))
    a = check.parse_args([])
    assert a.out == tmp_path / "o" and a.budget_s == 480 and a.device == "cuda"
    assert a.train_seconds == 50 and a.compile_seconds == 15 and a.skip == [] and not a.kernel_bench
    assert a.config == "configs/looped_1b_1gpu.yaml" and a.wheels is None
    monkeypatch.delenv("OUT")
    assert check.parse_args([]).out == Path("gpu_check_out")
    b = check.parse_args(["--skip", "build", "--skip", "compile", "--set", "a.b=1", "--set", "c.d=2",
                          "--wheels", str(tmp_path)])
    assert b.skip == ["build", "compile"] and b.set == ["a.b=1", "c.d=2"] and b.wheels == tmp_path


def test_phase_limits_fit_the_budget():
    """Every phase has its own limit and a process never outlives it (run_step), so the phases
    together stay within --budget-s (8 minutes by default), whatever one of them does."""
    assert sum(v for k, v in check.PHASES.items() if k != "kernel_bench") <= 0.98  # the default phases
    assert set(check.SKIPPABLE) <= set(check.PHASES)


@pytest.mark.parametrize("argv,msg", [(["--budget-s", "0"], "--budget-s"), (["--wheels", "/nonexistent/w"], "not a folder"),
                                      (["--config", "nope.yaml"], "no such file"),
                                      (["--set", "model.hidden=wide"], "model.hidden")])
def test_bad_arguments_are_one_line_exit_2(argv, msg, capsys, tmp_path):
    assert check.main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]


def test_wheel_folder_installs_offline_only_what_the_interpreter_lacks(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    make_wheel(wheels, name="pytest", version="0.0.1")  # the interpreter has pytest: never shadowed
    res = check.install_wheels(wheels, tmp_path / "site")
    assert res["status"] == "ok", res["log_tail"]
    assert res["wheels"] == ["stars_dummy_pkg-0.1-py3-none-any.whl"]
    assert res["already_present"] == ["pytest-0.0.1-py3-none-any.whl"]
    assert not (tmp_path / "site" / "pytest").exists()
    p = subprocess.run([sys.executable, "-c", "import stars_dummy_pkg; print(stars_dummy_pkg.VALUE)"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": res["target"]})
    assert p.stdout.strip() == "42"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(check.UsageError, match="no .whl files"):
        check.install_wheels(empty, tmp_path / "site2")


SLEEPER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, {handler})\n"
           "print('started', flush=True)\n"
           "time.sleep(30)\n")


@pytest.mark.parametrize("handler,status,deadline", [
    ("lambda *a: sys.exit(0)", "ok", True),  # like the trainer: checkpoint, exit 0
    ("signal.SIG_IGN", "timeout", True),  # ignores SIGTERM: killed at the limit
])
def test_run_step_stops_a_phase_within_its_limit(tmp_path, handler, status, deadline):
    env = {**os.environ, "STARS_CHECK_LOG": str(tmp_path / "log")}
    res = check.run_step([sys.executable, "-c", SLEEPER.format(handler=handler)], 4.0, env)
    assert res["status"] == status and res["seconds"] <= 4.0 + 1.0 and "started" in res["log_tail"]
    assert res.get("stopped_at_deadline", False) is (status == "ok")


def test_run_step_stop_condition_sends_sigterm_early(tmp_path):
    env = {**os.environ, "STARS_CHECK_LOG": str(tmp_path / "log")}
    log = tmp_path / "log"  # the child says it started once its handler is in place (as the trainer logs a step)
    res = check.run_step([sys.executable, "-c", SLEEPER.format(handler="lambda *a: sys.exit(0)")], 60.0, env,
                         stop_when=lambda: log.is_file() and "started" in log.read_text())
    assert res["status"] == "ok" and res["seconds"] < 10 and "stopped_at_deadline" not in res


def test_run_step_kill_asks_for_the_report_first(tmp_path):
    """A run whose figures are logged is killed (no checkpoint), after SIGUSR2 let it write its report."""
    env = {**os.environ, "STARS_CHECK_LOG": str(tmp_path / "log")}
    log, report = tmp_path / "log", tmp_path / "report.json"
    child = ("import signal, sys, time, pathlib\n"
             f"signal.signal(signal.SIGUSR2, lambda *a: pathlib.Path({str(report)!r}).write_text('{{}}'))\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "print('started', flush=True)\n"
             "time.sleep(30)\n")
    res = check.run_step([sys.executable, "-c", child], 60.0, env, stop_signal=signal.SIGKILL, report_file=report,
                         stop_when=lambda: log.is_file() and "started" in log.read_text())
    assert res["status"] == "ok" and res["returncode"] == -signal.SIGKILL and res["seconds"] < 10
    assert report.read_text() == "{}"


def test_check_sh_cpu_runs_the_real_trainer_and_writes_the_json_report(tmp_path):
    """The whole script on CPU with a tiny model, compile left out (inductor's first CPU compile
    alone takes minutes on a small machine; the phase is the same trainer call with
    train.compile=block)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    out = tmp_path / "out"
    # --budget-s: this shared CPU may be slow to start a process; the limits themselves are tested above
    cmd = ["bash", str(REPO / "bench/gpu/check.sh"), "--device", "cpu", "--train-seconds", "2", "--skip", "compile",
           "--budget-s", "1500", "--wheels", str(wheels)]
    for s in TINY:
        cmd += ["--set", s]
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    ph, summ = rep["phases"], rep["summary"]
    assert rep["ok"] and ph["wheels"]["status"] == "ok"
    assert {k: ph[k]["status"] for k in ("build", "tests", "compile", "kernel_bench")} == dict.fromkeys(
        ("build", "tests", "compile", "kernel_bench"), "skipped")
    for k in ("data", "peak", "train", "resume", "resume2", "tracking"):
        assert ph[k]["status"] == "ok", (k, ph[k].get("log_tail"))
        if "limit_s" in ph[k]:
            assert ph[k]["seconds"] <= ph[k]["limit_s"] + 1
    assert rep["environment"]["torch"] and "cuda_available" in rep["environment"]
    assert summ["kernels"].startswith("torch")  # no build on CPU
    assert ph["data"]["manifest"]["seq_len"] == 16 and ph["data"]["manifest"]["vocab_size"] <= 512
    # train: the real trainer (stars-train's main), stopped by SIGTERM with a checkpoint
    train = summ["train"]
    n = train["checkpoint_step"]
    assert n == train["last_step"] == train["steps"] >= 1 and "--resume" not in ph["train"]["command"]
    assert "bench/gpu/stars_train.py" in ph["train"]["command"] and "stars.warmup_steps=0" in ph["train"]["command"]
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1 and train["peak_memory"]["max_rss_bytes"] > 0
    assert train["rho_last"] is not None  # the STARS penalty's estimate is on
    # resume: step N+2 in one process vs resumed from the checkpoint of N+1: the same loss
    # killed once its step was logged (a tiny run may have finished by the next poll, or be past
    # main when SIGUSR2 arrives, its handler gone at interpreter shutdown: after its atexit report)
    assert ph["resume2"]["returncode"] in (0, -signal.SIGKILL, -signal.SIGUSR2)
    assert ph["resume2"]["peak_memory"]["max_rss_bytes"] > 0  # on SIGUSR2 before the kill, or at exit
    res = summ["resume"]
    assert res["step"] == n + 2 and res["from_checkpoint"] == f"step_{n + 1:08d}"
    assert res["loss_equal"] and res["same_depth"] and res["same_tokens"]
    assert res["grad_norm_uninterrupted"] == res["grad_norm_resumed"]  # CPU: the whole step is deterministic
    sweep = summ["depth_sweep"]
    assert sweep["depths"] == [1, 2, 4, 8] and sweep["step"] == n + 2 and len(sweep["loss"]) == 4
    # tracking: the sqlite store holds one finished run with every step of both processes
    tr = summ["tracking"]
    assert len(tr["runs"]) == 1 and tr["runs"][0]["status"] == "FINISHED" and tr["loss_points"] == n + 2
    assert tr["runs"][0]["metric_points"]["eval_loss"] == 4 and tr["untracked_warning"] is None
    assert not (out / "run" / "checkpoints").exists()  # the checkpoints are removed once used

"""The CPU-side parts of bench/gpu/check.sh: argument parsing, the offline wheel-folder install and
the JSON report (a CPU smoke run of the whole script with a tiny model; the GPU steps report
themselves as skipped)."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench/gpu/check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

TINY = ["model.hidden=32", "model.heads=2", "model.vocab_size=64", "model.mlp_hidden=64", "model.max_seq_len=16",
        "model.n_core=1", "model.n_prelude=1", "model.n_coda=1", "model.embed_scale=1.0", "data.batch_size=4",
        "train.dtype=fp32"]


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
    assert a.out == tmp_path / "o" and a.budget_s == 480 and a.steps == 10 and a.device == "cuda"
    assert a.config == "configs/looped_1b_1gpu.yaml" and a.wheels is None
    monkeypatch.delenv("OUT")
    assert check.parse_args([]).out == Path("gpu_check_out")
    b = check.parse_args(["--steps", "3", "--skip-build", "--set", "a.b=1", "--set", "c.d=2", "--wheels", str(tmp_path)])
    assert b.steps == 3 and b.skip_build and b.set == ["a.b=1", "c.d=2"] and b.wheels == tmp_path


@pytest.mark.parametrize("argv,msg", [(["--steps", "0"], "--steps"), (["--wheels", "/nonexistent/w"], "not a folder"),
                                      (["--config", "nope.yaml"], "no such file")])
def test_bad_arguments_are_one_line_exit_2(argv, msg, capsys):
    assert check.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]


def test_wheel_folder_installs_offline_into_a_private_target(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    res = check.install_wheels(wheels, tmp_path / "site")
    assert res["status"] == "ok", res["log_tail"]
    assert res["wheels"] == ["stars_dummy_pkg-0.1-py3-none-any.whl"]
    p = subprocess.run([sys.executable, "-c", "import stars_dummy_pkg; print(stars_dummy_pkg.VALUE)"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": res["target"]})
    assert p.stdout.strip() == "42"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(check.UsageError, match="no .whl files"):
        check.install_wheels(empty, tmp_path / "site2")


def test_check_sh_cpu_smoke_writes_the_json_report(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels)
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "bench/gpu/check.sh"), "--device", "cpu", "--steps", "1", "--warmup", "1",
           "--wheels", str(wheels)]
    for s in TINY:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable}, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["ok"] and rep["wheels"]["status"] == "ok"
    assert rep["build"]["status"] == "skipped" and rep["tests"]["status"] == "skipped"
    assert rep["environment"]["torch"] and "cuda_available" in rep["environment"]
    tp = rep["throughput"]
    assert tp["status"] == "ok", tp["log_tail"]
    setting = tp["result"]["settings"]["kernels=torch"]
    assert setting["tokens_per_s"] > 0 and 0 < setting["mfu"] and len(setting["losses"]) == 2
    assert tp["result"]["estimator"]["method"] == "fd" and tp["result"]["checkpointing"] == "loop"
    assert json.loads((out / "throughput.json").read_text()) == tp["result"]

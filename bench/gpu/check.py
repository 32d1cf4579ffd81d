"""The one-call GPU validation behind bench/gpu/check.sh: build, tests/gpu, throughput, one JSON.

    bash bench/gpu/check.sh [--wheels DIR] [--out DIR] [--steps 10] [--budget-s 480]
                            [--skip-build] [--skip-tests] [--skip-throughput] [--device cuda]
                            [--config configs/looped_1b_1gpu.yaml] [--set KEY=VALUE ...]

For a fresh single-GPU machine (H100/H200) with a CUDA torch, Triton and nvcc but no network:
1. `--wheels DIR`: pip-installs every wheel in DIR offline (--no-index --no-deps) into
   OUT/../site (a private target put first on PYTHONPATH). Nothing in this check needs them; they
   are for running the full trainer (megatron-core, webdataset, mlflow-skinny) afterwards.
2. build: JIT-compiles csrc/ (ninja, sm_80 + sm_90) and loads it;
3. tests: `pytest tests/gpu` with the kernels required (a failed build fails them, no skips);
4. throughput: bench/gpu/throughput.py on the config, kernels torch vs cuda;
5. writes OUT/gpu_check.json (environment, every step's status, seconds, log tail, figures) and
   OUT/gpu_tests.xml, OUT/throughput.json; OUT is $OUT when set, else ./gpu_check_out.
Each step has a time limit carved from --budget-s (default 480 s = the 8-minute target); the exit
code is 0 when no step failed (skipped steps do not fail), 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Share of the budget each step may use at most (the rest is slack for start-up and the report).
LIMITS = {"build": 0.45, "tests": 0.30, "throughput": 0.30}


class UsageError(Exception):
    """Bad arguments: one line, exit 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu/check.sh", description="One-call GPU validation of stars_scale.")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                    help="report folder (default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--wheels", type=Path, help="a folder of .whl files to install offline first")
    ap.add_argument("--config", default="configs/looped_1b_1gpu.yaml")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per throughput setting")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all steps")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke run of this script)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (throughput)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.budget_s <= 0:
        raise UsageError("--steps must be >= 1, --warmup >= 0 and --budget-s > 0")
    if args.wheels is not None and not args.wheels.is_dir():
        raise UsageError(f"--wheels {args.wheels}: not a folder")
    if not (REPO / args.config).is_file() and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    return args


def install_wheels(wheel_dir: Path, target: Path) -> dict:
    """pip install every wheel in `wheel_dir` into `target`, offline; the folder must hold wheels."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise UsageError(f"--wheels {wheel_dir}: no .whl files in it")
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, wheels)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return {"status": "ok" if p.returncode == 0 else "failed", "target": str(target),
            "wheels": [w.name for w in wheels], "log_tail": (p.stdout + p.stderr)[-2000:]}


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def run_step(cmd: list[str], timeout: float, env: dict) -> dict:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        status, out = ("ok" if p.returncode == 0 else "failed"), p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:  # its output may come back as bytes even with text=True
        status, out = "timeout", _text(e.stdout) + _text(e.stderr)
    sys.stdout.write(out[-6000:])
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "command": " ".join(cmd),
            "log_tail": out[-3000:]}


def junit_counts(path: Path) -> dict | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    counts["failed_names"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import triton  # noqa: F401
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/stars_scale_torch_extensions")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    paths = [str(REPO)]
    report: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.wheels is not None:
        try:
            report["wheels"] = install_wheels(args.wheels, out.parent / f"{out.name}_site")
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        paths.insert(0, report["wheels"]["target"])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    report["environment"] = environment(args.device)
    cuda = args.device == "cuda" and report["environment"]["cuda_available"]

    def budget(step: str) -> float:
        left = args.budget_s - (time.monotonic() - t_start)
        return max(10.0, min(LIMITS[step] * args.budget_s, left))

    py = sys.executable
    if args.skip_build or not cuda:
        report["build"] = {"status": "skipped", "reason": "--skip-build" if args.skip_build else "no CUDA device"}
    else:
        print("== build csrc/ (JIT, ninja)", flush=True)
        report["build"] = run_step([py, "-c", "from stars_scale.kernels.extension import jit_build; jit_build(True)"],
                                   budget("build"), env)
    built = report["build"]["status"] == "ok"
    if args.skip_tests or not cuda:
        report["tests"] = {"status": "skipped", "reason": "--skip-tests" if args.skip_tests else "no CUDA device"}
    else:
        print("== tests/gpu", flush=True)
        tenv = {**env, "STARS_KERNELS_JIT": "1", "STARS_REQUIRE_KERNELS": "1"}
        xml = out / "gpu_tests.xml"
        report["tests"] = run_step([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu",
                                    f"--junitxml={xml}"], budget("tests"), tenv)
        report["tests"]["counts"] = junit_counts(xml)
    if args.skip_throughput:
        report["throughput"] = {"status": "skipped", "reason": "--skip-throughput"}
    else:
        print("== throughput", flush=True)
        kernels = "torch,cuda" if built else "torch"
        tp_json = out / "throughput.json"
        cmd = [py, "bench/gpu/throughput.py", "--config", args.config, "--kernels", kernels, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--json", str(tp_json)]
        for s in args.set:
            cmd += ["--set", s]
        report["throughput"] = run_step(cmd, budget("throughput"), {**env, "STARS_KERNELS_JIT": "1" if built else "0"})
        if tp_json.is_file():
            report["throughput"]["result"] = json.loads(tp_json.read_text())
    report["seconds"] = round(time.monotonic() - t_start, 1)
    failed = [k for k in ("wheels", "build", "tests", "throughput") if report.get(k, {}).get("status") in ("failed", "timeout")]
    report["ok"] = not failed
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"== gpu check: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['seconds']} s; "
          f"report {out / 'gpu_check.json'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The one-call GPU validation behind bench/gpu/check.sh: build, tests/gpu, the real trainer, one JSON.

    bash bench/gpu/check.sh [--wheels DIR] [--out DIR] [--budget-s 480] [--device cuda]
                            [--config configs/looped_1b_1gpu.yaml] [--set KEY=VALUE ...]
                            [--train-seconds 50] [--compile-seconds 15] [--skip PHASE ...] [--kernel-bench]

For a fresh single-GPU machine (H100/H200) with a CUDA torch, Triton and nvcc but no network. The
phases, in order, each with its own time limit (a share of --budget-s, PHASES below), so a slow
phase ends as "timeout" and the next one still runs:

  wheels   `--wheels DIR`: pip-installs every wheel in DIR offline (--no-index --no-deps) into
           OUT/../<out>_site, put first on PYTHONPATH for every later phase;
  build    JIT-compiles csrc/ (ninja) and loads it (CUDA only);
  tests    `pytest tests/gpu` with the kernels required (CUDA only);
  data     the check's own dataset, made as a user makes one: a generated text corpus,
           `stars-data train-tokenizer`, `stars-data prepare` (shards + val split);
  peak     the dense bf16 matmul FLOP/s of the device (8192³ on CUDA), MFU's denominator;
  train    `stars-train` (bench/gpu/stars_train.py: the CLI's main plus the peak memory at exit)
           on the config with the check's overrides (TRAIN_OVERRIDES: the shards above, the STARS
           penalty on from step 1, one batch per step, every step logged), tracking to
           sqlite:///OUT/mlflow.db; SIGTERM after --train-seconds of steps, which the trainer
           answers with a DCP checkpoint at step N;
  resume   `stars-train --resume` from step N with train.steps = N + 2 and a periodic checkpoint
           at N + 1: it trains N + 1 and N + 2 in one process, finishes (final checkpoint, the
           depth sweep of eval.depths, MLflow run closed); then
  resume2  a fresh `stars-train --resume <step N+1>` into another directory trains step N + 2
           again (killed once it is logged): its loss must equal the uninterrupted one (same
           weights, batch, depth, RNG);
  tracking reads the run back from the MLflow store (metric points per name);
  compile  the same config with `train.compile: block`, killed after --compile-seconds of steps
           past the first (which pays the compilation);
  kernel_bench (only with --kernel-bench) bench/gpu/throughput.py: kernels cuda vs torch.

OUT/gpu_check.json holds the environment, every phase's status, seconds, command and log tail,
and `summary`: tokens/s, MFU and peak memory of the eager and compiled runs, resume equality, the
depth sweep and the tracked metric counts (docs/gpu.md, "Reading gpu_check.json"). Exit code 0
when no phase failed or timed out (skipped phases do not fail), 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Each phase's share of --budget-s (at the default 480 s: seconds in brackets); the rest is
# slack for start-up and the report.
PHASES = {"build": 0.18, "tests": 0.08, "data": 0.02, "peak": 0.02, "train": 0.22,  # 86 38 10 10 106
          "resume": 0.19, "resume2": 0.08, "tracking": 0.02, "compile": 0.17,  # 91 38 10 82: 470 s of 480
          "kernel_bench": 0.06}  # opt-in (--kernel-bench): 29 s more
SAVE_GRACE = 30.0  # seconds a trainer phase keeps after its deadline's SIGTERM for the checkpoint (1B: ~11 GB)
SKIPPABLE = ("build", "tests", "compile")
STEADY_SKIP = 3  # steps left out of the medians: allocator, autotuning, lazy kernel loads
# What the check sets on top of --config (a --set of the user's comes after and wins).
TRAIN_OVERRIDES = ["data.kind=shards", "data.mixture=[]", "data.num_workers=1", "data.val_batches=2",
                   "stars.warmup_steps=0", "train.grad_accum=1", "train.log_every=1", "train.ckpt_every=0",
                   "train.keep_last=2", "train.eval_every=0", "train.progress=false", "train.steps=1000000",
                   "optim.warmup_steps=10", "eval.depths=[1,2,4,8]", "eval.samples=8", "eval.rho_iters=2",
                   "eval.batch_size=4", "tracking.mlflow=true", "tracking.experiment=gpu_check",
                   "tracking.required=false"]


class UsageError(Exception):
    """Bad arguments: one line, exit 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu/check.sh", description="One-call GPU validation of stars_scale.")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                    help="report folder (default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--wheels", type=Path, help="a folder of .whl files to install offline first")
    ap.add_argument("--config", default="configs/looped_1b_1gpu.yaml")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all phases")
    ap.add_argument("--train-seconds", type=float, default=50.0, help="seconds of training steps in `train`")
    ap.add_argument("--compile-seconds", type=float, default=15.0, help="seconds of steps after the first in `compile`")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke run of this script)")
    ap.add_argument("--skip", action="append", default=[], choices=SKIPPABLE, help="leave a phase out (repeatable)")
    ap.add_argument("--kernel-bench", action="store_true",
                    help="also time the fused kernels against PyTorch's ops (bench/gpu/throughput.py; +6%% of the budget)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (every run)")
    args = ap.parse_args(argv)
    if args.budget_s <= 0 or args.train_seconds <= 0 or args.compile_seconds <= 0:
        raise UsageError("--budget-s, --train-seconds and --compile-seconds must be > 0")
    if args.device not in ("cuda", "cpu"):
        raise UsageError(f"--device {args.device}: expected cuda or cpu")
    if args.wheels is not None and not args.wheels.is_dir():
        raise UsageError(f"--wheels {args.wheels}: not a folder")
    if not (REPO / args.config).is_file() and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    return args


def installed(wheel: Path) -> bool:
    """Whether this interpreter already has the wheel's distribution (any version)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(wheel.name.split("-")[0])
        return True
    except PackageNotFoundError:
        return False


def install_wheels(wheel_dir: Path, target: Path) -> dict:
    """pip install, offline, every wheel in `wheel_dir` whose distribution this interpreter lacks
    into `target` (the image's own packages are never shadowed); the folder must hold wheels."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise UsageError(f"--wheels {wheel_dir}: no .whl files in it")
    present = [w for w in wheels if installed(w)]
    todo = [w for w in wheels if w not in present]
    target.mkdir(parents=True, exist_ok=True)
    rc, log = 0, ""
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, todo)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        rc, log = p.returncode, p.stdout + p.stderr
    return {"status": "ok" if rc == 0 else "failed", "target": str(target), "wheels": [w.name for w in todo],
            "already_present": [w.name for w in present],
            "mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 1), "log_tail": log[-2000:]}


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def run_step(cmd: list[str], limit: float, env: dict, *, stop_when=None, stop_signal: int = signal.SIGTERM,
             grace: float | None = None, report_file: Path | None = None) -> dict:
    """Run `cmd` (cwd: the repo) within `limit` seconds.

    `stop_when()`, polled every 0.5 s, True: `stop_signal` to the process (SIGTERM: the trainer
    finishes its step, checkpoints and exits 0; SIGKILL: stop now, when what was wanted is already
    on disk and a checkpoint would only cost time). At the deadline, `limit` less `grace` (default
    min(20 s, limit/4): the time a checkpoint needs), SIGTERM; at `limit` the process group is
    killed. Status: ok (exit 0, also after the deadline's SIGTERM, then `stopped_at_deadline`; or
    killed by the stop condition's SIGKILL), failed (another exit), timeout (killed at the limit,
    or no exit 0 after the deadline's SIGTERM). With `report_file`, a SIGKILL is preceded by
    SIGUSR2 and a wait (at most 5 s) for the process to write that file (bench/gpu/stars_train.py
    writes its peak memory there)."""
    t0 = time.monotonic()
    term_at = limit - (min(20.0, limit / 4) if grace is None else grace)
    log = Path(env["STARS_CHECK_LOG"])
    stopped = deadline = killed = False
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        while p.poll() is None:
            now = time.monotonic() - t0
            if not (stopped or deadline) and stop_when is not None and stop_when():
                stopped = True
                if stop_signal == signal.SIGKILL:
                    if report_file is not None:
                        p.send_signal(signal.SIGUSR2)
                        waited = time.monotonic()
                        while not report_file.is_file() and time.monotonic() - waited < 5 and p.poll() is None:
                            time.sleep(0.1)
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.send_signal(stop_signal)
            elif not (stopped or deadline) and now >= term_at:
                deadline = True
                p.send_signal(signal.SIGTERM)
            if now >= limit:
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
                p.wait()
                break
            time.sleep(0.5)
    out = log.read_text(errors="replace")
    sys.stdout.write(out[-4000:])
    # killed by the stop condition: SIGKILL, or SIGUSR2 itself when it reached a process already past
    # main (its handler gone at interpreter shutdown)
    by_stop = stopped and stop_signal == signal.SIGKILL and p.returncode in (-signal.SIGKILL, -signal.SIGUSR2)
    ok = (p.returncode == 0 or by_stop) and not killed
    status = "ok" if ok else ("timeout" if killed or deadline else "failed")
    res = {"status": status, "returncode": p.returncode, "seconds": round(time.monotonic() - t0, 1),
           "limit_s": round(limit, 1), "command": " ".join(cmd), "log_tail": out[-3000:]}
    if ok and deadline:
        res["stopped_at_deadline"] = True
    return res


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


def environment() -> dict:
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


# ---------------------------------------------------------------------- the check's dataset


def write_corpus(path: Path, n_chars: int, seed: int = 0) -> None:
    """Generated text with something to learn: 2,000 made-up words, each followed by one of its
    8 successors (a fixed random Markov chain), sentences of 5-20 words, paragraphs of 2-6."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "ba", "do", "fe", "gi", "ho", "ju"]
    words = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(4000)})[:2000]
    succ = {w: rng.sample(words, 8) for w in words}
    parts, size = [], 0
    while size < n_chars:
        para = []
        for _ in range(rng.randint(2, 6)):
            w = rng.choice(words)
            sent = [w]
            for _ in range(rng.randint(4, 19)):
                w = rng.choice(succ[w])
                sent.append(w)
            para.append(" ".join(sent).capitalize() + ".")
        parts.append(" ".join(para))
        size += len(parts[-1]) + 2
    path.write_text("\n\n".join(parts) + "\n")


def make_dataset(out: Path, vocab: int, seq_len: int, env: dict, budget: float) -> dict:
    py = sys.executable
    corpus = out / "corpus.txt"
    write_corpus(corpus, n_chars=max(60_000, 2_000 * seq_len))
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.monotonic()
    tok = run_step([py, "-m", "stars_scale.cli.data", "train-tokenizer", str(corpus), "--out", str(out / "tokenizer.json"),
                    "--vocab-size", str(min(vocab, 4096)), "--txt-docs", "paragraph"], budget, env)
    if tok["status"] != "ok":
        return {**tok, "phase": "train-tokenizer"}
    left = max(10.0, budget - (time.monotonic() - t0))
    res = run_step([py, "-m", "stars_scale.cli.data", "prepare", str(corpus), "--tokenizer", str(out / "tokenizer.json"),
                    "--out", str(data), "--seq-len", str(seq_len), "--val-fraction", "0.1", "--txt-docs", "paragraph",
                    "--blocks-per-shard", "64", "--no-progress"], left, env)
    res["seconds"] = round(time.monotonic() - t0, 1)
    if res["status"] == "ok":
        res["manifest"] = {k: v for k, v in json.loads((data / "manifest.json").read_text()).items()
                           if k in ("vocab_size", "seq_len", "splits")}
    return res


# ---------------------------------------------------------------------- reading the runs


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return rows


def steps_logged(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except OSError:
        return 0


def stop_after_steps_for(path: Path, seconds: float):
    """A stop_when: True once `seconds` have passed since the first step was logged."""
    first: list[float] = []

    def stop() -> bool:
        if not first and steps_logged(path) > 0:
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= seconds
    return stop


def run_figures(cfg, rows: list[dict], peak_flops: float | None, peak_mem: dict | None) -> dict:
    """tokens/s, MFU and step time over the steady steps of a run's metrics.jsonl rows.
    MFU: the model FLOPs of each step at its own depth (stars_scale.plan's count: loops included,
    recompute and the STARS estimator not) over the step's time, against the measured peak."""
    from stars_scale.plan import flops_per_token, param_counts
    from stars_scale.plan.counting import DepthStats

    rows = [r for r in rows if "step_time" in r and "tokens_per_s" in r]
    steady = rows[STEADY_SKIP:] if len(rows) > STEADY_SKIP else rows
    if not steady:
        return {"steps": len(rows)}
    counts = param_counts(cfg.model)
    flops = tokens = seconds = 0.0
    for r in steady:
        d, g = int(r["depth"]), int(r["n_grad"])
        ds = DepthStats(1, float(d), float(d - g), float(g), d, d, g, d)
        n = r["tokens_per_s"] * r["step_time"]
        flops += flops_per_token(cfg.model, counts, cfg.model.max_seq_len, ds).total * n
        tokens += n
        seconds += r["step_time"]
    out = {"steps": len(rows), "steady_steps": len(steady), "first_step": rows[0]["step"],
           "last_step": rows[-1]["step"], "tokens_per_s": tokens / seconds,
           "median_step_s": statistics.median(r["step_time"] for r in steady),
           "mean_depth": statistics.fmean(r["depth"] for r in steady),
           "model_flops_per_s": flops / seconds, "mfu": flops / seconds / peak_flops if peak_flops else None,
           "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
           "rho_last": next((r["rho"] for r in reversed(rows) if r.get("rho") is not None), None)}
    if peak_mem:
        out["peak_memory"] = peak_mem
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from stars_scale.config import load_config
    from stars_scale.errors import UserError

    t_start = time.monotonic()
    out = args.out.resolve()
    config_arg = str(args.config if Path(args.config).is_file() else REPO / args.config)
    overrides = list(TRAIN_OVERRIDES) + [f"data.path={out / 'data'}",
                                         f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}"] + list(args.set)
    try:
        cfg = load_config(config_arg, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STARS_CHECK_LOG": str(out / "phase.log")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the check's own store
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/stars_scale_torch_extensions")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    paths = [str(REPO)]
    report: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "phases": {}}
    phases = report["phases"]
    if args.wheels is not None:
        try:
            phases["wheels"] = install_wheels(args.wheels, out.parent / f"{out.name}_site")
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        paths.insert(0, phases["wheels"]["target"])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    report["environment"] = environment()
    cuda = args.device == "cuda" and report["environment"]["cuda_available"]
    py = sys.executable

    def budget(phase: str) -> float:
        return PHASES[phase] * args.budget_s

    def skipped(phase: str, reason: str) -> None:
        phases[phase] = {"status": "skipped", "reason": reason}

    def banner(phase: str) -> None:
        print(f"== {phase} (limit {budget(phase):.0f} s; {time.monotonic() - t_start:.0f} s so far)", flush=True)

    # ---- build, tests
    if "build" in args.skip or not cuda:
        skipped("build", "--skip build" if "build" in args.skip else "no CUDA device")
    else:
        banner("build")
        phases["build"] = run_step([py, "-c", "from stars_scale.kernels.extension import jit_build; jit_build(True)"],
                                   budget("build"), env)
    built = phases["build"]["status"] == "ok"
    kernel_env = {**env, "STARS_KERNELS_JIT": "1" if built else "0"}
    if "tests" in args.skip or not cuda:
        skipped("tests", "--skip tests" if "tests" in args.skip else "no CUDA device")
    else:
        banner("tests")
        xml = out / "gpu_tests.xml"
        phases["tests"] = run_step([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", f"--junitxml={xml}"],
                                   budget("tests"), {**kernel_env, "STARS_REQUIRE_KERNELS": "1"})
        phases["tests"]["counts"] = junit_counts(xml)

    banner("data")
    phases["data"] = make_dataset(out, cfg.model.vocab_size, cfg.model.max_seq_len, env, budget("data"))

    banner("peak")
    peak_json = out / "peak.json"
    phases["peak"] = run_step([py, "-c", "import json, sys, torch; sys.path.insert(0, 'bench/gpu'); "
                               "from throughput import matmul_peak; "
                               f"json.dump({{'flops': matmul_peak(torch.device({args.device!r}))}}, "
                               f"open({str(peak_json)!r}, 'w'))"], budget("peak"), env)
    peak_flops = (read_json(peak_json) or {}).get("flops")
    phases["peak"]["bf16_matmul_flops"] = peak_flops

    def train_cmd(run_dir: Path, *extra: str, sets: list[str] = ()) -> list[str]:
        cmd = [py, "bench/gpu/stars_train.py", "--config", config_arg, "--out", str(run_dir), *extra]
        for s in overrides + list(sets):
            cmd += ["--set", s]
        return cmd

    def trainer_phase(phase: str, run_dir: Path, *extra: str, sets: list[str] = (), stop=None,
                      stop_signal: int = signal.SIGTERM) -> dict:
        banner(phase)
        mem = out / f"peak_memory_{phase}.json"
        mem.unlink(missing_ok=True)
        res = run_step(train_cmd(run_dir, *extra, sets=sets), budget(phase),
                       {**kernel_env, "STARS_PEAK_MEMORY_JSON": str(mem)}, stop_when=stop, stop_signal=stop_signal,
                       grace=min(SAVE_GRACE, budget(phase) / 3), report_file=mem)
        res["peak_memory"] = read_json(mem)
        return res

    data_ok = phases["data"]["status"] == "ok"
    summary: dict = {"kernels": "cuda (csrc/ built)" if built else "torch (csrc/ not built: see phases.build)"}
    report["summary"] = summary
    run = out / "run"
    for d in (run, out / "run_resumed", out / "run_compile"):
        shutil.rmtree(d, ignore_errors=True)
    (out / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(out / "mlruns", ignore_errors=True)

    # ---- train: ~train_seconds of steps, stopped by SIGTERM -> checkpoint at step N
    if not data_ok:
        for p in ("train", "resume", "resume2", "tracking"):
            skipped(p, "no dataset (the data phase failed)")
    else:
        phases["train"] = trainer_phase("train", run, stop=stop_after_steps_for(run / "metrics.jsonl", args.train_seconds))
        rows = read_metrics(run / "metrics.jsonl")
        summary["train"] = run_figures(cfg, rows, peak_flops, phases["train"]["peak_memory"])
        untracked = [ln for ln in phases["train"]["log_tail"].splitlines() if "NOT tracked" in ln]
        saved = sorted((run / "checkpoints").glob("step_*/trainer_state.json"))
        state = read_json(saved[-1]) if saved else None
        n = state["step"] if state else None
        summary["train"].update({"checkpoint_step": n, "untracked_warning": untracked[0] if untracked else None})

        # ---- resume: N -> N+1 (periodic checkpoint) -> N+2 (final checkpoint, depth sweep) in one process
        if n is None:
            for p in ("resume", "resume2"):
                skipped(p, "the train phase left no checkpoint")
        else:
            sets = [f"train.steps={n + 2}", f"train.ckpt_every={n + 1}"]
            phases["resume"] = trainer_phase("resume", run, "--resume", sets=sets)
            mid = run / "checkpoints" / f"step_{n + 1:08d}"
            if phases["resume"]["status"] != "ok" or not mid.is_dir():
                skipped("resume2", f"no checkpoint {mid.name} from the resume phase")
            else:
                # resume2: step N+2 again from the checkpoint of N+1, in a fresh process; killed once
                # the step is logged (its final checkpoint would only cost time)
                again = out / "run_resumed" / "metrics.jsonl"
                phases["resume2"] = trainer_phase("resume2", out / "run_resumed", "--resume", str(mid),
                                                  sets=sets + ["eval.depths=[]", "tracking.mlflow=false"],
                                                  stop=lambda: steps_logged(again) >= 1, stop_signal=signal.SIGKILL)
                shutil.rmtree(out / "run_resumed" / "checkpoints", ignore_errors=True)
                a = next((r for r in read_metrics(run / "metrics.jsonl") if r.get("step") == n + 2), None)
                b = next((r for r in read_metrics(out / "run_resumed" / "metrics.jsonl") if r.get("step") == n + 2), None)
                if a and b:
                    summary["resume"] = {
                        "from_checkpoint": mid.name, "step": n + 2, "loss_uninterrupted": a["loss"],
                        "loss_resumed": b["loss"], "loss_equal": a["loss"] == b["loss"],
                        "abs_diff": abs(a["loss"] - b["loss"]),
                        "same_depth": a["depth"] == b["depth"], "same_tokens": a["tokens"] == b["tokens"],
                        "grad_norm_uninterrupted": a.get("grad_norm"), "grad_norm_resumed": b.get("grad_norm")}
                    if phases["resume2"]["status"] == "ok" and not summary["resume"]["loss_equal"]:
                        phases["resume2"]["status"] = "failed"
                        phases["resume2"]["reason"] = "the resumed step's loss differs from the uninterrupted one"
            summary["depth_sweep"] = read_json(run / "depth_scaling.json")
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # 12 bytes/parameter each: free the disk

        # ---- tracking: the run as the store holds it
        banner("tracking")
        track_json = out / "tracking.json"
        track_json.unlink(missing_ok=True)
        code = ("import json, sys\n"
                "from mlflow.tracking import MlflowClient\n"
                f"c = MlflowClient(tracking_uri={cfg.tracking.tracking_uri!r})\n"
                f"exp = c.get_experiment_by_name({cfg.tracking.experiment!r})\n"
                "runs = c.search_runs([exp.experiment_id]) if exp else []\n"
                "out = [{'run_id': r.info.run_id, 'status': r.info.status, 'metric_points': "
                "{k: len(c.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}} for r in runs]\n"
                f"json.dump(out, open({str(track_json)!r}, 'w'))\n")
        phases["tracking"] = run_step([py, "-c", code], budget("tracking"), env)
        runs = read_json(track_json)
        summary["tracking"] = {"uri": cfg.tracking.tracking_uri, "runs": runs,
                               "loss_points": runs[0]["metric_points"].get("loss") if runs else None,
                               "untracked_warning": summary["train"]["untracked_warning"]}
        if phases["tracking"]["status"] == "ok" and not runs:
            phases["tracking"]["status"] = "failed"
            phases["tracking"]["reason"] = "no run in the store"

    # ---- compile: the same config with train.compile: block
    if "compile" in args.skip or not data_ok:
        skipped("compile", "--skip compile" if "compile" in args.skip else "no dataset (the data phase failed)")
    else:
        compiled = out / "run_compile" / "metrics.jsonl"
        phases["compile"] = trainer_phase("compile", out / "run_compile", sets=["train.compile=block",
                                          "tracking.mlflow=false", "eval.depths=[]"],
                                          stop=stop_after_steps_for(compiled, args.compile_seconds),
                                          stop_signal=signal.SIGKILL)  # the figures are logged; no checkpoint
        shutil.rmtree(out / "run_compile" / "checkpoints", ignore_errors=True)
        rows = read_metrics(out / "run_compile" / "metrics.jsonl")
        summary["compile"] = run_figures(cfg, rows, peak_flops, phases["compile"]["peak_memory"])
        if rows:
            summary["compile"]["first_step_s"] = rows[0]["step_time"]
        eager = summary.get("train", {}).get("tokens_per_s")
        if eager and summary["compile"].get("tokens_per_s"):
            summary["compile"]["speedup_vs_eager"] = summary["compile"]["tokens_per_s"] / eager

    # ---- kernel_bench: the fused kernels against PyTorch's ops on the same steps (bench/gpu/throughput.py)
    if not args.kernel_bench or not built:
        skipped("kernel_bench", "no built kernels" if args.kernel_bench else "not asked for (--kernel-bench)")
    else:
        banner("kernel_bench")
        tp_json = out / "kernel_bench.json"
        cmd = [py, "bench/gpu/throughput.py", "--config", config_arg, "--kernels", "torch,cuda", "--steps", "3",
               "--warmup", "1", "--device", args.device, "--json", str(tp_json)]
        for s in args.set:
            cmd += ["--set", s]
        phases["kernel_bench"] = run_step(cmd, budget("kernel_bench"), kernel_env)
        summary["kernel_bench"] = read_json(tp_json)

    report["seconds"] = round(time.monotonic() - t_start, 1)
    failed = [k for k, v in phases.items() if v.get("status") in ("failed", "timeout")]
    report["ok"] = not failed
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"== gpu check: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['seconds']} s; "
          f"report {out / 'gpu_check.json'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

"""stars-launch slurm without a cluster: rendered scripts, layout checks and clear errors."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import stars_scale
from stars_scale.cli import launch as cli
from stars_scale.errors import UserError
from stars_scale.launch import slurm
from stars_scale.launch.sweep import parse_sweep, split_values

REPO = Path(stars_scale.__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """No reachable Slurm cluster: sinfo (if installed) reads a config that does not exist."""
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("STARS_LAUNCH_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def launch(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["slurm", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def normalise(text: str, cwd: Path) -> str:
    """Replace the machine-specific paths of a rendered script by placeholders."""
    for path, name in sorted([(str(cwd), "<CWD>"), (str(REPO), "<REPO>"), (sys.executable, "<PYTHON>")],
                             key=lambda p: -len(p[0])):
        text = text.replace(path, name)
    return text


TP2PP2 = """\
model: {hidden: 64, heads: 4, n_core: 2}
stars: {method: fd}
parallel: {tp: 2, pp: 2, zero: 1, microbatches: 4}
tracking: {run_name: tp2pp2}
"""


def test_dry_run_4_nodes_8_gpus_tp2_pp2_matches_expected(no_cluster, capsys):
    cfg = write_config(no_cluster / "big.yaml", TP2PP2)
    rc, out, err = launch(capsys, "--config", str(cfg), "--nodes", "4", "--gpus-per-node", "8",
                          "--partition", "gpu", "--time", "2-00:00:00", "--account", "proj1",
                          "--dry-run")
    assert rc == 0, err
    expected = (DATA / "sbatch_4x8_tp2pp2.expected").read_text()
    assert normalise(out, no_cluster) == expected
    assert "world 32: tp 2 x pp 2 x dp 8" in err
    assert not (no_cluster / "runs").exists()  # a dry run writes nothing


def test_dry_run_array_sweep_srun_mode_matches_expected(no_cluster, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = write_config(no_cluster / "sweep.yaml", "tracking: {run_name: lam}\n")
    rc, out, err = launch(capsys, "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "4",
                          "--mode", "srun", "--array", "stars.lam=0,0.05", "--array",
                          "depth.dist=lognormal,poisson-lognormal", "--out", "sweeps/lam",
                          "--sbatch=--qos=high", "--signal-seconds", "120", "--dry-run")
    assert rc == 0, err
    expected = (DATA / "sbatch_array_srun.expected").read_text()
    assert normalise(out, no_cluster) == expected
    assert "4 array tasks" in err


@pytest.mark.parametrize("argv,lines", [
    # CPU job, torchrun: one task per node, 2 workers each
    (["--nodes", "2", "--procs-per-node", "2"],
     ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "export STARS_NPROC_PER_NODE=2",
      "export STARS_LAUNCH_MODE=torchrun"]),
    # CPU job, srun mode: one task per process
    (["--nodes", "3", "--procs-per-node", "4", "--mode", "srun"],
     ["#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=4", "export STARS_LAUNCH_MODE=srun",
      "--ntasks-per-node=4 --kill-on-bad-exit=1"]),
    # one GPU node, shared rather than exclusive, CPUs per task
    (["--nodes", "1", "--gpus-per-node", "4", "--shared", "--cpus-per-task", "32"],
     ["#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32", "export STARS_NPROC_PER_NODE=4"]),
    (["--nodes", "1", "--resume", "--job-name", "again"],
     ["#SBATCH --job-name=again", "export STARS_RESUME=1"]),
])
def test_dry_run_layouts(no_cluster, capsys, argv, lines):
    # the trainer's layout rules apply at submission: 48 rows split over 1, 4 and 12 ranks
    cfg = write_config(no_cluster / "c.yaml", "parallel: {tp: 1}\ndata: {batch_size: 48}\n")
    rc, out, err = launch(capsys, "--config", str(cfg), *argv, "--dry-run")
    assert rc == 0, err
    for line in lines:
        assert line in out.splitlines() or line in out
    assert ("#SBATCH --exclusive" in out) == ("--gpus-per-node" in argv and "--shared" not in argv)


def test_rendered_scripts_are_valid_bash(no_cluster, capsys):
    cfg = write_config(no_cluster / "c.yaml", TP2PP2)
    for extra in ([], ["--array", "stars.lam=0,0.1", "--mode", "srun"]):
        rc, out, err = launch(capsys, "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "2",
                              *extra, "--dry-run")
        assert rc == 0, err
        check = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("config,argv,needle", [
    (TP2PP2, ["--nodes", "1", "--gpus-per-node", "2"],
     "parallel.tp × parallel.pp = 2 × 2 = 4 does not divide the world size 2 (--nodes 1 x --gpus-per-node 2)"),
    ("parallel: {tp: 4}\n", ["--nodes", "3", "--gpus-per-node", "2"],
     "parallel.tp × parallel.pp = 4 × 1 = 4 does not divide the world size 6 (--nodes 3 x --gpus-per-node 2)"),
    ("parallel: {pp: 3}\n", ["--nodes", "2", "--procs-per-node", "2"],
     "parallel.tp × parallel.pp = 1 × 3 = 3 does not divide the world size 4 (--nodes 2 x --procs-per-node 2)"),
    # the trainer's rules, at submission: pp needs a core block per stage
    ("parallel: {pp: 2}\n", ["--nodes", "1", "--gpus-per-node", "2"],
     "parallel.pp=2 is larger than model.n_core=1"),
    ("parallel: {tp: 2}\nstars: {method: fd}\n", ["--nodes", "2", "--gpus-per-node", "2", "--array",
                                                 "parallel.tp=1,3"],
     "--array task 1 (parallel.tp=3): parallel.tp × parallel.pp = 3 × 1 = 3 does not divide the world size 4"),
    ("{}\n", ["--nodes", "1", "--gpus-per-node", "8", "--procs-per-node", "4"],
     "--procs-per-node 4: GPU jobs run one process per GPU"),
    ("model: {hiden: 3}\n", ["--nodes", "1"], "model.hiden: unknown config key"),
    ("{}\n", ["--nodes", "1", "--set", "stars.lamda=0.1"], "stars.lamda: unknown config key"),
    ("{}\n", ["--nodes", "1", "--array", "stars.lam=0,7"], "--array task 1 (stars.lam=7): "),
    ("{}\n", ["--nodes", "1", "--array", "stars.nope=1,2"], "stars.nope: unknown config key"),
    ("{}\n", ["--nodes", "1", "--array", "stars.lam"], "--array 'stars.lam': expected KEY=V1,V2"),
    ("{}\n", ["--nodes", "1", "--array", "stars.lam=0,,1"], "--array stars.lam: empty value"),
    ("{}\n", ["--nodes", "1", "--array", "eval.depths=[1,2"], "--array eval.depths: unbalanced"),
    ("{}\n", ["--nodes", "1", "--array", "stars.lam=0,1", "--array", "stars.lam=2"],
     "--array stars.lam: given more than once"),
    ("{}\n", ["--nodes", "1", "--set", "stars.lam=0.1", "--array", "stars.lam=0,1"],
     "--array stars.lam: also given with --set"),
    ("{}\n", ["--nodes", "1", "--partition", "gpu;rm"], "--partition 'gpu;rm': expected a partition name"),
    ("{}\n", ["--nodes", "1", "--time", "1 day"], "--time '1 day': expected minutes"),
    ("{}\n", ["--nodes", "1", "--time", "4"], "--time 4: the job must run longer than the preemption warning"),
    ("{}\n", ["--nodes", "1", "--account", "a b"], "--account 'a b': expected letters"),
    ("{}\n", ["--nodes", "1", "--out", "has space"], "the path must not contain whitespace"),
    ("{}\n", ["--nodes", "1", "--python", "python3"], "--python 'python3': expected an absolute path"),
    ("{}\n", ["--nodes", "1", "--sbatch", "qos=high"], "--sbatch 'qos=high': expected one sbatch option"),
    ("{}\n", ["--nodes", "1", "--sbatch=--qos=high; touch /tmp/x"], "expected one sbatch option"),
    ("{}\n", ["--nodes", "1", "--sbatch=--comment=$(id)"], "expected one sbatch option"),
    ("{}\n", ["--nodes", "1", "--sbatch=-p gpu"], "expected one sbatch option"),
    ("{}\n", ["--nodes", "1", "--sbatch=--qos=high\n#SBATCH --x"], "expected one sbatch option"),
    ("{}\n", ["--nodes", "1", "--module", "not a module"], "--module 'not a module'"),
])
def test_bad_input_is_one_clear_line(no_cluster, capsys, config, argv, needle):
    cfg = write_config(no_cluster / "c.yaml", config)
    rc, out, err = launch(capsys, "--config", str(cfg), *argv, "--dry-run")
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert needle in err


def test_missing_config_file(no_cluster, capsys):
    rc, out, err = launch(capsys, "--config", str(no_cluster / "nope.yaml"), "--nodes", "1", "--dry-run")
    assert rc == 2 and out == ""
    assert err == f"error: {no_cluster / 'nope.yaml'}: config file not found\n"


@pytest.mark.parametrize("argv,needle", [
    (["slurm", "--nodes", "1"], "the following arguments are required: --config"),
    (["slurm", "--config", "c.yaml", "--nodes", "0"], "argument --nodes: must be >= 1, got 0"),
    (["slurm", "--config", "c.yaml", "--nodes", "two"], "argument --nodes: expected an integer"),
    (["slurm", "--config", "c.yaml", "--nodes", "1", "--mode", "mpirun"], "argument --mode: invalid choice"),
    (["kubernetes"], "invalid choice: 'kubernetes'"),
])
def test_console_script_usage_errors(no_cluster, argv, needle):
    """As a user runs it: one line on stderr, exit 2, no traceback."""
    (no_cluster / "c.yaml").write_text("{}\n")
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.launch", *argv], capture_output=True,
                         text=True, cwd=no_cluster, env=os.environ.copy())
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert needle in res.stderr


def test_console_script_config_error_has_no_traceback(no_cluster):
    (no_cluster / "c.yaml").write_text("parallel: {tp: 8}\n")
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.launch", "slurm", "--config", "c.yaml",
                          "--nodes", "1", "--gpus-per-node", "4"], capture_output=True, text=True,
                         cwd=no_cluster, env=os.environ.copy())
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("error: parallel.tp × parallel.pp = 8 × 1 = 8 does not divide the world size 4 "
                          "(--nodes 1 x --gpus-per-node 4): run a multiple of 8 processes or change parallel.tp/pp\n")


def test_submit_without_sbatch_is_a_clear_error(no_cluster, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(no_cluster / "empty-bin"))
    cfg = write_config(no_cluster / "c.yaml", "{}\n")
    rc, out, err = launch(capsys, "--config", str(cfg), "--nodes", "1", "--out", "r")
    assert rc == 2 and out == ""
    assert err.startswith("error: sbatch: not found on PATH")
    # the job's files were written before submission was attempted
    assert (no_cluster / "r" / "slurm" / "job.sbatch").is_file()
    from stars_scale.config import load_config
    assert load_config(no_cluster / "r" / "slurm" / "config.yaml").to_dict() == load_config(cfg).to_dict()


def test_submit_parses_the_job_id_and_bakes_overrides(no_cluster, capsys, monkeypatch):
    """A fake sbatch on PATH records its argument: the written script and resolved config."""
    bin_dir = no_cluster / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" > "$FAKE_SBATCH_LOG"\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(no_cluster / "sbatch.log"))
    cfg = write_config(no_cluster / "c.yaml", "stars: {lam: 0.1}\n")
    rc, out, err = launch(capsys, "--config", str(cfg), "--nodes", "1", "--out", "r",
                          "--set", "stars.lam=0.2", "--array", "model.hidden=64,96")
    assert rc == 0, err
    assert out == "4242\n"
    script = no_cluster / "r" / "slurm" / "job.sbatch"
    assert (no_cluster / "sbatch.log").read_text().split() == ["--parsable", str(script)]
    from stars_scale.config import load_config
    assert load_config(no_cluster / "r" / "slurm" / "config.yaml").stars.lam == 0.2
    sweep = (no_cluster / "r" / "sweep.json").read_text()
    assert '"model.hidden=96"' in sweep and str(no_cluster / "r" / "1_model.hidden=96") in sweep
    assert "STARS_MLFLOW_PARENT_RUN_ID" not in script.read_text()  # no tracking URI: no parent run


def test_sbatch_failure_is_reported(no_cluster, capsys, monkeypatch):
    bin_dir = no_cluster / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Invalid account or "
                                    "account/partition combination specified' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = write_config(no_cluster / "c.yaml", "{}\n")
    rc, out, err = launch(capsys, "--config", str(cfg), "--nodes", "1", "--out", "r")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Invalid account or account/partition combination" in err


def test_unreachable_mlflow_for_a_sweep_is_a_clear_error(no_cluster, capsys, monkeypatch):
    bin_dir = no_cluster / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = write_config(no_cluster / "c.yaml", f"tracking: {{tracking_uri: '{uri}'}}\n")
    rc, out, err = launch(capsys, "--config", str(cfg), "--nodes", "1", "--out", "r",
                          "--array", "stars.lam=0,0.1")
    assert rc == 2 and out == ""
    assert err.startswith(f"error: tracking: cannot create the MLflow parent run at {uri}: ")
    assert err.count("\n") == 1


def test_wrapper_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(REPO / "launch" / "stars-srun.sh"), "--config", "c.yaml"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 2
    assert "not inside a Slurm job step" in res.stderr


def test_missing_launch_dir_is_a_clear_error(no_cluster, monkeypatch):
    monkeypatch.setenv("STARS_LAUNCH_DIR", str(no_cluster / "nowhere"))
    with pytest.raises(UserError, match="launch file not found"):
        slurm.launch_dir()


# --------------------------------------------------------------------------- helpers


def test_sweep_product_order_and_bracket_values():
    tasks = parse_sweep(["stars.lam=0,0.1", "eval.depths=[1,2],[4,8]"])
    assert [t.overrides for t in tasks] == [
        ("stars.lam=0", "eval.depths=[1,2]"), ("stars.lam=0", "eval.depths=[4,8]"),
        ("stars.lam=0.1", "eval.depths=[1,2]"), ("stars.lam=0.1", "eval.depths=[4,8]"),
    ]
    assert [t.index for t in tasks] == [0, 1, 2, 3]
    assert tasks[1].name == "1_stars.lam=0_eval.depths=-4-8"
    assert split_values("a, {b: 1, c: 2} ,[x,y]") == ["a", "{b: 1, c: 2}", "[x,y]"]
    assert parse_sweep([]) == []


@pytest.mark.parametrize("text,seconds", [
    ("30", 1800), ("30:15", 1815), ("1:00:00", 3600), ("2-00", 172800), ("1-2:30", 95400),
    ("1-00:00:10", 86410), ("UNLIMITED", None), ("infinite", None),
])
def test_time_formats(text, seconds):
    assert slurm.time_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "1-", "-5", "1:2:3:4", "1--2"])
def test_bad_time_formats(text):
    with pytest.raises(UserError, match="--time"):
        slurm.time_seconds(text)


def test_wrapper_finds_worker_processes_with_and_without_pgrep():
    """The wrapper forwards signals to torchrun's direct children; on nodes without pgrep it
    reads /proc."""
    parent = subprocess.Popen(["bash", "-c", "sleep 60 & a=$!; sleep 60 & echo $a $!; wait"],
                              stdout=subprocess.PIPE, text=True)
    kids: list[str] = []
    try:
        kids = sorted(parent.stdout.readline().split())
        fn = f'source <(sed -n "/^children_of()/,/^}}/p" {REPO / "launch" / "stars-srun.sh"}); '
        for path in (os.environ["PATH"], "/nonexistent"):
            if path != "/nonexistent" and not shutil.which("pgrep"):
                continue
            res = subprocess.run(["bash", "-c", fn + f"PATH={path}; children_of {parent.pid}"],
                                 capture_output=True, text=True, timeout=30)
            assert sorted(res.stdout.split()) == kids, (path, res.stderr)
    finally:
        for pid in kids:
            os.kill(int(pid), 15)
        parent.wait(10)


def test_no_slurm_config_means_no_cluster(monkeypatch, tmp_path):
    """sinfo retries for a minute without a config: do not even start it then."""
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    assert not slurm.slurm_configured()
    assert slurm.cluster_partitions() is None
    (tmp_path / "missing.conf").write_text("ClusterName=x\n")
    assert slurm.slurm_configured()

"""`stars-eval depth --states` (PCA of state trajectories) and `stars-eval compare`, end to end."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from stars_scale.eval.compare import group_runs, markdown_table, summarize_group
from stars_scale.eval.trajectories import pca_2d, state_trajectories
from test_train_e2e import TINY, run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    res = run(["stars_scale.cli.train", "--config", "tiny.yaml", "--out", "run"], tmp)
    return tmp, json.loads(res.stdout.strip().splitlines()[-1])


def test_pca_recovers_a_planar_trajectory():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(50, 2, generator=g))  # an orthonormal 2-D plane in R^50
    t = torch.linspace(0, 6, 12)
    pts = torch.stack([torch.cos(t) * (1 + t), torch.sin(t) * 0.5], 1)  # a spiral in the plane
    traj = (pts @ basis.T + 3.0)[None]  # offset: PCA must centre
    coords, explained = pca_2d(traj)
    assert coords.shape == (1, 12, 2)
    assert float(explained.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(explained[0, 0]) > float(explained[0, 1]) > 0
    # a projection on the plane's own axes keeps every pairwise distance
    assert torch.allclose(torch.cdist(coords[0], coords[0]), torch.cdist(pts, pts), atol=1e-4)


def test_state_trajectories_match_the_model_loop(trained):
    from stars_scale.config import load_config
    from stars_scale.data.sources import build_eval_batch
    from stars_scale.model.looped import LoopedLM
    from stars_scale.checkpoint.dcp import read_model_state
    from stars_scale import checkpoint as ckpt

    tmp, _ = trained
    path = ckpt.resolve_checkpoint(tmp / "run")
    cfg = load_config(path / "config.yaml")
    model = LoopedLM(cfg.model)
    model.load_state_dict(read_model_state(path, cfg.model))
    batch, _ = build_eval_batch(cfg, 5)
    traj, correct = state_trajectories(model, batch["input_ids"], batch["labels"], 3)
    assert traj.shape == (5, 4, batch["input_ids"].shape[1] * cfg.model.hidden) and correct.shape == (5, 4)
    with torch.no_grad():
        out = model(batch["input_ids"], n_free=3, n_grad=0, return_states=True)
    assert torch.allclose(traj[:, -1], out.state.flatten(1), atol=1e-5)


def test_depth_states_writes_pca_figure_and_logs_it(trained):
    tmp, summary = trained
    run(["stars_scale.cli.eval", "depth", "--checkpoint", "run", "--depths", "1,2,4,6", "--out", "ev",
         "--samples", "32", "--states", "3"], tmp)
    res = json.loads((tmp / "ev" / "states_pca.json").read_text())
    assert res["depth"] == 6 and res["iterations"] == list(range(7))
    assert len(res["examples"]) == 3
    for ex in res["examples"]:
        assert len(ex["pc"]) == 7 and all(len(p) == 2 for p in ex["pc"])
        assert len(ex["delta_h"]) == 6 and all(x > 0 for x in ex["delta_h"])
        assert len(ex["correct"]) == 7 and all(isinstance(x, bool) for x in ex["correct"])
        assert 0 < ex["explained"][1] <= ex["explained"][0] and sum(ex["explained"]) <= 1 + 1e-6
        assert ex["title"].endswith("=") and "+" in ex["title"]  # the arithmetic prompt, e.g. "123+456="
        assert sum(p[0] for p in ex["pc"]) == pytest.approx(0.0, abs=1e-3 * max(abs(p[0]) for p in ex["pc"]))
    png = (tmp / "ev" / "states_pca.png").read_bytes()
    assert png[:8] == PNG and len(png) > 10_000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "eval")}
    assert {"eval/states_pca.png", "eval/states_pca.json", "eval/depth_scaling.json"} <= arts


def _sweep(path: Path, acc, rho, depths=(1, 2, 4)) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    n = len(depths)
    path.joinpath("depth_scaling.json").write_text(json.dumps({
        "depths": list(depths), "accuracy": acc, "loss": [0.5] * n, "perplexity": [1.6] * n, "rho": rho,
        "delta_h": [0.1 / (i + 1) for i in range(n)]}))
    return path


def test_compare_groups_runs_by_label(trained, tmp_path):
    tmp, _ = trained
    a0 = _sweep(tmp_path / "fixed_s0", [0.2, 1.0, 0.4], [1.1, 1.2, 1.3])
    a1 = _sweep(tmp_path / "fixed_s1", [0.4, 0.8, 0.0], [1.3, 1.0, 1.5])
    b = _sweep(tmp_path / "stars" / "eval_step_00000100", [0.5, 0.9, 0.9, 0.9], [0.9, 0.8, 0.7, 0.7],
               depths=(1, 2, 4, 8))
    res = run(["stars_scale.cli.eval", "compare", str(a0), str(a1), str(tmp_path / "stars"), str(tmp / "run"),
               "--labels", "fixed,fixed,stars,tiny", "--out", str(tmp_path / "cmp"), "--title", "t"], tmp)
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    runs = {r["label"]: r for r in out["runs"]}
    assert list(runs) == ["fixed", "stars", "tiny"]
    fx = runs["fixed"]
    assert fx["n"] == 2 and fx["depths"] == [1, 2, 4]
    assert fx["accuracy"]["mean"] == pytest.approx([0.3, 0.9, 0.2])
    assert fx["accuracy"]["min"] == pytest.approx([0.2, 0.8, 0.0])
    assert fx["rho"]["max"] == pytest.approx([1.3, 1.2, 1.5])
    assert runs["stars"]["depths"] == [1, 2, 4, 8] and runs["stars"]["sources"][0].endswith(
        "eval_step_00000100/depth_scaling.json")
    assert runs["tiny"]["n"] == 1 and runs["tiny"]["depths"] == [1, 2, 4]  # the trained run's own sweep
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md == res.stdout
    assert "| fixed (n=2) | exact match % | 30.0 (20.0–40.0) | 90.0 (80.0–100.0) | 20.0 (0.0–40.0) |  |" in md
    assert "| stars (n=1) | exact match % | 50.0 | 90.0 | 90.0 | 90.0 |" in md
    assert "|  | ρ̂ | 0.90 | 0.80 | 0.70 | 0.70 |" in md
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == PNG and len(png) > 10_000


def test_compare_default_labels_and_loss_only_runs(tmp_path):
    a = _sweep(tmp_path / "lm_a", None, [1.0, 1.0, 1.0])
    b = _sweep(tmp_path / "lm_b", None, [0.5, 0.6, 0.7])
    groups = group_runs([str(a), str(b / "depth_scaling.json")])
    assert [label for label, _ in groups] == ["lm_a", "lm_b"]
    summary = [(label, summarize_group(r)) for label, r in groups]
    assert summary[0][1]["accuracy"] is None
    md = markdown_table(summary)
    assert "exact match" not in md and "| lm_b (n=1) | loss | 0.500 | 0.500 | 0.500 |" in md


@pytest.mark.parametrize("setup,args,needle", [
    (lambda p: None, ["nowhere"], "nowhere: no such file or directory"),
    (lambda p: (p / "empty").mkdir(), ["empty"], "empty: no depth_scaling.json"),
    (lambda p: (p / "bad.json").write_text("{not json"), ["bad.json"], "bad.json: not a readable JSON file"),
    (lambda p: (p / "short.json").write_text(json.dumps({"depths": [1, 2], "accuracy": [1.0], "loss": [1, 1],
                                                         "rho": [1, 1], "delta_h": [1, 1]})),
     ["short.json"], "short.json: 'accuracy' must be a list of 2 numbers"),
    (lambda p: _sweep(p / "ok", [1, 1, 1], [1, 1, 1]), ["ok", "--labels", "a,b"], "--labels: 2 labels for 1 runs"),
])
def test_compare_bad_input_is_one_clear_line(tmp_path, setup, args, needle):
    setup(tmp_path)
    res = run(["stars_scale.cli.eval", "compare", *args, "--out", "cmp"], tmp_path, check=False)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()  # nothing half-written


def test_estimator_convergence_bench_reads_the_frobenius_average_then_the_top_eigenvalue(trained, capsys):
    """bench/estimator_convergence.py: its 1-iteration column is the average gain ‖J‖_F/√n (what
    the paper's one-iteration penalty sees) and its many-iteration column the spectral radius,
    both checked against the core map's full Jacobian at the same end state."""
    from stars_scale.data.sources import build_eval_batch
    from stars_scale.generate.load import load_model

    tmp, _ = trained
    conv = _bench("estimator_convergence")
    assert conv.main([str(tmp / "run"), "--depth", "3", "--samples", "2", "--iters", "1,60", "--draws", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| vjp") or line.startswith("| jvp")]
    assert len(rows) == 2
    means = [[float(cell.split()[0]) for cell in row.strip("|").split("|")[1:]] for row in rows]

    cfg, model, _ = load_model(tmp / "run")
    ids = build_eval_batch(cfg, 2)[0]["input_ids"]
    with torch.no_grad():
        e = model.encode(ids)
        s = model.init_state(e, torch.Generator().manual_seed(0))
        for _ in range(3):
            s = model.core_step(s, e)
    jac = torch.autograd.functional.jacobian(lambda h: model.core_step(h, e), s, vectorize=True)
    jac = jac.reshape(s.numel(), s.numel()).double()
    frob_avg = float(jac.norm() / s.numel() ** 0.5)
    radius = float(torch.linalg.eigvals(jac).abs().max())
    for one, many in means:
        assert one == pytest.approx(frob_avg, rel=0.15)  # mean of ‖Jᵀv‖ over 8 random unit v
        assert many == pytest.approx(radius, rel=0.05)
    assert conv.main([str(tmp / "run"), "--iters", "1,x"]) == 2


def _bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / f"bench/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_state_spread_is_zero_for_a_loop_that_forgets_its_input_and_kept_by_one_that_does_not():
    spread_by_depth = _bench("state_spread").spread_by_depth
    s = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    rel = float((s - s.mean(0)).norm() / s.norm())

    def spread(step, depths):  # trajectories s_0..s_R of a stand-in loop, as state_trajectories records them
        states = [s]
        for _ in range(max(depths)):
            states.append(step(states[-1]))
        return spread_by_depth(torch.stack([x.flatten(1) for x in states], 1), depths)

    assert spread(lambda h: torch.ones_like(h), [1, 4]) == {1: 0.0, 4: 0.0}
    kept = spread(lambda h: 0.5 * h, [1, 8])
    assert kept == {1: pytest.approx(rel), 8: pytest.approx(rel)}  # a contraction towards 0 keeps the spread
    merged = spread(lambda h: 0.5 * h + 0.5 * s[:1], [1, 30])  # to one input's state
    assert merged[1] > 1e-2 and merged[30] < 1e-6


def test_state_spread_bench_on_a_trained_run(trained, capsys):
    """bench/state_spread.py on a run dir: the printed spread is that of the model's own loop."""
    from stars_scale.data.sources import build_eval_batch
    from stars_scale.generate.load import load_model

    tmp, _ = trained
    mod = _bench("state_spread")
    assert mod.main([str(tmp / "run"), "--depths", "1,3", "--samples", "6"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {tmp / 'run'}")]
    printed = [float(c) for c in row[0].strip("|").split("|")[1:]]
    cfg, model, _ = load_model(tmp / "run")
    with torch.no_grad():
        e = model.encode(build_eval_batch(cfg, 6)[0]["input_ids"])
        s = model.init_state(e, torch.Generator().manual_seed(0))
        for _ in range(3):
            s = model.core_step(s, e)
    assert printed[1] == pytest.approx(float((s - s.mean(0)).norm() / s.norm()), rel=1e-2)
    assert printed[0] > 0
    assert mod.main([str(tmp / "run"), "--depths", "1,x"]) == 2
    assert mod.main([str(tmp / "run"), "--samples", "1"]) == 2

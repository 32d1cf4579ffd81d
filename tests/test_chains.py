"""The variable-binding chains task: generator, difficulty, split, shards, codec, CLI paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stars_scale.data.chains import (EOS, QUERY, VOCAB_SIZE, ChainsTask, decode_tokens, encode_text,
                                     format_problem, parse_difficulty, solve)
from stars_scale.loss import IGNORE


def brute_force(prompt: list[int]) -> tuple[int, int]:
    """An independent solver on the text: substitute bindings until the query is a digit."""
    text = decode_tokens(prompt)
    body, query = text[:-2], text[-2]
    env = {body[i]: body[i + 1] for i in range(0, len(body), 2)}
    assert len(env) * 2 == len(body), "every variable is bound once"
    steps = 0
    while not query.isdigit():
        query = env[query]
        steps += 1
    return int(query), steps


def test_every_problem_is_answered_right_and_needs_exactly_its_difficulty_lookups():
    task = ChainsTask(statements=12, variables=14, difficulty=(1, 5), test_difficulty=(1, 10), test_size=200)
    batch = task.train_batch(step=3, micro=0, batch_size=300)
    test = task.test_batch()
    for b in (batch, test):
        ids, labels = b["input_ids"], b["labels"]
        assert ids.shape[1] == task.seq_len == 2 * 12 + 4  # one prompt length for every difficulty
        for row, lab in zip(ids.tolist(), labels.tolist()):
            prompt = row[:task.prompt_len]
            answer, hops = brute_force(prompt)
            assert solve(prompt) == (answer, hops)
            assert row[task.prompt_len] == answer and row[-1] == EOS and row[task.prompt_len - 1] == QUERY
            # the loss covers exactly the answer (predicted at "?") and EOS (predicted at the answer)
            assert [i for i, x in enumerate(lab) if x != IGNORE] == [task.prompt_len - 1, task.prompt_len]
    train_hops = [solve(r[:task.prompt_len])[1] for r in batch["input_ids"].tolist()]
    assert set(train_hops) == {1, 2, 3, 4, 5}
    test_hops = [solve(r[:task.prompt_len])[1] for r in test["input_ids"].tolist()]
    assert test_hops == test["difficulty"].tolist() and test_hops == sorted(test_hops)
    assert np.bincount(test_hops)[1:].tolist() == [20] * 10  # an even split over 1..10


def test_dense_labels_give_every_statement_its_resolved_digit_and_test_labels_stay_the_answer():
    task = ChainsTask(statements=10, variables=12, difficulty=(1, 6), test_difficulty=(1, 8), test_size=40,
                      dense=True)
    plain = ChainsTask(statements=10, variables=12, difficulty=(1, 6), test_difficulty=(1, 8), test_size=40)
    batch = task.train_batch(step=5, micro=0, batch_size=200)
    assert torch.equal(batch["input_ids"], plain.train_batch(step=5, micro=0, batch_size=200)["input_ids"])
    for row, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        prompt = row[:task.prompt_len]
        # statement i's value token is labelled with what its variable resolves to (the text solver,
        # asked about that variable), "?" with the answer, the answer with EOS; nothing else
        want = {2 * i + 1: brute_force([*prompt[:-2], prompt[2 * i], QUERY])[0] for i in range(10)}
        want |= {task.prompt_len - 1: row[task.prompt_len], task.prompt_len: EOS}
        assert {i: x for i, x in enumerate(lab) if x != IGNORE} == want
    # deeper statements are in the labels (a statement at depth > 1 needs lookups of its own)
    depths = [brute_force([*r[:20], r[2 * i], QUERY])[1] for r in batch["input_ids"].tolist() for i in range(10)]
    assert max(depths) >= 6
    # the test set (exact match, the sweeps) scores the answer only, as without `dense`
    assert torch.equal(task.test_batch()["labels"], plain.test_batch()["labels"])


def test_value_first_and_slot_names_write_the_same_problems_another_way():
    """`value_first` writes `<value><variable>`; `names: slot` makes statement s bind the s-th letter
    (a lookup by position). Same problems, answers and difficulties, checked with the text solver."""
    kw = dict(statements=10, variables=12, difficulty=(1, 8), test_difficulty=(1, 8), test_size=16, dense=True)
    plain = ChainsTask(**kw)
    for task in (ChainsTask(**kw, value_first=True), ChainsTask(**kw, names="slot"),
                 ChainsTask(**kw, names="slot", value_first=True)):
        a, b = plain.train_batch(2, 0, 100), task.train_batch(2, 0, 100)
        for pa, pb, la, lb in zip(a["input_ids"].tolist(), b["input_ids"].tolist(), a["labels"].tolist(),
                                  b["labels"].tolist()):
            sb = [x for i in range(0, 20, 2) for x in ((pb[i + 1], pb[i]) if task.value_first else (pb[i], pb[i + 1]))]
            assert brute_force([*sb, pb[20], QUERY]) == brute_force(pa[:22])  # same answer, same lookups
            assert solve(pb[:22], task.value_first) == solve(pa[:22])
            assert la == lb  # the same resolved digits, slot by slot
            if task.names == "slot":
                assert sb[0::2] == list(range(10, 20))  # statement s binds letter s
            else:  # the renaming is the only difference
                assert sb == pa[:20]
    with pytest.raises(ValueError, match="data.names"):
        ChainsTask(names="sorted")


def test_matched_chains_leave_no_chain_length_cue():
    """`matched`: all C chains are k long and the spare statements are bound to the C root digits in
    turn, so the query's chain is not the longest one and no root digit is bound (directly or through
    a chain) to more than one variable above another."""
    task = ChainsTask(statements=18, variables=18, chains=3, difficulty=(1, 6), test_difficulty=(1, 6),
                      test_size=12, matched=True, names="slot", value_first=True, dense=True)
    for row in task.train_batch(4, 0, 300)["input_ids"].tolist() + task.test_batch()["input_ids"].tolist():
        prompt = row[:task.prompt_len]
        env = {b: a for a, b in zip(prompt[0:36:2], prompt[1:36:2])}  # value first: `<value><variable>`
        answer, k = solve(prompt, value_first=True)
        depth = {}
        for v in env:  # lookups to a digit and the digit, per variable
            u, n = v, 0
            while u >= 10:
                u, n = env[u], n + 1
            depth[v] = (n, u)
        roots = {u for _, u in depth.values()}
        assert len(roots) == 3 and answer in roots
        for r in roots:  # every root has a chain of exactly k, none longer
            assert max(n for n, u in depth.values() if u == r) == k
        counts = [sum(u == r for _, u in depth.values()) for r in roots]
        assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="data.statements=12 .* needs >= 15"):
        ChainsTask(statements=12, variables=16, chains=3, difficulty=(1, 5), test_difficulty=(1, 5), matched=True)


def test_difficulty_is_the_chain_length_and_every_chain_ends_in_a_digit():
    task = ChainsTask(statements=10, variables=10, difficulty=(3, 3), test_difficulty=(8, 8), test_size=5)
    for row in task.train_batch(0, 0, 50)["input_ids"].tolist() + task.test_batch()["input_ids"].tolist():
        prompt = row[:task.prompt_len]
        env = dict(zip(prompt[0:-2:2], prompt[1:-2:2]))
        for v in env:  # acyclic: every variable reaches a digit
            assert solve([*prompt[:-2], v, QUERY])[0] < 10
        # one lookup fewer than the difficulty never reaches a digit: the answer is not in the first k-1 hops
        v, k = prompt[-2], solve(prompt)[1]
        for _ in range(k - 1):
            v = env[v]
            assert v >= 10
        # exactly `chains` chains with distinct root digits: the number of candidate answers is the same
        # at every difficulty (guessing among the prompt's digits gives 1/3 whatever k is)
        digits = [x for x in prompt[1:-2:2] if x < 10]
        assert len(digits) == 3 == len(set(digits))
    assert {solve(r[:22])[1] for r in task.test_batch()["input_ids"].tolist()} == {8}


def test_program_order_binds_before_use_and_shuffled_does_not_always():
    prog = ChainsTask(statements=10, variables=12, difficulty=(1, 8), test_difficulty=(1, 8), test_size=10)
    shuf = ChainsTask(statements=10, variables=12, difficulty=(1, 8), test_difficulty=(1, 8), test_size=10,
                      order="shuffled")

    def forward_refs(row):
        seen, n = set(), 0
        for i in range(0, 20, 2):
            if row[i + 1] >= 10 and row[i + 1] not in seen:
                n += 1
            seen.add(row[i])
        return n

    assert all(forward_refs(r) == 0 for r in prog.train_batch(0, 0, 200)["input_ids"].tolist())
    assert sum(forward_refs(r) for r in shuf.train_batch(0, 0, 200)["input_ids"].tolist()) > 0
    with pytest.raises(ValueError, match="data.order"):
        ChainsTask(order="sorted")


def test_train_stream_is_deterministic_and_never_hits_the_test_set():
    task = ChainsTask(statements=4, variables=4, difficulty=(1, 2), test_difficulty=(1, 2), test_size=300)
    a, b = task.train_batch(7, 1, 64, dp_rank=0), task.train_batch(7, 1, 64, dp_rank=0)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], task.train_batch(8, 1, 64)["input_ids"])
    # a tiny problem space (4 variables), so clashes are frequent and must be redrawn
    for step in range(20):
        for row in task.train_batch(step, 0, 64)["input_ids"].numpy():
            assert not task.is_test_problem(row[:task.prompt_len])
    assert ChainsTask(statements=4, variables=4, difficulty=(1, 2), test_difficulty=(1, 2),
                      test_size=300).test_tokens.tobytes() == task.test_tokens.tobytes()


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="data.statements"):
        ChainsTask(statements=3, difficulty=(1, 4), test_difficulty=(1, 4))
    with pytest.raises(ValueError, match="data.variables"):
        ChainsTask(statements=8, variables=6)
    with pytest.raises(ValueError, match="data.difficulty"):
        ChainsTask(difficulty=(3, 2))
    with pytest.raises(ValueError, match="data.statements=5 leaves no room for 2 distractor"):
        ChainsTask(statements=5, variables=5, difficulty=(1, 4), test_difficulty=(1, 4))
    with pytest.raises(ValueError, match="data.chains"):
        ChainsTask(chains=11)
    assert parse_difficulty("2..7") == (2, 7) and parse_difficulty("3") == (3, 3)
    for bad in ("0..3", "5..2", "a..b", "1..2..3", ""):
        with pytest.raises(ValueError, match="LO..HI"):
            parse_difficulty(bad)


def test_config_fields_are_validated():
    from stars_scale.config import config_from_dict
    from stars_scale.data.sources import build_task
    from stars_scale.errors import ConfigError

    base = {"data": {"kind": "chains", "statements": 8, "variables": 10, "difficulty": [1, 3],
                     "test_difficulty": [2, 6], "test_size": 10}}
    task = build_task(config_from_dict(base))
    assert isinstance(task, ChainsTask) and task.difficulty == (1, 3) and task.test_difficulty == (2, 6)
    opts = {"dense": True, "value_first": True, "names": "slot", "matched": True, "statements": 18, "variables": 18}
    task = build_task(config_from_dict({"data": {**base["data"], **opts}}))
    assert (task.dense, task.value_first, task.names, task.matched) == (True, True, "slot", True)
    for field, value, msg in [("difficulty", [3, 1], "data.difficulty"),
                              ("test_difficulty", [1], "data.test_difficulty"),
                              ("test_difficulty", [1, 7], "data.statements"), ("variables", 5, "data.variables"),
                              ("statements", 27, "data.statements"), ("chains", 1, "data.chains"),
                              ("chains", 4, "data.statements"), ("matched", True, "data.statements=8 .* >= 18"),
                              ("names", "sorted", "data.names"), ("dense", "yes", "data.dense"),
                              ("value_first", 1, "data.value_first")]:
        bad = {"data": {**base["data"], field: value}}
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(bad)


def test_codec_round_trip_and_bad_characters():
    from stars_scale.errors import UserError
    from stars_scale.generate.load import chains_codec

    codec = chains_codec()
    task = ChainsTask(statements=6, variables=6, difficulty=(2, 4), test_difficulty=(2, 4), test_size=6)
    row = task.test_batch()["input_ids"][0].tolist()
    text = decode_tokens(row[:task.prompt_len])
    assert codec.encode(text) == row[:task.prompt_len]
    assert codec.encode(" ".join(text[i:i + 2] for i in range(0, len(text), 2))) == row[:task.prompt_len]
    assert codec.decode(row) == text + decode_tokens(row[task.prompt_len:]) and codec.eos_id == EOS
    assert format_problem(row).endswith(f"? -> {solve(row[:task.prompt_len])[0]}")
    assert encode_text("ab c7 b?") == [10, 11, 12, 7, 11, QUERY]
    with pytest.raises(UserError, match=r"prompt 'ab=c': .*\['='\]"):
        codec.encode("ab=c")


def test_shards_round_trip(tmp_path):
    from stars_scale.data.loader import ShardSource
    from stars_scale.data.shards import Manifest

    from data_helpers import stars_data

    res = stars_data("chains", "--statements", "8", "--variables", "10", "--difficulty", "1..3",
                     "--test-difficulty", "2..6", "--samples", "300", "--test-size", "25", "--blocks-per-shard",
                     "64", "--out", str(tmp_path / "ch"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "variable-binding chains, 8 statements, difficulty 1..3, seq_len 19" in res.stdout
    m = Manifest.load(tmp_path / "ch")
    assert m.kind == "chains" and m.vocab_size == VOCAB_SIZE and m.seq_len == 19 and m.has_mask
    assert m.extra["chains"]["test_difficulty"] == [2, 6]
    task = ChainsTask(statements=8, variables=10, difficulty=(1, 3), test_difficulty=(2, 6), test_size=25)
    src = ShardSource(str(tmp_path / "ch"), 25, dp_rank=0, dp_size=1, split="val", seed=0, shuffle_buffer=1)
    got = src.next_batch()
    want = task.test_batch()
    # the loader yields input_ids = block[:-1] and labels = next token where the mask is set
    rows = {tuple(r) for r in got["input_ids"].tolist()}
    assert rows == {tuple(r) for r in want["input_ids"][:, :-1].tolist()}
    for ids, lab in zip(got["input_ids"].tolist(), got["labels"].tolist()):
        answer, _ = solve(ids[:18])
        assert [x for x in lab if x != IGNORE] == [answer, EOS]
    train = ShardSource(str(tmp_path / "ch"), 100, dp_rank=0, dp_size=1, seed=0).next_batch()["input_ids"].tolist()
    assert all(1 <= solve(r[:18])[1] <= 3 for r in train)
    res = stars_data("inspect", str(tmp_path / "ch"), "--verify", "--samples", "1", cwd=tmp_path)
    assert res.returncode == 0 and "chains" in res.stdout and "?" in res.stdout
    # the written-another-way problems round trip too: the shards' val split is the task's test set
    res = stars_data("chains", "--statements", "9", "--variables", "10", "--difficulty", "1..3", "--value-first",
                     "--names", "slot", "--matched", "--samples", "50", "--test-size", "12", "--out",
                     str(tmp_path / "vf"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Manifest.load(tmp_path / "vf").extra["chains"]["matched"] is True
    vf = ChainsTask(statements=9, variables=10, difficulty=(1, 3), test_difficulty=(1, 3), test_size=12,
                    value_first=True, names="slot", matched=True)
    got = ShardSource(str(tmp_path / "vf"), 12, dp_rank=0, dp_size=1, split="val", seed=0,
                      shuffle_buffer=1).next_batch()["input_ids"].tolist()
    assert {tuple(r) for r in got} == {tuple(r) for r in vf.test_batch()["input_ids"][:, :-1].tolist()}
    res = stars_data("chains", "--statements", "8", "--difficulty", "1..3", "--matched", "--out",
                     str(tmp_path / "m"), cwd=tmp_path)
    assert res.returncode == 2 and "--statements=8" in res.stderr and "Traceback" not in res.stderr
    res = stars_data("chains", "--difficulty", "4..2", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert res.returncode == 2 and "--difficulty" in res.stderr and "Traceback" not in res.stderr
    res = stars_data("chains", "--statements", "3", "--difficulty", "1..4", "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert res.returncode == 2 and "statements" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "y").exists()


def test_depth_sweep_groups_add_up_to_the_overall_accuracy():
    from stars_scale.config import ModelConfig
    from stars_scale.eval.depth_scaling import depth_sweep
    from stars_scale.model import LoopedLM

    torch.manual_seed(0)
    model = LoopedLM(ModelConfig(vocab_size=VOCAB_SIZE, hidden=32, heads=2, max_seq_len=16, n_prelude=1, n_coda=1,
                                 injection="add", positions="rope"))
    task = ChainsTask(statements=6, variables=6, difficulty=(1, 4), test_difficulty=(1, 4), test_size=60)
    batch = task.test_batch()
    res = depth_sweep(model, batch, [1, 3], rho_iters=1, batch_size=16, groups=batch["difficulty"])
    assert res["group_sizes"] == {str(k): 15 for k in range(1, 5)}
    for i in range(2):
        mean = sum(res["accuracy_by_group"][g][i] * 15 for g in res["group_sizes"]) / 60
        assert abs(mean - res["accuracy"][i]) < 1e-12


def test_oracle_exit_by_hand():
    from stars_scale.eval.depth_scaling import oracle_exit

    right = {1: torch.tensor([1, 0, 0, 0]).bool(), 2: torch.tensor([0, 1, 0, 0]).bool(),
             4: torch.tensor([1, 1, 1, 0]).bool()}
    # first right depths 1, 2, 4 and (never right) the largest, 4; tokens 2, 2, 2, 4 per problem
    o = oracle_exit([1, 2, 4], right, groups=torch.tensor([1, 1, 2, 2]), tokens=torch.tensor([2, 2, 2, 4]))
    assert o["accuracy"] == 0.75 and o["mean_loops"] == (2 * 1 + 2 * 2 + 2 * 4 + 4 * 4) / 10
    assert o["by_group"] == {"1": {"accuracy": 1.0, "mean_loops": 1.5}, "2": {"accuracy": 0.5, "mean_loops": 4.0}}
    assert oracle_exit([1, 2, 4], right)["mean_loops"] == (1 + 2 + 4 + 4) / 4


def test_first_depth_and_table():
    from stars_scale.eval.difficulty import markdown_table, summarise

    res = {"depths": [1, 2, 4], "group_sizes": {"1": 5, "2": 5, "3": 5},
           "accuracy_by_group": {"1": [0.95, 1.0, 1.0], "2": [0.2, 0.9, 1.0], "3": [0.0, 0.4, 0.8]}}
    s = summarise(res)
    assert s["first_depth"] == {"1": 1, "2": 2, "3": None}
    assert s["best_depth"] == {"1": 2, "2": 4, "3": 4}
    table = markdown_table(s).splitlines()
    assert table[2] == "| 1 | 5 | 95.0 | 100.0 | 100.0 | 1 |" and table[4].endswith("| 80.0 | — |")


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_train_eval_difficulty_and_generate_cli(tmp_path):
    cfg = {"model": {"vocab_size": VOCAB_SIZE, "hidden": 32, "heads": 2, "mlp_hidden": 64, "max_seq_len": 20,
                     "positions": "rope", "n_prelude": 1, "n_coda": 1, "injection": "add"},
           "depth": {"dist": "lognormal", "mu": 0.7, "sigma": 0.5, "max": 4},
           "stars": {"lam": 0.1, "warmup_steps": 2},
           "data": {"kind": "chains", "statements": 8, "variables": 10, "difficulty": [1, 3],
                    "test_difficulty": [1, 3], "batch_size": 8, "test_size": 30},
           "train": {"steps": 4, "progress": False}, "eval": {"depths": [1, 2], "samples": 30},
           "tracking": {"mlflow": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = _cli("stars_scale.cli.train", "--config", "cfg.yaml", "--out", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = _cli("stars_scale.cli.eval", "depth", "--checkpoint", "run", "--depths", "1,2,4", "--difficulty", "1..6",
               "--samples", "36", "--out", "ev", "--no-mlflow", "--exit", "contraction,delta,confidence",
               "--tol", "contraction=0.1,delta=0.05,confidence=0.5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "ev" / "difficulty_depth.json").read_text())
    assert s["difficulties"] == [1, 2, 3, 4, 5, 6] and s["depths"] == [1, 2, 4]
    assert s["group_sizes"] == {str(k): 6 for k in range(1, 7)} and s["train_difficulty"] == [1, 3]
    for g, acc in s["accuracy"].items():
        assert len(acc) == 3 and all(0 <= a <= 1 for a in acc)
        first = s["first_depth"][g]
        assert first is None or acc[s["depths"].index(first)] >= 0.9
    md = (tmp_path / "ev" / "difficulty_depth.md").read_text().splitlines()
    assert len(md) == 2 + 6 and md[0].startswith("| difficulty | n | r=1 | r=2 | r=4 |")
    assert (tmp_path / "ev" / "difficulty_depth.png").read_bytes()[:4] == b"\x89PNG"
    sweep = json.loads((tmp_path / "ev" / "depth_scaling.json").read_text())
    assert sweep["accuracy_by_group"] == s["accuracy"]
    # the oracle (each problem at its first right depth) is right wherever some swept depth is
    oracle = sweep["oracle_exit"]
    assert oracle["accuracy"] >= max(sweep["accuracy"]) and 1 <= oracle["mean_loops"] <= 4
    assert list(oracle["by_group"]) == [str(k) for k in range(1, 7)]
    assert abs(sum(g["accuracy"] for g in oracle["by_group"].values()) / 6 - oracle["accuracy"]) < 1e-12
    for row in sweep["exit_rules"]:  # --exit under --difficulty: accuracy and loops per difficulty
        assert list(row["by_group"]) == [str(k) for k in range(1, 7)]
        assert abs(sum(g["accuracy"] for g in row["by_group"].values()) / 6 - row["accuracy"]) < 1e-12
        assert all(1 <= g["mean_loops"] <= 4 for g in row["by_group"].values())
    table = (tmp_path / "ev" / "test_time.md").read_text()
    assert "| oracle: each problem at its first right depth |" in table and "| contraction tol=0.1 | " in table
    assert "Per group (difficulty)" in table and table.count("| oracle |") == 1
    root = Path(__file__).resolve().parents[1]
    floor = subprocess.run([sys.executable, str(root / "bench" / "exit_floor.py"), "run", "--difficulty", "1..6",
                            "--samples", "36", "--max-depth", "4"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert floor.returncode == 0, floor.stderr[-2000:]
    rows = {ln.split(" | ")[0].strip("| "): float(ln.split(" | ")[1]) for ln in floor.stdout.splitlines()
            if ln.startswith("| ") and ln[2:3].isalpha() and "floor" not in ln}
    assert len(rows) == 4 and "36 problems, difficulty 1..6, 72 answer tokens" in floor.stdout
    settled = rows["settled, per token"]
    assert 1 <= settled <= rows["settled, per token, t >= 2 (rules comparing two loops)"] <= 5
    assert abs(rows["settled + 1, per token"] - settled - 1) < 0.011
    for bad, msg in [("0..3", "--difficulty"), ("1..7", "data.statements=8")]:
        res = _cli("stars_scale.cli.eval", "depth", "--checkpoint", "run", "--difficulty", bad, "--no-mlflow",
                   "--out", "bad", cwd=tmp_path)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr
    res = _cli("stars_scale.cli.generate", "--checkpoint", "run", "--prompt", "b3 ab d1 cd f5 ef a?", "--depth", "2",
               "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["prompt"] == "b3 ab d1 cd f5 ef a?"
    assert len(out["tokens"]) >= 1 and len(out["loops"]) == len(out["tokens"])
    res = _cli("stars_scale.cli.generate", "--checkpoint", "run", "--prompt", "a=b", cwd=tmp_path)
    assert res.returncode == 2 and "chains vocabulary" in res.stderr


def test_exit_floor_settled_depth_by_hand():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from exit_floor import settled_depth

    right = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [1, 1, 0, 1]], dtype=torch.bool)  # depths 1..3, 4 tokens
    assert settled_depth(right).tolist() == [3, 2, 4, 1]  # 4 = D + 1: never settled


def test_plain_control_bench_runs_and_reports_every_difficulty():
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "bench" / "chains_plain_control.py"), "--layers", "1",
                        "--statements", "9", "--difficulty", "1..3", "--matched", "--value-first", "--steps", "0"],
                       capture_output=True, text=True, cwd=root, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("step     0  loss ") and "exact match % by difficulty 1..3:" in line
    per = line.split("1..3:")[1].split("(")[0].split()
    assert len(per) == 3 and all(0 <= float(x) <= 100 for x in per)

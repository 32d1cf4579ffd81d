"""Fuzzing what a user hands the CLIs: generated malformed configs, `--set` lines, corrupt shards
and corrupt checkpoints. Every case must end with exit 2 and exactly one `error:` line on stderr,
no traceback, and nothing written.

The generators only produce input that is wrong by construction (a value of the wrong type, out
of every field's range, an unknown key, broken YAML, a flipped bit in a file a manifest covers),
so a case that trains instead of failing is a validation hole, not a flaky test. Most cases call
the CLI's `main` in-process (exactly what the console script runs); a sample goes through real
subprocesses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stars_scale.cli import eval as eval_cli  # noqa: E402
from stars_scale.cli import train as train_cli  # noqa: E402
from stars_scale.config import RunConfig  # noqa: E402

from cli_cases import BASE, _yaml_text, assert_one_line_exit2, run_main  # noqa: E402,F401

FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
COUNTS: dict[str, int] = {}


# --------------------------------------------------------------------------- the config schema


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f.name[:-1] if f.name.endswith("_") else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append((prefix + name, tp))
            out += _leaves(tp, f"{prefix}{name}.")
        else:
            out.append((prefix + name, tp))
    return out


LEAVES = _leaves(RunConfig)
SECTIONS = [p for p, tp in LEAVES if dataclasses.is_dataclass(tp)]


def _core(tp: Any) -> Any:
    """Optional[X] -> X."""
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


_junk = st.one_of(st.just({"nested": 1}), st.just([1, 2]), st.lists(st.integers(), min_size=1, max_size=3))


def bad_value(tp: Any) -> st.SearchStrategy:
    """Values no field of type `tp` accepts (wrong type, or outside every range the config allows)."""
    tp = _core(tp)
    if dataclasses.is_dataclass(tp):
        return st.one_of(st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=2))
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        return st.one_of(st.text(max_size=12).filter(lambda s: s not in choices), st.integers(), _junk)
    if origin is list:
        (item,) = get_args(tp)
        if dataclasses.is_dataclass(item):
            return st.one_of(st.integers(), st.text(max_size=5), st.just([{"bogus": 1}]), st.just(["x"]))
        return st.one_of(st.integers(), st.text(max_size=5), st.just([0]), st.just([-3]), st.just([1.5]),
                         st.just([10**30]), st.just([[1]]))
    if tp is bool:
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.text(min_size=1, max_size=6), _junk)
    if tp is int:
        return st.one_of(st.text(min_size=1, max_size=6).filter(lambda s: not _numeric(s)),
                         st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
                         st.booleans(), st.integers(min_value=2**63), st.integers(max_value=-(2**63)),
                         st.integers(min_value=-(2**62), max_value=-1), _junk)
    if tp is float:
        return st.one_of(st.text(min_size=1, max_size=6).filter(lambda s: not _numeric(s)), st.booleans(),
                         st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e39, -1e39]),
                         st.integers(min_value=10**40, max_value=10**400), _junk)
    if tp is str:
        return st.one_of(st.integers(), st.booleans(), _junk)
    raise AssertionError(f"no generator for {tp}")


def _numeric(s: str) -> bool:
    try:
        float(yaml.safe_load(s) if s.strip() else "x")
        return True
    except (ValueError, TypeError, yaml.YAMLError):
        return False


def _set(tree: dict, dotted: str, value: Any) -> dict:
    tree = json.loads(json.dumps(tree))
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return tree


@st.composite
def bad_field(draw) -> dict:
    path, tp = draw(st.sampled_from(LEAVES))
    return _set(BASE, path, draw(bad_value(tp)))


@st.composite
def unknown_key(draw) -> dict:
    section = draw(st.sampled_from([""] + SECTIONS))
    key = draw(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True))
    names = {p.split(".")[-1] for p, _ in LEAVES if p.rsplit(".", 1)[0] == section or (not section and "." not in p)}
    hypothesis.assume(key not in names and key not in {"from"})
    return _set(BASE, f"{section}.{key}" if section else key, draw(st.integers()))


BROKEN_YAML = st.sampled_from([
    b"model: [unclosed\n", b"model:\n\thidden: 3\n", b"a: b: c\n", b"- 1\n- 2\n", b"just a string\n", b"42\n",
    b"model: !!python/object/apply:os.system ['true']\n", b"[" * 5000, b"{" * 5000, b"model: &a [*a]\n",
    b"\xef\xbb\xbf\x00\x00", b"", b"# only a comment\n", b"---\n...\n", b"? [1, 2]\n: 3\n",
])


@st.composite
def malformed_config(draw) -> bytes:
    kind = draw(st.sampled_from(["field", "field", "field", "unknown", "duplicate", "broken", "binary"]))
    if kind == "field":
        return _yaml_text(draw(bad_field()))
    if kind == "unknown":
        return _yaml_text(draw(unknown_key()))
    if kind == "duplicate":
        text = _yaml_text(BASE).decode()
        section = draw(st.sampled_from(list(BASE)))
        return (text + f"{section}: {json.dumps(BASE[section])}\n").encode()
    if kind == "broken":
        return draw(BROKEN_YAML)
    return draw(st.binary(max_size=64)) + b"\xff" + draw(st.binary(max_size=16))  # never UTF-8


@st.composite
def malformed_set(draw) -> list[str]:
    kind = draw(st.sampled_from(["value", "value", "value", "key", "noeq", "yaml"]))
    if kind == "value":
        path, tp = draw(st.sampled_from(LEAVES))
        v = draw(bad_value(tp))
        raw = json.dumps(v) if not (isinstance(v, float) and v != v) else ".nan"
        return [f"{path}={raw}"]
    if kind == "key":
        key = draw(st.one_of(st.text(max_size=12).filter(lambda k: "=" not in k and k.strip() not in [p for p, _ in LEAVES]),
                             st.sampled_from(["model..hidden", ".lr", "optim.", "model.hidden.x", "a b"])))
        return [f"{key}=1"]
    if kind == "noeq":
        return [draw(st.text(max_size=12).filter(lambda k: "=" not in k))]
    return [draw(st.sampled_from(["optim.lr=[", "model={a", "eval.depths=[1,", "model.hidden=!!python/name:os.system",
                                  "optim.lr=*x", "train.steps: 3"]))]


# --------------------------------------------------------------------------- running a case


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # an mlflow.db or run dir would appear here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work


def test_malformed_configs_are_one_line(tmp_path, workdir):
    cfg = tmp_path / "c.yaml"

    @FUZZ
    @given(malformed_config())
    def case(content: bytes) -> None:
        cfg.write_bytes(content)
        rc, err = run_main(train_cli.main, ["--config", str(cfg), "--out", str(workdir / "run")])
        assert_one_line_exit2(rc, err, content[:300])
        assert not any(workdir.iterdir()), list(workdir.iterdir())
        COUNTS["configs"] = COUNTS.get("configs", 0) + 1

    case()
    assert COUNTS["configs"] >= 300


def test_malformed_set_lines_are_one_line(tmp_path, workdir):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(_yaml_text(BASE))

    @settings(FUZZ, max_examples=200)
    @given(malformed_set())
    def case(sets: list[str]) -> None:
        argv = ["--config", str(cfg), "--out", str(workdir / "run")] + [f"--set={s}" for s in sets]
        rc, err = run_main(train_cli.main, argv)
        assert_one_line_exit2(rc, err, sets)
        assert not any(workdir.iterdir())
        COUNTS["sets"] = COUNTS.get("sets", 0) + 1

    case()
    assert COUNTS["sets"] >= 200


@pytest.mark.parametrize("content,sets", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", []), (b"", []), (b"train: {}\ntrain: {}\n", []), (b"seed: -1\n", []),
    (None, ["optim.beta2=1.5"]), (None, ["optim.lr=1.0e+39"]), (None, ["model.hidden=" + str(10**30)]),
    (None, ["data.digits=50"]), (None, ["model.kv_heads=0"]), (None, ["optim.weight_decay=-1"]),
    (None, ["model.init_std=-1"]), (None, ["bogus.key=1"]),
])
def test_a_sample_through_real_processes(tmp_path, content, sets):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content if content is not None else _yaml_text(BASE))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(cfg), "--out", "run",
                          *[f"--set={s}" for s in sets]], capture_output=True, text=True, cwd=work, env=env,
                         timeout=300)
    assert_one_line_exit2(res.returncode, res.stderr, (content, sets))
    assert not any(work.iterdir())


# --------------------------------------------------------------------------- corrupt shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "ds"
    from stars_scale.cli.data import main as data_main

    rc, err = run_main(data_main, ["arithmetic", "--out", str(d), "--digits", "3", "--samples", "96",
                                   "--test-size", "16", "--blocks-per-shard", "32"])
    assert rc == 0, err
    return d


@st.composite
def shard_corruption(draw) -> tuple[str, str, int, int]:
    shard = draw(st.sampled_from(["train-000000.tar", "train-000001.tar", "train-000002.tar"]))
    op = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "append", "zero", "random", "extra", "delete"]))
    return shard, op, draw(st.integers(min_value=0, max_value=10**9)), draw(st.integers(min_value=0, max_value=7))


def corrupt_bytes(p: Path, op: str, pos: int, bit: int) -> None:
    """Flip one bit, cut, append to, zero, randomise or empty the file `p`."""
    data = bytearray(p.read_bytes())
    if op == "flip":
        data[pos % len(data)] ^= 1 << bit
    elif op == "truncate":
        data = data[: pos % len(data)]
    elif op == "append":
        data += bytes([bit + 1]) * (1 + pos % 2000)
    elif op == "zero":
        data = bytearray(len(data))
    elif op == "random":
        data = bytearray(os.urandom(len(data)))
    elif op == "empty":
        data = bytearray()
    p.write_bytes(bytes(data))


def corrupt_shard(ds: Path, shard: str, op: str, pos: int, bit: int) -> None:
    if op == "extra":
        shutil.copyfile(ds / shard, ds / "train-000099.tar")
    elif op == "delete":
        (ds / shard).unlink()
    else:
        corrupt_bytes(ds / shard, op, pos, bit)


def test_corrupt_shards_stop_training_with_one_line(tmp_path, dataset, workdir):
    cfg = tmp_path / "c.yaml"
    n = {"cases": 0}

    @settings(FUZZ, max_examples=30)
    @given(shard_corruption())
    def case(c) -> None:
        ds = tmp_path / "ds"
        shutil.rmtree(ds, ignore_errors=True)
        shutil.copytree(dataset, ds)
        corrupt_shard(ds, *c)
        tree = _set(_set(BASE, "data", {"kind": "shards", "path": str(ds), "batch_size": 8}), "train.steps", 12)
        cfg.write_bytes(_yaml_text(tree))
        out = workdir / "run"
        shutil.rmtree(out, ignore_errors=True)
        rc, err = run_main(train_cli.main, ["--config", str(cfg), "--out", str(out)])
        assert_one_line_exit2(rc, err, c)
        assert ("shard " in err or "manifest" in err), err
        assert not (out / "checkpoints").exists()  # no checkpoint of a model trained on corrupt data
        n["cases"] += 1

    case()
    assert n["cases"] >= 20


# --------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tmp / "c.yaml"
    cfg.write_bytes(_yaml_text(BASE))
    rc, err = run_main(train_cli.main, ["--config", str(cfg), "--out", str(tmp / "run")])
    assert rc == 0, err
    return tmp / "run" / "checkpoints" / "step_00000001"


CKPT_FILES = ["dcp/__0_0.distcp", "dcp/.metadata", "ranks/rank_00000.json", "trainer_state.json", "config.yaml",
              "manifest.json"]


@st.composite
def ckpt_corruption(draw) -> tuple[str, str, int, int]:
    f = draw(st.sampled_from(CKPT_FILES))
    op = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "append", "delete", "empty", "swap"]))
    return f, op, draw(st.integers(min_value=0, max_value=10**9)), draw(st.integers(min_value=0, max_value=7))


def corrupt_checkpoint(d: Path, f: str, op: str, pos: int, bit: int) -> None:
    if op == "delete":
        (d / f).unlink()
    elif op == "swap":  # another file of the same checkpoint under this name
        other = CKPT_FILES[(CKPT_FILES.index(f) + 1 + pos % (len(CKPT_FILES) - 1)) % len(CKPT_FILES)]
        shutil.copyfile(d / other, d / f)
    else:
        corrupt_bytes(d / f, op, pos, bit)


def test_corrupt_checkpoints_are_refused_in_one_line(tmp_path, checkpoint, workdir):
    n = {"cases": 0}
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(_yaml_text(BASE))

    @settings(FUZZ, max_examples=24)
    @given(ckpt_corruption(), st.booleans())
    def case(c, through_eval: bool) -> None:
        d = tmp_path / "step_00000001"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(checkpoint, d)
        corrupt_checkpoint(d, *c)
        if through_eval:
            rc, err = run_main(eval_cli.main, ["depth", "--checkpoint", str(d), "--depths", "1",
                                               "--out", str(workdir / "eval")])
        else:
            rc, err = run_main(train_cli.main, ["--config", str(cfg), "--out", str(workdir / "run"),
                                                "--resume", str(d)])
        assert_one_line_exit2(rc, err, c)
        assert not any(workdir.iterdir())
        n["cases"] += 1

    case()
    assert n["cases"] >= 10

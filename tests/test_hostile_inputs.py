"""The cases of an adversarial probe (issue 26) that ran code, lost files, crashed or hung: each is
refused in one line (`error: ...`, exit 2, no traceback) well within 10 s, runs nothing and
removes nothing it did not write.

Classes: names stored in data files (shard lists, tokenizer files, HF `weight_map`) that are URLs,
pipes, `..`, absolute paths or links leaving their directory; YAML alias bombs and key aliases;
huge or impossible numbers at the CLIs' numeric flags and in the config; foreign files in an
`--out` that `--overwrite` would replace.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from cli_cases import BASE, _yaml_text, assert_one_line_exit2, run_main, workdir  # noqa: F401 (a fixture)

from stars_scale.cli import data as data_cli
from stars_scale.cli import train as train_cli
from stars_scale.errors import UserError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "ds"
    rc, err = run_main(data_cli.main, ["arithmetic", "--out", str(d), "--digits", "2", "--samples", "64",
                                       "--test-size", "16", "--blocks-per-shard", "32"])
    assert rc == 0, err
    return d


def _copy(ds: Path, to: Path) -> Path:
    shutil.copytree(ds, to)
    return to


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _train_on(data_path: str, workdir: Path) -> tuple[int, str]:
    cfg = dict(BASE, data={"kind": "shards", "path": data_path, "batch_size": 4})
    cfg["model"] = dict(BASE["model"], max_seq_len=16)
    (workdir.parent / "c.yaml").write_bytes(_yaml_text(cfg))
    return run_main(train_cli.main, ["--config", str(workdir.parent / "c.yaml"), "--out", str(workdir / "run")])


# --------------------------------------------------------------------------- names in data files


def test_a_pipe_shard_name_is_refused_and_never_runs(dataset, tmp_path, workdir):
    """The probe's case: the shard renamed `pipe:cat train-000000.tar.orig;touch X` trained
    normally and created X (webdataset's opener ran it through the shell)."""
    d = _copy(dataset, tmp_path / "ds")
    os.rename(d / "train-000000.tar", d / "train-000000.tar.orig")
    name = "pipe:cat train-000000.tar.orig;touch X"
    _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][0].update(name=name))
    rc, err = _train_on(str(d), workdir)
    assert_one_line_exit2(rc, err, name)
    assert "URL or pipe" in err and "shards[0].name" in err
    assert not (workdir / "X").exists() and not (d / "X").exists()
    rc, err = run_main(data_cli.main, ["inspect", str(d), "--verify"])
    assert_one_line_exit2(rc, err, name)
    assert not (workdir / "X").exists()


def test_a_dataset_path_that_is_a_pipe_never_runs(dataset, workdir):
    """`data.path='pipe:touch X;true'` (a directory of that name holding a dataset) created X."""
    name = "pipe:touch X;true"
    shutil.copytree(dataset, workdir / name)
    rc, err = _train_on(name, workdir)
    assert_one_line_exit2(rc, err, name)
    assert "URL or pipe" in err
    assert not (workdir / "X").exists()
    # spelled as a local path, the same directory trains (the rule is about schemes, not names)
    from stars_scale.data.loader import ShardSource

    src = ShardSource(f"./{name}", 4, dp_rank=0, dp_size=1, seed=0)
    assert src.next_batch()["input_ids"].shape == (4, 10)
    src.close()
    assert not (workdir / "X").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link-out", "link-to-dir", "url", "fifo"])
def test_shard_names_leaving_the_dataset_are_refused(dataset, tmp_path, workdir, kind):
    d = _copy(dataset, tmp_path / "ds")
    outside = tmp_path / "elsewhere.tar"
    shutil.copyfile(d / "train-000001.tar", outside)
    names = {"dotdot": "../elsewhere.tar", "absolute": str(outside), "url": "https://example.com/x.tar",
             "link-out": "train-000001.tar", "link-to-dir": "train-000001.tar", "fifo": "train-000001.tar"}
    if kind == "link-out":
        (d / "train-000001.tar").unlink()
        (d / "train-000001.tar").symlink_to(outside)
    elif kind == "link-to-dir":
        (d / "train-000001.tar").unlink()
        (d / "train-000001.tar").symlink_to(d)
    elif kind == "fifo":  # opening a FIFO would block forever
        (d / "train-000001.tar").unlink()
        os.mkfifo(d / "train-000001.tar")
    _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][1].update(name=names[kind]))
    rc, err = _train_on(str(d), workdir)
    assert_one_line_exit2(rc, err, kind)
    assert "shards[1].name" in err, err
    rc, err = run_main(data_cli.main, ["inspect", str(d), "--verify"])
    assert_one_line_exit2(rc, err, kind)


def test_a_link_inside_the_dataset_is_read(dataset, tmp_path):
    """Links are fine while they stay inside the directory (a deduplicated copy, say)."""
    from stars_scale.data.verify import verify_dataset

    d = _copy(dataset, tmp_path / "ds")
    os.rename(d / "train-000001.tar", d / "blob")
    (d / "train-000001.tar").symlink_to("blob")
    assert verify_dataset(d).splits["train"].blocks == 64


def test_the_loader_never_hands_a_name_to_a_url_opener(dataset, tmp_path, workdir):
    """A manifest changed after it was loaded (or built in code) still cannot run a pipe."""
    from stars_scale.data import shards as fmt
    from stars_scale.data.loader import read_blocks

    m = fmt.Manifest.load(dataset)
    shard = fmt.ShardInfo("pipe:touch X", 32, 0, "0" * 64)
    with pytest.raises(UserError, match="URL or pipe"):
        list(read_blocks(m, [shard], 0))
    assert not (workdir / "X").exists()


def test_a_tokenizer_file_outside_the_dataset_is_refused(dataset, tmp_path):
    d = _copy(dataset, tmp_path / "ds")
    _edit_manifest(d, lambda m: m.update(tokenizer={"file": "../tok.json", "sha256": "0" * 64}))
    rc, err = run_main(data_cli.main, ["inspect", str(d)])
    assert_one_line_exit2(rc, err, "tokenizer")
    assert "tokenizer.file" in err


def _hf_dir(tmp_path: Path) -> Path:
    """A tiny `hf`-format directory (stars-convert export of a random model)."""
    from stars_scale.config import RunConfig, ModelConfig
    from stars_scale.convert.api import export_checkpoint
    from stars_scale.convert.checkpoint import save_converted
    from stars_scale.model.looped import LoopedLM

    run = RunConfig(model=ModelConfig(vocab_size=15, hidden=16, heads=2, mlp_hidden=32, max_seq_len=16))
    save_converted(tmp_path / "conv", run, LoopedLM(run.model).state_dict(), {"source_format": "test"})
    export_checkpoint(tmp_path / "conv", "hf", tmp_path / "hf", max_shard_bytes=4000)
    return tmp_path / "hf"


def test_convert_max_sizes_are_bounded(tmp_path):
    """A huge --max-seq-len reached torch as a tensor size (traceback); a huge --max-shard-size
    overflowed int()."""
    from stars_scale.cli.convert import main as convert_main

    hf = _hf_dir(tmp_path)
    for extra in (["--max-seq-len", "99999999999999999999"], ["--max-seq-len", "1e30"]):
        rc, err = run_main(convert_main, ["import", str(hf), "--from", "hf", "--out", str(tmp_path / "o"), *extra])
        assert_one_line_exit2(rc, err, extra)
        assert "--max-seq-len" in err
    rc, err = run_main(convert_main, ["export", str(tmp_path / "conv"), "--to", "hf", "--out", str(tmp_path / "e"),
                                      "--max-shard-size", "9" * 400 + "GB"])
    assert_one_line_exit2(rc, err, "shard size")
    assert "--max-shard-size" in err and not (tmp_path / "e").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link-out", "url"])
def test_weight_map_entries_leaving_the_source_are_refused(tmp_path, kind):
    from stars_scale.cli.convert import main as convert_main
    from stars_scale.convert.hfdir import INDEX_NAME

    hf = _hf_dir(tmp_path)
    index = json.loads((hf / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(hf / first, outside)
    target = {"dotdot": "../outside.safetensors", "absolute": "/etc/passwd", "url": "pipe:cat /etc/passwd",
              "link-out": first}[kind]
    if kind == "link-out":
        (hf / first).unlink()
        (hf / first).symlink_to(outside)
    tensor = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][tensor] = target
    (hf / INDEX_NAME).write_text(json.dumps(index))
    rc, err = run_main(convert_main, ["import", str(hf), "--from", "hf", "--out", str(tmp_path / "imp")])
    assert_one_line_exit2(rc, err, kind)
    assert "weight_map" in err, err
    assert not (tmp_path / "imp").exists()


# --------------------------------------------------------------------------- config files


def _train_config(tmp_path: Path, workdir: Path, text: str | bytes, timeout: float = 60) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text.encode() if isinstance(text, str) else text)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(cfg), "--out", "run"],
                          capture_output=True, text=True, cwd=workdir, env=env, timeout=timeout)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, workdir):
    """The probe's 464-byte billion laughs hung: the error path expanded it with repr()."""
    bomb = "seed:\n  - &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"  - &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    assert len(bomb) < 500
    res = _train_config(tmp_path, workdir, bomb)  # a hang is a TimeoutExpired failure
    assert_one_line_exit2(res.returncode, res.stderr, "bomb")
    assert "alias" in res.stderr
    assert not any(workdir.iterdir())


@pytest.mark.parametrize("text,needle", [
    ("a: &a [*a]\nmodel: *a\n", "recursive alias"),
    # the error text of a big value is cut without building its whole repr first
    ("model: " + "[" * 40 + "]" * 40 + "\n", "model: expected a mapping"),
])
def test_self_referencing_and_deep_yaml_is_one_line(tmp_path, workdir, text, needle):
    rc, err = run_main(train_cli.main, ["--config", str(_write(tmp_path, text)), "--out", str(workdir / "run")])
    assert_one_line_exit2(rc, err, text)
    assert needle in err and len(err) < 400, err


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "c.yaml").write_text(text)
    return tmp_path / "c.yaml"


def test_init_from_given_twice_is_refused(tmp_path, workdir):
    """`init: {from: a, from_: b}` silently used b."""
    cfg = dict(BASE, init={"from": "a", "from_": "b"})
    rc, err = run_main(train_cli.main, ["--config", str(_write(tmp_path, yaml.safe_dump(cfg))),
                                        "--out", str(workdir / "run")])
    assert_one_line_exit2(rc, err, "from_")
    assert "init.from_" in err and "write it as 'from'" in err
    from stars_scale.config import config_from_dict

    assert config_from_dict({"init": {"from": "a"}}).init.from_ == "a"


@pytest.mark.parametrize("sets,field", [
    (["data.test_size=600000"], "data.test_size"),  # 3 digits: 10^6 problems, the test set under half
    (["data.digits=10"], "data.digits"), (["data.digits=18"], "data.digits"),
    (["data.train_size=4000000000000000000"], "data.train_size"),
    (["data.digits=1", "data.test_size=50"], "data.test_size"),
])
def test_config_values_that_crashed_after_validation(tmp_path, workdir, sets, field):
    cfg = _write(tmp_path, _yaml_text(BASE).decode())
    rc, err = run_main(train_cli.main, ["--config", str(cfg), "--out", str(workdir / "run"),
                                        *[f"--set={s}" for s in sets]])
    assert_one_line_exit2(rc, err, sets)
    assert err.startswith(f"error: {cfg}: {field}"), err
    assert not any(workdir.iterdir())


def test_the_largest_allowed_digits_still_build_the_task():
    from stars_scale.config import BOUNDS
    from stars_scale.data.arithmetic import ArithmeticTask

    n = BOUNDS["digits"][1]
    task = ArithmeticTask(digits=n, test_size=8, train_size=4)
    batch = task.train_batch(step=0, micro=0, batch_size=4)
    assert batch["input_ids"].shape == (4, 3 * n + 5)
    with pytest.raises(ValueError, match="data.digits"):
        ArithmeticTask(digits=n + 1)
    rc, err = run_main(data_cli.main, ["arithmetic", "--out", "x", "--digits", str(n + 1)])
    assert_one_line_exit2(rc, err, "--digits")
    assert "--digits" in err


# --------------------------------------------------------------------------- CLI flags


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted checkpoint of an arithmetic model (stars-generate reads it with the task's codec)."""
    from stars_scale.config import DataConfig, ModelConfig, RunConfig
    from stars_scale.convert.checkpoint import save_converted
    from stars_scale.model.looped import LoopedLM

    run = RunConfig(model=ModelConfig(vocab_size=15, hidden=16, heads=2, mlp_hidden=32, max_seq_len=16,
                                      injection="add"), data=DataConfig(digits=2, test_size=16))
    run.tracking.mlflow = False
    d = tmp_path_factory.mktemp("conv") / "ckpt"
    save_converted(d, run, LoopedLM(run.model).state_dict(), {"source_format": "test"})
    return d


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--cache", "shared", "--cache-slots", "0"], "--cache-slots"),
    (["--cache", "shared", "--cache-slots", "-2"], "--cache-slots"),
    (["--device", "xpu"], "--device"), (["--device", "meta"], "--device"), (["--device", "cpu:3"], "--device"),
    (["--seed", "1e23"], "--seed"), (["--seed", "100000000000000000000000"], "--seed"),
    (["--exit", "contraction", "--tol", "0.1", "--rho-iters", "-1"], "--rho-iters"),
    (["--exit", "confidence", "--tol", "1"], "--tol"),
    (["--depth", "1000000000"], "--depth"), (["--exit", "delta", "--tol", "0.1", "--max-depth", "1e9"], "--max-depth"),
    (["--tol", "nan", "--exit", "delta"], "--tol"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--batch-size", "0"], "--batch-size"), (["--top-p", "nan"], "--top-p"),
])
def test_generate_flags_are_checked_at_parse_time(converted, args, needle):
    from stars_scale.cli.generate import main as generate_main

    rc, err = run_main(generate_main, ["--checkpoint", str(converted), "--prompt", "12+34=", *args])
    assert_one_line_exit2(rc, err, args)
    assert needle in err, err


def test_generate_names_the_prompt_not_max_new_tokens(converted, tmp_path):
    """A 100k-character prompt was reported as a --max-new-tokens problem the user never set."""
    from stars_scale.cli.generate import main as generate_main

    rc, err = run_main(generate_main, ["--checkpoint", str(converted), "--prompt", "1" * 100_000])
    assert_one_line_exit2(rc, err, "long prompt")
    assert "prompt 1 (100000 characters): 100000 tokens" in err and "--max-new-tokens" not in err, err
    rc, err = run_main(generate_main, ["--checkpoint", str(converted), "--prompt", "12+34=", "--depth", "2",
                                       "--max-new-tokens", "3", "--seed", "1e3"])
    assert rc == 0, err


def test_generate_refuses_token_ids_outside_the_model_vocabulary(converted, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "small": 3, "big": 500}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    from stars_scale.cli.generate import main as generate_main

    rc, err = run_main(generate_main, ["--checkpoint", str(converted), "--tokenizer", str(tmp_path / "tok.json"),
                                       "--prompt", "small big", "--depth", "2"])
    assert_one_line_exit2(rc, err, "oov")
    assert "token id 500" in err and "vocabulary of 15" in err, err


@pytest.mark.parametrize("args,needle", [
    (["--rho-iters", "-3"], "--rho-iters"), (["--depths", "1,1e9"], "--depths"),
    (["--depths", "99999999999999999999999999"], "--depths"), (["--samples", "0"], "--samples"),
    (["--cache-slots", "0"], "--cache-slots"), (["--max-depth", "1000000000"], "--max-depth"),
    (["--exit-rho-iters", "-1"], "--exit-rho-iters"), (["--states", "-1"], "--states"),
])
def test_eval_depth_flags_are_checked_before_any_work(tmp_path, args, needle):
    from stars_scale.cli.eval import main as eval_main

    rc, err = run_main(eval_main, ["depth", "--checkpoint", str(tmp_path / "no-such-run"), *args])
    assert_one_line_exit2(rc, err, args)
    assert needle in err, err


@pytest.mark.parametrize("args,needle", [
    (["--draws", "0"], "--draws"), (["--micro-batch", "0"], "--micro-batch"), (["--draws", "1e12"], "--draws"),
    (["--mfu", "nan"], "--mfu"), (["--tokens", "inf"], "--tokens"), (["--nodes", "0"], "--nodes"),
])
def test_plan_flags_are_not_silently_replaced(tmp_path, args, needle):
    """--draws 0 became 1 and --micro-batch 0 became the config's micro-batch."""
    from stars_scale.cli.plan import main as plan_main

    cfg = _write(tmp_path, _yaml_text(BASE).decode())
    base = ["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "1"]
    rc, err = run_main(plan_main, [*base, *args])
    assert_one_line_exit2(rc, err, args)
    assert needle in err, err
    rc, err = run_main(plan_main, [*base, "--draws", "100", "--micro-batch", "2"])
    assert rc == 0, err


# --------------------------------------------------------------------------- foreign files in --out


def test_convert_overwrite_never_deletes_a_foreign_file(tmp_path):
    """`stars-convert import ... --out D --overwrite` deleted an unrelated thesis.tex in D."""
    from stars_scale.cli.convert import main as convert_main

    hf = _hf_dir(tmp_path)
    out = tmp_path / "D"
    imp = ["import", str(hf), "--from", "hf", "--out", str(out), "--overwrite"]
    assert run_main(convert_main, imp)[0] == 0
    assert run_main(convert_main, imp)[0] == 0  # its own output is replaced
    (out / "thesis.tex").write_text("years of work")
    rc, err = run_main(convert_main, imp)
    assert_one_line_exit2(rc, err, "thesis")
    assert "'thesis.tex'" in err
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "model.safetensors").is_file()
    # export: the same rule
    exp = ["export", str(out), "--to", "hf", "--out", str(tmp_path / "E"), "--overwrite"]
    assert run_main(convert_main, exp)[0] == 0
    (tmp_path / "E" / "notes.txt").write_text("mine")
    rc, err = run_main(convert_main, exp)
    assert_one_line_exit2(rc, err, "notes")
    assert (tmp_path / "E" / "notes.txt").read_text() == "mine"


def test_data_overwrite_keeps_the_same_rule(dataset, tmp_path):
    """stars-data already refused a directory that is not a dataset; a dataset with a foreign file
    in it is refused too (one rule, utils.only_own_files, for datasets and converted checkpoints)."""
    d = _copy(dataset, tmp_path / "ds")
    (d / "README.txt").write_text("mine")
    rc, err = run_main(data_cli.main, ["arithmetic", "--out", str(d), "--digits", "2", "--samples", "8",
                                       "--test-size", "4", "--overwrite"])
    assert_one_line_exit2(rc, err, "README")
    assert "'README.txt'" in err and (d / "README.txt").read_text() == "mine"
    (d / "README.txt").unlink()
    rc, err = run_main(data_cli.main, ["arithmetic", "--out", str(d), "--digits", "2", "--samples", "8",
                                       "--test-size", "4", "--overwrite"])
    assert rc == 0, err


def test_generate_with_flash_attention_on_a_cpu_device_is_one_line(tmp_path):
    """`model.attention: flash` on CPU passed validation and crashed in the first forward."""
    from stars_scale.cli.generate import main as generate_main
    from stars_scale.config import DataConfig, ModelConfig, RunConfig
    from stars_scale.convert.checkpoint import save_converted
    from stars_scale.model.looped import LoopedLM

    run = RunConfig(model=ModelConfig(vocab_size=15, hidden=16, heads=2, mlp_hidden=32, max_seq_len=16,
                                      attention="flash"), data=DataConfig(digits=2, test_size=16))
    save_converted(tmp_path / "ckpt", run, LoopedLM(run.model).state_dict(), {"source_format": "test"})
    rc, err = run_main(generate_main, ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "12+34=",
                                       "--depth", "2", "--device", "cpu"])
    assert_one_line_exit2(rc, err, "flash")
    assert "model.attention" in err and "cpu" in err, err


def _numeric_flags():
    """(CLI, subcommand argv, flag, bounds) for every numeric flag of stars-generate, stars-eval,
    stars-plan and stars-convert, read from the parsers themselves (a new flag is covered without editing this list)."""
    import argparse

    from stars_scale.cli import eval as eval_cli
    from stars_scale.cli import generate as generate_cli
    from stars_scale.cli import convert as convert_cli
    from stars_scale.cli import plan as plan_cli

    def walk(parser, prefix):
        for a in parser._actions:  # argparse has no public listing of its actions
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from walk(sub, [*prefix, name])
            elif a.option_strings and (a.type in (int, float) or getattr(a.type, "bounds", None)):
                yield prefix, a.option_strings[0], getattr(a.type, "bounds", None)  # None: a bare int/float

    for name, mod in (("generate", generate_cli), ("eval", eval_cli), ("plan", plan_cli), ("convert", convert_cli)):
        for prefix, flag, bounds in walk(mod.build_parser(), []):
            yield pytest.param(mod, prefix, flag, bounds, id=f"{name}-{' '.join(prefix)}{flag}")


@pytest.mark.parametrize("mod,prefix,flag,bounds", list(_numeric_flags()))
def test_every_numeric_flag_refuses_huge_and_impossible_values(mod, prefix, flag, bounds, workdir):
    """NaN, infinities, huge and negative numbers at every numeric flag: one line naming the flag,
    before any file is read (the checkpoint and config named here do not exist)."""
    assert bounds is not None, f"{flag} is parsed as a bare int/float, without the config's bounds"
    lo, hi = bounds
    values = ["nan", "inf", "-inf", "-1e30", "1e400", "-99999999999999999999999999", "x"]
    if hi != float("inf"):
        values += ["1e30", "99999999999999999999999999"]
    required = {"generate": ["--checkpoint", "none", "--prompt", "1+1="], "depth": ["--checkpoint", "none"],
                "lm": ["--checkpoint", "none", "--tasks", "t"], "plan": ["--config", "none.yaml", "--nodes", "1",
                                                                          "--gpus-per-node", "1"],
                "import": ["none", "--from", "hf", "--out", "none-out"]}
    key = prefix[0] if prefix else mod.__name__.rsplit(".", 1)[-1]
    for v in values:
        argv = [*prefix, *required[key], f"{flag}={v}"]
        if flag in ("--nodes", "--gpus-per-node"):
            argv = [*prefix, "--config", "none.yaml", "--nodes", "1", "--gpus-per-node", "1", f"{flag}={v}"]
        rc, err = run_main(mod.main, argv)
        assert_one_line_exit2(rc, err, argv)
        assert flag in err, (argv, err)

"""The real-text quickstart on a tiny slice: `stars-data corpus` (Python's stdlib) -> tokenizer ->
shards -> 5 training steps of configs/text_tiny.yaml, and the depth table it prints."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import stars_data

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def fake_stdlib(root: Path) -> None:
    files = {
        "abc.py": "class ABC:\n    pass\n",
        "json/__init__.py": "def dumps(obj):\n    return str(obj)\n",
        "json/decoder.py": "def loads(s):\n    return eval(s)\n" * 3,
        "email/parser.py": "# parse mail\nimport re\n" * 10,
        "big.py": "x = 1\n" * 400,  # 2400 bytes: over the cap of the test below
        "empty/__init__.py": "",
        "test/test_abc.py": "import abc\n",  # test suites, codecs, third-party code: excluded
        "idlelib/idle_test/test_x.py": "pass\n",
        "encodings/cp1252.py": "table = ''\n",
        "html/entities.py": "name2codepoint = {}\n",  # generated data modules, build-specific config
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
        "site-packages/pkg/mod.py": "pass\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "latin.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: skipped and counted


def test_corpus_file_set_cap_split_and_refusals(tmp_path):
    root = tmp_path / "lib"
    fake_stdlib(root)
    res = stars_data("corpus", "--root", root, "--max-bytes", "2000", "--val-fraction", "0.5", "--out",
                     tmp_path / "c", "--text-only")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "c" / "corpus.json").read_text())
    assert m["python"] == platform.python_version() and m["root"] == str(root)
    assert [f["path"] for f in m["files"]] == ["abc.py", "email/parser.py", "json/__init__.py", "json/decoder.py"]
    assert m["skipped_not_utf8"] == 1
    docs = read_jsonl(tmp_path / "c" / "corpus.jsonl")
    assert [d["path"] for d in docs] == [f["path"] for f in m["files"]]
    assert docs[0]["text"] == (root / "abc.py").read_text()
    train, val = read_jsonl(tmp_path / "c" / "train.jsonl"), read_jsonl(tmp_path / "c" / "val.jsonl")
    from stars_scale.data.prepare import is_val_document

    assert val == [d for i, d in enumerate(docs) if is_val_document(i, 0.5)]
    assert train == [d for i, d in enumerate(docs) if not is_val_document(i, 0.5)]
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (len(train), len(val))
    assert m["splits"]["val"]["bytes"] == sum(len(d["text"].encode()) for d in val)
    before = (tmp_path / "c" / "corpus.jsonl").read_bytes()
    # a larger cap takes big.py too; the same inputs give the same bytes
    assert stars_data("corpus", "--root", root, "--max-bytes", "1MB", "--val-fraction", "0.5", "--out",
                      tmp_path / "c", "--overwrite", "--text-only").returncode == 0
    assert "big.py" in [d["path"] for d in read_jsonl(tmp_path / "c" / "corpus.jsonl")]
    assert stars_data("corpus", "--root", root, "--max-bytes", "2000", "--val-fraction", "0.5", "--out",
                      tmp_path / "c", "--overwrite", "--text-only").returncode == 0
    assert (tmp_path / "c" / "corpus.jsonl").read_bytes() == before

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    for args, words in [(("--out", tmp_path / "c"), "already exists"),
                        (("--out", tmp_path / "mine", "--overwrite"), "not a corpus"),
                        (("--out", tmp_path / "d", "--val-fraction", "1.5"), "--val-fraction"),
                        (("--out", tmp_path / "d", "--root", tmp_path / "nope"), "no such directory")]:
        res = stars_data("corpus", "--root", root, *args) if "--root" not in args else stars_data("corpus", *args)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine" and not (tmp_path / "d").exists()


def test_quickstart_on_a_stdlib_slice_prints_the_depth_table(tmp_path):
    corpus = tmp_path / "data" / "pystdlib"  # where configs/lm_tasks/stars_pystdlib_val.yaml reads val.jsonl
    tok, shards = corpus / "tokenizer.json", corpus / "shards"
    res = stars_data("corpus", "--max-bytes", "150kB", "--val-fraction", "0.2", "--vocab-size", "300",
                     "--seq-len", "32", "--shard-size", "20kB", "--out", corpus)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in corpus.iterdir()) == ["corpus.json", "corpus.jsonl", "shards", "tokenizer.json",
                                                        "train.jsonl", "val.jsonl"]
    m = json.loads((corpus / "corpus.json").read_text())
    assert m["kind"] == "python-stdlib" and 100_000 < sum(f["bytes"] for f in m["files"]) <= 150_000
    val = read_jsonl(corpus / "val.jsonl")
    assert len(val) == m["splits"]["val"]["documents"] > 0

    from stars_scale.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    assert t.get_vocab_size() == 300 and t.token_to_id("<|endoftext|>") is not None
    sm = json.loads((shards / "manifest.json").read_text())
    # the shards' val split is exactly val.jsonl: same documents, same tokens (+ one EOS each)
    assert sm["splits"]["val"]["documents"] == len(val)
    assert sm["splits"]["val"]["tokens"] == sum(len(t.encode(d["text"]).ids) + 1 for d in val)
    assert sm["splits"]["train"]["documents"] == m["splits"]["train"]["documents"]
    assert sm["seq_len"] == 32 and sm["vocab_size"] == 300 and len(sm["splits"]["train"]["shards"]) > 1

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stars_scale.cli.train", "--config", str(ROOT / "configs" / "text_tiny.yaml"),
           "--out", str(tmp_path / "run"), "--set", f"data.path={shards}", "--set", "model.vocab_size=300",
           "--set", "model.hidden=32", "--set", "model.mlp_hidden=64", "--set", "model.max_seq_len=32",
           "--set", "data.batch_size=4", "--set", "data.val_batches=2", "--set", "train.steps=5",
           "--set", "train.eval_every=0", "--set", "train.progress=false", "--set", "tracking.mlflow=false",
           "--set", "stars.warmup_steps=2", "--set", "eval.depths=[1,2,4]", "--set", "eval.rho_iters=2"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ds = json.loads((tmp_path / "run" / "depth_scaling.json").read_text())
    assert ds["depths"] == [1, 2, 4] and ds["accuracy"] is None
    rows = {line.split()[0]: line.split()[1:] for line in res.stderr.splitlines()
            if line.split() and line.split()[0] in ("depth", "val", "perplexity", "|dh|/|h|", "rho", "accuracy")}
    assert "accuracy" not in rows
    assert rows["depth"] == ["1", "2", "4"]
    assert [float(x) for x in rows["val"][1:]] == pytest.approx(ds["loss"], abs=5e-4)
    assert [float(x) for x in rows["perplexity"]] == pytest.approx(ds["perplexity"], abs=5e-3)
    assert [float(x) for x in rows["rho"]] == pytest.approx(ds["rho"], abs=5e-4)
    # an untrained-ish model over 300 tokens: perplexity near the vocabulary size, never below 1
    assert all(1 < p < 3 * 300 for p in ds["perplexity"])
    # continuations at the training median (3) and the deepest sweep depth (4), three val prompts each
    for depth in (3, 4):
        assert f"=== continuations at depth {depth}" in res.stderr
    assert res.stderr.count("--- val block") == 6
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["step"] == 5 and summary["best_val_loss"] == min(ds["loss"])

    # the trained text model generates and is scored by lm-eval's loglikelihood_rolling over val.jsonl
    gen = subprocess.run([sys.executable, "-m", "stars_scale.cli.generate", "--checkpoint", str(tmp_path / "run"),
                          "--prompt", "def ", "--max-new-tokens", "8", "--depth", "4", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    out = json.loads(gen.stdout)
    assert out["prompt"] == "def " and 1 <= len(out["tokens"]) <= 8 and set(out["loops"]) == {4}
    assert out["completion"] == t.decode(out["tokens"])
    pytest.importorskip("lm_eval", reason="lm-eval is in the dev/eval extras")
    env_lm = dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    lm = subprocess.run([sys.executable, "-m", "stars_scale.cli.eval", "lm", "--checkpoint", str(tmp_path / "run"),
                         "--tasks", "stars_pystdlib_val", "--include-path", str(ROOT / "configs" / "lm_tasks"),
                         "--depths", "1,4", "--limit", "2", "--out", str(tmp_path / "lm")],
                        cwd=tmp_path, env=env_lm, capture_output=True, text=True, timeout=900)
    assert lm.returncode == 0, lm.stderr[-3000:]
    table = json.loads((tmp_path / "lm" / "lm_depth_scaling.json").read_text())
    task = table["tasks"]["stars_pystdlib_val"]
    assert table["depths"] == [1, 4] and task["metric"] == "bits_per_byte"
    assert all(x > 0 for x in task["scores"]) and task["scores"][0] != task["scores"][1]

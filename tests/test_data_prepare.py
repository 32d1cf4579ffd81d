"""`stars-data train-tokenizer` / `prepare` / `inspect` / `arithmetic`, driven as a user would."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_helpers import all_blocks, make_docs, stars_data, write_corpus

from stars_scale.data.prepare import is_val_document


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    docs = write_corpus(tmp / "corpus", make_docs(45, seed=3))
    r = stars_data("train-tokenizer", tmp / "corpus", "--vocab-size", "300", "--out", tmp / "tok.json")
    assert r.returncode == 0, r.stderr
    r = stars_data("prepare", tmp / "corpus", "--tokenizer", tmp / "tok.json", "--seq-len", "24",
                   "--blocks-per-shard", "7", "--val-fraction", "0.2", "--out", tmp / "ds")
    assert r.returncode == 0, r.stderr
    assert "MB/s" in r.stdout
    return tmp, docs


def test_every_token_in_order_across_shards(prepared):
    from tokenizers import Tokenizer

    tmp, docs = prepared
    tok = Tokenizer.from_file(str(tmp / "tok.json"))
    eos = tok.token_to_id("<|endoftext|>")
    manifest = json.loads((tmp / "ds" / "manifest.json").read_text())
    assert manifest["seq_len"] == 24 and manifest["dtype"] == "uint16" and manifest["eos_id"] == eos
    for split, want_val in (("train", False), ("val", True)):
        mine = [d for i, d in enumerate(docs) if is_val_document(i, 0.2) == want_val]
        assert mine, f"the fixture should put documents in {split}"
        expected: list[int] = []
        for d in mine:
            ids = tok.encode(d, add_special_tokens=False).ids
            assert tok.decode(ids) == d  # the tokenizer round trip is lossless
            expected += ids + [eos]
        blocks = all_blocks(tmp / "ds", split)
        assert all(len(b) == 25 for b in blocks)
        flat = [t for b in blocks for t in b]
        info = manifest["splits"][split]
        assert flat[: len(expected)] == expected
        assert flat[len(expected):] == [eos] * info["padding_tokens"] and info["padding_tokens"] < 25
        assert info["tokens"] == len(expected) and info["documents"] == len(mine)
        assert len(info["shards"]) == -(-len(blocks) // 7) and sum(s["blocks"] for s in info["shards"]) == len(blocks)
        # the documents come back as text, in order, between EOS tokens
        text_docs, cur = [], []
        for t in flat[: len(expected)]:
            if t == eos:
                text_docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        assert text_docs == mine
    assert len(manifest["splits"]["train"]["shards"]) >= 3


def test_rerun_is_byte_identical_whatever_the_worker_count(prepared):
    tmp, _ = prepared
    r = stars_data("prepare", tmp / "corpus", "--tokenizer", tmp / "tok.json", "--seq-len", "24",
                   "--blocks-per-shard", "7", "--val-fraction", "0.2", "--out", tmp / "again", "--workers", "1")
    assert r.returncode == 0, r.stderr
    first = sorted(p.name for p in (tmp / "ds").iterdir())
    assert first == sorted(p.name for p in (tmp / "again").iterdir())
    for name in first:
        assert (tmp / "ds" / name).read_bytes() == (tmp / "again" / name).read_bytes(), name
    # --overwrite replaces a dataset in place; without it an existing dataset is refused
    r = stars_data("prepare", tmp / "corpus", "--tokenizer", tmp / "tok.json", "--seq-len", "24", "--out", tmp / "again")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = stars_data("prepare", tmp / "corpus", "--tokenizer", tmp / "tok.json", "--seq-len", "24", "--out",
                   tmp / "again", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp / "again" / "manifest.json").read_text())["splits"].keys() == {"train"}
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]


def test_inspect_prints_summary_samples_and_verifies(prepared):
    tmp, docs = prepared
    r = stars_data("inspect", tmp / "ds", "--verify", "--samples", "2")
    assert r.returncode == 0, r.stderr
    assert "seq_len 24" in r.stdout and "train:" in r.stdout and "val:" in r.stdout
    assert "verified" in r.stdout
    first_train = next(d for i, d in enumerate(docs) if not is_val_document(i, 0.2))
    assert first_train[:10] in r.stdout  # the first block decodes to the first train document's start


def test_paragraph_and_line_documents(tmp_path):
    from stars_scale.data.text import iter_documents

    p = tmp_path / "x.txt"
    p.write_text("one\ntwo\n\n\nthree\n\nfour\n")
    assert [d.text for d in iter_documents(p, txt_docs="paragraph")] == ["one\ntwo", "three", "four"]
    assert [d.text for d in iter_documents(p, txt_docs="line")] == ["one", "two", "three", "four"]
    assert [d.text for d in iter_documents(p)] == ["one\ntwo\n\n\nthree\n\nfour\n"]
    pieces = list(iter_documents(p, max_doc_chars=6))  # a long file is tokenised in pieces
    assert "".join(d.text for d in pieces) == p.read_text()
    assert [d.continues for d in pieces] == [True] * (len(pieces) - 1) + [False]


def test_arithmetic_shards_match_the_task(tmp_path):
    from stars_scale.data.arithmetic import IGNORE, ArithmeticTask
    from stars_scale.data.loader import ShardSource

    r = stars_data("arithmetic", "--digits", "2", "--samples", "300", "--test-size", "40", "--seed", "5",
                   "--blocks-per-shard", "50", "--out", tmp_path / "arith")
    assert r.returncode == 0, r.stderr
    task = ArithmeticTask(digits=2, seed=5, test_size=40)
    src = ShardSource(str(tmp_path / "arith"), 40, dp_rank=0, dp_size=1, seed=0, split="val")
    assert src.seq_len == task.seq_len - 1 and src.vocab_size == 15
    got = src.next_batch()
    want = task.test_batch()
    assert torch.equal(got["input_ids"], want["input_ids"][:, :-1])
    assert torch.equal(got["labels"], want["labels"][:, :-1])
    assert (want["labels"][:, -1] == IGNORE).all()
    # train problems: the task's own fresh draws, answer-only labels, none from the test set
    src = ShardSource(str(tmp_path / "arith"), 50, dp_rank=0, dp_size=1, seed=0, num_workers=0)
    b = src.next_batch()
    mask = b["labels"] != IGNORE
    assert (mask.sum(1) == 2 + 3).all()  # targets: the space, n + 1 answer digits, EOS
    codes = (b["input_ids"][:, :2] @ torch.tensor([10, 1])) * 100 + b["input_ids"][:, 3:5] @ torch.tensor([10, 1])
    assert not any(task.is_test_problem(int(c)) for c in codes)
    r = stars_data("inspect", tmp_path / "arith", "--verify", "--split", "val", "--samples", "1")
    assert r.returncode == 0, r.stderr
    assert "loss on" in r.stdout and "verified 7 shard(s)" in r.stdout


def test_uint32_when_the_vocabulary_does_not_fit_uint16():
    from stars_scale.data.shards import dtype_for_vocab, numpy_dtype

    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"
    assert np.iinfo(numpy_dtype("uint16")).max == 65535

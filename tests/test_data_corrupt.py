"""Corrupt or missing input: one clear error naming the shard/file, exit 2, no traceback, no debris."""
from __future__ import annotations

import json
import shutil

import pytest
from data_helpers import make_dataset, rewrite_shard, stars_data

from stars_scale.data.loader import ShardSource
from stars_scale.data.shards import sha256_file
from stars_scale.errors import UserError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corrupt")
    text = make_dataset(tmp, n_docs=40, seq_len=16, blocks_per_shard=6)
    r = stars_data("arithmetic", "--digits", "2", "--samples", "60", "--test-size", "10",
                   "--blocks-per-shard", "20", "--out", tmp / "arith")
    assert r.returncode == 0, r.stderr
    return text, tmp / "arith"


def copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def verify_fails(ds, *needles: str) -> str:
    r = stars_data("inspect", ds, "--verify")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_truncated_tar(pristine, tmp_path):
    ds = copy(pristine[0], tmp_path)
    shard = ds / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    verify_fails(ds, "train-000001.tar", "truncated")
    with pytest.raises(UserError, match="train-000001.tar: .* bytes on disk, but the manifest lists"):
        ShardSource(str(ds), 2, dp_rank=0, dp_size=1, seed=0)  # caught at start-up, before training


def test_missing_member(pristine, tmp_path):
    ds = copy(pristine[1], tmp_path)
    rewrite_shard(ds / "train-000002.tar", lambda ms: [m for m in ms if m[0] != "0000000043.mask"])
    verify_fails(ds, "train-000002.tar", "sample 0000000043 lacks member mask")


def test_block_of_the_wrong_size_also_stops_the_loader(pristine, tmp_path):
    ds = copy(pristine[0], tmp_path)
    shard = ds / "train-000000.tar"
    rewrite_shard(shard, lambda ms: [(n, d[:-4] if i == 3 else d) for i, (n, d) in enumerate(ms)])
    verify_fails(ds, "train-000000.tar", "'0000000003.tokens' has 30 bytes, expected 34 (17 uint16 tokens)")
    # make the manifest agree on sizes, so only reading the block can find the problem
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["bytes"] = shard.stat().st_size
    m["splits"]["train"]["shards"][0]["sha256"] = sha256_file(shard)  # (the loader checks it before reading)
    (ds / "manifest.json").write_text(json.dumps(m))
    src = ShardSource(str(ds), 4, dp_rank=0, dp_size=1, seed=0, num_workers=2, shuffle_buffer=0)
    with pytest.raises(UserError, match=r"shard .*train-000000.tar: sample 0000000003 block has 30 bytes, "
                                        r"expected 17 uint16 tokens \(34 bytes\)$"):
        for _ in range(src.epoch_blocks() // 4 + 2):  # from a DataLoader worker, as one clean message
            src.next_batch()


def test_manifest_that_disagrees_with_the_shards(pristine, tmp_path):
    ds = copy(pristine[0], tmp_path)
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][2]["blocks"] += 1
    m["splits"]["train"]["blocks"] += 1
    (ds / "manifest.json").write_text(json.dumps(m))
    verify_fails(ds, "train-000002.tar", "holds 6 blocks, but the manifest lists 7")
    m["splits"]["train"]["shards"][2]["blocks"] -= 1  # now consistent, but the split total is not
    (ds / "manifest.json").write_text(json.dumps(m))
    verify_fails(ds, "manifest.json", "splits.train.blocks", "disagrees")
    m["splits"]["train"]["blocks"] -= 1
    m["splits"]["train"]["shards"].pop()  # a shard on disk the manifest does not list
    m["splits"]["train"]["blocks"] = sum(s["blocks"] for s in m["splits"]["train"]["shards"])
    m["splits"]["train"]["tokens"] = m["splits"]["train"]["blocks"] * 17
    m["splits"]["train"]["padding_tokens"] = 0
    (ds / "manifest.json").write_text(json.dumps(m))
    verify_fails(ds, "in the directory but not in the manifest")


def test_rewritten_shard_fails_its_checksum(pristine, tmp_path):
    ds = copy(pristine[0], tmp_path)
    other = ds / "train-000001.tar"
    (ds / "train-000000.tar").write_bytes(other.read_bytes())  # same shape and size, different blocks
    verify_fails(ds, "train-000000.tar", "sha256")


def test_empty_input_directory_leaves_nothing(pristine, tmp_path):
    (tmp_path / "empty").mkdir()
    tok = pristine[0].parent / "ds_tok.json"
    r = stars_data("prepare", tmp_path / "empty", "--tokenizer", tok, "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "empty: no input files" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_bad_jsonl_line_leaves_nothing_half_written(pristine, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": f"document number {i} " * 20}) for i in range(50)]
    lines[41] = '{"text": "unterminated'
    (corpus / "x.jsonl").write_text("\n".join(lines) + "\n")
    tok = pristine[0].parent / "ds_tok.json"
    r = stars_data("prepare", corpus, "--tokenizer", tok, "--out", tmp_path / "out", "--seq-len", "8",
                   "--blocks-per-shard", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "x.jsonl:42: not valid JSON" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no out dir, no temporary dir


def test_missing_manifest_and_tokenizer(pristine, tmp_path):
    r = stars_data("inspect", tmp_path)
    assert r.returncode == 2 and "manifest.json: missing" in r.stderr
    (tmp_path / "c.txt").write_text("hello")
    r = stars_data("prepare", tmp_path / "c.txt", "--tokenizer", tmp_path / "nope.json", "--out", tmp_path / "o")
    assert r.returncode == 2 and "nope.json: no such file" in r.stderr


def test_training_refuses_a_shard_the_manifest_does_not_list(pristine, tmp_path):
    ds = copy(pristine[1], tmp_path)
    (ds / "train-000099.tar").write_bytes((ds / "train-000000.tar").read_bytes())  # dropped in by hand
    verify_fails(ds, "train-000099.tar", "not in the manifest")
    with pytest.raises(UserError, match=r"train-000099.tar: in the directory but not in the manifest .*training "
                                        r"reads only listed shards"):
        ShardSource(str(ds), 2, dp_rank=0, dp_size=1, seed=0)  # at start-up, before any step


def test_a_bit_flip_that_still_decodes_is_refused_by_the_loader(pristine, tmp_path):
    ds = copy(pristine[1], tmp_path)
    shard = ds / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[512] ^= 0x01  # the first token of the first block: still a digit, inside the vocabulary
    shard.write_bytes(bytes(data))
    src = ShardSource(str(ds), 4, dp_rank=0, dp_size=1, seed=0, shuffle_buffer=0)
    with pytest.raises(UserError, match=r"train-000001.tar: sha256 differs from the manifest"):
        for _ in range(src.epoch_blocks() // 4 + 2):
            src.next_batch()

"""ShardSource: epochs, shuffling, mixtures, the val split, and exact resume (with workers)."""
from __future__ import annotations

import collections
import json

import pytest
import torch
from data_helpers import all_blocks, batch_blocks, make_dataset

from stars_scale.data.loader import ShardSource
from stars_scale.errors import UserError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    return make_dataset(tmp, n_docs=60, seq_len=16, blocks_per_shard=6, val_fraction=0.15)


def draw(src: ShardSource, n: int) -> list[dict[str, torch.Tensor]]:
    return [src.next_batch() for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) and
                                    torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


def test_batches_shape_labels_and_epochs_cover_every_block(ds):
    blocks = all_blocks(ds)
    src = ShardSource(str(ds), 5, dp_rank=0, dp_size=1, seed=3, num_workers=0, shuffle_buffer=10)
    assert src.seq_len == 16
    n = src.epoch_blocks(0)
    assert n == len(blocks)
    batches = draw(src, -(-2 * n // 5))
    b = batches[0]
    assert b["input_ids"].shape == (5, 16) and b["input_ids"].dtype == torch.int64
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])  # labels are the next tokens
    seen = [blk for x in batches for blk in batch_blocks(x)]
    epoch0, epoch1 = seen[:n], seen[n: 2 * n]
    assert sorted(epoch0) == sorted(blocks) and sorted(epoch1) == sorted(blocks)  # every block once per epoch
    assert epoch0 != blocks and epoch0 != epoch1  # shuffled, differently in each epoch
    assert src.tokens_seen == len(batches) * 5 * 16
    again = ShardSource(str(ds), 5, dp_rank=0, dp_size=1, seed=3, num_workers=0, shuffle_buffer=10)
    assert same(draw(again, 6), batches[:6])  # deterministic from the seed
    other = ShardSource(str(ds), 5, dp_rank=0, dp_size=1, seed=4, num_workers=0, shuffle_buffer=10)
    assert not same(draw(other, 6), batches[:6])


@pytest.mark.parametrize("stop", [1, 7, 23])
def test_resume_with_workers_gives_the_uninterrupted_batches(ds, stop):
    kw = dict(dp_rank=0, dp_size=1, seed=11, num_workers=2, shuffle_buffer=8)
    full = draw(ShardSource(str(ds), 3, **kw), 30)  # crosses epoch boundaries in both workers
    first = ShardSource(str(ds), 3, **kw)
    head = draw(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    assert any(w and w["streams"][0]["buffer"] for w in state["worker_states"])  # stopped mid-shard, buffer full
    resumed = ShardSource(str(ds), 3, **kw)
    resumed.load_state_dict(state)
    assert same(head + draw(resumed, 30 - stop), full)
    assert resumed.tokens_seen == 30 * 3 * 16


def test_zero_and_one_worker_are_the_same_stream(ds):
    kw = dict(dp_rank=0, dp_size=1, seed=2, shuffle_buffer=8)
    a = ShardSource(str(ds), 4, num_workers=0, **kw)
    head = draw(a, 5)
    b = ShardSource(str(ds), 4, num_workers=1, **kw)
    b.load_state_dict(a.state_dict())
    assert same(head + draw(b, 5), draw(ShardSource(str(ds), 4, num_workers=0, **kw), 10))


def test_resume_refuses_a_different_layout(ds):
    src = ShardSource(str(ds), 4, dp_rank=0, dp_size=1, seed=0, num_workers=2)
    draw(src, 2)
    state = src.state_dict()
    src.close()
    with pytest.raises(UserError, match="dp_size=1 and 2 loader stream.*dp_size=2 and 2"):
        ShardSource(str(ds), 4, dp_rank=0, dp_size=2, seed=0, num_workers=2).load_state_dict(state)
    with pytest.raises(UserError, match="num_workers"):
        ShardSource(str(ds), 4, dp_rank=0, dp_size=1, seed=0, num_workers=3).load_state_dict(state)
    with pytest.raises(UserError, match="per-rank batch size was 4"):
        ShardSource(str(ds), 8, dp_rank=0, dp_size=1, seed=0, num_workers=2).load_state_dict(state)
    with pytest.raises(UserError, match="data seed"):
        ShardSource(str(ds), 4, dp_rank=0, dp_size=1, seed=1, num_workers=2).load_state_dict(state)


def test_too_few_shards_for_the_slots_is_refused(ds):
    n = len(json.loads((ds / "manifest.json").read_text())["splits"]["train"]["shards"])
    with pytest.raises(UserError, match=f"{n} train shards cannot feed dp_size={n} x 2"):
        ShardSource(str(ds), 4, dp_rank=0, dp_size=n, seed=0, num_workers=2)


def test_val_split_in_order_striped_over_dp_and_repeatable(ds):
    blocks = all_blocks(ds, "val")
    got = {}
    for r in range(2):
        src = ShardSource(str(ds), 2, dp_rank=r, dp_size=2, seed=0, num_workers=2, split="val")
        n = src.epoch_blocks()
        assert n == len(blocks[r::2])
        first = draw(src, -(-n // 2))
        got[r] = [b for x in first for b in batch_blocks(x)][:n]
        src.reset()
        assert same(draw(src, 2), first[:2])
    assert got[0] == blocks[0::2] and got[1] == blocks[1::2]


def test_mixture_draws_by_weight_and_resumes(tmp_path, ds):
    words_b = tuple("zz yy xx ww vv".split())
    tok = ds.parent / "ds_tok.json"
    other = make_dataset(tmp_path, n_docs=40, seq_len=16, blocks_per_shard=4, name="other", words=words_b,
                         tokenizer=tok)
    in_a, in_b = set(all_blocks(ds)), set(all_blocks(other))
    mix = [(str(ds), 3.0), (str(other), 1.0)]
    kw = dict(dp_rank=0, dp_size=1, seed=5, num_workers=2, shuffle_buffer=4)
    full = draw(ShardSource(mix, 4, **kw), 24)
    src = ShardSource(mix, 4, **kw)
    head = draw(src, 9)
    resumed = ShardSource(mix, 4, **kw)
    resumed.load_state_dict(src.state_dict())
    src.close()
    assert same(head + draw(resumed, 15), full)
    origin = collections.Counter("a" if b in in_a else "b" if b in in_b else "?" for x in full for b in batch_blocks(x))
    assert origin["?"] == 0 and origin["a"] > 2 * origin["b"] > 0
    with pytest.raises(UserError, match="different tokenizers"):
        lone = make_dataset(tmp_path, n_docs=10, seq_len=16, name="lone", words=words_b)
        ShardSource([(str(ds), 1.0), (str(lone), 1.0)], 4, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(UserError, match="data changed"):
        ShardSource([(str(ds), 1.0), (str(other), 1.0)], 4, **kw).load_state_dict(resumed.state_dict())

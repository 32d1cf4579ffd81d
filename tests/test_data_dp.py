"""Data-parallel splitting with dp2 x tp2: 4 gloo processes, dp_rank = rank // tp.

Tensor-parallel peers must see identical batches; data-parallel ranks disjoint ones whose union
over an epoch is every block exactly once. The batches are all-gathered over the 4 processes
and checked by the parent.
"""
from __future__ import annotations

import collections
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_helpers import all_blocks, batch_blocks, make_dataset

from stars_scale.data.loader import ShardSource

TP, DP = 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dp_rank = rank // TP
        src = ShardSource(data_dir, 4, dp_rank=dp_rank, dp_size=DP, seed=7, num_workers=0, shuffle_buffer=5)
        n = src.epoch_blocks(0)
        epoch = [b for _ in range(-(-n // 4)) for b in batch_blocks(src.next_batch())][:n]
        # with two loader workers per rank the split must hold as well
        wsrc = ShardSource(data_dir, 4, dp_rank=dp_rank, dp_size=DP, seed=7, num_workers=2, shuffle_buffer=5)
        with_workers = [b for _ in range(3) for b in batch_blocks(wsrc.next_batch())]
        wsrc.close()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "dp_rank": dp_rank, "epoch": epoch, "workers": with_workers})
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dp"), n_docs=70, seq_len=12, blocks_per_shard=5)


def test_dp2_tp2_split(ds, tmp_path):
    out = tmp_path / "gathered.pt"
    mp.spawn(_worker, args=(DP * TP, _free_port(), str(ds), str(out)), nprocs=DP * TP, join=True)
    got = torch.load(out, weights_only=False)
    by_rank = {g["rank"]: g for g in got}
    for dp in range(DP):
        peers = [by_rank[dp * TP + t] for t in range(TP)]
        assert all(p["dp_rank"] == dp for p in peers)
        assert all(p["epoch"] == peers[0]["epoch"] for p in peers)  # tp peers: identical batches
        assert all(p["workers"] == peers[0]["workers"] for p in peers)
    # Tiny corpora repeat a few blocks verbatim, so compare multisets: the union of the dp ranks'
    # epochs equals the dataset with multiplicity (each stored block once: disjoint and complete).
    blocks = all_blocks(ds)
    repeated = {b for b, c in collections.Counter(blocks).items() if c > 1}
    dp_epochs = [by_rank[dp * TP]["epoch"] for dp in range(DP)]
    assert all(dp_epochs) and sorted(dp_epochs[0] + dp_epochs[1]) == sorted(blocks)
    assert set(dp_epochs[0]) & set(dp_epochs[1]) <= repeated
    dp_workers = [by_rank[dp * TP]["workers"] for dp in range(DP)]
    assert all(dp_workers) and set(dp_workers[0]) & set(dp_workers[1]) <= repeated

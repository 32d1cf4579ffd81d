"""train.compile: compiled regions train like eager, and sampled depths do not recompile.

The recompilation tests use dynamo with the `aot_eager` backend (the same graphs and guards as
inductor, without generating code, so they take seconds); the equality test uses inductor.
"""
import copy
import random

import pytest
import torch

from stars_scale.config import config_from_dict
from stars_scale.data.sources import build_task
from stars_scale.model import LoopedLM
from stars_scale.model.dropout import DropoutMasks, keep_mask
from stars_scale.parallel.compile import apply_compile
from stars_scale.stars.depth import Depth
from stars_scale.stars.regularizer import core_map
from stars_scale.stars.objective import forward_backward

BASE = {
    "seed": 0,
    "model": {"vocab_size": 15, "hidden": 32, "heads": 2, "max_seq_len": 16, "mlp_hidden": 64,
              "mlp": "swiglu", "norm": "rmsnorm", "positions": "rope", "n_prelude": 1, "n_core": 1, "n_coda": 1,
              "injection": "concat-linear", "init_state": "random"},
    "depth": {"dist": "lognormal", "mu": 1.2, "sigma": 0.5, "max": 6, "backprop": 2},
    # fd_eps 0.5: the default ε magnifies last-bit differences (see test_parallel_equivalence)
    "stars": {"lam": 0.1, "method": "fd", "iters": 1, "warmup_steps": 2, "sample_fraction": 0.5, "fd_eps": 0.5},
    "data": {"digits": 2, "batch_size": 8, "test_size": 32},
    "optim": {"lr": 0.003, "warmup_steps": 1},
    "train": {"steps": 20, "progress": False},
    "tracking": {"mlflow": False},
}


def run_cfg(**sections):
    d = copy.deepcopy(BASE)
    for k, v in sections.items():
        d[k].update(v)
    return config_from_dict(d)


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["block", "model"])
def test_fifty_steps_of_varying_depth_compile_a_fixed_number_of_graphs(mode):
    cfg = run_cfg()
    torch.manual_seed(0)
    model = LoopedLM(cfg.model)
    model.checkpointing = "loop"
    apply_compile(model, mode, backend="aot_eager")
    batch = build_task(cfg).train_batch(0, 0, 8)
    rng = random.Random(0)
    methods = [("fd", 1.0), ("fd", 0.5), ("jvp", 1.0), ("vjp", 1.0)]
    counts, depths = [], set()
    for step in range(50):
        depth = Depth(rng.randint(0, 5), rng.randint(1, 3))
        depths.add((depth.n_free, depth.n_grad))
        method, frac = methods[step % len(methods)]
        stars = run_cfg(stars={"method": method, "sample_fraction": frac, "warmup_steps": 0}).stars
        forward_backward(model, batch, depth, stars, step=step, micro=0, seed=0, loss_scale=1.0)
        counts.append(unique_graphs())
    assert len(depths) >= 10
    # every graph (grad / no-grad, full batch / sampled rows) exists after the first few steps;
    # the remaining 40 steps at new depths compile nothing
    assert counts[10] == counts[-1], counts
    assert counts[-1] <= (8 if mode == "block" else 12), counts


def test_compiled_training_matches_eager_over_twenty_steps(tmp_path):
    """Inductor-compiled blocks (loop checkpointing, truncated BPTT, fd penalty on half the rows)
    give the eager run's losses to 1e-5 in fp32."""
    from stars_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    rows = {}
    for mode in ("none", "block"):
        t = Trainer(run_cfg(train={"compile": mode, "checkpointing": "loop"}), tmp_path / mode)
        rows[mode] = [t.train_step() for _ in range(20)]
    assert any(r["penalty"] is not None for r in rows["none"])
    for a, b in zip(rows["block"], rows["none"]):
        assert a["depth"] == b["depth"]
        for key in ("loss", "ce", "penalty"):
            if b[key] is None:
                assert a[key] is None
            else:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])


def test_probe_dropout_masks_are_replayed_without_touching_the_global_rng():
    cfg = run_cfg(model={"dropout": 0.3})
    torch.manual_seed(0)
    model = LoopedLM(cfg.model).train()
    e = torch.randn(4, 16, 32)
    h = torch.randn(4, 16, 32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fn = core_map(model, e, seed=7)
    a, b = fn(h), fn(h)
    assert torch.equal(a, b)  # the same masks on every evaluation, attention dropout included
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was neither read nor reseeded
    assert not torch.equal(core_map(model, e, seed=8)(h), a)  # another seed, other masks
    assert torch.equal(core_map(model, e, seed=7)(h), a)  # a function of the seed
    plain = model.core_step(h, e)
    assert not torch.equal(plain, a)  # dropout is on


def test_replay_refuses_a_different_call_pattern():
    masks = DropoutMasks(0)
    x = torch.ones(3, 4)
    with masks.replay():
        masks.mask(x.shape, 0.5, x)
    with masks.replay(), pytest.raises(RuntimeError, match="dropout replay: site 0 has shape"):
        masks.mask(torch.Size([2, 2]), 0.5, x)


def _tp_compiled_vs_eager(rank: int, world: int, out: str):
    import functools

    import stars_scale.train.trainer as trainer_mod
    from multirank import STEPS, make_cfg
    from stars_scale.train.trainer import Trainer

    trainer_mod.apply_compile = functools.partial(apply_compile, backend="aot_eager")
    rows = {}
    for mode in ("none", "block"):
        t = Trainer(make_cfg({"tp": 2, "microbatches": 2}, {"compile": mode}), f"{out}/{mode}")
        rows[mode] = [t.train_step() for _ in range(STEPS)]
    return rows, unique_graphs()


def test_tensor_parallel_compiled_blocks_match_eager(tmp_path):
    """megatron's column/row-parallel layers inside compiled blocks (tp 2, fd penalty, truncated
    BPTT): the same losses as the eager tp 2 run."""
    from multirank import spawn

    for rows, graphs in spawn(_tp_compiled_vs_eager, 2, str(tmp_path)):
        assert graphs > 0  # the blocks were compiled
        for a, b in zip(rows["block"], rows["none"]):
            for key in ("loss", "ce", "penalty", "rho"):
                if b[key] is None:
                    assert a[key] is None
                else:
                    assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])


def test_keep_mask_is_a_scaled_bernoulli_mask_with_mean_one():
    p = 0.1
    mask = keep_mask(torch.Size([1000, 1001]), p, generator=torch.Generator().manual_seed(0))
    scale = 2**16 / (2**16 - round(p * 2**16))  # 1 / P(keep): E[mask] = 1 exactly
    assert torch.equal(mask.unique(), torch.tensor([0.0, scale]))
    kept = (mask > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5  # within 5 sigma
    lanes = (mask.flatten()[:1000 * 1000] > 0).double().view(-1, 4).mean(0)  # the 4 int16 lanes of a draw
    assert ((lanes - (1 - p)).abs() < 5 * (p * (1 - p) / 250_000) ** 0.5).all(), lanes  # none biased
    again = keep_mask(torch.Size([1000, 1001]), p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)  # a function of the generator's state
    assert keep_mask(torch.Size([3]), 0.5).shape == (3,)  # sizes that are not a multiple of 4

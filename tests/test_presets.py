"""Every YAML in configs/ loads and validates; the billion-parameter presets have the documented
shape, the planner counts their parameters as the (meta-device) model does, and each preset's
own parallel layout fits the cluster it is written for."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stars_scale.config import load_config
from stars_scale.model.looped import LoopedLM
from stars_scale.plan import param_counts, plan

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))

# preset -> (nodes, gpus per node) named in its header, and its parameter count range
PRESETS = {
    "huginn_3p5b.yaml": ((4, 8), (3.4e9, 3.7e9)),
    "ouro_1p4b.yaml": ((1, 8), (1.35e9, 1.5e9)),
    "retrofit_tinyllama.yaml": ((1, 8), (0.4e9, 0.6e9)),
    "looped_1b_1gpu.yaml": ((1, 1), (0.85e9, 1.15e9)),
}


def test_presets_exist():
    assert set(PRESETS) <= {p.name for p in ALL}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_config_loads_and_builds_on_meta(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = LoopedLM(cfg.model)
    counts = model.param_groups_counts()
    assert param_counts(cfg.model).as_dict() == counts
    if path.name in PRESETS:
        lo, hi = PRESETS[path.name][1]
        assert lo <= counts["total"] <= hi, counts["total"]


def test_huginn_preset_shape():
    m = load_config(CONFIGS / "huginn_3p5b.yaml")
    assert (m.model.hidden, m.model.heads, m.model.mlp_hidden, m.model.vocab_size, m.model.max_seq_len) == \
        (5280, 55, 17920, 65536, 4096)
    assert (m.model.n_prelude, m.model.n_core, m.model.n_coda) == (2, 4, 2)
    assert (m.depth.dist, m.depth.mean, m.depth.backprop) == ("poisson-lognormal", 32.0, 8)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_layout_fits_its_cluster(name):
    run = load_config(CONFIGS / name)
    (nodes, gpn), _ = PRESETS[name]
    p = plan(run, nodes, gpn, "h100", draws=500)
    cl = p.config_layout()
    assert cl is not None and cl.valid and cl.fits, cl.reasons
    assert cl.tp * cl.pp * cl.dp == nodes * gpn

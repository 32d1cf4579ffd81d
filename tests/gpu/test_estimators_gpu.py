"""The STARS estimators under bf16 autocast on CUDA: within 5% of fp32 ρ̂, penalty-gradient cosine
>= 0.95 (the CPU version is tests/test_bf16_probe.py), with the kernels on (fd's probe kernel)."""
from __future__ import annotations

import math

import pytest
import torch

from stars_scale.config import config_from_dict
from stars_scale.model.looped import LoopedLM
from stars_scale.stars import estimate_spectral_radius, spectral_penalty

ARCH = {"vocab_size": 256, "hidden": 256, "heads": 4, "mlp": "swiglu", "norm": "rmsnorm", "positions": "rope",
        "max_seq_len": 128, "n_prelude": 1, "n_core": 4, "n_coda": 1, "injection": "concat-linear",
        "init_state": "random", "embed_scale": 16.0, "bias": False, "init_std": math.sqrt(2 / (5 * 256)),
        "kernels": "auto"}


@pytest.mark.parametrize("method", ["vjp", "jvp", "fd"])
def test_bf16_estimators_on_cuda(method):
    torch.manual_seed(0)
    model = LoopedLM(config_from_dict({"model": ARCH}).model).cuda().eval()
    ids = torch.randint(0, 256, (8, 128), device="cuda")
    with torch.no_grad():
        out = model(ids, n_free=8, n_grad=0, generator=torch.Generator(device="cuda").manual_seed(0))
    h, e = out.state.float(), out.embedded.float()
    fn = lambda x: model.core_step(x, e)  # noqa: E731
    ref = float(estimate_spectral_radius(fn, h, method, 20, generator=torch.Generator().manual_seed(0)))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = float(estimate_spectral_radius(fn, h, method, 20, generator=torch.Generator().manual_seed(0)))
    assert abs(got / ref - 1) < 0.05, (ref, got)
    params = list(model.core.parameters()) + list(model.adapter.parameters())

    def grad(bf16):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            est = spectral_penalty(fn, h, method, 1, generator=torch.Generator().manual_seed(1))
        return torch.cat([g.flatten() for g in torch.autograd.grad(est.penalty, params)])

    assert float(torch.nn.functional.cosine_similarity(grad(True), grad(False), dim=0)) >= 0.95

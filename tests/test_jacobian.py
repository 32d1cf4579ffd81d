"""STARS estimators against exact spectral radii in float64."""
import pytest
import torch

from stars_scale.config import ModelConfig, StarsConfig
from stars_scale.model import LoopedLM
from stars_scale.stars import estimate_spectral_radius, spectral_penalty
from stars_scale.stars.regularizer import core_map_penalty


def exact_rho(fn, h):
    n = h.numel()
    J = torch.autograd.functional.jacobian(fn, h).reshape(n, n)
    ev = torch.linalg.eigvals(J)
    return ev, ev.abs().max().item()


def tanh_map(seed, n=12, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = (A + A.T) / 2 * scale
    b = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    h = torch.randn(2, n, generator=g, dtype=torch.float64) * 0.5
    return (lambda x: torch.tanh(x @ W.T + b)), h


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["vjp", "jvp"])
def test_power_iteration_matches_exact_radius_tanh(seed, method):
    fn, h = tanh_map(seed)
    ev, rho = exact_rho(fn, h)
    # J = diag(1 - tanh^2) W with W symmetric is similar to a symmetric matrix: real spectrum
    assert ev.imag.abs().max() < 1e-9
    est = estimate_spectral_radius(fn, h, method, iters=400, generator=torch.Generator().manual_seed(seed))
    assert est.dtype == torch.float64
    assert abs(est.item() - rho) / rho < 0.01


def tiny_core(seed=3):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=15, hidden=16, heads=2, max_seq_len=8, mlp_hidden=32)
    model = LoopedLM(cfg).double().eval()
    ids = torch.randint(0, 15, (1, 4), generator=torch.Generator().manual_seed(seed))
    out = model(ids, n_free=0, n_grad=3)
    e = out.embedded.detach()
    return model, (lambda x: model.core_step(x, e)), out.state.detach()


@pytest.mark.parametrize("method", ["vjp", "jvp"])
def test_power_iteration_matches_exact_radius_core_block(method):
    model, fn, h = tiny_core()
    ev, rho = exact_rho(fn, h)
    top = ev[ev.abs().argsort(descending=True)]
    # precondition for power iteration: a real dominant eigenvalue
    assert abs(top[0].imag) < 1e-9
    est = estimate_spectral_radius(fn, h, method, iters=600, generator=torch.Generator().manual_seed(0))
    assert abs(est.item() - rho) / rho < 0.01


@pytest.mark.parametrize("normalize", ["tensor", "token"])
def test_fd_agrees_with_jvp(normalize):
    model, fn, h = tiny_core()
    for iters in (1, 5):
        kw = dict(normalize=normalize, generator=None)
        jvp = estimate_spectral_radius(fn, h, "jvp", iters, normalize=normalize,
                                       generator=torch.Generator().manual_seed(7))
        fd = estimate_spectral_radius(fn, h, "fd", iters, normalize=normalize,
                                      generator=torch.Generator().manual_seed(7))
        assert abs(fd.item() - jvp.item()) / jvp.item() < 1e-4, kw


def test_vjp_penalty_is_the_reference_formula():
    """One iteration: penalty = ||v^T J||^2 with v the normalised Gaussian direction."""
    fn, h = tanh_map(0)
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = v / v.norm()
    x = h.clone().requires_grad_(True)
    vj = torch.autograd.grad(fn(x), x, v)[0]
    est = spectral_penalty(fn, h, "vjp", 1, v0=v)
    assert torch.allclose(est.penalty, vj.pow(2).sum())
    assert torch.allclose(est.rho, vj.norm())


def test_vjp_graph_last_differentiates_only_the_last_iteration():
    """vjp_graph="last": penalty ||J^T u||^2 at the detached u = normalise((J^T)^(k-1) v0), so for
    f(x) = A x its gradient in A is exactly 2 u u^T A; "all" differentiates the iteration too."""
    g = torch.Generator().manual_seed(0)
    A0 = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = torch.randn(6, generator=g, dtype=torch.float64)
    v0 = torch.randn(6, generator=g, dtype=torch.float64)
    u = v0 / v0.norm()
    for _ in range(3):
        u = A0.T @ u
        u = u / u.norm()
    grads = {}
    for graph in ("all", "last"):
        A = A0.clone().requires_grad_(True)
        est = spectral_penalty(lambda x: A @ x, h, "vjp", 4, v0=v0, vjp_graph=graph)
        assert torch.allclose(est.penalty, (A0.T @ u).pow(2).sum())  # same value either way
        grads[graph], = torch.autograd.grad(est.penalty, A)
    assert torch.allclose(grads["last"], 2 * torch.outer(u, u) @ A0)
    assert not torch.allclose(grads["all"], grads["last"], rtol=1e-3)


def test_vjp_graph_last_converged_penalty_is_rho_squared_with_its_gradient():
    """Symmetric A, enough iterations: the penalty is the top eigenvalue squared and its gradient
    is that of lambda_max^2, 2 lambda u u^T (the eigenvalue's derivative), not a random direction's."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    A0 = Q @ torch.diag(torch.tensor([-2.5, 1.8, 1.2, -0.9, 0.5, 0.3, -0.2, 0.1], dtype=torch.float64)) @ Q.T
    lam, vecs = torch.linalg.eigh(A0)
    i = lam.abs().argmax()
    A = A0.clone().requires_grad_(True)
    est = spectral_penalty(lambda x: A @ x, torch.zeros(8, dtype=torch.float64), "vjp", 300,
                           generator=torch.Generator().manual_seed(2), vjp_graph="last")
    assert abs(est.penalty.item() - lam[i].item() ** 2) < 1e-8
    grad, = torch.autograd.grad(est.penalty, A)
    top = vecs[:, i]
    assert torch.allclose(grad, 2 * lam[i] * torch.outer(top, top), atol=1e-6)


def test_vjp_graph_is_validated():
    with pytest.raises(ValueError, match="vjp_graph"):
        spectral_penalty(lambda x: 2 * x, torch.ones(3), "vjp", 1, vjp_graph="first")


@pytest.mark.parametrize("method", ["vjp", "jvp", "fd"])
def test_penalty_gradient_reaches_core_and_nothing_upstream(method):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=15, hidden=16, heads=2, max_seq_len=8, mlp_hidden=32, n_prelude=1, n_coda=1,
                      injection="concat-linear", init_state="zero")
    model = LoopedLM(cfg).double()
    ids = torch.randint(0, 15, (3, 6))
    out = model(ids, n_free=1, n_grad=2)
    est = core_map_penalty(model, out.state, out.embedded, StarsConfig(lam=0.1, method=method, iters=2),
                           create_graph=True, generator=torch.Generator().manual_seed(0))
    est.penalty.backward()
    core_params = {id(p) for m in (*model.core, model.adapter) for p in m.parameters()}
    for name, p in model.named_parameters():
        has = p.grad is not None and p.grad.abs().sum() > 0
        if id(p) in core_params:
            # every matrix shapes the Jacobian (biases of the last norm do not: dJ/db = 0)
            assert has or p.ndim < 2, f"no penalty gradient on core parameter {name}"
        else:
            assert not has, f"penalty gradient leaked upstream/downstream into {name}"


def test_sample_fraction_uses_a_subset_of_sequences():
    model, _, _ = tiny_core()
    ids = torch.randint(0, 15, (8, 4))
    out = model(ids, 0, 2)
    full = core_map_penalty(model, out.state, out.embedded, StarsConfig(method="fd"), create_graph=False,
                            generator=torch.Generator().manual_seed(0))
    part = core_map_penalty(model, out.state, out.embedded, StarsConfig(method="fd", sample_fraction=0.25),
                            create_graph=False, generator=torch.Generator().manual_seed(0))
    assert full.v.shape[0] == 8 and part.v.shape[0] == 2

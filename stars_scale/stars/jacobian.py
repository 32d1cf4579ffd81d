"""Power-iteration estimates of the spectral radius of a map's Jacobian, ρ(∂f/∂h), at h.

Three estimators share one loop, `v ← normalise(A v)`, and report ‖A v‖ (with ‖v‖ = 1) after the
last iteration, which converges to |λ_max| as the iterations grow; with one iteration it is a
Hutchinson-style Frobenius proxy, as in the STARS paper:

- ``vjp``: A = Jᵀ by reverse mode, exactly the STARS reference (`train_addition/train.py`): h is
  detached, v ~ N(0, I) normalised over the whole tensor, every VJP taken with
  ``create_graph=True`` and v *not* detached between iterations, penalty ‖vᵀJ‖². Needs double
  backward, so attention runs on the math path (`math_attention`).
- ``jvp``: A = J by forward mode (`torch.func.jvp`) when no graph is needed; with a graph, the
  double-VJP form Jv = ∂/∂u ⟨Jᵀu, v⟩, which composes with autograd (and checkpointing).
- ``fd``: A v ≈ (f(h + εv) − f(h)) / ε. First-order gradients only, so it runs under
  FlashAttention and tensor parallelism; ε = sqrt(machine-eps of the compute dtype) · ‖h‖, i.e.
  a relative perturbation of about sqrt(eps) per element.

For ``jvp``/``fd`` with a graph, only the last iteration carries it (earlier ones only choose
the direction), which is the scalable first-order form. ``normalize="token"`` rescales every
token's vector of v to the same norm (‖v‖ = 1 still), so a few large tokens cannot dominate.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from stars_scale.model.attention import math_attention

METHODS = ("vjp", "jvp", "fd")

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SpectralEstimate:
    rho: torch.Tensor  # detached scalar: ‖A v‖ after the last iteration
    penalty: Optional[torch.Tensor]  # ‖A v‖², differentiable in f's parameters when create_graph
    v: torch.Tensor  # the last direction (detached)


def normalize_direction(v: torch.Tensor, mode: str = "tensor") -> torch.Tensor:
    """Unit-norm direction; `token` gives every token vector (last dim) the same norm."""
    if mode == "tensor":
        return v / (v.norm() + 1e-12)
    if mode == "token":
        n_tokens = v.numel() // v.shape[-1]
        return v / ((v.norm(dim=-1, keepdim=True) + 1e-12) * math.sqrt(n_tokens))
    raise ValueError(f"normalize must be 'tensor' or 'token', got {mode!r}")


def fd_epsilon(h: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """Finite-difference step for a unit direction: sqrt(machine eps) · ‖h‖."""
    dtype = dtype or h.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    scale = float(h.detach().float().norm())
    return math.sqrt(torch.finfo(dtype).eps) * (scale if scale > 0 else 1.0)


def _vjp(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, create_graph: bool, normalize: str):
    x = h.detach().requires_grad_(True)
    with math_attention():
        y = fn(x)
        vj = v
        for i in range(iters):
            last = i == iters - 1
            vj = torch.autograd.grad(y, x, grad_outputs=v, create_graph=create_graph,
                                     retain_graph=create_graph or not last)[0]
            v = normalize_direction(vj, normalize)
    return vj, v


def _jvp_no_graph(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, normalize: str):
    x = h.detach()
    jv = v
    with torch.no_grad(), math_attention():
        for _ in range(iters):
            _, jv = torch.func.jvp(fn, (x,), (v,))
            v = normalize_direction(jv, normalize)
    return jv, v


def _jvp_graph(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, normalize: str):
    if iters > 1:  # choose the direction without a graph, then one differentiable step
        _, v = _jvp_no_graph(fn, h, v, iters - 1, normalize)
    x = h.detach().requires_grad_(True)
    with math_attention():
        y = fn(x)
        u = torch.zeros_like(y, requires_grad=True)
        jtu = torch.autograd.grad(y, x, grad_outputs=u, create_graph=True)[0]
        jv = torch.autograd.grad(jtu, u, grad_outputs=v, create_graph=True)[0]
    return jv, normalize_direction(jv.detach(), normalize)


@contextlib.contextmanager
def fd_evaluation(grad: bool):
    """The context of one evaluation of the map for the `fd` estimator (wherever it runs: here, or
    spread over pipeline stages): with a graph only where the estimate needs one."""
    with torch.set_grad_enabled(grad):
        yield


class FiniteDifference:
    """The `fd` power iteration as a sequence of evaluations of the map, so that whoever evaluates
    it (`_fd` here, a pipeline schedule across stages) runs this one implementation:

        while (x := it.point()) is not None:
            with fd_evaluation(it.grad):
                it.take(fn(x))
        estimate = it.result()

    The evaluations are f(h), then f(h + εv) per iteration; with a graph only f(h) and the last one.
    """

    def __init__(self, h: torch.Tensor, v: torch.Tensor, iters: int, create_graph: bool, normalize: str,
                 eps: float | None):
        self.x = h.detach()
        self.eps = eps if eps is not None else fd_epsilon(self.x)
        self.v, self.jv = v, v
        self.y0: torch.Tensor | None = None
        self.create_graph, self.normalize = create_graph, normalize
        self.evaluations = iters + 1
        self.done = 0

    @staticmethod
    def grad_at(i: int, evaluations: int, create_graph: bool) -> bool:
        """Whether evaluation i (of `evaluations`) carries a graph: f(h) and the last one."""
        return create_graph and i in (0, evaluations - 1)

    @property
    def grad(self) -> bool:
        """Whether the next evaluation carries a graph."""
        return self.grad_at(self.done, self.evaluations, self.create_graph)

    def point(self) -> torch.Tensor | None:
        """Where the map is evaluated next (None when the iteration is complete)."""
        if self.done == self.evaluations:
            return None
        return self.x if self.done == 0 else self.x + self.eps * self.v

    def take(self, y: torch.Tensor) -> None:
        """The map's value at `point()`."""
        first, last = self.done == 0, self.done == self.evaluations - 1
        self.done += 1
        if first:
            self.y0 = y
        elif last and self.create_graph:
            self.jv = (y - self.y0) / self.eps
            self.v = normalize_direction(self.jv.detach(), self.normalize)
        else:
            with torch.no_grad():
                self.jv = (y - self.y0.detach()) / self.eps
                self.v = normalize_direction(self.jv, self.normalize)

    def result(self) -> SpectralEstimate:
        return estimate_from(self.jv, self.v, self.create_graph)


def _fd(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, create_graph: bool, normalize: str,
        eps: float | None):
    it = FiniteDifference(h, v, iters, create_graph, normalize, eps)
    while (x := it.point()) is not None:
        with fd_evaluation(it.grad):
            it.take(fn(x))
    return it.jv, it.v


def estimate_from(av: torch.Tensor, v: torch.Tensor, create_graph: bool) -> SpectralEstimate:
    """ρ̂ = ‖A v‖ and the penalty ‖A v‖² (accumulated in fp32 at least) from the last iteration."""
    acc = av.dtype if av.dtype in (torch.float32, torch.float64) else torch.float32
    sq = av.pow(2).sum(dtype=acc)
    return SpectralEstimate(rho=sq.detach().sqrt(), penalty=sq if create_graph else sq.detach(), v=v.detach())


def random_direction(h: torch.Tensor, generator: torch.Generator | None, mode: str) -> torch.Tensor:
    """The power iteration's start: v ~ N(0, I) (drawn in fp32 on the generator's device), normalised."""
    v = torch.randn(h.shape, generator=generator, dtype=torch.float32, device=h.device if generator is None
                    else generator.device).to(device=h.device, dtype=h.dtype)
    return normalize_direction(v, mode)


def spectral_penalty(fn: Fn, h: torch.Tensor, method: str = "vjp", iters: int = 1, *,
                     normalize: str = "tensor", eps: float | None = None, create_graph: bool = True,
                     generator: torch.Generator | None = None,
                     v0: torch.Tensor | None = None) -> SpectralEstimate:
    """Power iteration on ∂fn/∂h at h; `penalty` = ‖A v‖² (with a graph when create_graph)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    v = normalize_direction(v0, normalize) if v0 is not None else random_direction(h, generator, normalize)
    if method == "vjp":
        av, v = _vjp(fn, h, v, iters, create_graph, normalize)
    elif method == "jvp":
        av, v = (_jvp_graph if create_graph else _jvp_no_graph)(fn, h, v, iters, normalize)
    else:
        av, v = _fd(fn, h, v, iters, create_graph, normalize, eps)
    return estimate_from(av, v, create_graph)


def estimate_spectral_radius(fn: Fn, h: torch.Tensor, method: str = "vjp", iters: int = 20, *,
                             normalize: str = "tensor", eps: float | None = None,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """ρ̂(∂fn/∂h) at h: a detached scalar tensor (no graph is built)."""
    return spectral_penalty(fn, h, method, iters, normalize=normalize, eps=eps, create_graph=False,
                            generator=generator).rho


def row_subset(fraction: float, generator: torch.Generator | None, rows: int) -> torch.Tensor | None:
    """A random subset of `rows` batch rows (sequences), ceil(fraction · rows) of them; None at 1.0."""
    if fraction >= 1.0:
        return None
    return torch.randperm(rows, generator=generator)[:max(1, math.ceil(fraction * rows))]


def sample_rows(fraction: float, generator: torch.Generator | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same random subset of batch rows (sequences) from each tensor; all rows at 1.0."""
    idx = row_subset(fraction, generator, tensors[0].shape[0])
    if idx is None:
        return tensors
    idx = idx.to(tensors[0].device)
    return tuple(t.index_select(0, idx) for t in tensors)

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
the direction), which is the scalable first-order form. ``vjp`` does the same with
``vjp_graph="last"``: the penalty is then ‖Jᵀv‖² at the iterated, detached v, i.e. ≈ ρ² once v
has converged, and its gradient is that of the top eigenvalue; with ``"all"`` (the reference) the
gradient also runs through the iteration that chose v, which a model can learn to exploit
(docs/arith_results.md, "Depth collapse"). ``normalize="token"`` rescales every
token's vector of v to the same norm (‖v‖ = 1 still), so a few large tokens cannot dominate.

Precision. Under a bf16/fp16 autocast a difference quotient loses most of its digits (ε must be
about sqrt(eps_bf16) ≈ 9% of ‖h‖, and both evaluations round to 8 bits). With
``precision="fp32"`` (the default) the estimator's evaluations of fn run with autocast off,
on an fp32 copy of h, with full-precision fp32 matmuls (no TF32), and ε is chosen for fp32; the
weights under autocast are fp32 already, so this is the fp32 estimate at the same state.
``precision="autocast"`` keeps the step's dtype (cheaper, inaccurate for ``fd``).

Kernels. The vjp/jvp estimators run under `math_attention()` and `kernels.reference_ops()`: second
derivatives and forward-mode AD go through differentiable PyTorch, never a fused op's backward.
``fd`` is first order and reduces its difference quotient with the fused probe kernel when
``kernels`` allows it (`stars_scale.kernels.fused`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from stars_scale import kernels as K
from stars_scale.kernels import reference as kernel_ref
from stars_scale.model.attention import math_attention

METHODS = ("vjp", "jvp", "fd")
PRECISIONS = ("fp32", "autocast")
VJP_GRAPHS = ("all", "last")

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
    """Finite-difference step for a unit direction: sqrt(machine eps) · ‖h‖, for `dtype`, else the
    active autocast's dtype, else h's."""
    if dtype is None:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    scale = float(h.detach().float().norm())
    return math.sqrt(torch.finfo(dtype).eps) * (scale if scale > 0 else 1.0)


def low_precision_autocast(device_type: str) -> bool:
    """Whether an autocast to bf16/fp16 is active on this device type."""
    return (torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) in (torch.bfloat16, torch.float16))


@contextlib.contextmanager
def full_fp32(device_type: str) -> Iterator[None]:
    """Autocast off and IEEE fp32 matmuls (TF32's 10-bit mantissa would swamp an fp32-sized ε)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(saved)


def probe_in_fp32(precision: str, device_type: str) -> bool:
    """`precision="fp32"` under a bf16/fp16 autocast: the probe's evaluations run in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "fp32" and low_precision_autocast(device_type)

def _vjp(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, create_graph: bool, normalize: str,
         graph: str = "all"):
    x = h.detach().requires_grad_(True)
    with math_attention(), K.reference_ops():
        y = fn(x)
        vj = v
        for i in range(iters):
            last = i == iters - 1
            carry = create_graph and (last or graph == "all")  # "last": earlier VJPs only choose v
            vj = torch.autograd.grad(y, x, grad_outputs=v, create_graph=carry,
                                     retain_graph=create_graph or not last)[0]
            v = normalize_direction(vj, normalize)
    return vj, v


def _jvp_no_graph(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, normalize: str):
    x = h.detach()
    jv = v
    with torch.no_grad(), math_attention(), K.reference_ops():
        for _ in range(iters):
            _, jv = torch.func.jvp(fn, (x,), (v,))
            v = normalize_direction(jv, normalize)
    return jv, v


def _jvp_graph(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, normalize: str):
    if iters > 1:  # choose the direction without a graph, then one differentiable step
        _, v = _jvp_no_graph(fn, h, v, iters - 1, normalize)
    x = h.detach().requires_grad_(True)
    with math_attention(), K.reference_ops():
        y = fn(x)
        u = torch.zeros_like(y, requires_grad=True)
        jtu = torch.autograd.grad(y, x, grad_outputs=u, create_graph=True)[0]
        jv = torch.autograd.grad(jtu, u, grad_outputs=v, create_graph=True)[0]
    return jv, normalize_direction(jv.detach(), normalize)


@contextlib.contextmanager
def fd_evaluation(grad: bool, precision: str):
    """The context of one evaluation of the map for the `fd` estimator (wherever it runs: here, or
    spread over pipeline stages): with a graph only where the estimate needs one, and in fp32
    under a bf16/fp16 autocast unless precision="autocast"."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.set_grad_enabled(grad))
        for device in ("cpu", "cuda"):
            if probe_in_fp32(precision, device):
                stack.enter_context(full_fp32(device))
        yield


class FiniteDifference:
    """The `fd` power iteration as a sequence of evaluations of the map, so that whoever evaluates
    it (`_fd` here, a pipeline schedule across stages) runs this one implementation:

        while (x := it.point()) is not None:
            with fd_evaluation(it.grad, it.precision):
                it.take(fn(x))
        estimate = it.result()

    The evaluations are f(h), then f(h + εv) per iteration; with a graph only f(h) and the last one.
    """

    def __init__(self, h: torch.Tensor, v: torch.Tensor, iters: int, create_graph: bool, normalize: str,
                 eps: float | None, *, precision: str, kernels: str):
        self.precision, self.kernels = precision, kernels
        fp32 = probe_in_fp32(precision, h.device.type)  # then ε, x and v are fp32 too
        self.x = h.detach().float() if fp32 else h.detach()
        self.eps = eps if eps is not None else fd_epsilon(self.x, torch.float32 if fp32 else None)
        self.v = v.float() if fp32 else v
        self.sq: torch.Tensor | None = None
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
            self.v, self.sq = self._reduce(y, self.y0)
        else:
            with torch.no_grad():
                self.v, self.sq = self._reduce(y, self.y0.detach())

    def _reduce(self, y1: torch.Tensor, y0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(h+εv) − f(h))/ε -> (its normalised direction, its squared norm in fp32): one fused
        kernel when `kernels` allows it, else the same function in PyTorch."""
        if K.fused(self.kernels, y1):
            return K.probe_reduce(y1, y0, self.eps, self.normalize)
        return kernel_ref.probe_reduce(y1, y0.to(y1.dtype), self.eps, self.normalize == "token")

    def result(self) -> SpectralEstimate:
        sq = self.sq
        return SpectralEstimate(rho=sq.detach().sqrt(), penalty=sq if self.create_graph else sq.detach(),
                                v=self.v.detach())


def _fd(fn: Fn, h: torch.Tensor, v: torch.Tensor, iters: int, create_graph: bool, normalize: str,
        eps: float | None, precision: str, kernels: str) -> SpectralEstimate:
    it = FiniteDifference(h, v, iters, create_graph, normalize, eps, precision=precision, kernels=kernels)
    while (x := it.point()) is not None:
        with fd_evaluation(it.grad, precision):
            it.take(fn(x))
    return it.result()


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
                     v0: torch.Tensor | None = None, precision: str = "fp32",
                     kernels: str = "auto", vjp_graph: str = "all") -> SpectralEstimate:
    """Power iteration on ∂fn/∂h at h; `penalty` = ‖A v‖² (with a graph when create_graph).
    `precision`: fp32 | autocast (see the module docstring); `kernels`: model.kernels' modes;
    `vjp_graph`: all | last (see the module docstring; jvp and fd always carry the last only)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if vjp_graph not in VJP_GRAPHS:
        raise ValueError(f"vjp_graph must be one of {VJP_GRAPHS}, got {vjp_graph!r}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    fp32 = probe_in_fp32(precision, h.device.type)
    with full_fp32(h.device.type) if fp32 else contextlib.nullcontext():
        if fp32:
            h = h.float()
            v0 = None if v0 is None else v0.float()
        v = normalize_direction(v0, normalize) if v0 is not None else random_direction(h, generator, normalize)
        if method == "fd":
            return _fd(fn, h, v, iters, create_graph, normalize, eps, precision, kernels)
        if method == "vjp":
            av, v = _vjp(fn, h, v, iters, create_graph, normalize, vjp_graph)
        else:
            av, v = (_jvp_graph if create_graph else _jvp_no_graph)(fn, h, v, iters, normalize)
        return estimate_from(av, v, create_graph)


def estimate_spectral_radius(fn: Fn, h: torch.Tensor, method: str = "vjp", iters: int = 20, *,
                             normalize: str = "tensor", eps: float | None = None,
                             generator: torch.Generator | None = None, precision: str = "fp32",
                             kernels: str = "auto") -> torch.Tensor:
    """ρ̂(∂fn/∂h) at h: a detached scalar tensor (no graph is built)."""
    return spectral_penalty(fn, h, method, iters, normalize=normalize, eps=eps, create_graph=False,
                            generator=generator, precision=precision, kernels=kernels).rho


def row_subset(fraction: float, generator: torch.Generator | None, rows: int) -> torch.Tensor | None:
    """A random subset of `rows` batch rows (sequences), ceil(fraction · rows) of them; None at 1.0."""
    if fraction >= 1.0:
        return None
    return torch.randperm(rows, generator=generator)[:max(1, math.ceil(fraction * rows))]


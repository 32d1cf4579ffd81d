"""PyTorch references of the fused kernels in `csrc/`: the same functions, op for op.

Each function computes in fp32 and returns the input's dtype, as the CUDA kernels do. They are
what the `stars_scale::*` custom ops run on CPU and wherever the extension is not built, and the
GPU tests compare the kernels against them. Rows are the flattened leading dimensions.
"""
from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (so gradcheck can check the math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


# ------------------------------------------------------------------ residual add + norm

def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """norm(x + residual) with fp32 statistics -> (out, mean [rows] fp32, rstd [rows] fp32).
    RMSNorm when `rms` (mean is returned as zeros), else LayerNorm."""
    z = _f(x if residual is None else x + residual)
    if rms:
        mean = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        var = z.pow(2).mean(-1)
    else:
        mean = z.mean(-1)
        var = (z - mean.unsqueeze(-1)).pow(2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    out = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * _f(weight)
    if bias is not None:
        out = out + _f(bias)
    return out.to(x.dtype), mean, rstd


def add_norm_backward(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                      mean: torch.Tensor, rstd: torch.Tensor, rms: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d(x + residual), d weight, d bias); the same gradient reaches x and residual."""
    z = _f(x if residual is None else x + residual)
    xhat = (z - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dy = _f(grad)
    g = dy * _f(weight)
    dz = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not rms:
        dz = dz - g.mean(-1, keepdim=True)
    dz = dz * rstd.unsqueeze(-1)
    rows = tuple(range(dy.dim() - 1))
    return dz.to(x.dtype), (dy * xhat).sum(rows).to(weight.dtype), dy.sum(rows).to(weight.dtype)


# ------------------------------------------------------------------ gated MLP activations

def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on the fused projection's output, last dim cat(gate, up) (gate first)."""
    g, u = _f(gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)


def swiglu_backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    g, u = _f(gate_up).chunk(2, dim=-1)
    dy = _f(grad)
    sig = torch.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1 + g * (1 - sig))
    return torch.cat([dg, dy * silu], dim=-1).to(gate_up.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU, as `F.gelu` by default."""
    xf = _f(x)
    return (0.5 * xf * (1 + torch.erf(xf / math.sqrt(2)))).to(x.dtype)


def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    xf = _f(x)
    cdf = 0.5 * (1 + torch.erf(xf / math.sqrt(2)))
    pdf = torch.exp(-0.5 * xf * xf) / math.sqrt(2 * math.pi)
    return (_f(grad) * (cdf + xf * pdf)).to(x.dtype)


# ------------------------------------------------------------------ rotary positions

def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., T, D]: pairs (i, i + D/2) rotate by angle t·θ_i; cos/sin [≥T, D/2]
    fp32. The backward is the same op with -sin."""
    T, half = x.shape[-2], x.shape[-1] // 2
    c, s = cos[:T].to(acc_dtype(x.dtype)), sin[:T].to(acc_dtype(x.dtype))
    x1, x2 = _f(x)[..., :half], _f(x)[..., half:]
    out = torch.empty_like(x)  # x's strides, as the kernel writes (q/k are transposed views)
    return out.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))


# ------------------------------------------------------------------ cross-entropy (vocab-parallel)

def xent_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of logits [N, V_local] (this rank's vocab slice starts at `vocab_start`):
    (max, Σ exp(l − max), the label's logit or 0 when another rank holds it), all fp32 [N]."""
    lf = _f(logits)
    mx = lf.max(-1).values
    sumexp = torch.exp(lf - mx.unsqueeze(-1)).sum(-1)
    local = labels - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = lf.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return mx, sumexp, torch.where(inside, picked, torch.zeros_like(picked))


def xent_grad(logits: torch.Tensor, labels: torch.Tensor, mx: torch.Tensor, sumexp: torch.Tensor,
              vocab_start: int, ignore_index: int, scale: torch.Tensor | float) -> torch.Tensor:
    """d loss / d logits = scale · (softmax − onehot) for rows whose label is not ignored, else 0
    (mx and sumexp are the global, all-reduced statistics)."""
    p = torch.exp(_f(logits) - mx.unsqueeze(-1)) / sumexp.unsqueeze(-1)
    local = labels - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    onehot = torch.zeros_like(p).scatter_(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1),
                                          inside.unsqueeze(-1).to(p.dtype))
    valid = (labels != ignore_index).unsqueeze(-1)
    return torch.where(valid, (p - onehot) * scale, torch.zeros_like(p)).to(logits.dtype)


# ------------------------------------------------------------------ STARS probe reduction

def probe_reduce(y1: torch.Tensor, y0: torch.Tensor, eps: float, token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d = (y1 − y0)/ε in fp32 -> (d normalised over the whole tensor, or every token to the same
    norm with ‖·‖ = 1 overall, in y1's dtype; ‖d‖² as an fp32 (fp64 for fp64) scalar)."""
    d = (_f(y1) - _f(y0)) / eps
    row_sq = d.pow(2).sum(-1, keepdim=True)
    sq = row_sq.sum()
    if token:
        n_rows = d.numel() // d.shape[-1]
        v = d / ((row_sq.sqrt() + 1e-12) * math.sqrt(n_rows))
    else:
        v = d / (sq.sqrt() + 1e-12)
    return v.to(y1.dtype), sq


def probe_reduce_backward(grad_sq: torch.Tensor, y1: torch.Tensor, y0: torch.Tensor, eps: float) -> torch.Tensor:
    """d‖d‖²/d y1 = 2 d / ε (and the negative for y0)."""
    d = (_f(y1) - _f(y0)) / eps
    return (_f(grad_sq) * 2.0 / eps * d).to(y1.dtype)

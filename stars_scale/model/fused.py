"""The fused projection layouts of a block, and their conversion from separate q/k/v, gate/up.

`qkv_proj` is Megatron's head-grouped layout: its output rows are KV groups, each holding the
group's query heads, then its key head, then its value head,

    [q_0 .. q_{g-1}, k_0, v_0 | q_g .. q_{2g-1}, k_1, v_1 | ...]      g = heads / kv_heads,

so splitting the rows into tp contiguous pieces gives every rank whole heads *and* whole KV
groups (tensor parallelism needs tp | kv_heads). With a q/k bias but none on v (Huginn,
`qkv_bias: qk`) the bias is a separate `qk_bias` [kv_heads, g + 1, head_dim] in the same
grouping. `gate_up_proj`'s output is `cat(gate, up)` along the last dim; tensor parallelism
slices gate and up alike, so every rank's output is again `cat(gate_local, up_local)`.

Checkpoints written before the fusion (separate q/k/v_proj, gate/up_proj) are converted when
they are loaded (`upgrade_attention_keys`, `upgrade_mlp_keys`, registered as load hooks on the
modules). The functions work on any slice of whole groups, so they also fuse tensor-parallel
shards written with the old layout. The g and head_dim they take are the same on every rank.
"""
from __future__ import annotations

import torch

from stars_scale.errors import UserError


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int, head_dim: int) -> torch.Tensor:
    """Separate q [H·hd, ...], k/v [KV·hd, ...] (weights or biases) -> the head-grouped fused rows."""
    tail = q.shape[1:]
    n_kv = k.shape[0] // head_dim
    groups = [q.reshape(n_kv, g * head_dim, *tail), k.reshape(n_kv, head_dim, *tail),
              v.reshape(n_kv, head_dim, *tail)]
    return torch.cat(groups, dim=1).reshape(n_kv * (g + 2) * head_dim, *tail)


def split_qkv(w: torch.Tensor, g: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv`: (q, k, v) rows, contiguous."""
    tail = w.shape[1:]
    grouped = w.reshape(-1, (g + 2) * head_dim, *tail)
    n_kv = grouped.shape[0]
    q, k, v = grouped.split([g * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(n_kv * g * head_dim, *tail).contiguous(), k.reshape(n_kv * head_dim, *tail).contiguous(),
            v.reshape(n_kv * head_dim, *tail).contiguous())


def fuse_qk_bias(q_bias: torch.Tensor, k_bias: torch.Tensor, g: int, head_dim: int) -> torch.Tensor:
    """q bias [H·hd] and k bias [KV·hd] -> `qk_bias` [KV, g + 1, hd]."""
    n_kv = k_bias.shape[0] // head_dim
    return torch.cat([q_bias.reshape(n_kv, g, head_dim), k_bias.reshape(n_kv, 1, head_dim)], dim=1)


def split_qk_bias(qk_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`qk_bias` [KV, g + 1, hd] -> (q bias [H·hd], k bias [KV·hd])."""
    return qk_bias[:, :-1].reshape(-1).contiguous(), qk_bias[:, -1].reshape(-1).contiguous()


def _suffixes(sd: dict, prefix: str, name: str) -> dict[str, torch.Tensor]:
    """{'weight': t, 'inner.weight': t, ...} of `prefix + name + '.'`."""
    head = f"{prefix}{name}."
    return {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}


def _pop(sd: dict, prefix: str, names: tuple[str, ...], suffixes) -> None:
    for name in names:
        for suffix in suffixes:
            sd.pop(f"{prefix}{name}.{suffix}")


def upgrade_attention_keys(sd: dict, prefix: str, g: int, head_dim: int, v_has_bias: bool) -> None:
    """Old-layout q/k/v_proj tensors under `prefix` -> qkv_proj (and qk_bias), in place.
    Incomplete or inconsistent sets stay as they are (the loader then names them)."""
    q, k, v = (_suffixes(sd, prefix, n) for n in ("q_proj", "k_proj", "v_proj"))
    want_v = {s for s in q if v_has_bias or not s.endswith("bias")}
    ok = q and set(k) == set(q) and set(v) == want_v and all(
        k[s].shape[0] % head_dim == 0 and q[s].shape[0] == g * k[s].shape[0]
        and q[s].shape[1:] == k[s].shape[1:] and (s not in v or v[s].shape == k[s].shape) for s in q)
    if not ok:
        return
    _pop(sd, prefix, ("q_proj", "k_proj"), q)
    _pop(sd, prefix, ("v_proj",), v)
    for suffix, qt in q.items():
        if suffix not in v:
            sd[f"{prefix}qk_bias"] = fuse_qk_bias(qt, k[suffix], g, head_dim)
        else:
            sd[f"{prefix}qkv_proj.{suffix}"] = fuse_qkv(qt, k[suffix], v[suffix], g, head_dim)


def upgrade_mlp_keys(sd: dict, prefix: str) -> None:
    """Old-layout gate_proj/up_proj tensors under `prefix` -> gate_up_proj = cat(gate, up), in place."""
    gate, up = _suffixes(sd, prefix, "gate_proj"), _suffixes(sd, prefix, "up_proj")
    if not gate or set(gate) != set(up) or any(gate[s].shape != up[s].shape for s in gate):
        return
    _pop(sd, prefix, ("gate_proj", "up_proj"), gate)
    for suffix, gt in gate.items():
        sd[f"{prefix}gate_up_proj.{suffix}"] = torch.cat([gt, up[suffix]], dim=0)


def _block_prefixes(sd: dict, leaf: str) -> list[str]:
    return sorted({k[: -len(leaf)] for k in sd if k.endswith(leaf)})


def qkv_bias_flags(cfg) -> tuple[bool, bool]:
    """(q and k have a bias, v has a bias): `qkv_bias` when set, else `bias` for all three."""
    if cfg.qkv_bias is None:
        return cfg.bias, cfg.bias
    return cfg.qkv_bias in ("qk", "qkv"), cfg.qkv_bias == "qkv"


def _grouping(cfg) -> tuple[int, int, bool]:
    """(g, head_dim, v has a bias) of a ModelConfig."""
    n_kv = cfg.kv_heads or cfg.heads
    return cfg.heads // n_kv, cfg.hidden // cfg.heads, qkv_bias_flags(cfg)[1]


def fuse_state_dict(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A full model's state dict with separate q/k/v, gate/up (an older checkpoint, or a
    converter's per-projection names) -> the fused layout. A fused dict comes back as it was."""
    out = dict(sd)
    g, hd, v_bias = _grouping(cfg)
    for prefix in _block_prefixes(out, "attn.q_proj.weight"):
        upgrade_attention_keys(out, prefix + "attn.", g, hd, v_bias)
    for prefix in _block_prefixes(out, "mlp.gate_proj.weight"):
        upgrade_mlp_keys(out, prefix + "mlp.")
    return out


def unfuse_state_dict(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The inverse of `fuse_state_dict`: separate q/k/v_proj and gate/up_proj (for exporters)."""
    out = dict(sd)
    g, hd, _ = _grouping(cfg)
    for prefix in _block_prefixes(out, "attn.qkv_proj.weight"):
        for suffix in ("weight", "bias"):
            fused = out.pop(f"{prefix}attn.qkv_proj.{suffix}", None)
            if fused is not None:
                for name, t in zip(("q_proj", "k_proj", "v_proj"), split_qkv(fused, g, hd)):
                    out[f"{prefix}attn.{name}.{suffix}"] = t
        qk = out.pop(f"{prefix}attn.qk_bias", None)
        if qk is not None:
            out[f"{prefix}attn.q_proj.bias"], out[f"{prefix}attn.k_proj.bias"] = split_qk_bias(qk)
    for prefix in _block_prefixes(out, "mlp.gate_up_proj.weight"):
        for suffix in ("weight", "bias"):
            fused = out.pop(f"{prefix}mlp.gate_up_proj.{suffix}", None)
            if fused is not None:
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}mlp.gate_proj.{suffix}"] = gate.contiguous()
                out[f"{prefix}mlp.up_proj.{suffix}"] = up.contiguous()
    return out


def refuse_unfused_resume(sd: dict, where) -> None:
    """Resuming needs the optimizer state of the fused parameters: an older checkpoint cannot
    give it (its weights still load: `init.from`, stars-eval, stars-convert)."""
    if any(".attn.q_proj." in k or ".mlp.gate_proj." in k for k in sd):
        raise UserError(f"{where}: written with separate q/k/v and gate/up projections (before the fused "
                        f"layout); its optimizer state cannot be resumed. Start a new run from its "
                        f"weights with init.from: {where}")

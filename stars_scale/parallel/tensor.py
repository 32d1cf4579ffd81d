"""Tensor parallelism applied to the plain LoopedLM (torchtitan's `parallelize` style).

    qkv_proj                   -> ColumnParallelLinear   (head-grouped rows: whole KV groups)
    qk_bias (Huginn)           -> split like qkv_proj    (dim 0: KV groups)
    gate_up_proj               -> ColumnParallelLinear   (stride 2: every rank holds cat(gate, up))
    up_proj (GELU)             -> ColumnParallelLinear
    o_proj, down_proj          -> RowParallelLinear      (input features split, all-reduce)
    adapter Linear(2h -> h)    -> RowParallelLinear      (input_is_parallel=False: scatter cat(s, e))
    embed                      -> VocabParallelEmbedding (vocab rows split)
    lm_head                    -> VocabParallelHead      (column-parallel logits, tied or not)
    loss                       -> vocab_parallel_cross_entropy

megatron-core layers run on CPU/gloo with `use_cpu_initialization=True` and no sequence parallel.
Weights are not initialised by megatron: the full single-device model is built from the seed
first and its weights are sliced into the parallel layers (`shard_parameter`), so every layout
starts from the same full weights. A vocabulary that tp does not divide is padded; the padded
logits are masked to -inf-like values and the padded embedding rows stay zero.

Every parameter megatron splits carries `tensor_model_parallel=True` and `partition_dim`; the
head's own weight gets the same attributes. `full_state_dict` inverts the sharding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from stars_scale import kernels
from stars_scale.loss import IGNORE, token_ce
from stars_scale.parallel.layout import padded_vocab

_NEG = -1e30  # padded logits: exp() underflows to exactly 0


def _mp_config(tp: int, dtype: torch.dtype):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, sequence_parallel=False,
                               gradient_accumulation_fusion=False, params_dtype=dtype)


def mark_split(param: torch.Tensor | None, dim: int | None, stride: int = 1) -> None:
    """megatron's tensor-parallel attributes (megatron sets them only when it initialises).

    `stride` s: the split dim is s equal parts, each split over the ranks (megatron's
    partition_stride), so rank r holds [part_0 slice r, part_1 slice r, ...]."""
    if param is None:
        return
    param.tensor_model_parallel = dim is not None
    param.partition_dim = -1 if dim is None else dim
    param.partition_stride = stride


def _strided(full: torch.Tensor, dim: int, stride: int, tp: int) -> torch.Tensor:
    """Reorder `full` so a contiguous split over tp ranks gives each its strided shard."""
    if stride == 1:
        return full
    n = full.shape[dim] // (stride * tp)
    chunks = full.split(n, dim=dim)  # stride * tp chunks: part p, rank r at p * tp + r
    return torch.cat([chunks[p * tp + r] for r in range(tp) for p in range(stride)], dim=dim)


def gather_shards(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every rank's shard (inverse of `shard_parameter`)."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


def shard_parameter(local: torch.Tensor, full: torch.Tensor, tp_rank: int) -> None:
    """Copy this rank's slice of `full` into `local` (along `local.partition_dim`; zero padding)."""
    with torch.no_grad():
        if not getattr(local, "tensor_model_parallel", False):
            local.copy_(full)
            return
        dim = local.partition_dim
        n = local.shape[dim]
        stride = getattr(local, "partition_stride", 1)
        if stride > 1:
            full = _strided(full, dim, stride, full.shape[dim] // n)
        lo = tp_rank * n
        piece = full.narrow(dim, lo, max(0, min(n, full.shape[dim] - lo)))
        local.zero_()
        local.narrow(dim, 0, piece.shape[dim]).copy_(piece)


def _shard_linear(inner: nn.Module, linear: nn.Linear, tp_rank: int) -> None:
    shard_parameter(inner.weight, linear.weight, tp_rank)
    if linear.bias is not None:
        shard_parameter(inner.bias, linear.bias, tp_rank)


class ColumnParallel(nn.Module):
    """megatron-core ColumnParallelLinear returning a tensor, as nn.Linear does."""

    def __init__(self, linear: nn.Linear, config, tp_rank: int, stride: int = 1):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.inner = ColumnParallelLinear(linear.in_features, linear.out_features, config=config,
                                          init_method=nn.init.zeros_, bias=linear.bias is not None,
                                          gather_output=False, skip_bias_add=False)
        mark_split(self.inner.weight, 0, stride)
        mark_split(self.inner.bias, 0, stride)
        _shard_linear(self.inner, linear, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


class _ScatterLastDim(torch.autograd.Function):
    """This rank's slice of the last dim; backward all-gathers the gradient. (megatron-core's
    `scatter_to_tensor_model_parallel_region` allocates its backward buffer with torch.cuda.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, tp: int, tp_rank: int) -> torch.Tensor:
        ctx.group, ctx.tp = group, tp
        n = x.shape[-1] // tp
        return x[..., tp_rank * n:(tp_rank + 1) * n].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        parts = [torch.empty_like(grad) for _ in range(ctx.tp)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=-1), None, None, None


class RowParallel(nn.Module):
    """megatron-core RowParallelLinear returning a tensor (bias added after the all-reduce).

    `input_is_parallel=False`: the full input is sliced here first (the injection adapter)."""

    def __init__(self, linear: nn.Linear, config, tp_rank: int, input_is_parallel: bool = True):
        super().__init__()
        from megatron.core import parallel_state as mps
        from megatron.core.tensor_parallel import RowParallelLinear

        self.scatter = None if input_is_parallel else (mps.get_tensor_model_parallel_group(),
                                                       config.tensor_model_parallel_size, tp_rank)
        self.inner = RowParallelLinear(linear.in_features, linear.out_features, config=config,
                                       init_method=nn.init.zeros_, bias=linear.bias is not None,
                                       input_is_parallel=True, skip_bias_add=False)
        mark_split(self.inner.weight, 1)
        mark_split(self.inner.bias, None)
        _shard_linear(self.inner, linear, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scatter is not None:
            x = _ScatterLastDim.apply(x, *self.scatter)
        return self.inner(x)[0]


class VocabParallelEmbedding(nn.Module):
    def __init__(self, emb: nn.Embedding, config, tp: int, tp_rank: int):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding as VPE

        self.num_embeddings = emb.num_embeddings
        self.inner = VPE(padded_vocab(emb.num_embeddings, tp), emb.embedding_dim, init_method=nn.init.zeros_,
                         config=config)
        mark_split(self.inner.weight, 0)
        shard_parameter(self.inner.weight, emb.weight, tp_rank)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)


class VocabParallelHead(nn.Module):
    """Logits over this rank's vocabulary slice: [..., V_pad / tp], padded columns masked.

    Tied: the weight is the embedding's (a reference, not a second parameter) or, on a pipeline's
    last stage, a tensor received from the first stage each step (`external_weight`).
    """

    def __init__(self, head: nn.Linear, vocab: int, config, tp: int, tp_rank: int, tied_to: nn.Module | None):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.vocab, self.tp, self.tp_rank = vocab, tp, tp_rank
        self.vocab_padded = padded_vocab(vocab, tp)
        self._tied = [tied_to] if tied_to is not None else None  # a list: not registered as a child
        self.external_weight: torch.Tensor | None = None
        self.inner = ColumnParallelLinear(head.in_features, self.vocab_padded, config=config,
                                          init_method=nn.init.zeros_, bias=False, gather_output=False,
                                          skip_bias_add=False, skip_weight_param_allocation=tied_to is not None)
        if tied_to is None:
            mark_split(self.inner.weight, 0)
            shard_parameter(self.inner.weight, head.weight, tp_rank)
        n = self.vocab_padded // tp
        valid = torch.arange(tp_rank * n, (tp_rank + 1) * n) < vocab
        self.register_buffer("valid", valid, persistent=False)

    @property
    def tied(self) -> bool:
        return self._tied is not None

    def receive_weight(self) -> None:
        """A pipeline's last stage: no reference to the embedding; `external_weight` is set per round."""
        self._tied = None
        self.inner.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.external_weight
        if weight is None and self.tied:
            weight = self._tied[0].weight
        logits = self.inner(x, weight=weight)[0]
        if not bool(self.valid.all()):
            logits = logits.masked_fill(~self.valid, _NEG)
        return logits


def _shard_new_parameter(full: nn.Parameter, tp: int, tp_rank: int) -> nn.Parameter:
    """This rank's dim-0 slice of a parameter that megatron has no layer for (qk_bias)."""
    local = nn.Parameter(full.detach().chunk(tp, dim=0)[tp_rank].clone())
    mark_split(local, 0)
    return local


def parallelize_tensor(model, tp: int, tp_rank: int) -> None:
    """Replace the model's Linear/Embedding layers with tensor-parallel ones, in place.

    Needs megatron-core's model-parallel groups (`stars_scale.parallel.state.init_parallel`).
    Runs on the full model, before pipeline stages drop what they do not hold.
    """
    from stars_scale.model.layers import MLP, Attention

    dtype = next(model.parameters()).dtype
    config = _mp_config(tp, dtype)
    for module in list(model.modules()):
        if isinstance(module, Attention):
            if module.n_kv % tp:
                raise ValueError(f"tensor parallelism {tp} must divide the KV heads ({module.n_kv}): "
                                 "the fused QKV projection is split by whole KV groups")
            module.qkv_proj = ColumnParallel(module.qkv_proj, config, tp_rank)
            if module.qk_bias is not None:
                module.qk_bias = _shard_new_parameter(module.qk_bias, tp, tp_rank)
            module.o_proj = RowParallel(module.o_proj, config, tp_rank)
        elif isinstance(module, MLP):
            if hasattr(module, "gate_up_proj"):  # stride 2: each rank's output is cat(gate, up)
                module.gate_up_proj = ColumnParallel(module.gate_up_proj, config, tp_rank, stride=2)
            else:
                module.up_proj = ColumnParallel(module.up_proj, config, tp_rank)
            module.down_proj = RowParallel(module.down_proj, config, tp_rank)
    if model.adapter is not None:
        model.adapter = RowParallel(model.adapter, config, tp_rank, input_is_parallel=False)
    tied = model.cfg.tie_embeddings
    old_head = model.lm_head
    model.embed = VocabParallelEmbedding(model.embed, config, tp, tp_rank)
    model.lm_head = VocabParallelHead(old_head, model.cfg.vocab_size, config, tp, tp_rank,
                                      tied_to=model.embed if tied else None)


def vocab_parallel_ce(logits: torch.Tensor, labels: torch.Tensor, tp: int, kernels_mode: str = "torch",
                      group=None) -> torch.Tensor:
    """Mean token cross entropy over labels != IGNORE; logits are vocab-parallel when tp > 1 (over
    `group`). With model.kernels allowing it on these logits: the fused in-place kernel."""
    if tp == 1:
        return token_ce(logits, labels, kernels_mode)
    if kernels.fused(kernels_mode, logits):
        return kernels.cross_entropy(logits, labels, IGNORE, group=group)
    flat = logits.float().flatten(0, -2)
    target = labels.flatten()
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    mask = target != IGNORE
    per_token = vocab_parallel_cross_entropy(flat.unsqueeze(1), target.clamp(min=0).unsqueeze(1)).squeeze(1)
    return (per_token * mask).sum() / mask.sum()

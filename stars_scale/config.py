"""Typed run configuration: YAML -> nested dataclasses, with clear errors.

Every field has a default; unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the dotted field (e.g. ``model.hidden``). ``--set a.b=c`` overrides are
parsed as YAML scalars so ``--set stars.lam=0.1`` gives a float and ``--set
eval.depths=[1,2,4]`` a list.
"""
from __future__ import annotations

import dataclasses
import keyword
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from stars_scale.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 16
    hidden: int = 128
    heads: int = 4
    kv_heads: Optional[int] = None  # None: = heads (MHA); fewer: GQA
    mlp: Literal["swiglu", "gelu"] = "gelu"
    mlp_hidden: Optional[int] = None  # None: 4*hidden (gelu) or 8/3*hidden rounded to 64 (swiglu)
    norm: Literal["rmsnorm", "layernorm"] = "layernorm"
    norm_eps: float = 1e-5
    # peri: pre-norm plus a norm on each sublayer output before the residual add (Ouro)
    norm_placement: Literal["pre", "sandwich", "post", "peri"] = "sandwich"
    positions: Literal["rope", "learned"] = "learned"
    rope_base: float = 10000.0
    max_seq_len: int = 64
    n_prelude: int = 0
    n_core: int = 1
    n_coda: int = 0
    injection: Literal["none", "add", "concat-linear"] = "none"
    init_state: Literal["zero", "embed", "random"] = "embed"
    init_state_std: Optional[float] = None  # None: Huginn's sqrt(2/(5*hidden)) scaled recipe
    state_norm: bool = False  # Ouro: a norm on the state after every loop iteration
    final_norm: bool = True
    tie_embeddings: bool = True
    embed_scale: float = 1.0
    bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    qk_norm: bool = False
    attention: Literal["auto", "sdpa", "math", "flash"] = "auto"
    # Which of q/k/v projections carry a bias. None: all three follow `bias`. qk: Huginn's
    # qk_bias; qkv: Qwen2. o_proj and the MLP always follow `bias`.
    qkv_bias: Optional[Literal["none", "qk", "qkv"]] = None
    # Huginn applies its final norm (same weights) twice: to the end state before the coda
    # and after it. Needs final_norm: true.
    pre_coda_norm: bool = False
    # Ouro's early-exit gate: Linear(hidden, 1) on the state after each iteration. Kept as an
    # optional head (LoopedLM.exit_logits); it does not enter the LM loss.
    exit_gate: bool = False


@dataclass
class CurriculumConfig:
    steps: int = 0  # 0: off. Otherwise the mean depth ramps from `start` to the target over steps
    start: float = 1.0
    shape: Literal["linear", "sqrt"] = "linear"  # sqrt: 1 - sqrt(1 - t), fast at first
    backprop_start: Optional[int] = None  # backprop depth ramps from this to depth.backprop too


@dataclass
class DepthConfig:
    dist: Literal["fixed", "lognormal", "poisson-lognormal", "uniform"] = "fixed"
    value: int = 4  # fixed
    mu: float = 2.0  # lognormal: clip(round(LogNormal(mu, sigma)), min, max)
    sigma: float = 0.7  # lognormal and poisson-lognormal
    mean: float = 32.0  # poisson-lognormal: Poisson(exp(N(ln(mean) - sigma^2/2, sigma))) + 1
    min: int = 1
    max: int = 100
    backprop: Optional[int] = None  # truncated BPTT: gradients through the last k iterations
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval_depth: Optional[int] = None  # depth used for validation during training (None: median)


@dataclass
class StarsConfig:
    lam: float = 0.0
    method: Literal["vjp", "jvp", "fd"] = "vjp"
    iters: int = 1
    warmup_steps: int = 0  # the penalty enters the loss from this step on
    combine: Literal["convex", "additive"] = "convex"  # (1-lam)*CE + lam*P, or CE + lam*P
    sample_fraction: float = 1.0  # estimate on this fraction of the batch's sequences
    normalize: Literal["tensor", "token"] = "tensor"
    fd_eps: Optional[float] = None  # None: chosen from the dtype
    estimate_every: int = 1  # compute rho-hat every N steps while the penalty is off


@dataclass
class MixtureItem:
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    kind: Literal["arithmetic", "shards"] = "arithmetic"
    batch_size: int = 64  # global batch per microbatch, split over the data-parallel ranks
    # arithmetic (in-memory generator)
    digits: int = 3
    train_size: int = 0  # 0: fresh problems every step; else a fixed training set of this size
    test_size: int = 512
    reverse_answer: bool = True
    # shards (`stars-data prepare` / `stars-data arithmetic` output)
    path: Optional[str] = None  # one dataset directory (manifest.json + shards)
    mixture: list[MixtureItem] = field(default_factory=list)  # or several, sampled by weight
    num_workers: int = 0
    shuffle_buffer: int = 1024
    val_batches: int = 8  # validation batches (from the val split) per evaluation


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    grad_accum: int = 1
    dtype: Literal["fp32", "bf16"] = "fp32"
    checkpointing: Literal["none", "loop", "block"] = "none"
    log_every: int = 1
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 2
    eval_every: int = 0  # validation accuracy during training (0: off)
    progress: bool = True
    # CPU runs: keep freed host memory in the process for reuse (glibc mallopt, see
    # stars_scale/train/host_malloc.py) instead of page-faulting it back in every step.
    host_malloc: Literal["tuned", "system"] = "tuned"


@dataclass
class EvalConfig:
    depths: list[int] = field(default_factory=list)  # run the depth sweep at the end of training
    samples: int = 512
    rho_iters: int = 20
    batch_size: int = 256


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite in the cwd
    experiment: str = "stars_scale"
    run_name: Optional[str] = None
    system_metrics: bool = False  # CPU/GPU/memory/network per node, sampled by MLflow
    system_metrics_interval: float = 10.0


@dataclass
class InitConfig:
    """Start from converted weights (`stars-convert import ... --out DIR`); YAML key `init.from`."""

    from_: Optional[str] = None  # a converted checkpoint dir (config.yaml + model.safetensors)
    strict: bool = True  # the run's model config must equal the converted one


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero: int = 0
    microbatches: int = 1
    # pp > 1: 1f1b holds min(pp, microbatches) microbatches' activations per stage; gpipe all of them
    schedule: Literal["1f1b", "gpipe"] = "1f1b"


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    stars: StarsConfig = field(default_factory=StarsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def to_dict(self) -> dict:
        return _yaml_keys(dataclasses.asdict(self))


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin is Union:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # programming error


def _yaml_keys(d: Any) -> Any:
    """Field `from_` is written as YAML key `from` (Python keywords cannot be field names)."""
    if isinstance(d, dict):
        return {(k[:-1] if k.endswith("_") and keyword.iskeyword(k[:-1]) else k): _yaml_keys(v) for k, v in d.items()}
    return d


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    data = {(f"{k}_" if isinstance(k, str) and keyword.iskeyword(k) else k): v for k, v in data.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            shown = str(key).rstrip("_") if str(key).endswith("_") else str(key)
            where = f"{prefix}.{shown}" if prefix else shown
            raise ConfigError(
                f"{where}: unknown config key (known keys{' of ' + prefix if prefix else ''}: "
                f"{', '.join(sorted(n.rstrip('_') for n in names))})"
            )
    kwargs = {}
    for name in names:
        if name in data:
            shown = name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name
            path = f"{prefix}.{shown}" if prefix else shown
            kwargs[name] = _coerce(data[name], hints[name], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set stars.lam=0.1")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
        out.append((key.strip(), value))
    return out


def config_from_dict(data: dict, overrides: list[str] | None = None) -> RunConfig:
    data = dict(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from stars_scale.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


def validate(cfg: RunConfig) -> None:
    m, d, s, o, t = cfg.model, cfg.depth, cfg.stars, cfg.optim, cfg.train
    for name in ("vocab_size", "hidden", "heads", "max_seq_len", "n_core"):
        _require(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    for name in ("n_prelude", "n_coda"):
        _require(getattr(m, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(m, name)}")
    _require(m.hidden % m.heads == 0, "model.heads", f"hidden {m.hidden} is not divisible by heads {m.heads}")
    kv = m.kv_heads or m.heads
    _require(kv >= 1 and m.heads % kv == 0, "model.kv_heads", f"heads {m.heads} must be a multiple of kv_heads {kv}")
    if m.positions == "rope":
        _require((m.hidden // m.heads) % 2 == 0, "model.positions", "rope needs an even head dimension")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.mlp_hidden is None or m.mlp_hidden >= 1, "model.mlp_hidden", "must be >= 1")
    _require(m.init_state_std is None or m.init_state_std > 0, "model.init_state_std", "must be > 0")
    _require(not (m.pre_coda_norm and not m.final_norm), "model.pre_coda_norm",
             "needs model.final_norm: true (it reuses the final norm's weights)")
    _require(not (m.injection == "none" and m.init_state != "embed"), "model.init_state",
             "injection: none needs init_state: embed (otherwise the input never reaches the loop)")

    _require(d.value >= 1, "depth.value", f"must be >= 1, got {d.value}")
    _require(d.min >= 1, "depth.min", f"must be >= 1, got {d.min}")
    _require(d.max >= d.min, "depth.max", f"must be >= depth.min ({d.min}), got {d.max}")
    _require(d.sigma >= 0, "depth.sigma", f"must be >= 0, got {d.sigma}")
    _require(d.mean > 0, "depth.mean", f"must be > 0, got {d.mean}")
    _require(d.backprop is None or d.backprop >= 1, "depth.backprop", f"must be >= 1 or null, got {d.backprop}")
    _require(d.curriculum.steps >= 0, "depth.curriculum.steps", "must be >= 0")
    _require(d.curriculum.start > 0, "depth.curriculum.start", "must be > 0")
    _require(d.curriculum.backprop_start is None or d.curriculum.backprop_start >= 1,
             "depth.curriculum.backprop_start", "must be >= 1")
    _require(d.curriculum.backprop_start is None or d.backprop is not None, "depth.curriculum.backprop_start",
             "needs depth.backprop (the backprop depth it ramps to)")
    _require(d.eval_depth is None or d.eval_depth >= 1, "depth.eval_depth", "must be >= 1")

    _require(s.lam >= 0, "stars.lam", f"must be >= 0, got {s.lam}")
    _require(not (s.combine == "convex" and s.lam > 1), "stars.lam", "must be <= 1 with combine: convex")
    _require(s.iters >= 1, "stars.iters", f"must be >= 1, got {s.iters}")
    _require(s.warmup_steps >= 0, "stars.warmup_steps", "must be >= 0")
    _require(0 < s.sample_fraction <= 1, "stars.sample_fraction", f"must be in (0, 1], got {s.sample_fraction}")
    _require(s.fd_eps is None or s.fd_eps > 0, "stars.fd_eps", "must be > 0")
    _require(s.estimate_every >= 0, "stars.estimate_every", "must be >= 0")

    _require(cfg.data.digits >= 1, "data.digits", "must be >= 1")
    if cfg.data.kind == "shards":
        _require(bool(cfg.data.path) != bool(cfg.data.mixture), "data.path",
                 "data.kind: shards needs exactly one of data.path (a dataset directory) or data.mixture")
        for i, item in enumerate(cfg.data.mixture):
            _require(bool(item.path), f"data.mixture[{i}].path", "must name a dataset directory")
            _require(item.weight > 0, f"data.mixture[{i}].weight", f"must be > 0, got {item.weight}")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _require(cfg.data.val_batches >= 1, "data.val_batches", "must be >= 1")
    _require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(cfg.data.train_size >= 0, "data.train_size", "must be >= 0")
    _require(cfg.data.test_size >= 1, "data.test_size", "must be >= 1")

    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: off)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")

    _require(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _require(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")
    _require(t.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
    _require(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    _require(t.eval_every >= 0, "train.eval_every", "must be >= 0")

    for i, dep in enumerate(cfg.eval.depths):
        _require(dep >= 1, f"eval.depths[{i}]", f"must be >= 1, got {dep}")
    _require(cfg.eval.samples >= 1, "eval.samples", "must be >= 1")
    _require(cfg.eval.rho_iters >= 1, "eval.rho_iters", "must be >= 1")

    p = cfg.parallel
    for name in ("tp", "pp", "microbatches"):
        _require(getattr(p, name) >= 1, f"parallel.{name}", "must be >= 1")
    _require(p.zero in (0, 1, 2), "parallel.zero", f"must be 0, 1 or 2, got {p.zero}")

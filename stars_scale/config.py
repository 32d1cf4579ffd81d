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
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from stars_scale.errors import ConfigError

_MAX_INT = 2**62  # counts (steps, sizes) beyond any real run; keeps arithmetic on them in int64
_MAX_WIDTH = 2**24  # widths, vocabularies, sequence lengths
_MAX_BLOCKS = 4096
_MAX_DEPTH = 100_000  # loop iterations
_MAX_FLOAT = 1e30  # scales and rates: far beyond any sane value, well inside float32
_MAX_YAML_NODES = 100_000  # a config's nodes with every alias expanded (a real one has hundreds)

# Bounds (inclusive) shared by config fields and the CLI flags that stand for them
# (`cli/flags.int_flag`): a flag is refused at parse time by the same rule as its field.
BOUNDS: dict[str, tuple[int, int]] = {
    "depth": (1, _MAX_DEPTH),  # loop iterations: depth.*, eval.depths, --depth, --max-depth, --depths
    "power_iters": (1, 1000),  # power-iteration steps: stars.iters, eval.rho_iters, --rho-iters
    "seed": (0, 2**63 - 1),  # seed, --seed
    "count": (1, _MAX_INT),  # sizes: batch sizes, samples, --samples, --batch-size
    "width": (1, _MAX_WIDTH),  # token counts: model.max_seq_len, --max-new-tokens, --seq-len
    # n-digit addition: a problem's code a * 10^n + b must fit in int64 (10^(2n) <= 2^63)
    "digits": (1, 9),
    "draws": (1, 1_000_000),  # stars-plan --draws: depth statistics settle long before
    # problem sets held in memory: the test set also as a Python set (~70 bytes a problem), a
    # fixed training set as int64 codes (8 GiB at the cap)
    "test_problems": (0, 2**24),
    "train_problems": (0, 2**30),
}


def bound_error(value: float, kind: str, lo: float | None = None, hi: float | None = None) -> str | None:
    """Why `value` is outside BOUNDS[kind] (with `lo`/`hi` overriding an end), or None."""
    b_lo, b_hi = BOUNDS[kind]
    lo = b_lo if lo is None else lo
    hi = b_hi if hi is None else hi
    if value < lo:
        return f"must be >= {_num(lo)}, got {_short(value)}"
    if value > hi:
        return f"must be <= {_num(hi)}, got {_short(value)}"
    return None


def arithmetic_error(digits: int, test_size: int, train_size: int = 0) -> str | None:
    """Why the n-digit addition task cannot be built with these sizes (field: reason), or None.
    The one rule for `data.*` and `ArithmeticTask` (which `stars-data arithmetic` builds)."""
    for name, value, kind in (("digits", digits, "digits"), ("test_size", test_size, "test_problems"),
                              ("train_size", train_size, "train_problems")):
        why = bound_error(value, kind)
        if why:
            return f"data.{name}: {why}"
    space = 10 ** (2 * digits)  # pairs (a, b) of n-digit numbers
    if test_size >= space // 2:
        return (f"data.test_size: {test_size} is too large for {digits}-digit problems (there are {space}; "
                f"the test set may take less than half of them, so training draws are not mostly test problems)")
    return None


def chains_error(statements: int, variables: int, difficulty, test_difficulty, chains: int,
                 train_size: int = 0, for_kind: bool = True) -> str | None:
    """Why the variable-binding chains task cannot be built with these fields (field: reason), or
    None. The one rule for `data.*` and `ChainsTask`. The ranges hold whatever the task (a typo in a
    field the task does not read is still a typo); with `for_kind` also how the fields fit together."""
    for name, r in (("difficulty", difficulty), ("test_difficulty", test_difficulty)):
        if len(r) != 2 or not 1 <= r[0] <= r[1]:
            return f"data.{name}: expected [lo, hi] with 1 <= lo <= hi, got {list(r)!r}"
    for name, value, lo, hi in (("statements", statements, 1, 26), ("variables", variables, 1, 26),
                                ("chains", chains, 2, 10)):
        if not lo <= value <= hi:
            return f"data.{name}: must be {'>= %d' % lo if value < lo else '<= %d' % hi}, got {value}"
    if not for_kind:
        return None
    if variables < statements:
        return (f"data.variables: must be >= data.statements ({statements}): every statement binds its own "
                f"variable, got {variables}")
    top = max(difficulty[1], test_difficulty[1])
    if statements < top + chains - 1:
        return (f"data.statements={statements} leaves no room for {chains - 1} distractor chain(s) next to a chain "
                f"of {top}: needs >= {top + chains - 1}")
    if train_size != 0:
        return "data.train_size: the chains task draws fresh problems (use 0)"
    return None


def parse_int(text: str) -> int | None:
    """A CLI integer as the config reads one: `12`, `1_000`, or an integral float such as `1e9`;
    None when `text` is not an integer."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None


def _require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


def _range(obj: Any, at: str, lo: float, hi: float, *names: str, lo_open: bool = False,
           hi_open: bool = False) -> None:
    """Each of `names` (when not None) must lie in [lo, hi], with open ends as asked."""
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        where = f"{at}.{name}" if at else name
        _require(v > lo if lo_open else v >= lo, where, f"must be {'>' if lo_open else '>='} {_num(lo)}, got {v!r}")
        _require(v < hi if hi_open else v <= hi, where, f"must be {'<' if hi_open else '<='} {_num(hi)}, got {v!r}")


def _num(x: float) -> str:
    if isinstance(x, int) and not isinstance(x, bool):
        for k in range(40, 128):  # 2**62, 2**63 - 1: exact, not 4.61169e+18
            if abs(x) in (2**k, 2**k - 1):
                return f"{'-' if x < 0 else ''}2**{k}{' - 1' if abs(x) == 2**k - 1 else ''}"
        if abs(x) < 10**12:
            return str(x)
    return f"{x:g}"


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
    # Fused CUDA kernels (csrc/, stars_scale/kernels): auto uses them on CUDA when the extension
    # is built; torch never; cuda requires them (a config error where they are not built).
    kernels: Literal["auto", "torch", "cuda"] = "auto"

    def validate(self, at: str = "model") -> None:
        _range(self, at, *BOUNDS["width"], "vocab_size", "hidden", "heads", "max_seq_len", "mlp_hidden")
        _range(self, at, 1, _MAX_BLOCKS, "n_core")
        _range(self, at, 0, _MAX_BLOCKS, "n_prelude", "n_coda")
        _range(self, at, 1, self.heads, "kv_heads")
        _require(self.hidden % self.heads == 0, f"{at}.heads",
                 f"hidden {self.hidden} is not divisible by heads {self.heads}")
        kv = self.kv_heads or self.heads
        _require(self.heads % kv == 0, f"{at}.kv_heads", f"heads {self.heads} must be a multiple of kv_heads {kv}")
        if self.positions == "rope":
            _require((self.hidden // self.heads) % 2 == 0, f"{at}.positions", "rope needs an even head dimension")
            _range(self, at, 1.0, _MAX_FLOAT, "rope_base", lo_open=True)
        _range(self, at, 0.0, 1.0, "dropout", hi_open=True)
        _range(self, at, 0.0, 1.0, "norm_eps", lo_open=True)
        _range(self, at, 0.0, _MAX_FLOAT, "init_std", "init_state_std", "embed_scale", lo_open=True)
        _require(not (self.pre_coda_norm and not self.final_norm), f"{at}.pre_coda_norm",
                 "needs model.final_norm: true (it reuses the final norm's weights)")
        _require(not (self.injection == "none" and self.init_state != "embed"), f"{at}.init_state",
                 "injection: none needs init_state: embed (otherwise the input never reaches the loop)")


@dataclass
class CurriculumConfig:
    steps: int = 0  # 0: off. Otherwise the mean depth ramps from `start` to the target over steps
    start: float = 1.0
    shape: Literal["linear", "sqrt"] = "linear"  # sqrt: 1 - sqrt(1 - t), fast at first
    backprop_start: Optional[int] = None  # backprop depth ramps from this to depth.backprop too

    def validate(self, at: str = "depth.curriculum") -> None:
        _range(self, at, 0, _MAX_INT, "steps")
        _range(self, at, 0.0, _MAX_DEPTH, "start", lo_open=True)
        _range(self, at, *BOUNDS["depth"], "backprop_start")


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

    def validate(self, at: str = "depth") -> None:
        _range(self, at, *BOUNDS["depth"], "value", "min", "max", "backprop", "eval_depth")
        _require(self.max >= self.min, f"{at}.max", f"must be >= depth.min ({self.min}), got {self.max}")
        _range(self, at, -20.0, 20.0, "mu")
        _range(self, at, 0.0, 20.0, "sigma")
        _range(self, at, 0.0, _MAX_DEPTH, "mean", lo_open=True)
        _require(self.curriculum.backprop_start is None or self.backprop is not None,
                 f"{at}.curriculum.backprop_start", "needs depth.backprop (the backprop depth it ramps to)")


@dataclass
class StarsConfig:
    lam: float = 0.0
    method: Literal["vjp", "jvp", "fd"] = "vjp"
    iters: int = 1
    # vjp: which iterations carry the penalty's graph. all: every one, v never detached (the STARS
    # reference); last: the first iters-1 only choose the direction, the penalty is ‖Jᵀv‖² at it
    # (≈ ρ² with enough iters). jvp and fd always carry the last only.
    vjp_graph: Literal["all", "last"] = "all"
    warmup_steps: int = 0  # the penalty enters the loss from this step on
    combine: Literal["convex", "additive"] = "convex"  # (1-lam)*CE + lam*P, or CE + lam*P
    sample_fraction: float = 1.0  # estimate on this fraction of the batch's sequences
    normalize: Literal["tensor", "token"] = "tensor"
    fd_eps: Optional[float] = None  # None: chosen from the dtype
    estimate_every: int = 1  # compute rho-hat every N steps while the penalty is off
    # Under bf16/fp16 autocast: fp32 runs the estimator's core evaluations in fp32 (accurate);
    # autocast keeps the step's dtype (cheaper; fd loses most digits, see stars/jacobian.py).
    probe_precision: Literal["fp32", "autocast"] = "fp32"
    # stability options (stars/objective.py): P taken this many no-grad iterations past the
    # sampled depth; the progressive loss's weight alpha (Bansal et al. 2022; 0: off)
    probe_beyond: int = 0
    progressive: float = 0.0

    def validate(self, at: str = "stars") -> None:
        _range(self, at, 0.0, _MAX_FLOAT, "lam")
        _require(not (self.combine == "convex" and self.lam > 1), f"{at}.lam", "must be <= 1 with combine: convex")
        _range(self, at, *BOUNDS["power_iters"], "iters")
        _range(self, at, 0, _MAX_INT, "warmup_steps", "estimate_every")
        _range(self, at, 0.0, 1.0, "sample_fraction", lo_open=True)
        _range(self, at, 0.0, 1.0, "fd_eps", lo_open=True)
        _range(self, at, 0, _MAX_DEPTH, "probe_beyond")
        _range(self, at, 0.0, 1.0, "progressive")


@dataclass
class MixtureItem:
    path: str = ""
    weight: float = 1.0

    def validate(self, at: str = "data.mixture[0]") -> None:
        _require(bool(self.path), f"{at}.path", "must name a dataset directory")
        _range(self, at, 0.0, _MAX_FLOAT, "weight", lo_open=True)


@dataclass
class DataConfig:
    kind: Literal["arithmetic", "chains", "shards"] = "arithmetic"
    # rows of one batch over all data-parallel ranks (train.grad_accum batches per optimizer step);
    # each rank's share (batch_size / dp) is split into parallel.microbatches microbatches
    batch_size: int = 64
    # arithmetic (in-memory generator)
    digits: int = 3
    train_size: int = 0  # 0: fresh problems every step; else a fixed training set of this size
    test_size: int = 512
    reverse_answer: bool = True
    reverse_operands: bool = False  # operands least-significant digit first as well
    # chains (variable-binding chains, data/chains.py): difficulty = lookups the answer needs
    statements: int = 12  # binding statements per problem (prompt: 2 * statements + 2 tokens)
    variables: int = 16  # variable names drawn from the first `variables` letters
    difficulty: list[int] = field(default_factory=lambda: [1, 4])  # training range [lo, hi]
    test_difficulty: list[int] = field(default_factory=lambda: [1, 4])  # test-set range [lo, hi]
    chains: int = 3  # chains per problem (the query's + distractors), rooted at distinct digits
    order: Literal["program", "shuffled"] = "program"  # bound before referenced, or any order
    # shards (`stars-data prepare` / `stars-data arithmetic` output)
    path: Optional[str] = None  # one dataset directory (manifest.json + shards)
    mixture: list[MixtureItem] = field(default_factory=list)  # or several, sampled by weight
    num_workers: int = 0
    shuffle_buffer: int = 1024
    val_batches: int = 8  # validation batches (from the val split) per evaluation

    def validate(self, at: str = "data") -> None:
        _range(self, at, *BOUNDS["count"], "batch_size", "val_batches")
        _range(self, at, *BOUNDS["digits"], "digits")
        _range(self, at, 1, BOUNDS["test_problems"][1], "test_size")  # a run evaluates on a test set
        _range(self, at, *BOUNDS["train_problems"], "train_size")
        why = arithmetic_error(self.digits, self.test_size, self.train_size) if self.kind == "arithmetic" else None
        if why:
            raise ConfigError(why)
        _range(self, at, 0, _MAX_INT, "shuffle_buffer")
        _range(self, at, 0, 1024, "num_workers")
        why = chains_error(self.statements, self.variables, self.difficulty, self.test_difficulty, self.chains,
                           self.train_size, for_kind=self.kind == "chains")
        if why:
            raise ConfigError(why)
        if self.kind == "shards":
            _require(bool(self.path) != bool(self.mixture), f"{at}.path",
                     "data.kind: shards needs exactly one of data.path (a dataset directory) or data.mixture")


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

    def validate(self, at: str = "optim") -> None:
        _range(self, at, 0.0, _MAX_FLOAT, "lr", lo_open=True)
        _range(self, at, 0.0, 1.0, "min_lr_ratio")
        _range(self, at, 0.0, _MAX_FLOAT, "weight_decay", "grad_clip")
        _range(self, at, 0.0, 1.0, "beta1", "beta2", hi_open=True)
        _range(self, at, 0.0, 1.0, "eps", lo_open=True)
        _range(self, at, 0, _MAX_INT, "warmup_steps")
        _range(self, at, 0.0, 1.0, "decay_fraction", lo_open=True)


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
    # a checkpoint save that fails (disk full, I/O error) warns and is retried at the next
    # interval; this many failures in a row stop the run
    max_failed_saves: int = 3
    # write periodic checkpoints on a background thread (the step goes on; the state is copied
    # first, so each rank holds a second copy of its part while a save is in flight)
    async_save: bool = False
    # a step whose loss or global gradient norm is not finite is skipped (no update); after
    # max_skips in a row: skip -> stop, rollback -> reload the newest verified checkpoint with the
    # learning rate scaled by rollback_lr_scale, stop -> stop at the first one
    nonfinite: Literal["skip", "rollback", "stop"] = "skip"
    max_skips: int = 3
    rollback_lr_scale: float = 0.5
    # torch.compile regions (stars_scale/parallel/compile.py): none | block (each transformer
    # block) | model (the prelude, one loop iteration of the core, the coda + head)
    compile: Literal["none", "block", "model"] = "none"

    def validate(self, at: str = "train") -> None:
        _range(self, at, 1, _MAX_INT, "steps", "grad_accum", "log_every", "keep_last", "max_failed_saves")
        _range(self, at, 0, _MAX_INT, "ckpt_every", "eval_every", "max_skips")
        _range(self, at, 0.0, 1.0, "rollback_lr_scale", lo_open=True)


@dataclass
class EvalConfig:
    depths: list[int] = field(default_factory=list)  # run the depth sweep at the end of training
    samples: int = 512
    rho_iters: int = 20
    batch_size: int = 256

    def validate(self, at: str = "eval") -> None:
        for i, dep in enumerate(self.depths):
            msg = bound_error(dep, "depth")
            _require(msg is None, f"{at}.depths[{i}]", str(msg))
        _range(self, at, *BOUNDS["count"], "samples", "batch_size")
        _range(self, at, *BOUNDS["power_iters"], "rho_iters")


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite in the cwd
    experiment: str = "stars_scale"
    run_name: Optional[str] = None
    system_metrics: bool = False  # CPU/GPU/memory/network per node, sampled by MLflow
    system_metrics_interval: float = 10.0
    # true: a run whose MLflow store cannot start is refused; false: it runs untracked and says so once
    required: bool = False

    def validate(self, at: str = "tracking") -> None:
        _require(self.mlflow or not self.required, f"{at}.required", "true needs tracking.mlflow: true")
        _range(self, at, 0.1, 86400.0, "system_metrics_interval")
        _require(bool(self.experiment.strip()), f"{at}.experiment", "must be a non-empty name")


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
    # pp > 1: 1f1b holds about pp microbatches' activations per stage; gpipe all of them
    schedule: Literal["1f1b", "gpipe"] = "1f1b"

    def validate(self, at: str = "parallel") -> None:
        _range(self, at, 1, 4096, "tp", "pp", "microbatches")
        _require(self.zero in (0, 1, 2), f"{at}.zero", f"must be 0, 1 or 2, got {self.zero}")


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

    def validate(self, at: str = "") -> None:
        _range(self, at, *BOUNDS["seed"], "seed")

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
            raise ConfigError(f"{path}: expected a mapping, got {_short(value)}")
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
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # 1e3, 2.0e+4: integers written in float notation
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_short(value)}")
        if not -2**63 < value < 2**63:
            raise ConfigError(f"{path}: expected an integer that fits in 64 bits, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_short(value)}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {_short(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_short(value)}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # programming error


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def _short(value: Any) -> str:
    """repr of a user's value, cut to one short line; never expands a big or nested value (a YAML
    alias bomb, a recursive list) before cutting it."""
    r = _REPR.repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _yaml_keys(d: Any) -> Any:
    """Field `from_` is written as YAML key `from` (Python keywords cannot be field names)."""
    if isinstance(d, dict):
        return {(k[:-1] if k.endswith("_") and keyword.iskeyword(k[:-1]) else k): _yaml_keys(v) for k, v in d.items()}
    return d


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:  # YAML keys are `from`, never the field's Python spelling `from_`
        python_spelling = isinstance(key, str) and key.endswith("_") and keyword.iskeyword(key[:-1])
        if (f"{key}_" if isinstance(key, str) and keyword.iskeyword(key) else key) not in names or python_spelling:
            shown = key[:60] if isinstance(key, str) else _short(key)
            where = f"{prefix}.{shown}" if prefix else shown
            hint = f"; write it as '{key[:-1]}'" if python_spelling else ""
            raise ConfigError(
                f"{where}: unknown config key (known keys{' of ' + prefix if prefix else ''}: "
                f"{', '.join(sorted(n.rstrip('_') for n in names))}){hint}"
            )
    data = {(f"{k}_" if isinstance(k, str) and keyword.iskeyword(k) else k): v for k, v in data.items()}
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


def _expanded_nodes(root: yaml.Node) -> int | None:
    """Nodes of the document with every alias expanded (capped just above the budget), counted
    on the composed graph without expanding it; None when an alias refers to its own ancestor."""
    def children(node: yaml.Node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}
    path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            path.discard(key)
            size[key] = min(1 + sum(size[id(c)] for c in children(node)), _MAX_YAML_NODES + 1)
        elif key not in size:
            path.add(key)
            stack.append((node, True))
            for c in children(node):
                if id(c) in path:
                    return None
                if id(c) not in size:
                    stack.append((c, False))
    return size[id(root)]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with three fixes for configs: a key given twice is an error (instead of
    the later block silently replacing the earlier), `1e-3` / `1e12` are numbers (YAML 1.2;
    PyYAML's YAML 1.1 rule wants a dot and a signed exponent and reads them as strings), and a
    document whose aliases expand to more than _MAX_YAML_NODES nodes (a "billion laughs" bomb)
    or refer to themselves is refused before anything is built from it."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            n = _expanded_nodes(node)
            if n is None:
                raise ConfigError("an alias refers to a node that contains it (a recursive alias)")
            if n > _MAX_YAML_NODES:
                raise ConfigError(f"its aliases expand to more than {_MAX_YAML_NODES} values "
                                  "(an alias bomb?); a config needs a few hundred")
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base class reports unhashable keys
                if key in seen and key != "<<":
                    raise ConfigError(f"duplicate key {_short(key)} at line {key_node.start_mark.line + 1} "
                                      f"(first given at line {seen[key]}): give each key once")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str, what: str) -> Any:
    """YAML text -> Python data with the strict loader; one-line ConfigError naming `what` otherwise."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what}: not valid YAML{where}: {problem}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{what}: not valid YAML: nested too deeply") from None


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {_short(item)}: expected key=value, e.g. --set stars.lam=0.1")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"--set {_short(key)}: expected a dotted field name such as optim.lr")
        value = parse_yaml(raw, f"--set {key}") if raw.strip() != "" else ""
        out.append((key, value))
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
        raise ConfigError(f"{p}: config file not found" if not p.exists() else f"{p}: not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (byte {e.start} is not UTF-8); expected a YAML config") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (it holds NUL bytes); expected a YAML config")
    data = parse_yaml(text, str(p))
    if data is None:
        raise ConfigError(f"{p}: the config file is empty; expected a YAML mapping such as 'model: {{hidden: 64}}'")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def config_text(cfg: RunConfig) -> str:
    """The YAML text of `cfg` (what `save_config` writes, and `load_config` reads back)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from stars_scale.utils import atomic_write_text

    atomic_write_text(Path(path), config_text(cfg))


# --------------------------------------------------------------------------- validation


def validate(cfg: Any, at: str = "") -> None:
    """Run every dataclass's own `validate(at)` (each checks its fields where they are defined)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        shown = f.name[:-1] if f.name.endswith("_") and keyword.iskeyword(f.name[:-1]) else f.name
        path = f"{at}.{shown}" if at else shown
        if dataclasses.is_dataclass(value):
            validate(value, path)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, f"{path}[{i}]")
    if hasattr(cfg, "validate"):
        cfg.validate(at)

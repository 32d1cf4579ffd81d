"""Typed run configuration: YAML -> nested dataclasses that pydantic validates, with one-line errors.

Every field has a default; its type and bounds stand in its annotation (`Count`, `_int(0, 2)`,
`_float(0.0, 1.0, lo_open=True)`, ...) and the rules between fields in its section's
`_rules`. Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the
dotted field (e.g. ``model.hidden``) and what was expected. ``--set a.b=c`` overrides are parsed
as YAML scalars so ``--set stars.lam=0.1`` gives a float and ``--set eval.depths=[1,2,4]`` a list.
Code may build the dataclasses directly (converters, tests): they are checked when loaded.
"""
import dataclasses
import keyword
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator,
                      with_config)

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
    # variable-binding chains: each statement binds its own letter; chains are rooted at distinct digits
    "letters": (1, 26),  # data.statements, data.variables
    "chains": (2, 10),  # data.chains
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


def _data_bounds_error(*checks: tuple[str, float, str]) -> str | None:
    """`data.<name>: why` for the first (name, value, BOUNDS kind) outside its bounds, or None."""
    for name, value, kind in checks:
        why = bound_error(value, kind)
        if why:
            return f"data.{name}: {why}"
    return None


def arithmetic_error(digits: int, test_size: int, train_size: int = 0) -> str | None:
    """Why the n-digit addition task cannot be built with these sizes (field: reason), or None.
    The one rule for `data.*` and `ArithmeticTask` (which `stars-data arithmetic` builds)."""
    why = _data_bounds_error(("digits", digits, "digits"), ("test_size", test_size, "test_problems"),
                             ("train_size", train_size, "train_problems"))
    if why:
        return why
    space = 10 ** (2 * digits)  # pairs (a, b) of n-digit numbers
    if test_size >= space // 2:
        return (f"data.test_size: {test_size} is too large for {digits}-digit problems (there are {space}; "
                f"the test set may take less than half of them, so training draws are not mostly test problems)")
    return None


def chains_room(top: int, chains: int, matched: bool) -> int:
    """Statements a chains problem of `top` lookups needs: one chain of `top` and `chains - 1`
    distractor chains of >= 1, or with `matched` all `chains` chains of `top`."""
    return chains * top if matched else top + chains - 1


def chains_error(statements: int, variables: int, difficulty, test_difficulty, chains: int,
                 train_size: int = 0, for_kind: bool = True, matched: bool = False) -> str | None:
    """Why the variable-binding chains task cannot be built with these fields (field: reason), or
    None. The one rule for `data.*` and `ChainsTask`. The ranges hold whatever the task (a typo in a
    field the task does not read is still a typo); with `for_kind` also how the fields fit together."""
    for name, r in (("difficulty", difficulty), ("test_difficulty", test_difficulty)):
        if len(r) != 2 or not 1 <= r[0] <= r[1]:
            return f"data.{name}: expected [lo, hi] with 1 <= lo <= hi, got {list(r)!r}"
    why = _data_bounds_error(("statements", statements, "letters"), ("variables", variables, "letters"),
                             ("chains", chains, "chains"))
    if why or not for_kind:
        return why
    if variables < statements:
        return (f"data.variables: must be >= data.statements ({statements}): every statement binds its own "
                f"variable, got {variables}")
    top = max(difficulty[1], test_difficulty[1])
    if statements < chains_room(top, chains, matched):
        return (f"data.statements={statements} leaves no room for {chains - 1} distractor chain(s)"
                f"{' as long as' if matched else ' next to'} a chain of {top}: needs >= {chains_room(top, chains, matched)}")
    if train_size != 0:
        return "data.train_size: the chains task draws fresh problems (use 0)"
    return None


def _integral(value: Any) -> Any:
    """1e3, 2.0e+4: integers written in float notation (YAML 1.2 reads them as floats) are integers."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def parse_int(text: str) -> int | None:
    """A CLI integer as the config reads one: `12`, `1_000`, or an integral float such as `1e9`;
    None when `text` is not an integer."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = _integral(float(text))
    except ValueError:
        return None
    return value if isinstance(value, int) else None


def _num(x: float) -> str:
    if isinstance(x, int) and not isinstance(x, bool):
        for k in range(40, 128):  # 2**62, 2**63 - 1: exact, not 4.61169e+18
            if abs(x) in (2**k, 2**k - 1):
                return f"{'-' if x < 0 else ''}2**{k}{' - 1' if abs(x) == 2**k - 1 else ''}"
        if abs(x) < 10**12:
            return str(x)
    return f"{x:g}"


# --------------------------------------------------------------------------- field types

# Strict: no "3" for 3, no 1 for true, no true for 1.0; an int is a number, an integral float an integer.
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def _int(lo: int, hi: int) -> Any:
    """An integer in [lo, hi]."""
    return Annotated[int, BeforeValidator(_integral), Strict(), Field(ge=lo, le=hi)]


def _float(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A finite number in [lo, hi], (lo, hi], [lo, hi) or (lo, hi)."""
    ends = {"gt" if lo_open else "ge": lo, "lt" if hi_open else "le": hi}
    return Annotated[float, Strict(), Field(**ends)]


def _list(item: Any) -> Any:
    return Annotated[list[item], Strict()]


Depth = _int(*BOUNDS["depth"])
Count = _int(*BOUNDS["count"])
Width = _int(*BOUNDS["width"])
Iters = _int(*BOUNDS["power_iters"])
Seed = _int(*BOUNDS["seed"])
Digits = _int(*BOUNDS["digits"])
Letters = _int(*BOUNDS["letters"])
Chains = _int(*BOUNDS["chains"])
TrainProblems = _int(*BOUNDS["train_problems"])
TestProblems = _int(1, BOUNDS["test_problems"][1])  # a run evaluates on a test set
Steps = _int(0, _MAX_INT)  # steps and intervals, where 0 means none or off
Positive = _int(1, _MAX_INT)
Int64 = _int(-(2**63 - 1), 2**63 - 1)  # an integer a tensor can hold
Scale = _float(0.0, _MAX_FLOAT, lo_open=True)
Fraction = _float(0.0, 1.0, lo_open=True)  # (0, 1]

# Every section forbids keys it does not know, and every number is finite.
_SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)


def _section(cls: type) -> type:
    return with_config(_SECTION)(dataclass(cls))


def _rule(ok: bool, name: str, why: str) -> None:
    """A rule between fields: `name` is the field it names within its section."""
    if not ok:
        raise ValueError(f"{name}: {why}")


@_section
class ModelConfig:
    vocab_size: Width = 16
    hidden: Width = 128
    heads: Width = 4
    kv_heads: Optional[Width] = None  # None: = heads (MHA); fewer: GQA
    mlp: Literal["swiglu", "gelu"] = "gelu"
    mlp_hidden: Optional[Width] = None  # None: 4*hidden (gelu) or 8/3*hidden rounded to 64 (swiglu)
    norm: Literal["rmsnorm", "layernorm"] = "layernorm"
    norm_eps: Fraction = 1e-5
    # peri: pre-norm plus a norm on each sublayer output before the residual add (Ouro)
    norm_placement: Literal["pre", "sandwich", "post", "peri"] = "sandwich"
    positions: Literal["rope", "learned"] = "learned"
    rope_base: _float(1.0, _MAX_FLOAT, lo_open=True) = 10000.0
    max_seq_len: Width = 64
    n_prelude: _int(0, _MAX_BLOCKS) = 0
    n_core: _int(1, _MAX_BLOCKS) = 1
    n_coda: _int(0, _MAX_BLOCKS) = 0
    injection: Literal["none", "add", "concat-linear"] = "none"
    init_state: Literal["zero", "embed", "random"] = "embed"
    init_state_std: Optional[Scale] = None  # None: Huginn's sqrt(2/(5*hidden)) scaled recipe
    state_norm: Bool = False  # Ouro: a norm on the state after every loop iteration
    final_norm: Bool = True
    tie_embeddings: Bool = True
    embed_scale: Scale = 1.0
    bias: Bool = True
    dropout: _float(0.0, 1.0, hi_open=True) = 0.0
    init_std: Scale = 0.02
    embed_init_std: Optional[Scale] = None  # token/position embeddings (None: init_std); torch's default is 1
    qk_norm: Bool = False
    attention: Literal["auto", "sdpa", "math", "flash"] = "auto"
    # Which of q/k/v projections carry a bias. None: all three follow `bias`. qk: Huginn's
    # qk_bias; qkv: Qwen2. o_proj and the MLP always follow `bias`.
    qkv_bias: Optional[Literal["none", "qk", "qkv"]] = None
    # Huginn applies its final norm (same weights) twice: to the end state before the coda
    # and after it. Needs final_norm: true.
    pre_coda_norm: Bool = False
    # Ouro's early-exit gate: Linear(hidden, 1) on the state after each iteration. Kept as an
    # optional head (LoopedLM.exit_logits); it does not enter the LM loss.
    exit_gate: Bool = False
    # Fused CUDA kernels (csrc/, stars_scale/kernels): auto uses them on CUDA when the extension
    # is built; torch never; cuda requires them (a config error where they are not built).
    kernels: Literal["auto", "torch", "cuda"] = "auto"

    @model_validator(mode="after")
    def _rules(self) -> "ModelConfig":
        _rule(self.hidden % self.heads == 0, "heads", f"hidden {self.hidden} is not divisible by heads {self.heads}")
        kv = self.kv_heads or self.heads
        _rule(self.heads % kv == 0, "kv_heads", f"heads {self.heads} must be a multiple of kv_heads {kv}")
        _rule(self.positions != "rope" or (self.hidden // self.heads) % 2 == 0, "positions",
              "rope needs an even head dimension")
        _rule(not self.pre_coda_norm or self.final_norm, "pre_coda_norm",
              "needs model.final_norm: true (it reuses the final norm's weights)")
        _rule(self.injection != "none" or self.init_state == "embed", "init_state",
              "injection: none needs init_state: embed (otherwise the input never reaches the loop)")
        return self


@_section
class CurriculumConfig:
    steps: Steps = 0  # 0: off. Otherwise the mean depth ramps from `start` to the target over steps
    start: _float(0.0, _MAX_DEPTH, lo_open=True) = 1.0
    shape: Literal["linear", "sqrt"] = "linear"  # sqrt: 1 - sqrt(1 - t), fast at first
    backprop_start: Optional[Depth] = None  # backprop depth ramps from this to depth.backprop too


@_section
class DepthConfig:
    dist: Literal["fixed", "lognormal", "poisson-lognormal", "uniform"] = "fixed"
    value: Depth = 4  # fixed
    mu: _float(-20.0, 20.0) = 2.0  # lognormal: clip(round(LogNormal(mu, sigma)), min, max)
    sigma: _float(0.0, 20.0) = 0.7  # lognormal and poisson-lognormal
    # poisson-lognormal: Poisson(exp(N(ln(mean) - sigma^2/2, sigma))) + 1
    mean: _float(0.0, _MAX_DEPTH, lo_open=True) = 32.0
    min: Depth = 1
    max: Depth = 100
    backprop: Optional[Depth] = None  # truncated BPTT: gradients through the last k iterations
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval_depth: Optional[Depth] = None  # depth used for validation during training (None: median)

    @model_validator(mode="after")
    def _rules(self) -> "DepthConfig":
        _rule(self.max >= self.min, "max", f"must be >= depth.min ({self.min}), got {self.max}")
        _rule(self.curriculum.backprop_start is None or self.backprop is not None, "curriculum.backprop_start",
              "needs depth.backprop (the backprop depth it ramps to)")
        return self


@_section
class StarsConfig:
    lam: _float(0.0, _MAX_FLOAT) = 0.0
    method: Literal["vjp", "jvp", "fd"] = "vjp"
    iters: Iters = 1
    # vjp: which iterations carry the penalty's graph. all: every one, v never detached (the STARS
    # reference); last: the first iters-1 only choose the direction, the penalty is ‖Jᵀv‖² at it
    # (≈ ρ² with enough iters). jvp and fd always carry the last only.
    vjp_graph: Literal["all", "last"] = "all"
    warmup_steps: Steps = 0  # the penalty enters the loss from this step on
    combine: Literal["convex", "additive"] = "convex"  # (1-lam)*CE + lam*P, or CE + lam*P
    sample_fraction: Fraction = 1.0  # estimate on this fraction of the batch's sequences
    normalize: Literal["tensor", "token"] = "tensor"
    fd_eps: Optional[Fraction] = None  # None: chosen from the dtype
    estimate_every: Steps = 1  # compute rho-hat every N steps while the penalty is off
    # Under bf16/fp16 autocast: fp32 runs the estimator's core evaluations in fp32 (accurate);
    # autocast keeps the step's dtype (cheaper; fd loses most digits, see stars/jacobian.py).
    probe_precision: Literal["fp32", "autocast"] = "fp32"
    # stability options (stars/objective.py): P taken this many no-grad iterations past the
    # sampled depth; the progressive loss's weight alpha (Bansal et al. 2022; 0: off)
    probe_beyond: _int(0, _MAX_DEPTH) = 0
    progressive: _float(0.0, 1.0) = 0.0
    # the penalty waits, past warmup_steps, until the mean training CE of the last 50 steps is
    # <= this (None: from warmup_steps on): a penalty that meets a model still on its first loss
    # plateau contracts the map before the loop has learned anything (train/trainer.py)
    warmup_ce: Optional[_float(0.0, _MAX_FLOAT, lo_open=True)] = None

    @model_validator(mode="after")
    def _rules(self) -> "StarsConfig":
        _rule(self.combine != "convex" or self.lam <= 1, "lam", "must be <= 1 with combine: convex")
        return self


@_section
class MixtureItem:
    path: Annotated[Str, Field(min_length=1)] = ""  # a dataset directory
    weight: Scale = 1.0


@_section
class DataConfig:
    kind: Literal["arithmetic", "chains", "shards"] = "arithmetic"
    # rows of one batch over all data-parallel ranks (train.grad_accum batches per optimizer step);
    # each rank's share (batch_size / dp) is split into parallel.microbatches microbatches
    batch_size: Count = 64
    # arithmetic (in-memory generator)
    digits: Digits = 3
    train_size: TrainProblems = 0  # 0: fresh problems every step; else a fixed set
    test_size: TestProblems = 512
    reverse_answer: Bool = True
    reverse_operands: Bool = False  # operands least-significant digit first as well
    # chains (variable-binding chains, data/chains.py): difficulty = lookups the answer needs
    statements: Letters = 12  # binding statements per problem (prompt: 2 * statements + 2 tokens)
    variables: Letters = 16  # variable names drawn from the first `variables` letters
    difficulty: _list(Int64) = field(default_factory=lambda: [1, 4])  # training [lo, hi]
    test_difficulty: _list(Int64) = field(default_factory=lambda: [1, 4])  # test set [lo, hi]
    chains: Chains = 3  # chains per problem (the query's + distractors), rooted at distinct digits
    order: Literal["program", "shuffled"] = "program"  # bound before referenced, or any order
    dense: Bool = False  # chains: training also labels every statement's resolved digit (not just the answer)
    # chains: the distractor chains as long as the query's, the spare statements bound straight to the
    # root digits in turn (no chain-length cue to the answer); needs statements >= chains * difficulty
    matched: Bool = False
    names: Literal["random", "slot"] = "random"  # chains: variable names at random, or statement s binds letter s
    value_first: Bool = False  # chains: statements written `<value><variable>` instead of `<variable><value>`
    # shards (`stars-data prepare` / `stars-data arithmetic` output)
    path: Optional[Str] = None  # one dataset directory (manifest.json + shards)
    mixture: _list(MixtureItem) = field(default_factory=list)  # or several, sampled by weight
    num_workers: _int(0, 1024) = 0
    shuffle_buffer: Steps = 1024
    val_batches: Count = 8  # validation batches (from the val split) per evaluation

    @model_validator(mode="after")
    def _rules(self) -> "DataConfig":
        why = (arithmetic_error(self.digits, self.test_size, self.train_size) if self.kind == "arithmetic" else None) \
            or chains_error(self.statements, self.variables, self.difficulty, self.test_difficulty, self.chains,
                            self.train_size, for_kind=self.kind == "chains", matched=self.matched)
        if why:  # the shared rules name fields from the top (data.x), the section's rules from within it
            raise ValueError(why.removeprefix("data."))
        _rule(self.kind != "shards" or bool(self.path) != bool(self.mixture), "path",
              "data.kind: shards needs exactly one of data.path (a dataset directory) or data.mixture")
        return self


@_section
class OptimConfig:
    lr: Scale = 1e-3
    min_lr_ratio: _float(0.0, 1.0) = 0.1
    weight_decay: _float(0.0, _MAX_FLOAT) = 0.01
    beta1: _float(0.0, 1.0, hi_open=True) = 0.9
    beta2: _float(0.0, 1.0, hi_open=True) = 0.95
    eps: Fraction = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: Steps = 0
    decay_fraction: Fraction = 0.2  # wsd: final fraction of steps spent decaying
    grad_clip: _float(0.0, _MAX_FLOAT) = 1.0


@_section
class TrainConfig:
    steps: Positive = 100
    grad_accum: Positive = 1
    dtype: Literal["fp32", "bf16"] = "fp32"
    checkpointing: Literal["none", "loop", "block"] = "none"
    log_every: Positive = 1
    ckpt_every: Steps = 0  # 0: only at the end
    keep_last: Positive = 2
    eval_every: Steps = 0  # validation accuracy during training (0: off)
    progress: Bool = True
    # CPU runs: keep freed host memory in the process for reuse (glibc mallopt, see
    # stars_scale/train/host_malloc.py) instead of page-faulting it back in every step.
    host_malloc: Literal["tuned", "system"] = "tuned"
    # a checkpoint save that fails (disk full, I/O error) warns and is retried at the next
    # interval; this many failures in a row stop the run
    max_failed_saves: Positive = 3
    # write periodic checkpoints on a background thread (the step goes on; the state is copied
    # first, so each rank holds a second copy of its part while a save is in flight)
    async_save: Bool = False
    # a step whose loss or global gradient norm is not finite is skipped (no update); after
    # max_skips in a row: skip -> stop, rollback -> reload the newest verified checkpoint with the
    # learning rate scaled by rollback_lr_scale, stop -> stop at the first one
    nonfinite: Literal["skip", "rollback", "stop"] = "skip"
    max_skips: Steps = 3
    rollback_lr_scale: Fraction = 0.5
    # torch.compile regions (stars_scale/parallel/compile.py): none | block (each transformer
    # block) | model (the prelude, one loop iteration of the core, the coda + head)
    compile: Literal["none", "block", "model"] = "none"


@_section
class EvalConfig:
    depths: _list(Depth) = field(default_factory=list)  # run the depth sweep at the end of training
    samples: Count = 512
    rho_iters: Iters = 20
    batch_size: Count = 256


@_section
class TrackingConfig:
    mlflow: Bool = True
    tracking_uri: Optional[Str] = None  # None: $MLFLOW_TRACKING_URI or sqlite in the cwd
    experiment: Str = "stars_scale"
    run_name: Optional[Str] = None
    system_metrics: Bool = False  # CPU/GPU/memory/network per node, sampled by MLflow
    system_metrics_interval: _float(0.1, 86400.0) = 10.0
    # true: a run whose MLflow store cannot start is refused; false: it runs untracked and says so once
    required: Bool = False

    @model_validator(mode="after")
    def _rules(self) -> "TrackingConfig":
        _rule(self.mlflow or not self.required, "required", "true needs tracking.mlflow: true")
        _rule(bool(self.experiment.strip()), "experiment", "must be a non-empty name")
        return self


@_section
class InitConfig:
    """Start from converted weights (`stars-convert import ... --out DIR`)."""

    # a converted checkpoint dir (config.yaml + model.safetensors); YAML key `from` (a Python keyword)
    from_: Annotated[Optional[Str], Field(alias="from")] = None
    strict: Bool = True  # the run's model config must equal the converted one


@_section
class ParallelConfig:
    tp: _int(1, 4096) = 1
    pp: _int(1, 4096) = 1
    zero: _int(0, 2) = 0
    microbatches: _int(1, 4096) = 1
    # pp > 1: 1f1b holds about pp microbatches' activations per stage; gpipe all of them
    schedule: Literal["1f1b", "gpipe"] = "1f1b"


@_section
class RunConfig:
    seed: Seed = 0
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
        """Plain data with the YAML key names (`init.from`)."""
        return _RUN.dump_python(self, by_alias=True)


_RUN = TypeAdapter(RunConfig)


# --------------------------------------------------------------------------- errors

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def _short(value: Any) -> str:
    """repr of a user's value, cut to one short line; never expands a big or nested value (a YAML
    alias bomb, a recursive list) before cutting it."""
    r = _REPR.repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


# pydantic's error types, as what the value should have been
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
             "string_too_short": "a non-empty string", "list_type": "a list", "dataclass_type": "a mapping"}
_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


def _yaml_key(name: str) -> str:
    """Field `from_` is YAML key `from` (Python keywords cannot be field names)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _where(loc: tuple) -> str:
    """A pydantic location as the dotted field a user writes: `data.mixture[0].path`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{str(part)[:60]}"
    return out


def _keys_of(loc: tuple) -> list[str]:
    """The YAML keys of the section at `loc`."""
    tp: Any = RunConfig
    for part in loc:
        if isinstance(part, str):
            tp = next(f.type for f in dataclasses.fields(tp) if _yaml_key(f.name) == part)
        while not dataclasses.is_dataclass(tp):  # list[...] and its annotations: the item's section
            tp = typing.get_args(tp)[0]
    return sorted(_yaml_key(f.name) for f in dataclasses.fields(tp))


def _explain(err: dict) -> str:
    """One pydantic error as one line: the field, what was expected, what was given."""
    loc, kind, ctx, value = err["loc"], err["type"], err.get("ctx") or {}, err.get("input")
    where = _where(loc)
    if kind == "value_error":  # a section's rule, naming its field within the section
        return f"{where}.{ctx['error']}" if where else str(ctx["error"])
    if kind in ("unexpected_keyword_argument", "invalid_key"):
        section, key = _where(loc[:-1]), loc[-1]
        shown = key[:60] if isinstance(key, str) else _short(key)
        hint = f"; write it as '{_yaml_key(key)}'" if isinstance(key, str) and _yaml_key(key) != key else ""
        return (f"{section + '.' if section else ''}{shown}: unknown config key (known keys"
                f"{' of ' + section if section else ''}: {', '.join(_keys_of(loc[:-1]))}){hint}")
    if kind in _BOUNDS:
        end, op = _BOUNDS[kind]
        why = f"must be {op} {_num(ctx[end])}, got {_short(value)}"
    elif kind == "literal_error":
        why = f"expected one of {ctx['expected']}, got {_short(value)}"
    else:
        why = f"expected {_EXPECTED[kind]}, got {_short(value)}" if kind in _EXPECTED else err["msg"]
    return f"{where}: {why}" if where else why


# --------------------------------------------------------------------------- parsing


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
    try:
        return _RUN.validate_python(data)
    except ValidationError as e:  # the first problem, in one line (pydantic lists them all, over many)
        raise ConfigError(_explain(e.errors(include_url=False)[0])) from None


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

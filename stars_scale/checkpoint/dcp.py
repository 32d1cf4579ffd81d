"""Distributed checkpoints on `torch.distributed.checkpoint` (DCP), keyed by logical names.

Every rank writes the pieces of the single-device state it holds, under the names and in the
coordinates of the plain one-process `LoopedLM` ("logical"):

    model/<name>                 the weight (fp32 master under ZeRO)
    optim/<name>/exp_avg         AdamW's moments, sharded exactly like the weight
    optim/<name>/exp_avg_sq
    optim/<name>/step            AdamW's step count (a scalar)

A piece is a box (offsets, sizes) of the logical tensor and the local tensor view holding it:
a tensor-parallel shard is one box per `partition_stride` part (vocabulary padding cut off),
a pipeline stage holds its blocks under their full-model indices (`full_name`), and a
ZeRO partition (a flat range of the parameter) is split into at most three boxes per dimension
(part of a row, whole rows, part of a row). Replicas (data parallel, replicated norms) report
the same box and DCP writes it once. DCP's planner matches the saved boxes against the boxes the
loading layout asks for, so a checkpoint loads on any tp × pp × dp × zero layout (resharding).

Safety: DCP's `.metadata` is a pickle and torch's `FileSystemReader` reads it with a bare
`pickle.load`; `SafeReader` reads it with a restricted unpickler that builds only DCP's metadata
classes (anything else is refused in one line), after the checkpoint's sha256 manifest verified.
Tensor data DCP reads with `torch.load(weights_only=True)`; byte entries are refused.
"""
from __future__ import annotations

import contextlib
import io
import math
import pathlib
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from stars_scale.checkpoint.files import RecordingFile, load_tensor_file
from stars_scale.errors import UserError
from stars_scale.model.looped import LoopedLM

DCP_DIR = "dcp"
Box = tuple[tuple[int, ...], tuple[int, ...]]
_CORE = re.compile(r"^core\.(\d+)\.")


# --------------------------------------------------------------------------- logical names


def full_name(local: str, core_offset: int) -> str:
    """The single-device name of a parameter of this rank's part of the model: a pipeline stage's
    core block i is block i + core_offset of the full model; a tensor-parallel layer's `.inner.`
    is dropped."""
    name = local.replace(".inner.", ".")
    return _CORE.sub(lambda m: f"core.{int(m.group(1)) + core_offset}.", name)


def reference_shapes(model_cfg) -> dict[str, torch.Size]:
    """The single-device model's tensors and their shapes (built on the meta device: no memory)."""
    with torch.device("meta"):
        ref = LoopedLM(model_cfg)
    return {k: v.shape for k, v in ref.state_dict().items()}


# --------------------------------------------------------------------------- logical tensors


@dataclass
class ShardSpec:
    """How a local tensor sits in its logical tensor: split along `dim` over `tp` ranks
    (`stride` parts, each split), or whole (dim None)."""

    shape: tuple[int, ...]  # logical
    dim: int | None = None
    stride: int = 1
    tp: int = 1
    tp_rank: int = 0


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The flat range [start, stop) of a C-contiguous tensor of `shape` as boxes, each itself a
    contiguous flat range, in order."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first,) + o, (1,) + s) for o, s in flat_boxes(shape[1:], start - first * inner, stop - first * inner)]
    out: list[Box] = []
    if start % inner:
        out += flat_boxes(shape, start, (first + 1) * inner)
        first += 1
    whole = stop // inner
    if whole > first:
        out.append(((first,) + (0,) * (len(shape) - 1), (whole - first,) + tuple(shape[1:])))
    if stop % inner:
        out += flat_boxes(shape, whole * inner, stop)
    return out


def to_logical(offsets, sizes, view: torch.Tensor, local_shape, spec: ShardSpec) -> list[tuple]:
    """A box of the local tensor (and its view) -> boxes of the logical tensor with their views."""
    if spec.dim is None:
        return [(tuple(offsets), tuple(sizes), view)]
    d = spec.dim
    a, n = offsets[d], sizes[d]
    part = local_shape[d] // spec.stride
    out = []
    for p in range(spec.stride):
        lo, hi = max(a, p * part), min(a + n, (p + 1) * part)
        if lo >= hi:
            continue
        g = (p * spec.tp + spec.tp_rank) * part + (lo - p * part)
        length = min(hi - lo, spec.shape[d] - g)  # vocabulary padding is not logical
        if length <= 0:
            continue
        off, sz = list(offsets), list(sizes)
        off[d], sz[d] = g, length
        out.append((tuple(off), tuple(sz), view.narrow(d, lo - a, length)))
    return out


class Logical:
    """One logical tensor as this rank holds it: boxes of it and the local views (DCP's
    `__create_write_items__` / `__create_chunk_list__` hooks; our planners look the views up)."""

    def __init__(self, shape, dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.pieces: dict[tuple[int, ...], tuple[tuple[int, ...], torch.Tensor]] = {}

    def add(self, offsets, sizes, view: torch.Tensor) -> None:
        self.pieces[tuple(offsets)] = (tuple(sizes), view)

    def add_local(self, t: torch.Tensor, spec: ShardSpec) -> "Logical":
        """The whole local tensor `t` (shaped like the local parameter)."""
        for o, s, v in to_logical((0,) * t.dim(), tuple(t.shape), t, tuple(t.shape), spec):
            self.add(o, s, v)
        return self

    def add_flat(self, frag: torch.Tensor, start: int, local_shape, spec: ShardSpec) -> None:
        """A flat fragment [start, start + numel) of a local tensor of `local_shape` (ZeRO)."""
        strides = torch.empty(local_shape, device="meta").stride()
        for o, s in flat_boxes(tuple(local_shape), start, start + frag.numel()):
            at = sum(i * st for i, st in zip(o, strides)) - start
            view = frag.narrow(0, at, math.prod(s)).view(s)
            for lo, ls, lv in to_logical(o, s, view, local_shape, spec):
                self.add(lo, ls, lv)

    def size(self) -> torch.Size:
        return self.shape

    def copy(self) -> "Logical":
        """The same pieces, copied (an asynchronous save writes them while training goes on)."""
        out = Logical(self.shape, self.dtype)
        out.pieces = {o: (s, v.detach().clone()) for o, (s, v) in self.pieces.items()}
        return out

    def view_at(self, offsets) -> torch.Tensor:
        return self.pieces[tuple(offsets)][1]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, (s, _) in self.pieces.items()]

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        props = TensorProperties(dtype=self.dtype)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(o), torch.Size(s)),
                                                      properties=props, size=self.shape))
                for o, (s, _) in self.pieces.items()]


class _SavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        return self.state_dict[index.fqn].view_at(index.offset).detach().contiguous()


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # the default first maps every value through a tensor-only walk that turns ours into None
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.view_at(index.offset) if isinstance(obj, Logical) else super().lookup_tensor(index)

    def load_bytes(self, read_item, value) -> None:
        raise UserError(f"{read_item.dest_index.fqn}: a pickled object in the checkpoint (only tensors are read)")


# --------------------------------------------------------------------------- safe metadata


def _metadata_classes() -> dict[tuple[str, str], object]:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {}
    for mod, names in ((metadata, ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                   "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                                   "_MEM_FORMAT_ENCODING")),
                       (filesystem, ("_StorageInfo",))):
        for n in names:
            if hasattr(mod, n):
                allowed[(mod.__name__, n)] = getattr(mod, n)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # layout by name
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath  # the checkpoint id DCP records
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for attr in dir(torch):  # dtypes, layouts and memory formats pickle as torch.<name>
        obj = getattr(torch, attr, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", attr)] = obj
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    allowed: dict = {}

    def find_class(self, module: str, name: str):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")
        return obj


def read_metadata(path: Path):
    """DCP's `.metadata` of `path`, unpickled with an allow-list (never runs code)."""
    f = Path(path) / ".metadata"
    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _metadata_classes()
    try:
        md = _MetadataUnpickler(io.BytesIO(f.read_bytes())).load()
    except OSError as e:
        raise UserError(f"{f}: cannot be read ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or hostile pickle
        raise UserError(f"{f}: refused: not a distributed-checkpoint metadata file ({type(e).__name__}: "
                        f"{str(e)[:160]})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise UserError(f"{f}: refused: not a distributed-checkpoint metadata file")
    for info in md.storage_data.values():
        rel = Path(str(getattr(info, "relative_path", "")))
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
            raise UserError(f"{f}: names a data file outside the checkpoint ({str(rel)[:80]!r})")
    return md


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        md = read_metadata(Path(self.path))
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


# --------------------------------------------------------------------------- save / load


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


class _RecordingFS(FileSystem):
    """Files written through `RecordingFile`: torch.save reports a failed write (ENOSPC) only as
    "unexpected pos"; the OSError is kept in `error`."""

    error: OSError | None = None

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        f = RecordingFile(path, mode)
        try:
            with f:
                yield f
        finally:
            self.error = self.error or f.error


class _Writer(dcp.FileSystemWriter):
    def __init__(self, path: Path):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)
        self.fs = _RecordingFS()


def save(state: dict[str, Logical | torch.Tensor], path: Path, group=None) -> None:
    """Collective over `group` (default: the world): every rank writes its pieces of `state`
    under `path` (DCP's files + .metadata)."""
    writer = _Writer(path)
    try:
        with _one_process_quietly():
            dcp.save(state, storage_writer=writer, planner=_SavePlanner(), process_group=group, no_dist=_no_dist())
    except dcp.api.CheckpointException as e:
        err = writer.fs.error or _first_error(e)
        if isinstance(err, OSError) and err.errno:  # ENOSPC, EFBIG, EIO: say what it needed
            rank = 0 if _no_dist() else dist.get_rank()
            need = sum(v.numel() * v.element_size() for x in state.values() for _, v in x.pieces.values())
            raise OSError(err.errno, f"{err.strerror}; writing {path.name}/__{rank}_0.distcp needs about "
                                     f"{need} bytes") from None
        raise err from None


def load(state: dict[str, Logical | torch.Tensor], path: Path) -> None:
    """Collective: fill every rank's pieces of `state` from the checkpoint at `path`."""
    read_metadata(path)  # refuses a hostile or corrupt pickle in one line before DCP reads it
    try:
        with _one_process_quietly():
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=_LoadPlanner(), no_dist=_no_dist())
    except dcp.api.CheckpointException as e:
        err = _first_error(e)
        if isinstance(err, UserError):
            raise err from None
        raise UserError(f"{path}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns at every call without a process group that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_error(e) -> BaseException:
    for failure in getattr(e, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, BaseException):
            return exc
    return RuntimeError(str(e))


# --------------------------------------------------------------------------- the model's logical state


def param_specs(model, model_cfg, tp: int = 1, tp_rank: int = 0, core_offset: int = 0):
    """(logical name, local tensor, ShardSpec) for every tensor of this rank's part of the model
    (parameters and persistent buffers; a tied head is the embedding)."""
    shapes = reference_shapes(model_cfg)
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        logical = full_name(name, core_offset)
        if model_cfg.tie_embeddings and logical == "lm_head.weight":
            continue
        if logical not in shapes:
            raise RuntimeError(f"{name}: no logical tensor {logical}")
        split = getattr(t, "tensor_model_parallel", False) and tp > 1
        spec = ShardSpec(tuple(shapes[logical]), t.partition_dim if split else None,
                         getattr(t, "partition_stride", 1), tp, tp_rank)
        out.append((logical, t, spec))
    return out


def read_model_state(ckpt: Path, model_cfg) -> dict[str, torch.Tensor]:
    """The single-device state dict of a training checkpoint, read in this one process (no
    torchrun): from DCP's shards (any layout), or from the `model.pt` of older checkpoints."""
    ckpt = Path(ckpt)
    if not (ckpt / DCP_DIR).is_dir():
        if not (ckpt / "model.pt").is_file():
            raise UserError(f"{ckpt}: neither {DCP_DIR}/ nor model.pt (not a training checkpoint)")
        return dict(load_tensor_file(ckpt / "model.pt"))
    md = read_metadata(ckpt / DCP_DIR)
    shapes = reference_shapes(model_cfg)
    want = {}
    for name, shape in shapes.items():
        if model_cfg.tie_embeddings and name == "lm_head.weight":
            continue
        m = md.state_dict_metadata.get(f"model/{name}")
        if m is None or not hasattr(m, "size"):
            raise UserError(f"{ckpt / DCP_DIR}: no tensor model/{name} (saved with another model config?)")
        if tuple(m.size) != tuple(shape):
            raise UserError(f"{ckpt / DCP_DIR}: model/{name} has shape {list(m.size)}, the config gives {list(shape)}")
        want[f"model/{name}"] = torch.empty(tuple(shape), dtype=m.properties.dtype)
    load(want, ckpt / DCP_DIR)
    sd = {k[len("model/"):]: v for k, v in want.items()}
    if model_cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    return sd


def read_checkpoint(ckpt: Path):
    """(RunConfig, single-device state dict) of a verified training checkpoint directory."""
    from stars_scale.config import load_config

    run = load_config(Path(ckpt) / "config.yaml")
    return run, read_model_state(ckpt, run.model)

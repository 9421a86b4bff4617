"""The stream cache: the frozen half of a cascade step, computed once per training stream and
shared by every trial that trains on it (issue 21).

Why. The cascade trials of a grid with one seed see the same training stream (data is a pure
function of (seed, step), `cascade.train`), the same frozen negative network N and the same
frozen encoder f. So per step the ground truth p, the hard negative n = N(x)[:, :3] and the loss's
target embeddings f(p), f(n) (`cascade.losses.target_features`) are the same in all of them;
only the anchor's forward, f(anchor) and the backward differ by cell. At the paper's size (ViT-L
at 128 px) that frozen half is ~45 % of a step's FLOPs (docs/performance.md, "Stream cache").

What is stored, per data-parallel rank (`r<rank>of<workers>/`) and shard of SHARD_STEPS steps:
- `<first step>.stream.pt`: p and n of every step of the shard, each with its strides (restored
  when read, so the anchor gets a tensor laid out as in a trial that computed n itself);
- `<first step>.f-<fkey>.pt`: the target embeddings of one encoder and one `target_kind` ("pn":
  f(p) and f(n) of one batched pass, as the loss makes them; "p": f(p) alone, for lambda_ = 1).
The input x is not stored: the anchor's input is n, and no loss term reads x. So a trial whose
shards are all there decodes and synthesises no data and runs neither N nor f's target pass.

Key. `<root>/<key>/` (`stream_spec`, written to `spec.json` there; `features-<fkey>.json` for
`features_spec`) covers everything the stored values depend on, never a path: the seed, crop,
batch size, random-erasing probability and the data's content fingerprint (`data_fingerprint`:
the files the pairs read, by relative path and size, in their order, or the procedural generator's
version); the number of data-parallel workers (each rank's share of the batch is its own batch
composition); the negative's weights as loaded (sha256 of its state dict: a checkpoint or the
procedural base, whichever it came from) and `channels_last`; where and how it is computed
(`compute_spec`: device type and model, CPU capability and thread count, since both change
reduction orders; bf16 autocast as applied, CUDA/cuDNN versions and TF32 flags; package versions)
and the source of the modules that compute the values (`CODE`). The features' key adds the
encoder's name, `encoder_features`, its weights as built (sha256 of its state dict: pretrained,
a local file or random init alike) and the target kind. Bit-identity needs the batch shapes of the
trial's own step: both are stored per rank, per step, as the step computes them.

Sharing and recovery. Every file is written atomically (`cascade.io.atomic_write_bytes`) with a
sha256 of its bytes in its first line. A shard that is missing, short (a trial with fewer steps
wrote it), corrupt or unreadable is (re)built by the trial that needs it, under an exclusive
`cascade.locks.file_lock` per shard, so concurrent trials build each shard once. A trial that finds
a shard locked (another trial is building it) builds the next shard nobody has started meanwhile,
and waits only when none is left: trials that run side by side share the building instead of
queueing behind one. A disk that would have less than MIN_FREE_BYTES free after a write, or a
folder that cannot be written or locked, is not written: the trial keeps what it computed (a
warning says so) and its results do not change. Deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cascade.io import atomic_write_bytes, atomic_write_json, cache_dir, digest
from cascade.locks import file_lock
from cascade.losses import CascadeLoss, target_kind
from cascade.machine import cpu_model, package_version

log = logging.getLogger(__name__)

# Bump when what a shard holds changes, or which samples a step of a rank takes (step s: indices
# s*B .. s*B+B-1, rank r of W the r-th of every W: cascade.data.batches.step_indices, DataParallel.shard).
STREAM_VERSION = 1
SHARD_STEPS = 10  # steps per shard file: 31 MB per shard at the paper's 128 px, batch 8, fp32
MIN_FREE_BYTES = 1 << 30  # never leave the cache's disk with less than this free
# The modules whose code computes the stored values (N, f, the data); their source is in the key.
CODE = ("uformer.py", "model.py", "encoders.py", "demo_encoder.py", "losses.py", "stream_cache.py",
        "data/synthetic.py", "data/flare7k.py", "data/erasing.py", "data/images.py")
PACKAGES = ("torchvision", "timm", "numpy", "pillow")
_MAGIC = b"flaresweep-stream-shard"
_UNSHARED = object()  # _try_lock: the folder cannot be locked (read-only, ...)

Batches = Callable[[range], Iterator[tuple[Tensor, Tensor, Tensor]]]
"""This rank's (input, gt, flare) of each step in a range, on the trial's device (cascade.train)."""


class StreamStep(NamedTuple):
    """One step's frozen half on the trial's device: gt `(b, 3, S, S)` in [0, 1], the negative's
    output `(b, 3, S, S)` (a trial's `negative(x)[:, :3]`, strides included) and the target
    embeddings (`(2b, ...)`, `(b, ...)` or None, `cascade.losses.target_features`); b = the
    rank's share of the batch."""

    gt: Tensor
    negative: Tensor
    targets: Tensor | None


class FrozenHalf:
    """What no trial's training changes, computed as the trainer's step computes it.

    `negative`: the frozen, eval-mode network N; `criterion`: the trial's loss (its encoder,
    lambda_ and delta say which target embeddings exist); `bf16`: the step's autocast.
    """

    def __init__(self, negative: nn.Module, criterion: CascadeLoss, bf16: bool,
                 channels_last: bool) -> None:
        self.negative, self.criterion = negative, criterion
        self.bf16, self.channels_last = bool(bf16), bool(channels_last)
        self.kind = target_kind(criterion.lambda_, criterion.delta)

    def __call__(self, inp: Tensor, gt: Tensor) -> tuple[Tensor, Tensor | None]:
        """(n, targets) of one step: inp, gt `(b, 3, S, S)` in [0, 1]; n = N(inp)[:, :3]."""
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(inp.device.type, torch.bfloat16, enabled=self.bf16):
            with torch.no_grad():  # the negative is fixed: no graph
                neg = self.negative(inp)[:, :3]
            targets = self.criterion.targets(gt, neg.float())
        return neg, targets

    def targets(self, gt: Tensor, neg: Tensor) -> Tensor | None:
        """The target embeddings of a step whose gt and n are known (as `__call__` makes them)."""
        with torch.autocast(gt.device.type, torch.bfloat16, enabled=self.bf16):
            return self.criterion.targets(gt, neg.float())


# -- the key ----------------------------------------------------------------------------------------


def module_digest(module: nn.Module | None) -> str | None:
    """16 hex digits of sha256 over a module's state dict (names, dtypes, shapes, bytes), layout-
    independent (values in standard order); None for None. ViT-L (303 M values): ~1 CPU-s."""
    if module is None:
        return None
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _files_digest(paths: list[Path], root: str | os.PathLike) -> str:
    """`<count>:<digest>` of (path relative to root, size) of each file, in the given order."""
    base = Path(root).expanduser().resolve()
    entries = []
    for p in paths:
        real = Path(p).expanduser().resolve()
        entries.append([real.relative_to(base).as_posix() if real.is_relative_to(base) else real.name,
                        real.stat().st_size])
    return f"{len(entries)}:{digest(entries, 16)}"


def data_fingerprint(pairs: Any, data: str | None, backgrounds: str | None) -> dict[str, Any]:
    """What the training pairs are made from, by content: for Flare7K (`Flare7KPairs`) the loader
    and its settings and every file it reads (relative path and size, in the order it indexes
    them); for the procedural stream its generator version and settings."""
    if hasattr(pairs, "sets"):  # cascade.data.flare7k.Flare7KPairs
        flares = [p for s in pairs.sets for p in (*s.flares, *(s.lights or ()))]
        return {"loader": pairs.loader, "synth_size": pairs.synth_size,
                "reflective": pairs.reflective, "flips": pairs.flips,
                "flares": _files_digest([*flares, *pairs.reflective_files], data),
                "backgrounds": _files_digest(list(pairs.backgrounds), backgrounds)}
    from cascade.data import synthetic

    return {"loader": "procedural", "generator": synthetic.GENERATOR, "split": pairs.split,
            "frame": pairs.frame, "n_psf": pairs.n_psf,
            "natural_fraction": pairs.natural_fraction, "ghosts": pairs.ghosts}


@functools.cache
def code_digest() -> str:
    """16 hex digits of sha256 over the source of the modules in CODE."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for rel in CODE:
        h.update(rel.encode() + b"\0" + (package / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def compute_spec(device: torch.device, bf16: bool) -> dict[str, Any]:
    """Where and how the values are computed: everything besides the inputs that changes their
    bits (device model, kernels' capability, CPU threads, autocast, TF32, library versions)."""
    spec: dict[str, Any] = {
        "device": device.type, "autocast": "bf16" if bf16 else None, "torch": torch.__version__,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "packages": {name: package_version(name) for name in PACKAGES}}
    if device.type == "cuda":
        spec.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:  # CPU kernels pick their vector width and split reductions over threads
        spec.update(name=cpu_model(), capability=torch.backends.cpu.get_cpu_capability(),
                    threads=torch.get_num_threads())
    return spec


def stream_spec(cfg: Any, pairs: Any, negative: nn.Module, device: torch.device,
                bf16: bool) -> dict[str, Any]:
    """What p and n of every step depend on (the folder's key; see the module docstring).
    `cfg`: the trial's TrialConfig; `pairs`: its training pairs (`cascade.data.batches.build_pairs`)."""
    return {
        "version": STREAM_VERSION, "shard_steps": SHARD_STEPS,
        "data": {"seed": cfg.seed, "crop": cfg.crop, "batch_size": cfg.batch_size,
                 "random_erasing": cfg.random_erasing,
                 # where the box goes changes gt too; absent without erasing (keys stay as they were)
                 **({"random_erasing_on": cfg.random_erasing_on} if cfg.random_erasing else {}),
                 "source": data_fingerprint(pairs, cfg.data, cfg.backgrounds)},
        "sharding": {"workers": cfg.workers},
        "negative": {"weights": module_digest(negative), "channels_last": cfg.channels_last},
        "compute": compute_spec(device, bf16),
        "code": code_digest(),
    }


def features_spec(cfg: Any, encoder: nn.Module | None, kind: str | None) -> dict[str, Any] | None:
    """What the target embeddings depend on besides p and n (None: the loss needs none)."""
    if kind is None:
        return None
    return {"kind": kind, "encoder": cfg.encoder, "features": cfg.encoder_features,
            "weights": module_digest(encoder)}


def stream_root(cfg: Any) -> Path:
    """Where a trial's stream caches live: `stream_cache_dir`, else `<cache>/stream`."""
    if cfg.stream_cache_dir:
        return Path(cfg.stream_cache_dir).expanduser().resolve()
    return cache_dir(cfg.base_cache) / "stream"


# -- shard files ------------------------------------------------------------------------------------


def _pack(start: int, key: str, **columns: list[Tensor]) -> dict[str, Any]:
    """A shard: for each column, its steps stacked on the CPU `(n, ...)` and the strides of one step's
    tensor on the device it was computed on."""
    out: dict[str, Any] = {"version": STREAM_VERSION, "key": key, "start": start,
                           "count": len(next(iter(columns.values())))}
    for name, tensors in columns.items():
        out[name] = torch.stack([t.detach().cpu() for t in tensors])
        out[f"{name}_stride"] = list(tensors[0].stride())
    return out


def _restore(shard: dict[str, Any], name: str, j: int, device: torch.device) -> Tensor:
    """Step j of column `name` on `device`, with the strides it had when it was computed."""
    values = shard[name][j]
    out = torch.empty_strided(tuple(values.shape), tuple(shard[f"{name}_stride"]),
                              dtype=values.dtype, device=device)
    return out.copy_(values)


def _encode(obj: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    return _MAGIC + b" " + hashlib.sha256(data).hexdigest().encode() + b"\n" + data


def _decode(blob: bytes) -> dict[str, Any] | None:
    """The shard in a file's bytes, or None when its checksum or contents are wrong."""
    head, sep, data = blob.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 2 or parts[0] != _MAGIC:
        return None
    if hashlib.sha256(data).hexdigest().encode() != parts[1]:
        return None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable shard is rebuilt, whatever the reason
        return None
    return obj if isinstance(obj, dict) else None


class StreamCache:
    """One rank's shards of one stream: `steps(start, stop)` yields each step's `StreamStep`,
    reading shards that exist and building (and writing) those that do not.

    folder: `<root>/<key>`; spec / features: `stream_spec` / `features_spec` (written beside the
    shards for people; the key is their digest); frozen: computes a step's n and targets;
    batches: this rank's data of a range of steps (only called to build a shard).
    """

    def __init__(self, root: str | os.PathLike, spec: dict[str, Any], features: dict[str, Any] | None,
                 frozen: FrozenHalf, batches: Batches, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> None:
        self.key = digest(spec, 16)
        self.fkey = digest(features, 12) if features is not None else None
        self.folder = Path(root) / self.key
        self.dir = self.folder / f"r{rank}of{world_size}"
        self.frozen, self.batches, self.device = frozen, batches, device
        self.built_steps = self.read_steps = 0
        self._built: set[int] = set()  # shards this process built (read back later: not "read")
        self._warned: set[str] = set()
        try:
            if not (self.folder / "spec.json").is_file():
                atomic_write_json(self.folder / "spec.json", spec)
            if features is not None and not (self.folder / f"features-{self.fkey}.json").is_file():
                atomic_write_json(self.folder / f"features-{self.fkey}.json", features)
        except OSError as exc:
            self._warn("write", f"stream cache {self.folder}: cannot write there ({exc}); this "
                                "trial computes every step itself")

    @classmethod
    def for_trial(cls, cfg: Any, negative: nn.Module, criterion: CascadeLoss, pairs: Any,
                  batches: Batches, device: torch.device, bf16: bool, rank: int = 0,
                  world_size: int = 1) -> StreamCache:
        """The cache of a trial's stream (`cfg` a TrialConfig) under `stream_root(cfg)`."""
        frozen = FrozenHalf(negative, criterion, bf16, cfg.channels_last)
        spec = stream_spec(cfg, pairs, negative, device, bf16)
        features = features_spec(cfg, criterion.encoder, frozen.kind)
        return cls(stream_root(cfg), spec, features, frozen, batches, device, rank, world_size)

    # -- reading ------------------------------------------------------------------------------------
    def steps(self, start: int, stop: int) -> Iterator[StreamStep]:
        """StreamStep of each step in [start, stop), in order."""
        for i in range(start // SHARD_STEPS, math.ceil(stop / SHARD_STEPS)):
            first = i * SHARD_STEPS
            stream, feats = self._shard(i, stop)
            for j in range(max(start, first) - first, min(stop, first + SHARD_STEPS) - first):
                yield StreamStep(_restore(stream, "gt", j, self.device),
                                 _restore(stream, "negative", j, self.device),
                                 _restore(feats, "targets", j, self.device) if feats else None)

    def present(self, i: int) -> bool:
        """Whether shard i's files exist (not checked: `steps` verifies what it reads)."""
        return self._stream_path(i).is_file() and (
            self.fkey is None or self._features_path(i).is_file())

    def _stream_path(self, i: int) -> Path:
        return self.dir / f"{i * SHARD_STEPS:07d}.stream.pt"

    def _features_path(self, i: int) -> Path:
        return self.dir / f"{i * SHARD_STEPS:07d}.f-{self.fkey}.pt"

    def _lock_path(self, i: int) -> Path:
        return self.dir / f"{i * SHARD_STEPS:07d}.lock"

    def _shard(self, i: int, stop: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Shard i, holding its steps below `stop` (the trial's last step + 1): read, or built
        under its lock; while another trial builds it, this one builds a later one."""
        need = min(SHARD_STEPS, stop - i * SHARD_STEPS)
        while True:
            stream, feats = self._load(i, need)
            if stream is not None and (feats is not None or self.fkey is None):
                self.read_steps += 0 if i in self._built else need
                return stream, feats
            lock = self._try_lock(i)
            if lock is _UNSHARED:
                return self._build(i, need, stream, write=False)
            if lock is not None:
                with lock:
                    stream, feats = self._load(i, need)  # it may have appeared meanwhile
                    if stream is not None and (feats is not None or self.fkey is None):
                        self.read_steps += 0 if i in self._built else need
                        return stream, feats
                    return self._build(i, need, stream)
            if not self._build_ahead(i, stop):
                with file_lock(self._lock_path(i)):  # wait for the trial building it
                    pass

    def _build_ahead(self, i: int, stop: int) -> bool:
        """Build the first shard after i (below `stop`) that nobody has built or started; False
        when there is none. Its steps are built once, by whoever gets there first, and read by
        this trial when it gets there: no step is computed twice, no trial idles while one is
        left."""
        for j in range(i + 1, math.ceil(stop / SHARD_STEPS)):
            if self.present(j):
                continue
            lock = self._try_lock(j)
            if lock is None or lock is _UNSHARED:
                continue
            with lock:
                need = min(SHARD_STEPS, stop - j * SHARD_STEPS)
                stream, feats = self._load(j, need)
                if stream is None or (feats is None and self.fkey is not None):
                    self._build(j, need, stream)
            return True
        return False

    def _try_lock(self, i: int) -> Any:
        """Shard i's lock held (an ExitStack to close), None when another process holds it, or
        _UNSHARED when this folder cannot be locked."""
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(file_lock(self._lock_path(i), blocking=False))
        except BlockingIOError:
            return None
        except OSError as exc:
            self._warn("write", f"stream cache {self.folder}: cannot lock or write there ({exc}); "
                                "this trial computes every step itself")
            return _UNSHARED
        return stack

    def _load(self, i: int, need: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(stream part, features part) of shard i, each None unless present, intact and >= need
        steps long."""
        stream = self._read(self._stream_path(i), self.key, i, need, ("gt", "negative"))
        feats = (self._read(self._features_path(i), self.fkey, i, need, ("targets",))
                 if stream is not None and self.fkey is not None else None)
        return stream, feats

    def _read(self, path: Path, key: str | None, i: int, need: int,
              columns: tuple[str, ...]) -> dict[str, Any] | None:
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("stream cache: cannot read %s (%s); computing it", path, exc)
            return None
        shard = _decode(blob)
        count = shard.get("count") if shard is not None else None
        if (shard is None or shard.get("version") != STREAM_VERSION or shard.get("key") != key
                or shard.get("start") != i * SHARD_STEPS or not isinstance(count, int)
                or any(not isinstance(shard.get(c), Tensor) or shard[c].shape[0] != count
                       or not isinstance(shard.get(f"{c}_stride"), list) for c in columns)):
            log.warning("stream cache: %s is corrupt; computing it again", path)
            return None
        return shard if count >= need else None  # short: written by a trial with fewer steps

    # -- building -----------------------------------------------------------------------------------
    def _build(self, i: int, need: int, stream: dict[str, Any] | None, write: bool = True
               ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Compute shard i (`need` steps; its stream part reused when given) and write it."""
        first = i * SHARD_STEPS
        targets: list[Tensor | None] = []
        if stream is None:
            gts, negs = [], []
            for inp, gt, _flare in self.batches(range(first, first + need)):
                neg, t = self.frozen(inp, gt)
                gts.append(gt)
                negs.append(neg)
                targets.append(t)
            if len(gts) != need:
                raise RuntimeError(f"stream cache: {len(gts)} batches for {need} steps")
            stream = _pack(first, self.key, gt=gts, negative=negs)
            if write:
                self._write(self._stream_path(i), stream)
        else:  # p and n are stored: only the embeddings, from them as the step computed them
            n = stream["count"]
            targets = [self.frozen.targets(_restore(stream, "gt", j, self.device),
                                           _restore(stream, "negative", j, self.device))
                       for j in range(n)]
        feats = None
        if self.fkey is not None:
            assert all(t is not None for t in targets)
            feats = _pack(first, self.fkey, targets=targets)
            if write:
                self._write(self._features_path(i), feats)
        self.built_steps += need
        self._built.add(i)
        return stream, feats

    def _write(self, path: Path, shard: dict[str, Any]) -> None:
        blob = _encode(shard)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(path.parent).free
            if free - len(blob) < MIN_FREE_BYTES:
                self._warn("disk", f"stream cache {self.folder}: {free / 2**30:.1f} GiB free, "
                                   f"{MIN_FREE_BYTES / 2**30:.1f} GiB must stay free; not writing "
                                   "shards (this trial computes the rest itself)")
                return
            atomic_write_bytes(path, blob)
        except OSError as exc:
            self._warn("write", f"stream cache {self.folder}: cannot write {path.name} ({exc}); "
                                "this trial computes the rest itself")

    def _warn(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)

    def stats(self) -> dict[str, Any]:
        """What this rank did: the folder, the steps it computed (all of a shard's, or only the
        embeddings of one whose p and n were there) and the steps it read that others built."""
        return {"dir": str(self.folder), "built_steps": self.built_steps,
                "read_steps": self.read_steps}

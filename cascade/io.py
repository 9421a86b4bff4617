"""Files on disk, one rule each: atomic writes, the cache folder, hashes, strict YAML and
image-folder listing and pairing. Standard library and PyYAML only (no torch): `sweep.py status`
and the reports use it too.

- Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half. Every
  result, checkpoint and report is written through `atomic_*`: the bytes go to a temporary file in
  the destination folder, are flushed and fsync'd, then renamed over the target.
- Locks live in `cascade.locks` (`file_lock`: flock on local disks, a lease on network ones).
- `digest`: the stable short hash behind trial ids and cache keys.
- `parse_yaml`: the one YAML reading (duplicate keys rejected, `1e-3` is a float).
- `list_images` / `pair_images`: the one listing of an image folder and the one pairing of
  input/gt/mask/prediction folders by file stem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cascade.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on clean exit rename it onto `path`, else delete it.

    Use for writers that want a file name (torch.save, DataFrame.to_csv, matplotlib savefig).
    `suffix` lets writers that infer the format from the extension see the right one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename publishes them
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once at import, before threads start
    os.umask(mask)
    return mask


UMASK = _read_umask()
"""The process umask, read once at import: new files get mode 0o666 & ~UMASK, like open()."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


# Image files every reader of a folder accepts (infer, evaluate, test sets, Flare7K, reports).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder` (suffix in IMAGE_SUFFIXES, any case; hidden files
    skipped), sorted by name. The folder must exist; callers check and word their own errors."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# -- cache folder, hashes ----------------------------------------------------------------------------


def cache_dir(override: str | None = None) -> Path:
    """Where procedural bases and test sets are cached: `override` (a trial's `base_cache`), else
    `$FLARESWEEP_CACHE`, else the repo's `.cache/` for a source checkout, else
    `~/.cache/flaresweep`. Always absolute (Ray trials run in their own working directory)."""
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get("FLARESWEEP_CACHE"):
        return Path(os.environ["FLARESWEEP_CACHE"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache"
    return Path.home() / ".cache" / "flaresweep"



def digest(obj: Any, n: int = 12) -> str:
    """First `n` hex digits of the sha256 of `obj` as compact, key-sorted JSON (ids, cache keys).

    The encoding is fixed: trial ids and cache folders already on disk depend on it.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


# -- strict YAML -------------------------------------------------------------------------------------

# A decimal number, with or without a fraction or an exponent: `1e-3`, `2E-4`, `.5`, `3`. PyYAML
# follows YAML 1.1, where a float needs a dot and a signed exponent, so it reads `1e-3` as the
# string "1e-3"; `parse_yaml` reads such literals as floats, and TrialConfig accepts them as
# numbers where they arrive as strings (from another YAML reader, or JSON).
FLOAT_LITERAL = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\Z")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads FLOAT_LITERAL scalars YAML 1.1 leaves as
    strings (`1e-3`) as floats."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    for key in keys:
        if keys.count(key) > 1:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
# Consulted after SafeLoader's own resolvers, so ints, YAML 1.1 floats, .inf and .nan keep theirs.
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_LITERAL, list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    """Parse YAML (or JSON, a subset) strictly: a key given twice is an error, `1e-3` a float.

    Raises yaml.YAMLError (a duplicate key: ConstructorError, `problem` "duplicate key 'x'");
    callers turn it into a UserError naming their file.
    """
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


# -- image folders -----------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """`image_files(folder)`, refusing what no reader can use; `what` names the folder's role in
    the messages ("folder", "input folder"). UserError "<folder>: no such <what>", "<folder>: no
    images (...)" or, for `a.png` beside `a.jpg`, "... have the same stem": outputs are named and
    folders paired by stem, so one of them would be lost."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{path}: no such {what}")
    files = image_files(path)
    if not files:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this {what}")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise UserError(f"{path}: {seen[f.stem].name} and {f.name} have the same stem {f.stem!r}; "
                            "keep one (files are paired and named by stem)")
        seen[f.stem] = f
    return files


# File-name prefixes dropped when pairing folders, by folder role: Flare7K(++) names its test files
# input_000000.png, gt_000000.png, mask_000000.png; prediction folders come from many tools.
PAIR_PREFIXES = {
    "input": ("input",),
    "gt": ("gt",),
    "mask": ("mask",),
    "pred": ("pred", "output", "deflare", "blend", "flare", "input", "gt", "mask"),
}


def pair_key(path: str | os.PathLike, role: str) -> str:
    """Pairing key of an image file in a folder of `role` (a PAIR_PREFIXES key; any other role
    drops its own name): its stem without a leading `<prefix>_`, e.g. gt_000001 -> 000001."""
    stem = Path(path).stem
    for prefix in PAIR_PREFIXES.get(role, (role,)):
        if stem.startswith(prefix + "_") and len(stem) > len(prefix) + 1:
            return stem[len(prefix) + 1:]
    return stem


def pair_images(listed: Mapping[str, Sequence[Path]]) -> dict[str, dict[str, Path]]:
    """role -> {pairing key: file}, for folders listed by role (e.g. input, gt, mask).

    The one pairing rule: when every folder holds the same stems, the stems are the keys;
    otherwise each file's key is `pair_key(file, role)`. Never by sort order (Flare7K's evaluation
    globbed each folder separately and could mis-pair). Two files of one folder with one key are a
    UserError; which keys lack a partner is for the caller to say, in its own words.
    """
    stems = [{p.stem for p in files} for files in listed.values()]
    exact = all(s == stems[0] for s in stems)
    keyed: dict[str, dict[str, Path]] = {}
    for role, files in listed.items():
        keyed[role] = {}
        for path in files:
            key = path.stem if exact else pair_key(path, role)
            if key in keyed[role]:
                raise UserError(f"{path.parent}: {keyed[role][key].name} and {path.name} pair as {key!r}; "
                                "pairing would be ambiguous")
            keyed[role][key] = path
    return keyed

"""What a result is bound to: a training identity and an evaluation identity, from contents.

A trial's folder is named by its *training identity*: the TrialConfig fields that determine the
trained weights (`training_fields()`: loss, optimiser, data settings, base architecture, encoder,
seed, ...) plus *content fingerprints* of the files it reads, never their paths:

- checkpoint / encoder weights: sha256 of the file (cached by real path + size + mtime_ns + inode
  in `<cache>/fingerprints.json`, so a 300 MB file is hashed once and an in-place edit is seen);
- Flare7K data and backgrounds: sorted relative paths and sizes of every image file (the
  scattering/reflective flares, light sources and backgrounds; `test_data/` excluded) — cheap, and
  it changes when a file is added, removed, renamed or resized;
- the procedural default: the generator's version and the fixed seeds of base and test set.

An evaluation of those weights has an *evaluation identity*: the training identity plus the fields
only the evaluation reads (`config.EVAL_FIELDS`: protocol, SSIM window, test set, ...) and the
test set's content fingerprint (sha256 of every input/gt/mask file). Moving a mount changes
neither; replacing a file's content changes it. The code version is recorded beside results
(orchestrator.provenance), never hashed into an identity.

Torch-free: `status` and `table1` compute identities too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cascade import config
from cascade.config import TrialConfig
from cascade.errors import UserError
from cascade.io import IMAGE_SUFFIXES, atomic_write_json, cache_dir, digest, read_json
from cascade.locks import file_lock

FINGERPRINT_VERSION = 1  # bump when what a fingerprint covers changes
_CHUNK = 1 << 20
# In-process memo: a driver computes the same fingerprints for every cell of a space.
_FILE_MEMO: dict[tuple[str, int, int, int], str] = {}
_TREE_MEMO: dict[tuple[str, bool, tuple[str, ...]], str] = {}


def _eval_class() -> tuple[str, ...]:
    return getattr(config, "EVAL_FIELDS", ("protocol", "ssim_window", "test_data", "n_test",
                                           "test_size", "n_samples"))


def eval_fields() -> tuple[str, ...]:
    """Fields only the evaluation reads (config.EVAL_FIELDS), minus the path ones."""
    return tuple(f for f in _eval_class() if f not in config.PATH_FIELDS)


def training_fields() -> tuple[str, ...]:
    """Fields that determine a trial's trained weights: the id fields but evaluation and paths."""
    skip = set(_eval_class()) | set(config.PATH_FIELDS)
    return tuple(f for f in config.ID_FIELDS if f not in skip)


# -- fingerprints -----------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, *, memo: bool = True) -> str:
    """sha256 of a file's bytes, cached by (real path, size, mtime_ns, inode).

    UserError naming the file when it is missing or unreadable.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise UserError(f"{path}: cannot fingerprint it ({exc.strerror or exc})") from None
    key = (real, st.st_size, st.st_mtime_ns, st.st_ino)
    if memo and key in _FILE_MEMO:
        return _FILE_MEMO[key]
    cache = cache_dir() / "fingerprints.json"
    entry = _read_cache(cache).get(real)
    if (isinstance(entry, dict) and entry.get("sha256")
            and (entry.get("size"), entry.get("mtime_ns"), entry.get("inode")) == key[1:]):
        sha = entry["sha256"]
    else:
        h = hashlib.sha256()
        try:
            with open(real, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
        except OSError as exc:
            raise UserError(f"{path}: cannot fingerprint it ({exc.strerror or exc})") from None
        sha = h.hexdigest()
        try:
            with file_lock(cache.with_suffix(".lock")):
                entries = _read_cache(cache)
                entries[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
                                 "sha256": sha}
                atomic_write_json(cache, entries)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    _FILE_MEMO[key] = sha
    return sha


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        entries = read_json(path)
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _image_files(root: Path, exclude: tuple[str, ...]) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (rel / d).as_posix() not in exclude)
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(folder) / name


def tree_fingerprint(root: str | os.PathLike, *, contents: bool = False,
                     exclude: tuple[str, ...] = (), memo: bool = True) -> str:
    """Digest of the image files under `root` (relative paths and sizes; with `contents`, their
    sha256 too). `exclude`: relative sub-folders to skip. UserError when `root` is no folder."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise UserError(f"{root}: cannot fingerprint it (no such folder)")
    key = (os.path.realpath(root_path), contents, exclude)
    if memo and key in _TREE_MEMO:
        return _TREE_MEMO[key]
    entries = []
    for path in _image_files(root_path, exclude):
        rel = path.relative_to(root_path).as_posix()
        try:
            entry = [rel, path.stat().st_size]
        except OSError as exc:
            raise UserError(f"{path}: cannot fingerprint it ({exc.strerror or exc})") from None
        if contents:
            entry.append(file_sha256(path, memo=memo))
        entries.append(entry)
    if not entries:
        raise UserError(f"{root}: cannot fingerprint it (no image files)")
    result = f"{len(entries)}:{digest(entries, 16)}"
    _TREE_MEMO[key] = result
    return result


def procedural_versions() -> dict[str, Any]:
    """What the procedural default's pixels and base depend on besides the config fields."""
    from cascade.versions import PROCEDURAL

    return dict(PROCEDURAL)


def training_inputs(cfg: TrialConfig, *, memo: bool = True) -> dict[str, Any]:
    """Content fingerprints of everything a trial's training reads (None where not used)."""
    out: dict[str, Any] = {"version": FINGERPRINT_VERSION}
    out["checkpoint"] = file_sha256(cfg.checkpoint, memo=memo) if cfg.checkpoint else None
    out["encoder_weights"] = (file_sha256(cfg.encoder_weights, memo=memo)
                              if cfg.encoder_weights else None)
    out["data"] = (tree_fingerprint(cfg.data, exclude=("test_data",), memo=memo)
                   if cfg.data else None)
    out["backgrounds"] = tree_fingerprint(cfg.backgrounds, memo=memo) if cfg.backgrounds else None
    out["procedural"] = procedural_versions() if cfg.data is None or cfg.checkpoint is None else None
    demo = demo_encoder_version(cfg)
    if demo is not None:  # only then: the ids of trials that read their encoder file stay as they were
        out["demo_encoder"] = demo
    return out


def demo_encoder_version(cfg: TrialConfig) -> dict[str, Any] | None:
    """The demo encoder's version when the trial builds its weights (cascade.demo_encoder) rather
    than reading a file: its weights are then a function of that version and the generator."""
    from cascade.versions import DEMO_ENCODER

    built = cfg.encoder == DEMO_ENCODER["name"] and cfg.encoder_pretrained and not cfg.encoder_weights
    return dict(DEMO_ENCODER) | {"generator": procedural_versions()["generator"]} if built else None


def test_set_path(cfg: TrialConfig) -> str | None:
    """The real test folder a config evaluates on (None: the procedural test set)."""
    return config.real_test_dir(cfg)


def evaluation_inputs(cfg: TrialConfig, *, memo: bool = True) -> dict[str, Any]:
    """Content fingerprints of everything the evaluation reads besides the trained weights."""
    test = test_set_path(cfg)
    weights = getattr(cfg, "lpips_weights", None)
    return {"version": FINGERPRINT_VERSION,
            "test_data": tree_fingerprint(test, contents=True, memo=memo) if test else None,
            "procedural_test": None if test else procedural_versions(),
            "lpips_weights": file_sha256(weights, memo=memo) if weights else None}


def training_key(cfg: TrialConfig, inputs: dict[str, Any]) -> str:
    """12 hex digits over the training fields and the training inputs' fingerprints (fields that
    are inert in this config, `config.inert_fields`, left out)."""
    values, inert = cfg.to_dict(), config.inert_fields(cfg)
    return digest({"fields": {f: values[f] for f in training_fields() if f not in inert},
                   "inputs": inputs})


def evaluation_key(train_key: str, cfg: TrialConfig, inputs: dict[str, Any]) -> str:
    """12 hex digits over the training key, the evaluation fields and the evaluation inputs
    (inert fields left out, as in `training_key`)."""
    values, inert = cfg.to_dict(), config.inert_fields(cfg)
    return digest({"training": train_key,
                   "fields": {f: values[f] for f in eval_fields() if f not in inert},
                   "inputs": inputs})


def describe(fingerprints: dict[str, Any]) -> str:
    """Compact JSON of a fingerprint dict, for tables and messages."""
    return json.dumps(fingerprints, sort_keys=True, separators=(",", ":"))

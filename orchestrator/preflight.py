"""Checks before a sweep writes anything: inputs, the Ray address, folders, shared storage, and
where trials can run (one rank per whole GPU; a trial that fits no node is refused).

Each check refuses with one `UserError` naming what is wrong, so a refused run leaves the results
folder as it was. The test-set and checkpoint checks import cascade's torch modules when they run
(never at import: `status` and `table1` must not pay for torch).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cascade.config import TrialConfig, check_base_kind
from cascade.errors import UserError
from cascade.locks import NETWORK_FS, on_network_fs

# File systems a multi-node cluster can share (from /proc/mounts); anything else counts as local.
SHARED_FS = NETWORK_FS


def check_inputs(configs: Iterable[TrialConfig]) -> None:
    """Test sets are read in full (stems, decodable images, mask colours); checkpoints must be
    Uformers with 3 or 6 output channels, and 6 for `base_kind: flare7kpp` (a Flare7K++ network
    predicts the flare too); an `lpips_weights` file must exist (its contents are read by the
    trial, before it writes anything)."""
    from cascade.data.testset import PairedTestSet
    from cascade.uformer import infer_arch, read_state_dict

    configs = list(configs)
    for path in dict.fromkeys(c.test_data for c in configs if c.test_data):
        PairedTestSet(path)
    for path in dict.fromkeys(c.lpips_weights for c in configs if c.lpips_weights):
        if not Path(path).is_file():
            raise UserError(f"lpips_weights={path}: no such file (a torchvision AlexNet state dict)")
    kinds: dict[str, set[str | None]] = {}
    for c in configs:
        if c.checkpoint:
            kinds.setdefault(c.checkpoint, set()).add(c.base_kind)
    for path, base_kinds in kinds.items():
        output_ch = infer_arch(read_state_dict(path), where=str(path))["output_ch"]
        if output_ch not in (3, 6):
            raise UserError(f"{path}: a Uformer with {output_ch} output channels; expected 3 "
                            "(deflared image) or 6 (deflared image + flare)")
        for base_kind in sorted(base_kinds, key=str):
            check_base_kind(path, base_kind, output_ch)


def check_run(sweep_dir: Path, storage: str | None, address: str | None, timeout_s: float) -> None:
    """The Ray address answers (when given); the results and a local storage folder can be written."""
    if address:
        probe(address, timeout_s)
    folders = [("--results", sweep_dir)]
    if storage and "://" not in storage:
        folders.append(("--storage", Path(storage).expanduser().resolve()))
    check_folders(folders)


def check_folders(folders: Iterable[tuple[str, Path]]) -> None:
    """Each (flag, folder) must exist as a writable folder or be creatable."""
    for flag, folder in folders:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"{flag} {folder}: cannot create it, {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {folder}: {existing} is not writable")


def probe(address: str, timeout_s: float) -> None:
    """Fail fast when nothing listens at a host:port Ray address ("auto" is left to Ray)."""
    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout_s, 10.0)):
            pass
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach Ray at RAY_ADDRESS={address} ({exc}); start the cluster "
                        "(`ray start --head`) or unset RAY_ADDRESS to run locally") from None


def check_shared(n_nodes: int, storage: str, sweep_dir: Path, trusted: bool) -> None:
    """On more than one node, Ray's storage and the results folder must be on a shared file
    system (or a URI for the storage); `trusted` (--shared-storage) skips the check."""
    if n_nodes <= 1 or trusted:
        return
    for what, path in (("--storage", storage), ("the results folder (--results)", str(sweep_dir))):
        if "://" not in path and not on_shared_fs(Path(path)):
            raise UserError(
                f"the Ray cluster has {n_nodes} nodes but {what} {path} is on a local disk; "
                "trials on other nodes could not write there. Use shared storage (an NFS path, "
                "or s3://... for --storage), or pass --shared-storage if it is shared")


def on_shared_fs(path: Path) -> bool:
    """True when `path` lies on a network file system according to /proc/mounts."""
    return on_network_fs(path)


# -- placement: which devices a trial's ranks use, and whether a trial fits a node ----------------


def workers_for_gpus(gpus_per_trial: float | None, set_by_space: Iterable[str]) -> dict[str, Any]:
    """Fields `--gpus-per-trial N` (N >= 2) sets where the space leaves them open: `workers: N`
    (one data-parallel rank per GPU) and `backend: ddp`. Empty below 2 GPUs, and `workers` is
    never overridden when the space sets it (fixed, grid or search)."""
    keys = set(set_by_space)
    if gpus_per_trial is None or gpus_per_trial < 2 or "workers" in keys:
        return {}
    return {"workers": int(gpus_per_trial), **({} if "backend" in keys else {"backend": "ddp"})}


def check_placement(cfg: TrialConfig, gpu: float, where: str = "the space") -> None:
    """A trial on CUDA runs one rank per whole GPU it holds, no more, no fewer.

    DDP/Horovod put rank r on the trial's GPU r (NCCL refuses two ranks on one device), so
    `workers: N` on CUDA needs resources.gpu to be a whole number >= N; a trial holding more GPUs
    than ranks leaves the rest idle. A trial is on CUDA when `device: cuda`, or `device: auto` and
    Ray gives it GPUs (`auto` is the trial's GPUs, the CPU without any).
    """
    if not (cfg.device == "cuda" or (cfg.device == "auto" and gpu > 0)):
        return
    ranks = cfg.workers if cfg.backend != "none" else 1
    if ranks > 1 and (gpu != int(gpu) or gpu < ranks):
        raise UserError(f"{where}: workers={ranks} ({cfg.backend} on CUDA) needs {ranks} whole GPUs "
                        f"per trial, one per rank, but a trial gets {gpu:g}; pass --gpus-per-trial "
                        f"{ranks} (or set resources.gpu: {ranks}), or set workers: 1")
    if gpu >= 2 and gpu > ranks:
        raise UserError(f"{where}: a trial gets {gpu:g} GPUs but runs {ranks} rank(s), leaving "
                        f"{gpu - ranks:g} idle; set workers: {int(gpu)} with backend: ddp (what "
                        f"--gpus-per-trial {int(gpu)} does when the space does not set workers), or "
                        f"ask for {ranks} GPU(s)")


# The `run` flags that lower a trial's request, by Ray resource name.
RESOURCE_FLAGS = {"CPU": "--cpus-per-trial", "GPU": "--gpus-per-trial"}


def check_fit(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]],
              node_types: Sequence[Mapping[str, float]] | None = None) -> None:
    """One trial's Ray resources (`{"CPU": 4, "GPU": 1, custom: n}`) must fit one live node, or a
    node type the cluster's autoscaler can add (`node_types`, None: no autoscaler). Ray would keep
    a trial that fits nowhere pending forever, repeating "insufficient resources" every minute;
    this says so in one line, with the flags that lower the request."""
    wanted = {k: v for k, v in request.items() if v > 0}

    def fits(node: Mapping[str, float]) -> bool:
        return all(node.get(k, 0.0) >= v for k, v in wanted.items())

    if any(fits(n) for n in nodes) or any(fits(t) for t in node_types or ()):
        return
    most = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in sorted({"CPU", "GPU", *wanted})}
    need = ", ".join(f"{_amount(v)} {k}" for k, v in wanted.items())
    have = ", ".join(f"{_amount(v)} {k}" for k, v in most.items())
    lower = []
    for key, value in wanted.items():
        if most[key] >= value:
            continue
        if key in RESOURCE_FLAGS:
            lower.append(f"{RESOURCE_FLAGS[key]} {_amount(most[key])}")
        else:  # a custom resource no node declares (enough of)
            lower.append(f"--trial-resource {key}={_amount(most[key])}" if most[key] else
                         f"drop --trial-resource {key}")
    grown = " (nor a node type its autoscaler can add)" if node_types else ""
    raise UserError(f"a trial needs {need}, which no node of the Ray cluster offers{grown} "
                    f"({len(nodes)} node(s), at most {have}); every trial would wait forever. "
                    f"Lower the request ({', '.join(lower)}), use bigger nodes, or pass "
                    "--wait-for-resources if such nodes are coming")


def _amount(value: float) -> str:
    return f"{value:g}"

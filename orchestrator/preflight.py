"""Checks before a sweep writes anything: inputs, the Ray address, folders, shared storage.

Each check refuses with one `UserError` naming what is wrong, so a refused run leaves the results
folder as it was. The test-set and checkpoint checks import cascade's torch modules when they run
(never at import: `status` and `table1` must not pay for torch).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

from cascade.config import TrialConfig
from cascade.errors import UserError

# File systems a multi-node cluster can share (from /proc/mounts); anything else counts as local.
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "cephfs", "ceph",
             "glusterfs", "panfs", "wekafs", "afs", "9p", "fuse.")


def check_inputs(configs: Iterable[TrialConfig]) -> None:
    """Test sets are read in full (stems, decodable images, mask colours); checkpoints must be
    Uformers with 3 or 6 output channels."""
    from cascade.data.testset import PairedTestSet
    from cascade.uformer import infer_arch, read_state_dict

    configs = list(configs)
    for path in dict.fromkeys(c.test_data for c in configs if c.test_data):
        PairedTestSet(path)
    for path in dict.fromkeys(c.checkpoint for c in configs if c.checkpoint):
        output_ch = infer_arch(read_state_dict(path), where=str(path))["output_ch"]
        if output_ch not in (3, 6):
            raise UserError(f"{path}: a Uformer with {output_ch} output channels; expected 3 "
                            "(deflared image) or 6 (deflared image + flare)")


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
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = path.resolve()
    best, best_fs = "", ""
    for mount, fstype in mounts:
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, best_fs = mount, fstype
    return best_fs.startswith(SHARED_FS)

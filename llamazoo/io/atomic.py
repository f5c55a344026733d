"""Outputs appear whole or not at all: written under a temporary name beside their target and renamed into
place when complete (datasets, HF folders, training checkpoints).

The temporary name `.{target}.incomplete-{host}-{pid}` says who writes it. A run killed with SIGKILL cannot
remove its own, so the next writer to the same place does (`remove_stale_temps`): it removes those of a
process on this host that is gone (or whose PID now belongs to a younger process), and reports the ones it
cannot judge (another host's, or a live process's) with their size, leaving them alone.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Optional

LOG = logging.getLogger("llamazoo.io")
INCOMPLETE = ".incomplete-"   # a temporary output being written
OLD = ".old-"                 # the previous output, renamed aside while the new one is moved in


def host_name() -> str:
    """This machine's short name, as it goes into temporary names."""
    return socket.gethostname().split(".")[0] or "localhost"


def temp_path_beside(target: str | os.PathLike) -> Path:
    """A fresh temporary path for `target`, in the same folder (so the final rename is atomic); not created.

    What killed runs left there for the same target is cleaned up first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    tmp = target.parent / f".{target.name}{INCOMPLETE}{host_name()}-{os.getpid()}"
    remove_path(tmp)  # an earlier, failed attempt of this process
    return tmp


def replace_path(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves the complete `tmp` to `target` by rename, replacing the folder or file there.

    The old one is renamed aside first and removed last; a run killed in between leaves it under
    `.{target}.old-{host}-{pid}`, which `remove_stale_temps` puts back or removes."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}{OLD}{host_name()}-{os.getpid()}"
        remove_path(old)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        remove_path(old)


def write_text(target: str | os.PathLike, text: str) -> None:
    """A small file (a config, summary or result) that appears whole: a kill mid-write leaves the
    previous version, not half of the new one."""
    tmp = temp_path_beside(target)
    try:
        tmp.write_text(text)
        replace_path(tmp, target)
    except BaseException:
        remove_path(tmp)
        raise


def remove_path(path: Path) -> None:
    """Removes a folder tree or a file, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | os.PathLike, name: Optional[str] = None,
                       report: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Cleans up after killed writers in `folder`, for the target `name` (None: every target there).

    A temporary output of a process that is gone is removed. The previous output renamed aside by a run
    killed during `replace_path` is removed when the new one is in place, else renamed back. Each is
    reported in one line with its size (`report`, default: a logged warning); so is every temporary output
    left alone because its writer may still run. Returns the paths removed."""
    report = report or LOG.warning
    folder = Path(folder)
    stem = glob.escape(f".{name}") if name is not None else ".*"
    removed = []
    for kind in (INCOMPLETE, OLD):
        for path in sorted(folder.glob(f"{stem}{kind}*")):
            who = _writer(path.name, kind)
            if who is None:
                continue  # not a name this module gives
            target_name, host, pid = who
            size = _size_text(path)
            gone = _process_gone(host, pid, path)
            if not gone:
                if kind == INCOMPLETE and pid != os.getpid():
                    where = "" if host == host_name() else f" on {host}"
                    report(f"left {path} ({size}) alone: process {pid}{where} may still be writing it; "
                           "remove it once that run is over")
                continue
            target = folder / target_name
            if kind == OLD and not (target.exists() or target.is_symlink()):
                try:
                    path.rename(target)
                    report(f"put back {target} ({size}): a run killed while replacing it had moved it aside")
                except OSError:
                    pass
                continue
            remove_path(path)
            removed.append(path)
            what = "left half-written" if kind == INCOMPLETE else f"the {target_name} it replaced, left"
            report(f"removed {path} ({size}), {what} by process {pid}, which is gone")
    return removed


def _writer(entry: str, kind: str) -> Optional[tuple[str, str, int]]:
    """(target name, host, pid) from `.{target}{kind}{host}-{pid}`, or None for other names."""
    head, sep, tail = entry.rpartition(kind)
    host, _, pid = tail.rpartition("-")
    if not sep or not head.startswith(".") or len(head) < 2 or not host or not pid.isdigit():
        return None
    return head[1:], host, int(pid)


def _process_gone(host: str, pid: int, path: Path) -> bool:
    """Whether the process that wrote `path` has ended; False where that cannot be known."""
    if host != host_name():
        return False
    if pid == os.getpid():
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # e.g. another user's process: alive
        return False
    try:
        written = path.lstat().st_mtime
    except FileNotFoundError:
        return False
    # the writer existed before it made `path`: a process younger than that has only reused the PID
    return started > written + 1.0


def _size_text(path: Path) -> str:
    total = 0
    if path.is_dir() and not path.is_symlink():
        for root, _, files in os.walk(path):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
    else:
        try:
            total = path.lstat().st_size
        except OSError:
            pass
    return f"{total / 2**20:.1f} MB" if total >= 2**20 else f"{total / 2**10:.1f} KB"

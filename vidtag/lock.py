"""One writer at a time: a lock beside an output names the process writing it (pid, host, start time).

``<target>.lock/`` holds one file per writer *slot*. A writer claims its slot by hard-linking a fully
written file into place (atomic and exclusive, also on NFS), then refuses to go on while a live writer
holds a conflicting slot. Slots let writers that never touch the same bytes share an output (the
feature store's ``--shard i/n`` processes); by default every slot conflicts. A lock whose process is
gone (same host, pid not running, or running but started later: a reused pid) is taken over; a lock
from another host cannot be judged and is refused with the path to delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vidtag.errors import LockError

LOCK_SUFFIX = ".lock"
_HELD: set[str] = set()  # lock files this process holds (a lock naming our pid but not here is a leftover)


def lock_dir(target: str | os.PathLike) -> Path:
    """Where the locks of ``target`` live: beside it, so they exist before the output does."""
    target = Path(target)
    return target.with_name(target.name + LOCK_SUFFIX)


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
    except (IndexError, ValueError):
        return None


def _holder_alive(holder: dict[str, Any], path: Path) -> bool | None:
    """True / False for the holder of lock file ``path`` on this host; None when it is on another host."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return str(path) in _HELD  # ours, or left by an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    ticks = _proc_start_ticks(pid)
    return ticks is None or holder.get("proc_start") in (None, ticks)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host, since 2024-05-01T10:00:00+00:00 (what)`` for messages."""
    what = f" ({holder['what']})" if holder.get("what") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}{what}"


def _refuse(target: Path, path: Path, holder: dict[str, Any]) -> LockError:
    return LockError(f"{target} is being written by another process ({describe(holder)}); wait for it to finish, "
                     f"or delete {path} if that process is gone")


def _claim(path: Path, me: dict[str, Any], target: Path) -> None:
    """Create ``path`` holding ``me``, exclusively; take it over from a dead holder."""
    for _ in range(5):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            tmp.write_text(json.dumps(me) + "\n")
            os.link(tmp, path)
            return
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # unreadable: written by no vidtag, or cut short; a lock that names no one
                path.unlink(missing_ok=True)
                continue
            if _holder_alive(holder, path) is False:
                path.unlink(missing_ok=True)  # a dead writer's lock: taken over
                continue
            raise _refuse(target, path, holder) from None
        except FileNotFoundError:
            continue  # the lock directory was removed by a writer finishing just now
        finally:
            tmp.unlink(missing_ok=True)
    raise LockError(f"cannot take the lock {path} for {target} (it keeps changing); try again")


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, *, slot: str = "writer", what: str = "",
                compatible: Callable[[str, str], bool] | None = None) -> Iterator[Path]:
    """Hold the ``slot`` lock of ``target`` while the block runs; raise :class:`LockError` naming a live
    writer of a conflicting slot. ``compatible(a, b)`` says whether slots a and b may write at once."""
    target = Path(target)
    directory = lock_dir(target)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start_ticks(os.getpid()),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "slot": slot, "what": what}
    mine = directory / f"{slot}.json"
    _claim(mine, me, target)
    _HELD.add(str(mine))
    try:
        for other in sorted(directory.glob("*.json")):
            if other == mine:
                continue
            holder = _read(other)
            other_slot = other.name[: -len(".json")]
            if holder is None or (compatible is not None and compatible(slot, other_slot)):
                continue
            if _holder_alive(holder, other) is False:
                other.unlink(missing_ok=True)
                continue
            raise _refuse(target, other, holder)
        yield mine
    finally:
        _HELD.discard(str(mine))
        mine.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when no other writer holds a slot

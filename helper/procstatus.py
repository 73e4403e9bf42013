"""Who a process runs as, from ``/proc/PID/status``: its four uids and whether it is a zombie.

The jail code (``helper.jail.jailer``: which processes a VM uid still runs, checked again
through a pidfd before each SIGKILL) and the cgroup attach (``helper.cgattach``: the owner's
process, read through a ``/proc/PID`` directory fd) both ask this; ``parse`` is the one
reading of the file (pure), ``runs_as`` the jailer's question by pid.
"""

from __future__ import annotations

from dataclasses import dataclass

from helper.base.errors import NotFound


@dataclass(frozen=True)
class Status:
    uids: tuple[int, ...]  # real, effective, saved, fs
    zombie: bool


def parse(text: str) -> Status:
    """The ``Uid:`` and ``State:`` lines of a status file; NotFound without a ``Uid:``."""
    uids: tuple[int, ...] | None = None
    zombie = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uids = tuple(int(x) for x in value.split()[:4])
        elif key == "State":
            zombie = value.strip().startswith("Z")
    if uids is None:
        raise NotFound("no Uid line in /proc status", "")
    return Status(uids, zombie)


def runs_as(pid: int, uid: int) -> bool:
    """Process ``pid`` is alive (not a zombie) and any of its uids is ``uid``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = parse(f.read())
    except (OSError, NotFound):
        return False
    return not status.zombie and uid in status.uids

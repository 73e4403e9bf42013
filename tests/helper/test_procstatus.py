"""helper.procstatus: who a process runs as, read from /proc/PID/status."""

from __future__ import annotations

import os

import pytest

from helper import procstatus
from helper.base.errors import NotFound


def test_parse_reads_the_four_uids_and_the_zombie_state() -> None:
    text = "Name:\tx\nState:\tZ (zombie)\nTgid:\t7\nUid:\t1000\t0\t0\t1000\nGid:\t5\t5\t5\t5\n"
    assert procstatus.parse(text) == procstatus.Status((1000, 0, 0, 1000), True)
    live = procstatus.parse("State:\tS (sleeping)\nUid:\t1\t2\t3\t4\n")
    assert live == procstatus.Status((1, 2, 3, 4), False)
    with pytest.raises(NotFound):
        procstatus.parse("Name:\tx\nState:\tR (running)\n")


def test_runs_as_this_process_and_not_a_gone_one() -> None:
    assert procstatus.runs_as(os.getpid(), os.getuid())
    assert not procstatus.runs_as(os.getpid(), os.getuid() + 12345)
    assert not procstatus.runs_as(2**22 + 1, os.getuid())  # above pid_max: no such process

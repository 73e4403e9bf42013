"""Progress events the build emits; the CLI decides how (or whether) to show them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """``kind`` is ``start``/``end`` of a named stage, or ``bytes`` for blob progress."""

    kind: str
    stage: str
    detail: str = ""
    done: int = 0
    total: int = 0
    seconds: float = 0.0


Listener = Callable[[Event], None]


@dataclass
class Progress:
    """Emits events to a listener and keeps each stage's duration."""

    listener: Listener | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def emit(self, event: Event) -> None:
        if self.listener is not None:
            self.listener(event)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        _fault_point(name)
        self.emit(Event("start", name, detail))
        t0 = time.monotonic()
        try:
            yield
        finally:
            dt = time.monotonic() - t0
            self.timings[name] = self.timings.get(name, 0.0) + dt
            self.emit(Event("end", name, detail, seconds=dt))


def _fault_point(stage: str) -> None:
    """Crash-test hook: ``KILN_FAULT_KILL_AT=STAGE[:SECONDS]`` SIGKILLs this process that
    long after STAGE starts. The crash tests use it to kill a build at each named step
    deterministically; it does nothing unless the variable is set."""
    spec = os.environ.get("KILN_FAULT_KILL_AT", "")
    name, _, delay = spec.partition(":")
    if not spec or name != stage:
        return

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if not delay or float(delay) <= 0:
        kill()
    timer = threading.Timer(float(delay), kill)
    timer.daemon = True
    timer.start()

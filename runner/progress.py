"""Showing build progress: rich bars on a terminal, nothing otherwise (CI logs stay clean)."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from builder.events import Event

STAGE_LABELS = {
    "resolve": "resolve",
    "pull": "pull",
    "unpack": "unpack",
    "mkfs": "mkfs",
    "verify": "verify",
    "hash": "hash",
    "commit": "commit",
}


class _BytesColumn(DownloadColumn):
    """Byte counts for blob rows only; stage rows have nothing to count."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("blob") else Text("")


class ProgressView:
    """A listener for ``builder.events`` that renders with rich when stderr is a TTY."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Progress | None = None
        self._stages: dict[str, TaskID] = {}
        self._blobs: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressView:
        if self.enabled:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description:<24}"),
                BarColumn(),
                _BytesColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: Event) -> None:
        p = self._progress
        if p is None:
            return
        if event.kind == "bytes":
            tid = self._blobs.get(event.detail)
            if tid is None:
                tid = p.add_task(f"  blob {event.detail[7:19]}", total=event.total or None,
                                 blob=True)
                self._blobs[event.detail] = tid
            p.update(tid, completed=event.done, total=event.total or None)
            return
        label = STAGE_LABELS.get(event.stage, event.stage)
        if event.kind == "start":
            self._stages[event.stage] = p.add_task(label, total=None)
        elif event.kind == "end" and event.stage in self._stages:
            p.update(self._stages[event.stage], total=1, completed=1,
                     description=f"{label} ({event.seconds:.2f} s)")

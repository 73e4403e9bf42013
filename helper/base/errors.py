"""The error hierarchy every kiln layer raises.

Every error a user can see carries a one-line ``message`` (what is wrong) and a ``hint``
(what to do). The CLI has one handler that prints both; tracebacks appear only with
``--debug``. Subclasses exist so callers (and tests) can tell failures apart, never to
carry a different presentation.
"""

from __future__ import annotations


class KilnError(Exception):
    """A failure the user can act on."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(KilnError):
    """Bad input from the user: a malformed reference, id, size or option value."""


class NotFound(KilnError):
    """A named object (volume, snapshot, VM, file) does not exist."""


class Conflict(KilnError):
    """The request is valid but clashes with current state (ambiguous id, in use, locked)."""


class UidInUse(Conflict):
    """A VM uid/gid another caller's VM holds: the caller records another and asks again."""


class IntegrityError(KilnError):
    """Bytes do not match the digest or metadata they claim."""


class RegistryError(KilnError):
    """A registry refused, failed, or did not answer in time."""


class BuildError(KilnError):
    """The build stage could not produce a volume."""


class ToolError(KilnError):
    """An external tool exited non-zero.

    ``cmd`` is the argv as run, ``code`` its exit status, ``stderr_tail`` the last lines of
    its stderr, which usually say what went wrong.
    """

    def __init__(self, cmd: list[str], code: int, stderr_tail: str, hint: str = "") -> None:
        tool = cmd[0].rsplit("/", 1)[-1] if cmd else "?"
        last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else "no error output"
        super().__init__(f"{tool} failed (exit {code}): {last}", hint or f"command: {_join(cmd)}")
        self.cmd = cmd
        self.code = code
        self.stderr_tail = stderr_tail


class ToolNotFound(KilnError):
    """A required external tool is not installed."""

    def __init__(self, tool: str, package: str = "") -> None:
        pkg = package or tool
        super().__init__(
            f"{tool} not found",
            f"install it: apt-get install {pkg} (or run scripts/install-deps.sh)",
        )
        self.tool = tool


class ToolTimeout(KilnError):
    """An external tool ran longer than its time limit and was killed."""

    def __init__(self, cmd: list[str], seconds: float, hint: str = "") -> None:
        tool = cmd[0].rsplit("/", 1)[-1] if cmd else "?"
        super().__init__(
            f"{tool} did not finish within {seconds:g} s and was stopped",
            hint or f"command: {_join(cmd)}",
        )
        self.cmd = cmd
        self.seconds = seconds


def _join(cmd: list[str]) -> str:
    import shlex

    return shlex.join(cmd)

"""``kiln-helper OP``: the only kiln program that runs as root for other users (via sudo).

Protocol: one JSON request on stdin (at most ``[limits] request_bytes``, 64 KiB by
default; larger exits 2 having read at most one byte more), validated by the op's pydantic
model; one JSON object on stdout; exit 0 done, 1 refused or failed (one line on stderr, and
``{"error": {...}}`` on stdout), 2 malformed request or usage. ``kiln-helper --list``
prints every op's request JSON Schema.

Hardening, in order, before anything else runs:

* a sudo caller's relayable signals (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGTSTP, SIGTTIN,
  SIGTTOU, SIGUSR1/2, SIGALRM) are held (blocked) from the first line until the process
  exits, so a caller cannot cut any op between two steps; they are never delivered (the
  pending ones die with us). Only SIGKILL (root's, or the CPU limit's) remains, and that
  is what the ops' records and ``reclaim`` handle. Tools start with the default mask
  (``helper.base.run``);
* ``python3 -I`` semantics: the venv's script runs ``python3 -I`` (no user site, no
  ``PYTHON*`` variables, no cwd on ``sys.path``); ``main`` checks ``sys.flags.isolated``
  and re-checks that every ``sys.path`` entry is root-owned and not writable by others;
* ``os.environ`` is cleared down to a fixed ``PATH`` and ``LC_ALL``; ``umask 022``;
  cwd ``/``;
* the trusted config is loaded (``helper.config``: root-owned files only), and tools run
  from its absolute paths (``helper.base.run.which`` is pointed at ``Config.tool``);
* the caller is ``SUDO_UID``/``SUDO_GID`` when sudo ran us (sudo sets them; a caller cannot),
  else our real uid. Its area ``<[pool] directory>/users/<uid>`` and ``users/`` are
  root-owned 0711: a caller reaches what is its own inside, never lists another's;
* the op name is checked (``ops.valid_op``: at most 32 of a-z and '-') before it is logged
  or echoed; a bad one is logged in a bounded, escaped form (``op_label``);
* a sudo caller's resource limits are checked before anything heavy is imported
  (``helper.procguard``: a hard limit below what the helper needs is refused, nothing
  done), its op runs under ``RLIMIT_CPU`` = ``[limits] cpu_seconds`` (soft = hard: the
  kernel SIGKILLs at the limit; ``helper.base.run.limit_cpu``), inherited by its tools, and the
  process leaves the caller's cgroups for each hierarchy's root before it reads the
  request (the caller cannot limit or kill it through them).

Every op is appended to the audit log (``helper.audit``: one bounded line per op, a
daily byte cap per non-root caller, rotation). Tests read it to assert which ops ran.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helper.audit import audit

if TYPE_CHECKING:
    from helper.configbase import Config

SAFE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
AREA_MODE = 0o711  # users/ and users/<uid>: traversable to one's own, never listable
# Ops whose child outlives them (the jailer execs Firecracker, the VM): RLIMIT_CPU would
# kill the VM after cpu_seconds of its own CPU time, and a lowered hard limit cannot be
# raised again for the child without CAP_SYS_RESOURCE. Their own work is bounded by the
# jailer's timeout; the VM's CPU by its cgroup.
UNLIMITED_CPU_OPS = frozenset({"jail-launch"})


def scrub_environment() -> None:
    """Drop everything the caller put in our environment (LD_PRELOAD is already moot:
    the dynamic loader ignores it for setuid/sudo, but tools we start must not see it)."""
    os.environ.clear()
    os.environ.update(SAFE_ENV)
    os.umask(0o022)
    os.chdir("/")


def check_import_path() -> None:
    """Every directory Python imports from must be root-owned and not group/other-writable
    (a user who could write one could run code as root)."""
    from helper.configbase import UntrustedConfig, check_dirs

    if not sys.flags.isolated:
        raise UntrustedConfig("kiln-helper must run with python3 -I", "reinstall it with "
                              "scripts/install-helper")
    for entry in sys.path:
        if not entry:
            raise UntrustedConfig("the current directory is on sys.path", "run python3 -I")
        try:
            st = os.stat(entry)
        except FileNotFoundError:
            continue
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise UntrustedConfig(f"import path {entry} is not root-owned or is writable "
                                  "by others", "install kiln-helper with "
                                  "scripts/install-helper")
        check_dirs(Path(entry) if os.path.isdir(entry) else Path(entry).parent)
    import helper

    check_dirs(Path(helper.__file__).parent)  # an editable install maps it elsewhere


def _caller() -> tuple[int, int]:
    uid, gid = os.getuid(), os.getgid()
    if uid == 0 and "SUDO_UID" in _SUDO:
        try:
            return int(_SUDO["SUDO_UID"]), int(_SUDO["SUDO_GID"])
        except (KeyError, ValueError):
            pass
    return uid, gid


_SUDO: dict[str, str] = {}


# -- the audit log ---------------------------------------------------------------------------


def op_label(op: str) -> str:
    """``op`` as it may be logged or echoed: itself when it could name an op, else a
    bounded, escaped stand-in (a caller chooses argv: 131 KB of it must not reach a log)."""
    from helper.ops.registry import MAX_OP_LEN, valid_op

    if valid_op(op):
        return op
    shown = op[:MAX_OP_LEN].encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return f"<invalid op of {len(op)} characters: {shown[:MAX_OP_LEN]}>"


# -- the entry point -------------------------------------------------------------------------


def _fail(code: int, kind: str, message: str, hint: str = "") -> tuple[int, str, str]:
    one = message.replace("\n", " ")
    return (code, json.dumps({"error": {"type": kind, "message": message, "hint": hint}}),
            f"kiln-helper: {one}" + (f" ({hint})" if hint else ""))


def hold_signals() -> None:
    """Block ``cgattach.HELD`` for the rest of the process (see the module docstring).
    The ops' own ``cgattach.uninterrupted`` then restores a mask that still holds them."""
    from helper.cgattach import HELD

    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def read_request(fd: int, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of ``fd`` (one more than allowed tells "too large"),
    never more: os.read, not a buffered reader that reads ahead."""
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = os.read(fd, limit + 1 - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Keep what sudo told us about the caller, then forget the whole environment.
    for k in ("SUDO_UID", "SUDO_GID"):
        if k in os.environ:
            _SUDO[k] = os.environ[k]
    caller_uid, caller_gid = _caller()
    via_sudo = caller_uid != os.getuid()
    if via_sudo:
        hold_signals()  # first: before the request is read, until the answer is written
        from helper import procguard

        try:  # before anything heavy is imported: a caller's rlimits could kill it
            procguard.check_rlimits()
        except procguard.LimitTooLow as e:
            return _emit(_fail(1, "UsageError", e.message, e.hint))
    scrub_environment()
    from helper import config
    from helper.base import run
    from helper.base.errors import KilnError
    from helper.ops import registry as ops

    if args == ["--list"]:
        print(json.dumps(ops.schemas(), sort_keys=True))
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        return _emit(_fail(2, "UsageError", "usage: kiln-helper OP < request.json | "
                           "kiln-helper --list"))
    op = args[0]
    try:
        check_import_path()
        cfg = config.load()
    except KilnError as e:
        audit(caller_uid, op_label(op), f"refused: {e.message}")
        return _emit(_fail(1, type(e).__name__, e.message, e.hint))
    log = functools.partial(audit, cap=cfg.limits.audit_bytes_per_day)
    if not ops.valid_op(op):  # before reading anything: a bad name is all there is to say
        return _emit(_unknown_op(op, caller_uid, log))
    if via_sudo:
        try:
            _guard(cfg, op)
        except KilnError as e:
            log(caller_uid, op, f"refused: {e.message}")
            return _emit(_fail(1, type(e).__name__, e.message, e.hint))
    try:
        payload = read_request(0, cfg.limits.request_bytes)
    except OSError:  # no stdin at all: an empty, malformed request
        payload = b""
    run.which = cfg.tool  # type: ignore[assignment]  # tools only from the trusted config
    return _emit(serve(op, payload, cfg, caller_uid, caller_gid, log=log))


def _guard(cfg: Config, op: str) -> None:
    """A sudo caller's process: CPU capped (the caller's hard limit must allow the cap:
    ``helper.procguard``), out of the caller's cgroups, its scheduling the default's."""
    from helper import cgroup, procguard
    from helper.base import run
    from helper.base.errors import UsageError

    try:
        procguard.check_rlimits(cfg.limits.cpu_seconds)
    except procguard.LimitTooLow as e:
        raise UsageError(e.message, e.hint) from None
    if op not in UNLIMITED_CPU_OPS:
        run.limit_cpu(cfg.limits.cpu_seconds)
    lay = cgroup.layout(cgroup.CgroupConfig(parent=cfg.cgroup_parent))
    procguard.leave_cgroups([*lay.v1.values(), *([lay.v2] if lay.v2 else [])])
    try:  # after leaving the caller's cpuset: init's CPUs are ours again
        procguard.reset_scheduling()
    except procguard.LimitTooLow as e:
        raise UsageError(e.message, e.hint) from None


def _emit(result: tuple[int, str, str]) -> int:
    code, out, err = result
    print(out)
    if err:
        print(err, file=sys.stderr)
    sys.stdout.flush()  # written while the signals are still held
    return code


def _unknown_op(op: str, caller_uid: int,
                log: Callable[[int, str, str], None]) -> tuple[int, str, str]:
    log(caller_uid, op_label(op), "unknown op")
    return _fail(2, "UsageError", f"unknown op {op_label(op)}", "see `kiln-helper --list`")


def serve(op: str, payload: bytes, cfg: Config, caller_uid: int, caller_gid: int,
          log: Callable[[int, str, str], None] = audit) -> tuple[int, str, str]:
    """One request, once the process is hardened and the config loaded: (exit code,
    stdout line, stderr line). In-process tests call this with their own ``log``, which
    gets the op only once ``ops.valid_op`` accepted it (else its bounded ``op_label``)."""
    from pydantic import ValidationError

    from helper.base.errors import KilnError, UsageError
    from helper.ops import registry as ops

    if not ops.valid_op(op):
        return _unknown_op(op, caller_uid, log)
    limit = cfg.limits.request_bytes
    if len(payload) > limit:
        log(caller_uid, op, f"malformed: request larger than {limit} bytes")
        return _fail(2, "UsageError", f"request larger than {limit} bytes",
                     "[limits] request_bytes in the trusted config")
    try:
        req = ops.parse(op, payload)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "request"
        log(caller_uid, op, "malformed")
        return _fail(2, "UsageError", f"malformed {op} request: {loc[:200]}: {err['msg']}",
                     "see `kiln-helper --list`")
    except UsageError as e:
        log(caller_uid, op, "unknown op")
        return _fail(2, "UsageError", e.message, e.hint)
    try:
        area = cfg.area(caller_uid)
        _make_area(cfg.users_dir(), area)
        ctx = ops.Ctx(cfg=cfg, area=area, caller_uid=caller_uid, caller_gid=caller_gid)
        result: dict[str, Any] = ops.run_op(ctx, op, req)
    except KilnError as e:
        log(caller_uid, op, f"failed: {e.message}")
        return _fail(1, type(e).__name__, e.message, e.hint)
    except OSError as e:
        log(caller_uid, op, f"failed: {e}")
        return _fail(1, "NotFound" if isinstance(e, FileNotFoundError) else "KilnError",
                     f"{op} failed: {e.strerror or e}")
    log(caller_uid, op, "ok")
    return 0, json.dumps(result, sort_keys=True), ""


def _make_area(users: Path, area: Path) -> None:
    """``users/`` and ``users/<uid>``: root-owned ``AREA_MODE`` (0711: a caller passes
    through to what is its own, but lists or reads no other's), never a symlink. One made
    0755 by an older helper is fixed here, by fd."""
    from helper.base import safepath

    users.parent.mkdir(mode=0o755, exist_ok=True)
    for parent, name in ((users.parent, users.name), (users, area.name)):
        os.close(safepath.root_dir(parent, name, create=True, mode=AREA_MODE))


if __name__ == "__main__":
    raise SystemExit(main())

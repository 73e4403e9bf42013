"""``kiln-helper OP``: the only kiln program that runs as root for other users (via sudo).

Protocol: one JSON request on stdin (at most 1 MiB), validated by the op's pydantic model;
one JSON object on stdout; exit 0 done, 1 refused or failed (one line on stderr, and
``{"error": {...}}`` on stdout), 2 malformed request or usage. ``kiln-helper --list``
prints every op's request JSON Schema.

Hardening, in order, before anything else runs:

* ``python3 -I`` semantics: the venv's script runs ``python3 -I`` (no user site, no
  ``PYTHON*`` variables, no cwd on ``sys.path``); ``main`` checks ``sys.flags.isolated``
  and re-checks that every ``sys.path`` entry is root-owned and not writable by others;
* ``os.environ`` is cleared down to a fixed ``PATH`` and ``LC_ALL``; ``umask 022``;
  cwd ``/``;
* the trusted config is loaded (``helper.config``: root-owned files only), and tools run
  from its absolute paths (``helper.run.which`` is pointed at ``Config.tool``);
* the caller is ``SUDO_UID``/``SUDO_GID`` when sudo ran us (sudo sets them; a caller cannot),
  else our real uid. Its area ``<[pool] directory>/users/<uid>`` is created root-owned.

Every op is appended to ``/var/log/kiln-helper/audit.log`` (root-owned, 0600 directory):
time, caller uid, op, outcome. Tests read it to assert which ops ran.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from helper.config import Config

AUDIT_DIR = Path("/var/log/kiln-helper")
SAFE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
MAX_REQUEST = 1 << 20


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
    from helper.config import UntrustedConfig, check_dirs

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


def audit(caller: int, op: str, outcome: str) -> None:
    try:
        AUDIT_DIR.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(AUDIT_DIR)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            return
        fd = os.open(AUDIT_DIR / "audit.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "uid": caller, "op": op, "outcome": outcome[:200]})
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)
    except OSError:
        pass  # auditing must not turn a done op into a failure


def _fail(code: int, kind: str, message: str, hint: str = "") -> tuple[int, str, str]:
    one = message.replace("\n", " ")
    return (code, json.dumps({"error": {"type": kind, "message": message, "hint": hint}}),
            f"kiln-helper: {one}" + (f" ({hint})" if hint else ""))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Keep what sudo told us about the caller, then forget the whole environment.
    for k in ("SUDO_UID", "SUDO_GID"):
        if k in os.environ:
            _SUDO[k] = os.environ[k]
    scrub_environment()
    from helper import config, ops, run
    from helper.errors import KilnError

    if args == ["--list"]:
        print(json.dumps(ops.schemas(), sort_keys=True))
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        return _emit(_fail(2, "UsageError", "usage: kiln-helper OP < request.json | "
                           "kiln-helper --list"))
    op = args[0]
    caller_uid, caller_gid = _caller()
    try:
        check_import_path()
        cfg = config.load()
    except KilnError as e:
        audit(caller_uid, op, f"refused: {e.message}")
        return _emit(_fail(1, type(e).__name__, e.message, e.hint))
    payload = sys.stdin.buffer.read(MAX_REQUEST + 1)
    run.which = cfg.tool  # type: ignore[assignment]  # tools only from the trusted config
    return _emit(serve(op, payload, cfg, caller_uid, caller_gid))


def _emit(result: tuple[int, str, str]) -> int:
    code, out, err = result
    print(out)
    if err:
        print(err, file=sys.stderr)
    return code


def serve(op: str, payload: bytes, cfg: Config, caller_uid: int, caller_gid: int,
          log: Callable[[int, str, str], None] = audit) -> tuple[int, str, str]:
    """One request, once the process is hardened and the config loaded: (exit code,
    stdout line, stderr line). In-process tests call this with their own ``log``."""
    from pydantic import ValidationError

    from helper import ops
    from helper.errors import KilnError, UsageError

    if len(payload) > MAX_REQUEST:
        return _fail(2, "UsageError", "request larger than 1 MiB")
    try:
        req = ops.parse(op, payload)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "request"
        log(caller_uid, op, "malformed")
        return _fail(2, "UsageError", f"malformed {op} request: {loc}: {err['msg']}",
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
    """``users/`` and ``users/<uid>``: root-owned 0755, never a symlink."""
    from helper import safepath

    for d in (users.parent, users):
        d.mkdir(mode=0o755, exist_ok=True)
    safepath.mkdirs_beneath(users, area.name, 0o755)
    fd = safepath.open_beneath(users, area.name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        safepath.fstat_kind(fd, "dir", str(area), owner=0)
    finally:
        os.close(fd)


if __name__ == "__main__":
    raise SystemExit(main())

"""kiln-helper installed for real and called through sudo by unprivileged users: fixtures.

``installed``: ``scripts/install-helper`` (idempotent; this is a test machine, so the real
``/opt/kiln`` is used and left installed) and ``/etc/kiln/test-config.toml`` (the one
config path the helper honours before ``config.toml``; created here, removed after), which
points the helper's ``[pool] directory`` at ``/var/lib/kiln-helper-test``. ``sudo_user``
and ``victim_user``: two throw-away users, each allowed by a temporary sudoers file
(checked with ``visudo -cf``) to run only the helper — attacks need an attacker and a
victim. ``helper_as`` runs one op as either (or as root); ``host_state`` snapshots what a
refused request must leave unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.oci import User, run_as

REPO = Path(__file__).resolve().parents[2]
HELPER = "/opt/kiln/bin/kiln-helper"
TEST_CONFIG = Path("/etc/kiln/test-config.toml")
BASE = Path("/var/lib/kiln-helper-test")
AUDIT = Path("/var/log/kiln-helper/audit.log")
GOOD_CONFIG = f"""[pool]
directory = "{BASE}"

[jails]
chroot_base = "{BASE}/jails"
"""

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def installed() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("installing the helper needs root")
    with helper_installed(twice=True) as helper:
        yield helper


@contextlib.contextmanager
def helper_installed(*, twice: bool = False) -> Iterator[str]:
    """The helper installed from this checkout, with the test config (pool directory under
    ``BASE``), removed with everything under ``BASE`` afterwards (tests and ``bench/``).
    ``twice``: install-helper is idempotent, the second run must succeed too."""
    for _ in range(2 if twice else 1):
        subprocess.run([str(REPO / "scripts/install-helper")], check=True,
                       capture_output=True, timeout=300)
    Path("/etc/kiln").mkdir(mode=0o755, exist_ok=True)
    _write_config(GOOD_CONFIG)
    try:
        yield HELPER
    finally:
        TEST_CONFIG.unlink(missing_ok=True)
        _cleanup_base()


def _write_config(text: str, mode: int = 0o644) -> None:
    TEST_CONFIG.unlink(missing_ok=True)
    tmp = TEST_CONFIG.with_name(".test-config.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.rename(tmp, TEST_CONFIG)


def _cleanup_base() -> None:
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mp = line.split()[4]
        if mp.startswith(str(BASE) + "/"):
            subprocess.run(["umount", "--lazy", mp], check=False)
    res = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False)
    for d in json.loads(res.stdout or '{"loopdevices": []}')["loopdevices"]:
        if (d.get("back-file") or "").startswith(str(BASE) + "/"):
            subprocess.run(["losetup", "--detach", d["name"]], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(BASE)], check=False)


@contextlib.contextmanager
def sudoers(user: User) -> Iterator[User]:
    # Throw-away users get recycled uids: start the audit rate counter afresh.
    (AUDIT.parent / "rate" / str(user.uid)).unlink(missing_ok=True)
    rule = Path(f"/etc/sudoers.d/kiln-test-{user.name}")
    tmp = Path(f"/etc/sudoers.d/.kiln-test-{user.name}")
    tmp.write_text(f"{user.name} ALL=(root) NOPASSWD: {HELPER}\n")
    tmp.chmod(0o440)
    subprocess.run(["visudo", "-cf", str(tmp)], check=True, capture_output=True)
    os.rename(tmp, rule)
    try:
        yield user
    finally:
        rule.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sudo_user(unprivileged_user: User, installed: str) -> Iterator[User]:
    """A member of the helper's group (by a sudoers rule for the helper alone)."""
    with sudoers(unprivileged_user) as u:
        yield u


@pytest.fixture(scope="module")
def victim_user(second_user: User, installed: str) -> Iterator[User]:
    """Another such member: what an attacker must never reach."""
    with sudoers(second_user) as u:
        yield u


def helper_as(user: User | None, op: str, request: dict[str, Any] | str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed helper: as ``user`` through sudo, or as root directly."""
    payload = request if isinstance(request, str) else json.dumps(request)
    base_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
    base_env.update(env or {})
    if user is None:
        argv = [HELPER, op]
    else:
        base_env.update({"HOME": str(user.home), "USER": user.name})
        argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                "--", "/usr/bin/sudo", "--non-interactive", HELPER, op]
    return subprocess.run(argv, input=payload, capture_output=True, text=True, timeout=60,
                          env=base_env, cwd="/", check=False)


def _tree(root: Path) -> list[tuple[str, int, int, int]]:
    out: list[tuple[str, int, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out.append((p, st.st_mode, st.st_uid, st.st_size if not os.path.isdir(p) else 0))
    return sorted(out)


def _cgroup_tops() -> list[str]:
    out: list[str] = []
    for hier in Path("/sys/fs/cgroup").iterdir():
        if hier.is_dir():
            out += sorted(str(p) for p in hier.iterdir() if p.is_dir())
    return out


# Other test runs (pytest tmp dirs, benchmarks) attach and mount under /tmp concurrently;
# what they do there is not ours to compare. The foreign-loop test checks its own device.
_CONCURRENT = ("/tmp/",)


def loop_table() -> list[tuple[str, str]]:
    out = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True,
                         check=False).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return sorted((d["name"], d.get("back-file") or "") for d in devs)


def host_state() -> dict[str, Any]:
    loops = [x for x in loop_table() if not x[1].startswith(_CONCURRENT)]
    mounts = sorted(mp for mp in (line.split()[4] for line in
                                  Path("/proc/self/mountinfo").read_text().splitlines())
                    if not mp.startswith(_CONCURRENT))
    return {"loops": loops, "mounts": mounts, "cgroups": _cgroup_tops(),
            "net": sorted(os.listdir("/sys/class/net")), "base": _tree(BASE),
            "etc": _tree(Path("/etc/kiln"))}


def _ops_ran(uid: int, since: int) -> list[tuple[str, str]]:
    lines = AUDIT.read_text().splitlines()[since:]
    recs = [json.loads(x) for x in lines]
    return [(r["op"], r["outcome"].split(":")[0]) for r in recs if r["uid"] == uid]


def _audit_len() -> int:
    return len(AUDIT.read_text().splitlines()) if AUDIT.exists() else 0



def kiln_as(user: User, root: Path, *args: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    code = ("import runpy, sys; sys.argv[0] = 'kiln'; "
            "runpy.run_module('runner', run_name='__main__')")
    return run_as(user, [sys.executable, "-c", code, "--root", str(root), *args],
                  cwd=Path("/"), check=check, timeout=300)



@contextlib.contextmanager
def cgroup_parent(prefix: str) -> Iterator[str]:
    """A cgroup parent name of the tests' own (``[cgroups] parent`` in their configs);
    afterwards the good test config is back and every VM cgroup under it is killed and
    removed, in every hierarchy."""
    from helper import cgroup as cg

    top = f"{prefix}{secrets.token_hex(4)}"
    try:
        yield top
    finally:
        _write_config(GOOD_CONFIG)
        ccfg = cg.CgroupConfig(parent=top)
        lay = cg.layout(ccfg)
        for version, mnt in [(2, lay.v2), *((1, m) for m in lay.v1.values())]:
            if mnt is not None and (mnt / top).is_dir():
                for d in (mnt / top).iterdir():
                    if d.is_dir():
                        cg.cgroup_kill(ccfg, d.name, version)
                with contextlib.suppress(OSError):
                    os.rmdir(mnt / top)

"""Guest init: the config merge (docker's rules), the config text read back by a real
shell, the debugfs injection checked with debugfs, init.sh's syntax."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helper.base.errors import KilnError, UsageError
from runner import guest_init
from runner.guest_init import DEFAULT_PATH, Workload, workload

IMAGE = {"Env": ["PATH=/usr/bin:/bin", "A=1"], "Entrypoint": ["/app"], "Cmd": ["--serve"],
         "WorkingDir": "/srv", "User": "app"}


def test_merge_image_config_and_overrides() -> None:
    w = workload(IMAGE, hostname="vm1")
    assert w == Workload(argv=("/app", "--serve"),
                         env=(("PATH", "/usr/bin:/bin"), ("A", "1"), ("HOSTNAME", "vm1")),
                         workdir="/srv", user="app", hostname="vm1")
    o = workload(IMAGE, command=["--once"], env=["A=2", "B=x=y"], workdir="/tmp",
                 user="0:0", hostname="vm1")
    assert o.argv == ("/app", "--once")  # a command replaces Cmd, keeps Entrypoint
    assert dict(o.env) == {"PATH": "/usr/bin:/bin", "A": "2", "B": "x=y", "HOSTNAME": "vm1"}
    assert (o.workdir, o.user) == ("/tmp", "0:0")
    assert workload({"Cmd": ["sh"]}, hostname="h").path == DEFAULT_PATH


@pytest.mark.parametrize(("entrypoint", "command", "argv"), [
    (None, (), ("/app", "--serve")),
    ("/bin/sh", (), ("/bin/sh",)),  # --entrypoint: the image's Cmd goes too (docker)
    ("/bin/sh", ("-c", "exit 3"), ("/bin/sh", "-c", "exit 3")),
    ("", ("sh", "-c", "exit 3"), ("sh", "-c", "exit 3")),  # '' clears the entrypoint
])
def test_entrypoint_override(entrypoint: str | None, command: tuple[str, ...],
                             argv: tuple[str, ...]) -> None:
    w = workload(IMAGE, command=command, entrypoint=entrypoint, hostname="h")
    assert w.argv == argv


@pytest.mark.parametrize(("kw", "message"), [
    ({}, "nothing to run: the image has no Entrypoint or Cmd"),
    ({"entrypoint": ""}, "nothing to run: --entrypoint ''"),
    ({"command": ["x"], "env": ["1A=b"]}, "invalid environment entry '1A=b' in -e"),
    ({"command": ["x"], "workdir": "rel"}, "working directory 'rel' is not absolute"),
    ({"command": ["x"], "user": "a b"}, "invalid user 'a b'"),
    ({"command": ["x"], "hostname": "Bad_Host"}, "invalid hostname 'Bad_Host'"),
])
def test_merge_errors(kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"hostname": "h", **kw}
    with pytest.raises(UsageError) as e:
        workload({}, **args)  # type: ignore[arg-type]
    assert e.value.message == message


def test_config_reads_back_in_a_real_shell(tmp_path: Path) -> None:
    tricky = ["it's", 'a "b"', "$(rm -rf /)", "back\\slash", "new\nline", "", "--"]
    w = workload({"Cmd": ["x"]}, command=tricky, env=["Q=$HOME 'x'"], hostname="h")
    cfg = tmp_path / "config"
    cfg.write_text(guest_init.render_config(w))
    out = subprocess.run(["/bin/busybox", "sh", "-c",
                          '. "$1"; printf "%s\\0" "$KILN_PATH" "$@"', "sh", str(cfg)],
                         capture_output=True, check=True).stdout.decode()
    assert out.split("\0")[:-1] == [DEFAULT_PATH, "Q=$HOME 'x'", f"PATH={DEFAULT_PATH}",
                                    "HOSTNAME=h", "--", *tricky]


def test_init_script_parses() -> None:
    subprocess.run(["/bin/busybox", "sh", "-n", str(Path(guest_init.__file__).parent /
                                                     "init.sh")], check=True)


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True).stdout


def _ext4(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "tree"
    src.mkdir()
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    img = tmp_path / "snap.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(src), str(img), "16M"], check=True)
    return img


def test_inject_writes_root_owned_files(tmp_path: Path) -> None:
    img = _ext4(tmp_path, {"proc/.keep": ""})
    w = workload({"Cmd": ["sh"]}, hostname="h")
    guest_init.inject(img, w, scratch=tmp_path)
    listing = _debugfs(img, "ls -p /.kiln")
    rows = {r.split("/")[5]: r.split("/") for r in listing.splitlines() if r.count("/") >= 6}
    assert rows["busybox"][2:5] == ["100755", "0", "0"]
    assert rows["init"][2:5] == ["100755", "0", "0"]
    assert rows["config"][2:5] == ["100644", "0", "0"]
    assert _debugfs(img, "cat /.kiln/config") == guest_init.render_config(w)
    assert _debugfs(img, "cat /.kiln/init").encode() == guest_init.init_script()
    root = _debugfs(img, "ls -p /")
    assert {"/proc/", "/sys/", "/dev/"} <= {"/" + r.split("/")[5] + "/"
                                            for r in root.splitlines() if r.count("/") >= 6}


def test_inject_for_the_control_channel_writes_no_config(tmp_path: Path) -> None:
    """QEMU: the static files only (busybox, init, agent); the workload goes to the driver
    (``Boot.workload``), never onto the disk."""
    img = _ext4(tmp_path, {"proc/.keep": ""})
    agent = tmp_path / "agent-bin"
    agent.write_bytes(b"\x7fELF fake")
    agent.chmod(0o755)
    w = workload({"Cmd": ["sh"]}, env=["A=1"], hostname="h")
    guest_init.inject(img, w, scratch=tmp_path, agent=agent, on_disk=False)
    listing = _debugfs(img, "ls -p /.kiln")
    rows = {r.split("/")[5]: r.split("/") for r in listing.splitlines() if r.count("/") >= 6}
    assert set(rows) - {".", ".."} == {"busybox", "init", "agent"}
    assert rows["agent"][2:5] == ["100755", "0", "0"]
    with pytest.raises(KilnError, match="the control channel needs kiln's agent"):
        guest_init.inject(img, w, on_disk=False)


def test_inject_refuses_an_image_with_its_own_kiln_files(tmp_path: Path) -> None:
    img = _ext4(tmp_path, {".kiln/init": "#!/bin/sh\n"})
    with pytest.raises(KilnError) as e:
        guest_init.inject(img, workload({"Cmd": ["sh"]}, hostname="h"), scratch=tmp_path)
    assert e.value.message == ("cannot write kiln's init into the VM's snapshot: "
                               "write: Ext2 file already exists")


def test_inject_nothing_for_the_images_own_init(tmp_path: Path) -> None:
    img = _ext4(tmp_path, {"etc/hostname": "x\n"})
    before = img.read_bytes()
    guest_init.inject(img, None)
    assert img.read_bytes() == before


def _run_net_block(tmp_path: Path, cmdline: str, *, fail: str = "") -> list[str]:
    """init.sh's settings and network steps for a cold Firecracker run (``/.kiln/config``
    and the kernel command line), run by busybox sh with ``$bb`` a recorder: the commands
    it would run for ``cmdline``, paths moved under ``tmp_path``. (With the control channel
    the agent does them: the e2e runs check its results in real guests.)"""
    text = (Path(guest_init.__file__).parent / "init.sh").read_text()
    block = text[text.index("start_from_config() {"):text.index("  # The user:")] + "}\n"
    (tmp_path / "config").write_text("KILN_HOSTNAME=h\n")
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "eth0").mkdir()
    log = tmp_path / "log"
    bb = tmp_path / "bb"
    # The recorder fails the command named by $FAIL (e.g. "ip addr add"), like a real error.
    bb.write_text(f'#!/bin/sh\necho "$*" >>{log}\ncase "$*" in "$FAIL"*) exit 1 ;; esac\n')
    bb.chmod(0o755)
    script = (f"bb={bb}\nerr=/dev/null\n"
              f"say() {{ echo \"say: $*\" >>{log}; }}\nfinish() {{ echo finish $1 >>{log}; }}\n"
              # the command line as the channel search above the function reads it
              + ("read -r cmdline </proc/cmdline\n" + block + "start_from_config\n")
              .replace("/proc/cmdline", str(tmp_path / "cmdline"))
              .replace("/.kiln/config", str(tmp_path / "config"))
              .replace("/etc/machine-id", str(tmp_path / "machine-id"))
              .replace("/proc/sys/kernel/hostname", str(tmp_path / "hostname"))
              .replace("[ -d /etc ]", "true")
              .replace("/sys/class/net/eth0", str(tmp_path / "eth0"))
              .replace("/etc/resolv.conf", str(tmp_path / "resolv.conf")))
    # this runs as root on the host: nothing of the host's kernel may be written
    assert "/proc/sys" not in script, "a host path left unmapped"
    assert "/sys/class" not in script, "a host path left unmapped"
    subprocess.run(["/bin/busybox", "sh", "-c", script], check=True,
                   env={"PATH": "/bin:/usr/bin", "FAIL": fail or "-"})
    return log.read_text().splitlines() if log.exists() else []


def test_init_configures_eth0_from_the_kernel_command_line(tmp_path: Path) -> None:
    got = _run_net_block(tmp_path, "console=ttyS0 quiet kiln.ip=10.213.0.7/24 "
                         "kiln.gw=10.213.0.1 kiln.dns=192.0.2.53,192.0.2.54 init=/.kiln/init")
    assert got == ["ip addr add 10.213.0.7/24 dev eth0", "ip link set eth0 up",
                   "ip route add default via 10.213.0.1", "say: eth0 10.213.0.7/24"]
    assert (tmp_path / "hostname").read_text() == "h\n"
    assert (tmp_path / "resolv.conf").read_text() == ("nameserver 192.0.2.53\n"
                                                       "nameserver 192.0.2.54\n")


def test_init_leaves_the_network_alone_without_kiln_ip(tmp_path: Path) -> None:
    assert _run_net_block(tmp_path, "console=ttyS0 ip=10.0.0.2::10.0.0.1 kiln.gw=10.0.0.1"
                          ) == []
    assert not (tmp_path / "resolv.conf").exists()


def test_init_reports_an_eth0_it_cannot_configure(tmp_path: Path) -> None:
    got = _run_net_block(tmp_path, "kiln.ip=10.213.0.7/24 kiln.gw=10.213.0.1",
                         fail="ip addr add")
    assert got == ["ip addr add 10.213.0.7/24 dev eth0",
                   "say: cannot configure eth0 with 10.213.0.7/24"]

"""Guest init: the config merge (docker's rules), the debugfs injection and the settings
on the disk checked with debugfs, the agent's file reader, init.sh's syntax."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helper.base.errors import KilnError, UsageError
from runner import guest_init
from runner.guest_init import DEFAULT_PATH, Workload, channel, workload

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


def test_init_script_parses() -> None:
    subprocess.run(["/bin/busybox", "sh", "-n", str(Path(guest_init.__file__).parent /
                                                     "init.sh")], check=True)


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True).stdout


def _dump(image: Path, path: str, tmp_path: Path) -> bytes:
    out = tmp_path / "dumped"
    out.unlink(missing_ok=True)
    subprocess.run(["debugfs", "-R", f"dump {path} {out}", str(image)], capture_output=True,
                   check=True)
    return out.read_bytes()


def _ext4(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "tree"
    src.mkdir()
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    img = tmp_path / "snap.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(src), str(img), "16M"], check=True)
    return img


def _fake_agent(tmp_path: Path) -> Path:
    agent = tmp_path / "agent-bin"
    agent.write_bytes(b"\x7fELF fake")
    agent.chmod(0o755)
    return agent


def _rows(img: Path, d: str) -> dict[str, list[str]]:
    listing = _debugfs(img, f"ls -p {d}")
    return {r.split("/")[5]: r.split("/") for r in listing.splitlines() if r.count("/") >= 6}


def test_inject_writes_root_owned_files_and_no_workload(tmp_path: Path) -> None:
    """The static files only (busybox, init, agent): the workload goes to the driver
    (``Boot.workload``), which sends it over the control channel."""
    img = _ext4(tmp_path, {"proc/.keep": ""})
    w = workload({"Cmd": ["sh"]}, env=["A=1"], hostname="h")
    guest_init.inject(img, w, scratch=tmp_path, agent=_fake_agent(tmp_path))
    rows = _rows(img, "/.kiln")
    assert set(rows) - {".", ".."} == {"busybox", "init", "agent"}
    for name in ("busybox", "init", "agent"):
        assert rows[name][2:5] == ["100755", "0", "0"], name
    assert _debugfs(img, "cat /.kiln/init").encode() == guest_init.init_script()
    root = _rows(img, "/")
    assert {"proc", "sys", "dev"} <= set(root)


def test_settings_on_the_disk_are_roots_alone_and_rewritten(tmp_path: Path) -> None:
    """A cold Firecracker run's settings: the frame as ``/.kiln/settings``, 0600 root (the
    seed in it), written again whole for another lease (``write_settings``)."""
    img = _ext4(tmp_path, {"proc/.keep": ""})
    w = workload({"Cmd": ["sh"]}, hostname="h")
    first = channel.encode_settings(channel.Settings(w, "a" * 32), time_ns=None,
                                    seed=bytes(range(32)))
    guest_init.inject(img, w, scratch=tmp_path, agent=_fake_agent(tmp_path), settings=first)
    assert _rows(img, "/.kiln")["settings"][2:5] == ["100600", "0", "0"]
    assert _dump(img, "/.kiln/settings", tmp_path) == first
    net = channel.GuestNet("02:00:00:00:00:01", "10.0.0.2/24", "10.0.0.1", ("192.0.2.53",))
    second = channel.encode_settings(channel.Settings(w, "b" * 32, net), time_ns=None,
                                     seed=bytes(32))
    guest_init.write_settings(img, second, scratch=tmp_path)
    assert _rows(img, "/.kiln")["settings"][2:5] == ["100600", "0", "0"]
    assert _dump(img, "/.kiln/settings", tmp_path) == second
    subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, check=True)


def test_the_agent_reads_settings_from_a_file_once(tmp_path: Path) -> None:
    """``file:PATH``, the agent's reader for settings on the disk (its ``greet`` mode, which
    applies nothing): no hello written into the file, the frame read, the file removed."""
    from runner.guest_init import agentbin

    agent = agentbin.ensure_agent(tmp_path / "cache", scratch=tmp_path)
    w = workload({}, command=["echo", "it's"], hostname="h")
    frame = channel.encode_settings(channel.Settings(w, "c" * 32), time_ns=None,
                                    seed=bytes(32))
    path = tmp_path / "settings"
    path.write_bytes(frame)
    res = subprocess.run([str(agent), "greet", f"file:{path}"], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "KILN_HOSTNAME='h'" in res.stdout
    assert "KILN_MACHINE_ID='cccccccccccccccccccccccccccccccc'" in res.stdout
    assert res.stdout.rstrip().endswith("-- 'echo' 'it'\\''s'")
    assert not path.exists()
    missing = subprocess.run([str(agent), "greet", f"file:{path}"], capture_output=True,
                             text=True, check=False)
    assert missing.returncode == 1
    assert missing.stderr == f"kiln-agent: {path}: No such file or directory\n"


def test_inject_refuses_an_image_with_its_own_kiln_files(tmp_path: Path) -> None:
    img = _ext4(tmp_path, {".kiln/init": "#!/bin/sh\n"})
    with pytest.raises(KilnError) as e:
        guest_init.inject(img, workload({"Cmd": ["sh"]}, hostname="h"), scratch=tmp_path,
                          agent=_fake_agent(tmp_path))
    assert e.value.message == ("cannot write kiln's init into the VM's snapshot: "
                               "write: Ext2 file already exists")


def test_inject_nothing_for_the_images_own_init(tmp_path: Path) -> None:
    img = _ext4(tmp_path, {"etc/hostname": "x\n"})
    before = img.read_bytes()
    guest_init.inject(img, None, agent=_fake_agent(tmp_path))
    assert img.read_bytes() == before


def test_the_agent_refuses_a_machine_id_that_is_not_32_hex_digits(tmp_path: Path) -> None:
    """Only 32 lowercase hex digits go into /etc/machine-id: a longer one was written
    with the agent's stack after it (the length snprintf wanted, not what fit)."""
    from runner.guest_init import agentbin

    agent = agentbin.ensure_agent(tmp_path / "cache", scratch=tmp_path)
    w = workload({}, command=["true"], hostname="h")
    good = channel.encode_settings(channel.Settings(w, "d" * 32), time_ns=None,
                                   seed=bytes(32))
    for mid, code in ((b"d" * 32, 0), (b"d" * 300, 2), (b"D" * 32, 2), (b"", 0)):
        frame = good.replace(b"machine_id=" + b"d" * 32, b"machine_id=" + mid)
        frame = frame[:4] + (len(frame) - 8).to_bytes(4, "big") + frame[8:]
        path = tmp_path / "settings"
        path.write_bytes(frame)
        res = subprocess.run([str(agent), "greet", f"file:{path}"], capture_output=True,
                             text=True, check=False)
        assert res.returncode == code, (mid, res.stderr)
        if code:
            assert res.stderr == "kiln-agent: machine id is not 32 hex digits\n"


def test_a_host_that_hung_up_does_not_kill_the_agent_with_sigpipe(tmp_path: Path) -> None:
    """The hello on a socket whose peer is gone is an error (the vsock listener then
    accepts the next connection), not SIGPIPE: the workload's process died of it (141)."""
    import socket

    from runner.guest_init import agentbin

    agent = agentbin.ensure_agent(tmp_path / "cache", scratch=tmp_path)
    host, guest = socket.socketpair()
    host.close()
    with guest:
        res = subprocess.run([str(agent), "greet", f"fd:{guest.fileno()}"],
                             pass_fds=(guest.fileno(),), capture_output=True, text=True,
                             check=False)
    assert res.returncode == 1, res
    assert res.stderr == "kiln-agent: cannot greet the host: Broken pipe\n"


def _reads_before_hello(agent: Path, tmp: Path, cmdline: str, sh_device: bool = False
                        ) -> list[str]:
    """The paths ``agent run`` opens before its hello, booted with ``cmdline`` (a file
    bound over /proc/cmdline in a mount namespace of its own; strace names the opens);
    ``sh_device``: /bin/sh is a device there (/dev/null bound over it)."""
    import socket

    (tmp / "cmdline").write_text(cmdline + "\n")
    log = tmp / "trace"
    host, guest = socket.socketpair()
    with host, guest:
        script = (('mount --bind /dev/null /bin/sh && ' if sh_device else '') +
                  'mount --bind "$1" /proc/cmdline && exec strace -f -qq -o "$2" '
                  '-e trace=openat,sendto "$3" run "fd:$4"')
        p = subprocess.Popen(["unshare", "-m", "sh", "-c", script, "sh", str(tmp / "cmdline"),
                              str(log), str(agent), str(guest.fileno())],
                             pass_fds=(guest.fileno(),), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        guest.close()
        host.settimeout(60)
        assert host.recv(8) == b"HEL1\0\0\0\0"
        host.close()  # no settings: the agent ends (125)
        assert p.wait(timeout=60) == 125
    lines = log.read_text().splitlines()
    hello = next(i for i, line in enumerate(lines) if '"HEL1' in line)
    return [line.split('"')[1] for line in lines[:hello]
            if "openat(" in line and "= -1" not in line]


@pytest.mark.root
def test_a_warm_boots_agent_reads_what_runs_need_before_its_hello(tmp_path: Path) -> None:
    """Booted for a warm image (``kiln.warm`` on the command line), the agent reads the
    user files, the default PATH's directories and the shell before it greets the host:
    what a restored guest needs next is then in its page cache. Other boots read none."""
    from runner.guest_init import agentbin

    agent = agentbin.ensure_agent(tmp_path / "cache", scratch=tmp_path)
    warm = _reads_before_hello(agent, tmp_path, f"console=ttyS0 {guest_init.WARM_ARG}")
    dirs = [d for d in DEFAULT_PATH.split(":") if Path(d).is_dir()]
    assert {"/etc/passwd", "/etc/group", "/bin/sh", *dirs} <= set(warm), warm
    cold = _reads_before_hello(agent, tmp_path, "console=ttyS0 kiln.warmer")
    assert not {"/etc/passwd", "/etc/group", "/bin/sh", *dirs} & set(cold), cold
    # an image's /bin/sh that is a device (or a FIFO) is not opened at all
    device = _reads_before_hello(agent, tmp_path, guest_init.WARM_ARG, sh_device=True)
    assert "/etc/passwd" in device
    assert "/bin/sh" not in device

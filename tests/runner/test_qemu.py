"""The QEMU driver's pure parts: the exact argv, the kernel command line, the host TSC
frequency, port forwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from helper.base.errors import UsageError
from runner.vmm import qemuargv


def spec(**kw: object) -> qemuargv.QemuSpec:
    d = Path("/r/vms/abc")
    base: dict[str, object] = dict(
        name="kiln-abcdefghijkl", kernel=Path("/boot/vmlinuz"), initrd=Path("/k/initrd.cpio"),
        disk=Path("/p/snap.ext4"), cpus=2, memory_mib=512, accel="tcg", tsc_khz=2600000,
        console_log=d / "console.log", stdout=d / "stdout", stderr=d / "stderr",
        status=d / "status", control=d / "ctl", init="/.kiln/init", version=(7, 2))
    base.update(kw)
    return qemuargv.QemuSpec(**base)  # type: ignore[arg-type]


APPEND_TCG = ("console=ttyS0 root=/dev/vda rootfstype=ext4 rw init=/.kiln/init panic=-1 "
              "reboot=t quiet pci=off initcall_blacklist=pci_arch_init random.trust_cpu=on "
              "cryptomgr.notests tsc_early_khz=2600000")


def test_argv_exact_unprivileged_tcg() -> None:
    assert qemuargv.argv(spec()) == [
        "qemu-system-x86_64",
        "-name", "kiln-abcdefghijkl,process=kiln-abcdefghijkl",
        "-machine", "microvm",
        "-bios", "qboot.rom",
        "-accel", "tcg,tb-size=128",
        "-smp", "2",
        "-m", "512M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel", "/boot/vmlinuz",
        "-initrd", "/k/initrd.cpio",
        "-append", APPEND_TCG,
        "-chardev", "file,id=console,path=/r/vms/abc/console.log",
        "-serial", "chardev:console",
        "-drive", "id=root,file=/p/snap.ext4,format=raw,if=none,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", "file,id=stdout,path=/r/vms/abc/stdout",
        "-device", "virtserialport,chardev=stdout,name=kiln.stdout",
        "-chardev", "file,id=stderr,path=/r/vms/abc/stderr",
        "-device", "virtserialport,chardev=stderr,name=kiln.stderr",
        "-chardev", "file,id=status,path=/r/vms/abc/status",
        "-device", "virtserialport,chardev=status,name=kiln.status",
        "-chardev", "pipe,id=control,path=/r/vms/abc/ctl",
        "-device", "virtserialport,chardev=control,name=kiln.control",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]


def test_argv_root_kvm_net_user_interactive() -> None:
    a = qemuargv.argv(spec(accel="kvm", runas="820000:820000",
                           chroot=Path("/r/vms/abc/empty"), net="user",
                           forwards=(qemuargv.Forward(8080, 80), qemuargv.Forward(2222, 22)),
                           interactive=True))
    assert a[a.index("-accel") + 1] == "kvm"
    assert a[a.index("-cpu") + 1] == "host"
    # KVM needs no TSC hint, and its crypto self-tests are cheap: they stay on
    assert ("tsc_early_khz" in a[a.index("-append") + 1],
            "cryptomgr.notests" in a[a.index("-append") + 1]) == (False, False)
    tail = a[a.index("virtserialport,chardev=control,name=kiln.control") + 1:]
    assert tail == [
        "-chardev", "stdio,id=stdin,signal=off",
        "-device", "virtserialport,chardev=stdin,name=kiln.stdin",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "virtio-net-device,netdev=net0",
        "-runas", "820000:820000",
        "-chroot", "/r/vms/abc/empty",
        "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
    ]


@pytest.mark.parametrize("version", [(9, 1), (10, 0)])
def test_argv_root_from_qemu_9_1_drops_root_with_run_with(version: tuple[int, int]) -> None:
    """QEMU 8.1 took -chroot into -run-with, 9.1 -runas (9.0 and 10.0 removed them);
    older QEMUs keep theirs (above)."""
    a = qemuargv.argv(spec(runas="820000:820000", chroot=Path("/r/vms/a,b/empty"),
                           version=version))
    assert a[a.index("virtserialport,chardev=control,name=kiln.control") + 1:] == [
        "-run-with", "chroot=/r/vms/a,,b/empty,user=820000:820000",
        "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
    ]
    assert "-runas" not in a
    assert "-chroot" not in a
    for older, drop in (((9, 0), ["-runas", "820000:820000", "-run-with", "chroot=/e"]),
                        ((8, 1), ["-runas", "820000:820000", "-run-with", "chroot=/e"]),
                        ((8, 0), ["-runas", "820000:820000", "-chroot", "/e"])):
        old = qemuargv.argv(spec(runas="820000:820000", chroot=Path("/e"), version=older))
        assert old[-6:-2] == drop, older  # 9.0 removed -chroot, 10.0 -runas
    user = qemuargv.argv(spec(version=version))  # an ordinary user's QEMU drops nothing
    assert "-run-with" not in user
    assert user[-2] == "-sandbox"


def test_argv_warm_memory_file() -> None:
    """From QEMU 8.2 a warm image's memory is a file: shared while it is saved, opened
    read-only and mapped private (copy-on-write) by each clone."""
    save = qemuargv.argv(spec(warm="save", qmp=Path("/q"), ram=Path("/w/a,b/mem"),
                              version=(10, 0)))
    assert save[save.index("-machine") + 1] == "microvm,memory-backend=ram"
    assert save[save.index("-object") + 1] == (
        "memory-backend-file,id=ram,size=512M,mem-path=/w/a,,b/mem,share=on")
    assert save[save.index("-m") + 1] == "512M"
    restore = qemuargv.argv(spec(warm="restore", qmp=Path("/q"), ram=Path("/w/mem"),
                                 version=(8, 2)))
    assert restore[restore.index("-object") + 1] == (
        "memory-backend-file,id=ram,size=512M,mem-path=/w/mem,share=off,readonly=on,rom=off")
    assert "-object" not in qemuargv.argv(spec(warm="restore", qmp=Path("/q"), version=(10, 0)))
    with pytest.raises(UsageError, match=r"^QEMU 8\.1 cannot map a warm image's memory file$"):
        qemuargv.argv(spec(warm="save", qmp=Path("/q"), ram=Path("/w/mem"), version=(8, 1)))


@pytest.mark.parametrize(("text", "version"), [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", (7, 2)),
    ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", (10, 0)),
    ("missing", (0, 0)),
])
def test_parse_version(text: str, version: tuple[int, int]) -> None:
    assert qemuargv.parse_version(text) == version


def test_qemu_version_is_the_installed_one_asked_once(tmp_path: Path) -> None:
    import subprocess

    from builder.root import Root

    root = Root(tmp_path)
    first = subprocess.run([qemuargv.BINARY, "--version"], capture_output=True, text=True,
                           check=True).stdout.splitlines()[0]
    assert qemuargv.qemu_version(root) == qemuargv.parse_version(first) != (0, 0)
    facts = (tmp_path / "kernels" / "warm-facts.json").read_text()
    assert first in facts
    (tmp_path / "kernels" / "warm-facts.json").write_text(facts.replace(first, "version 9.9"))
    assert qemuargv.qemu_version(root) == (9, 9)  # the cached answer, not QEMU asked again
    from runner.facts import FileFacts

    mute = tmp_path / "mute"
    mute.write_text("#!/bin/sh\nexit 0\n")
    mute.chmod(0o755)
    ff = FileFacts(root)
    assert ff.version(mute) == "unknown"  # no output: not kept
    ff.save()
    assert "unknown" not in (tmp_path / "kernels" / "warm-facts.json").read_text()


def test_commas_in_paths_are_escaped() -> None:
    a = qemuargv.argv(spec(disk=Path("/p/a,b.ext4")))
    assert a[a.index("-drive") + 1] == "id=root,file=/p/a,,b.ext4,format=raw,if=none,discard=unmap"


def test_argv_refusals() -> None:
    with pytest.raises(UsageError, match=r"^--net vde is not supported by the QEMU driver$"):
        qemuargv.argv(spec(net="vde"))
    with pytest.raises(UsageError, match=r"^--net tap needs a tap$"):
        qemuargv.argv(spec(net="tap"))
    with pytest.raises(UsageError, match=r"^-p needs --net user$"):
        qemuargv.argv(spec(forwards=(qemuargv.Forward(1, 2),)))


TAP = qemuargv.TapNic("kt-abcdefghijkl", "02:1f:2e:3d:4c:5b")


def test_argv_exact_tap() -> None:
    a = qemuargv.argv(spec(net="tap", tap=TAP, runas="900001:900001",
                           chroot=Path("/r/vms/abc/empty")))
    # the network goes over the control channel, not the kernel command line
    assert a[a.index("-append") + 1] == APPEND_TCG
    tail = a[a.index("virtserialport,chardev=control,name=kiln.control") + 1:]
    assert tail == [
        "-netdev", "tap,id=net0,ifname=kt-abcdefghijkl,script=no,downscript=no",
        "-device", "virtio-net-device,netdev=net0,mac=02:1f:2e:3d:4c:5b",
        "-runas", "900001:900001",
        "-chroot", "/r/vms/abc/empty",
        "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
    ]


def test_no_network_words_on_the_kernel_command_line() -> None:
    """--net user and tap: the addresses reach kiln's init over the control channel
    (a saved state would freeze the command line)."""
    for kw in ({"net": "user"}, {}, {"net": "tap", "tap": TAP}):
        a = qemuargv.argv(spec(**kw))
        assert a[a.index("-append") + 1] == APPEND_TCG


def test_guest_settings_carry_the_network() -> None:
    from runner.guest_init import Workload, channel
    from runner.vmm.qemu import guest_settings

    w = Workload(("echo", "hi"), (("PATH", "/bin"),), "", "", "vm1")
    user = guest_settings(w, "abcdefghijkl", "user", None)
    assert user.net is not None
    assert (user.net.ip, user.net.gateway, user.net.dns) == ("10.0.2.15/24", "10.0.2.2",
                                                             ("10.0.2.3",))
    assert user.net.mac.startswith("02:")
    lease = channel.GuestNet("02:1f:2e:3d:4c:5b", "10.213.0.2/24", "10.213.0.1",
                             ("192.0.2.53",))
    assert guest_settings(w, "abcdefghijkl", "tap", lease).net == lease
    assert guest_settings(w, "abcdefghijkl", "none", lease).net is None
    none = guest_settings(w, "abcdefghijkl", "none", None)
    assert none.net is None
    assert (none.work.argv, none.work.hostname) == (("echo", "hi"), "vm1")
    assert len({guest_settings(w, "abcdefghijkl", "none", None).machine_id
                for _ in range(3)}) == 3  # a fresh machine id per run
    big = Workload(("echo", "x" * (64 << 10)), (), "", "", "vm1")
    with pytest.raises(UsageError) as e:  # refused before the boot, with the limit
        guest_settings(big, "abcdefghijkl", "none", None)
    assert e.value.message.startswith("the run's settings cannot be sent to the guest: SET1 "
                                      "frame of 65")
    assert e.value.message.endswith(" bytes exceeds the limit of 65536 bytes")


@pytest.mark.parametrize(("tap", "message"), [
    (qemuargv.TapNic("eth0", TAP.mac), "invalid tap name 'eth0'"),
    (qemuargv.TapNic("kt-abcdefghijklm", TAP.mac),
     "invalid tap name 'kt-abcdefghijklm'"),
    (qemuargv.TapNic("kt-a,script=/x", TAP.mac),
     "invalid tap name 'kt-a,script=/x'"),
    (qemuargv.TapNic(TAP.ifname, "02:1F:2E:3D:4C:5B"),
     "invalid MAC address '02:1F:2E:3D:4C:5B'"),
])
def test_tap_refusals(tap: qemuargv.TapNic, message: str) -> None:
    with pytest.raises(UsageError) as e:
        qemuargv.argv(spec(net="tap", tap=tap))
    assert e.value.message == message


@pytest.mark.parametrize(("text", "want"), [("8080:80", (8080, 80)), ("1:65535/tcp", (1, 65535))])
def test_parse_forward(text: str, want: tuple[int, int]) -> None:
    assert qemuargv.parse_forward(text) == qemuargv.Forward(*want)


@pytest.mark.parametrize("text", ["80", "0:80", "70000:1", "a:b", "1:2/udp", ""])
def test_parse_forward_rejects(text: str) -> None:
    with pytest.raises(UsageError) as e:
        qemuargv.parse_forward(text)
    assert e.value.message == f"invalid port forward {text!r}"


CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2600.000
flags\t\t: fpu tsc constant_tsc nonstop_tsc tsc_known_freq
"""


def test_tsc_khz_sources() -> None:
    assert qemuargv.parse_tsc_khz(CPUINFO) == 2600000
    assert qemuargv.parse_tsc_khz(CPUINFO, "2899999\n") == 2899999  # sysfs wins
    assert qemuargv.parse_tsc_khz(CPUINFO.replace("constant_tsc ", "")) is None  # not invariant
    assert qemuargv.parse_tsc_khz("flags : constant_tsc\n") is None


def test_tsc_khz_on_this_host() -> None:
    """The value booted with here: what the host's own kernel calibrated (cpu MHz)."""
    khz = qemuargv.host_tsc_khz()
    if khz is None:
        pytest.skip("this host's TSC is not invariant")
    mhz = float(next(line.split(":")[1] for line in Path("/proc/cpuinfo").read_text()
                     .splitlines() if line.startswith("cpu MHz")))
    assert khz == round(mhz * 1000)


def test_argv_warm_device_set() -> None:
    """Warm runs: the same devices whatever the run's options (NIC and stdin port always),
    a QMP socket, the disk without auto-read-only; a restore waits for its state."""
    save = qemuargv.argv(spec(warm="save", qmp=Path("/r/vms/abc/qmp.sock"),
                              runas="820000:820000", chroot=Path("/r/vms/abc/empty")))
    assert save[save.index("-drive") + 1] == (
        "id=root,file=/p/snap.ext4,format=raw,if=none,discard=unmap,file.auto-read-only=off")
    tail = save[save.index("virtserialport,chardev=control,name=kiln.control") + 1:]
    assert tail == [
        "-chardev", "null,id=stdin",
        "-device", "virtserialport,chardev=stdin,name=kiln.stdin",
        "-qmp", "unix:/r/vms/abc/qmp.sock,server=on,wait=off",
        "-device", "virtio-net-device",
        "-runas", "820000:820000",
        "-chroot", "/r/vms/abc/empty",
        "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
    ]
    restore = qemuargv.argv(spec(warm="restore", qmp=Path("/q"), net="user",
                                 interactive=True))
    i = restore.index("-qmp")
    assert restore[i:i + 4] == ["-qmp", "unix:/q,server=on,wait=off", "-incoming", "defer"]
    assert "stdio,id=stdin,signal=off" in restore
    assert restore.count("virtio-net-device,netdev=net0") == 1
    assert "virtio-net-device" not in restore  # the user network's NIC is the one
    # a warm image's boot is a cold boot's (init_on_free=1 cost its boot ~1.3 s here),
    # and kiln.warm: its agent reads what runs need before its hello
    words = save[save.index("-append") + 1].split()
    assert words == qemuargv.boot_args("/.kiln/init", "tcg", 2600000, warm=True)
    cold = qemuargv.argv(spec())
    assert [*cold[cold.index("-append") + 1].split(), "kiln.warm"] == words
    with pytest.raises(UsageError, match="warm mode"):
        qemuargv.argv(spec(warm="boot", qmp=Path("/q")))


def test_a_monitor_wait_ends_when_qemu_is_gone(tmp_path: Path) -> None:
    """A restore whose QEMU exited before its monitor answered (a memory file it could
    not open) fails at once instead of waiting the whole restore timeout."""
    import time

    from runner.vmm.qmp import Qmp, QmpError

    t0 = time.monotonic()
    with pytest.raises(QmpError, match=r"^QEMU exited before its monitor .* answered$"):
        Qmp(tmp_path / "qmp.sock", timeout=60, alive=lambda: False)
    assert time.monotonic() - t0 < 30  # not the timeout (a limit no busy machine reaches)
    with pytest.raises(QmpError, match=r"did not answer$"):
        Qmp(tmp_path / "qmp.sock", timeout=0.05, alive=lambda: True)

"""Firecracker warm runs with ``--net tap``, the pure parts: the key's device set per
network mode, the net the save VM runs with, the restore's settings, and how the driver
wires a lease into a warm VM (eth0 on the tap, no lease on the command line). The real
binary's side: tests/runner/test_firecracker_warm_net.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from builder.root import Root
from helper.base.errors import KilnError, UsageError
from helper.jail.jailer import JailConfig
from runner import network
from runner.guest_init import Workload, channel
from runner.guest_init.channel import GuestNet
from runner.vm import warmrun
from runner.vm.spec import RunOptions, WarmPlan
from runner.vmm import fcwarm
from runner.vmm import firecracker as fcd

WORK = Workload(("echo", "hi"), (("PATH", "/bin"),), "/", "0:0", "vm1")
VN = network.VmNet(vm_id="a", ip="10.0.0.2", guest_ip="10.0.0.2", prefix=24,
                   gateway="10.0.0.1", mac="02:00:00:00:00:01", tap="kt-a", netns=None,
                   namespace="kns", dns=("192.0.2.53",))
RESTORE = WarmPlan("restore", Path("/w/state"), Path("/w/disk"), Path("/w/mem"))


def _driver(root: Path = Path("/nonexistent")) -> fcd.FirecrackerDriver:
    cfg = JailConfig(jailer=Path("/j"), firecracker=Path("/fc"), chroot_base=Path("/srv/j"),
                     uid_first=900_000, uid_count=10, sources=())
    return fcd.FirecrackerDriver(Root(root), cfg)


def test_the_device_set_says_whether_the_nic_is_in_it() -> None:
    d = _driver()
    none = d.warm_facts(RunOptions(net="none"))
    tap = d.warm_facts(RunOptions(net="tap", publish=("8080:80",)))
    assert (none.devices, none.save_net) == ("fc:rootfs,vsock:3:v.sock", "none")
    assert (tap.devices, tap.save_net) == ("fc:rootfs,net:eth0,vsock:3:v.sock", "tap")
    assert none.cmdline == tap.cmdline  # the lease is never on a warm command line
    assert "kiln.ip=" not in tap.cmdline
    assert none.devices == fcwarm.DEVICES  # --net none images keep their key


@pytest.mark.parametrize(("opts", "message"), [
    (RunOptions(net="user"), "Firecracker VMs have no --net user and no -i (stdin) yet"),
    (RunOptions(net="tap", interactive=True),
     "Firecracker VMs have no --net user and no -i (stdin) yet"),
])
def test_warm_refuses_what_firecracker_cannot_do(opts: RunOptions, message: str) -> None:
    with pytest.raises(UsageError) as e:
        _driver().warm_facts(opts)
    assert e.value.message == message
    with pytest.raises(UsageError) as e2:
        fcwarm.devices("user")
    assert e2.value.message == "Firecracker warm runs have no --net user"


def test_a_restore_is_told_its_clones_eth0() -> None:
    s = fcwarm.settings(RESTORE, WORK, VN)
    assert s is not None
    assert (s.work, s.net, s.stdin) == (WORK, GuestNet("02:00:00:00:00:01", "10.0.0.2/24",
                                                       "10.0.0.1", ("192.0.2.53",)), None)
    other = fcwarm.settings(RESTORE, WORK, VN)
    assert other is not None
    assert other.machine_id != s.machine_id  # fresh per clone
    none = fcwarm.settings(RESTORE, WORK, None)
    assert none is not None
    assert none.net is None
    cold = fcwarm.settings(None, WORK, VN)  # a cold run's: written on its disk
    assert cold is not None
    assert cold.net == VN.guest()
    assert fcwarm.settings(None, None, VN) is None  # --init image: no settings at all
    assert fcwarm.settings(WarmPlan("save", Path("/s"), Path("/d")), WORK, VN) is None
    big = Workload(("x" * (70 << 10),), (), "/", "0:0", "vm1")
    with pytest.raises(UsageError) as e:
        fcwarm.settings(RESTORE, big, VN)
    assert e.value.message.startswith("the run's settings cannot be sent to the guest")


@pytest.mark.parametrize("warm", [None, WarmPlan("save", Path("/s"), Path("/d"), Path("/m")),
                                  RESTORE])
def test_make_gives_eth0_the_lease_in_the_settings_never_on_the_command_line(
        monkeypatch: pytest.MonkeyPatch, warm: WarmPlan | None) -> None:
    """A cold run's settings (eth0 from the lease) are written onto its disk, and its
    command line says so (``kiln.ctl=file:``); a restore's go over vsock; a save sends
    none. No run puts the lease on the kernel command line."""
    from runner import guest_init

    made: dict[str, Any] = {}
    written: list[tuple[Path, bytes]] = []
    rec = SimpleNamespace(id="a")
    monkeypatch.setattr(fcd.vmres, "net_attach", lambda *a: (VN, rec))
    monkeypatch.setattr(fcd, "ops_for", lambda root: None)
    monkeypatch.setattr(fcd, "make_vm", lambda *a, **kw: made.update(kw) or "vm")
    monkeypatch.setattr(guest_init, "write_settings",
                        lambda image, frame, scratch=None: written.append((image, frame)))
    boot = SimpleNamespace(intent=object(), picker=None, warm=warm, disk=Path("/snap"),
                           opts=RunOptions(net="tap"), init="/.kiln/init", workload=WORK)
    vm, got_rec, settings = _driver()._make(None, rec, boot, Path("/k"), Path("/i"))  # type: ignore[arg-type]
    assert (vm, got_rec) == ("vm", rec)
    assert made["nets"] == (VN.firecracker_nic(),)
    assert made["netns"] == "kns"
    assert not any(a.startswith(("kiln.ip=", "kiln.gw=")) for a in made["kernel_args"])
    if warm is None:
        assert made["kernel_args"] == ("kiln.ctl=file:/.kiln/settings",)
        assert settings is None  # nothing over vsock
        [(image, frame)] = written
        assert image == Path("/snap")
        tag, payload, rest = channel.decode_frame(frame)
        records = payload.split(b"\0")
        assert (tag, rest) == (channel.SETTINGS, b"")
        assert b"ip=10.0.0.2/24" in records
        assert b"gw=10.0.0.1" in records
        assert b"mac=02:00:00:00:00:01" in records
        assert not any(r.startswith(b"time=") for r in records)  # the guest keeps its clock
    else:
        assert written == []
        assert made["kernel_args"] == ("kiln.ctl=vsock:5252", "kiln.warm")
        assert made["vsock"] == fcwarm.VSOCK
        assert (settings is not None) == (warm.mode == "restore")
        if settings is not None:
            assert settings.net == VN.guest()


@pytest.mark.parametrize(("net", "save_net"), [("tap", "tap"), ("none", "none")])
def test_the_save_vm_runs_with_the_drivers_save_net(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, net: str, save_net: str) -> None:
    """``kiln warm create --net tap`` on Firecracker saves from a VM on the kiln network
    (no -p: the forwards are the clone's); the image is never made without it."""
    root = Root(tmp_path / "root").ensure()
    seen: list[RunOptions] = []
    monkeypatch.setattr(warmrun.lifecycle, "resolve_volume", lambda *a: SimpleNamespace(id="v"))
    monkeypatch.setattr(warmrun, "key_for", lambda *a: None)
    monkeypatch.setattr(warmrun.warm, "key_id", lambda key: "ab" * 32)
    monkeypatch.setattr(warmrun.lifecycle, "run",
                        lambda root, vol, opts, reg, warm: seen.append(opts) or 1)
    opts = RunOptions(vmm="firecracker", net=net, publish=("8080:80",) if net == "tap" else ())
    with pytest.raises(KilnError):  # the fake save "failed": nothing is published
        warmrun._create(root, "src", opts, None, _driver(root.path))
    assert [(o.net, o.publish, o.rm, o.command) for o in seen] == [
        (save_net, (), True, ("true",))]


@pytest.mark.parametrize(("args", "net"), [((), "none"), (("--net", "tap"), "tap")])
def test_warm_create_takes_the_runs_net(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        args: tuple[str, ...], net: str) -> None:
    """`kiln warm create --net tap` makes the image `kiln run --warm --net tap` restores."""
    from click.testing import CliRunner

    from builder.warm import WarmRecord
    from runner.cli import cli

    seen: list[RunOptions] = []
    rec = WarmRecord("ab" * 32, "sha256:" + "c" * 64, "firecracker", 512, 1, 0, 0.0)

    def create(root: Root, source: str, opts: RunOptions, reg: Any, say: Any
               ) -> tuple[WarmRecord, bool]:
        seen.append(opts)
        return rec, True

    monkeypatch.setattr(warmrun, "create", create)
    res = CliRunner().invoke(cli, ["--root", str(tmp_path), "warm", "create", "--vmm",
                                   "firecracker", *args, "src"])
    assert res.exit_code == 0, res.output
    assert [(o.vmm, o.net) for o in seen] == [("firecracker", net)]

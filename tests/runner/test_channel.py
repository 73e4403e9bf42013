"""The control channel's wire format (runner/guest_init/channel.py): exact bytes, round
trips and size limits (hypothesis), and the guest's own reader — the static agent built
from agent.c — run here in its ``print`` mode (which applies no seed and no clock) against
frames from the encoder, its output evaluated by a real busybox shell."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.guest_init import Workload, agentbin
from runner.guest_init import channel as ch

SEED = bytes(range(32))
T = 1_700_000_000_123_456_789
NET = ch.GuestNet("02:1f:2e:3d:4c:5b", "10.213.0.2/24", "10.213.0.1", ("192.0.2.53",))
KEYS = ("hostname", "machine_id", "time", "seed", "workdir", "user", "mac", "ip", "gw",
        "dns", "env", "arg")


def decode_settings(payload: bytes) -> dict[str, list[str]]:
    """A ``SET1`` payload as key → values, in order (the oracle: docs/run.md's grammar)."""
    if payload and not payload.endswith(b"\0"):
        raise ch.FrameError("settings record not ended by NUL")
    out: dict[str, list[str]] = {}
    for rec in payload.split(b"\0")[:-1] if payload else []:
        key, sep, value = rec.decode().partition("=")
        if not sep or key not in KEYS:
            raise ch.FrameError(f"unknown settings record {key!r}")
        if key in out and key not in ("env", "arg"):
            raise ch.FrameError(f"settings record {key!r} repeated")
        out.setdefault(key, []).append(value)
    return out


BASIC = ch.Settings(Workload(("echo", "hi"), (("PATH", "/bin"),), "/w", "0:0", "vm1"), "ab" * 16)


def test_frames_exact_bytes() -> None:
    assert ch.encode_frame(ch.HELLO, b"") == b"HEL1\0\0\0\0"
    assert ch.encode_stop(10) == b"STP1\0\0\0\x0210"
    assert ch.encode_stop(-3) == b"STP1\0\0\0\x010"
    assert ch.encode_stop(2.6) == b"STP1\0\0\0\x013"


def test_settings_exact_bytes() -> None:
    payload = (b"hostname=vm1\0machine_id=" + b"ab" * 16 + b"\0"
               b"time=1700000000.123456789\0seed=" + SEED.hex().encode() + b"\0"
               b"workdir=/w\0user=0:0\0env=PATH=/bin\0arg=echo\0arg=hi\0")
    assert ch.encode_settings(BASIC, time_ns=T, seed=SEED) == \
        b"SET1" + len(payload).to_bytes(4, "big") + payload
    with_net = ch.encode_settings(replace(BASIC, net=NET), time_ns=5, seed=SEED)
    assert b"\0mac=02:1f:2e:3d:4c:5b\0ip=10.213.0.2/24\0gw=10.213.0.1\0dns=192.0.2.53\0" \
        in with_net
    assert b"time=0.000000005\0" in with_net


_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=40)


@given(argv=st.lists(_text, min_size=1, max_size=6),
       env=st.lists(st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
                              _text), max_size=6),
       workdir=_text, user=_text, t=st.integers(0, 2**62),
       seed=st.binary(min_size=32, max_size=256))
def test_settings_round_trip(argv: list[str], env: list[tuple[str, str]], workdir: str,
                             user: str, t: int, seed: bytes) -> None:
    s = ch.Settings(Workload(tuple(argv), tuple(env), workdir, user, "vm1"), "0f" * 16, NET)
    tag, payload, rest = ch.decode_frame(ch.encode_settings(s, time_ns=t, seed=seed))
    assert (tag, rest) == (ch.SETTINGS, b"")
    got = decode_settings(payload)
    assert got["arg"] == argv
    assert got.get("env", []) == [f"{k}={v}" for k, v in env]
    assert (got["workdir"], got["user"], got["hostname"]) == ([workdir], [user], ["vm1"])
    sec, nsec = got["time"][0].split(".")
    assert int(sec) * 10**9 + int(nsec) == t
    assert bytes.fromhex(got["seed"][0]) == seed
    assert (got["mac"], got["ip"], got["gw"], got["dns"]) == (
        [NET.mac], [NET.ip], [NET.gateway], ["192.0.2.53"])


@given(size=st.integers(0, 200_000), tag=st.sampled_from([ch.HELLO, ch.SETTINGS, ch.STOP]))
def test_size_limits_are_refused_both_ways(size: int, tag: bytes) -> None:
    limit = ch.LIMITS[tag]
    header = tag + size.to_bytes(4, "big")
    if size <= limit:
        assert ch.decode_frame(ch.encode_frame(tag, b"x" * size)) == (tag, b"x" * size, b"")
        return
    message = f"{tag.decode()} frame of {size} bytes exceeds the limit of {limit} bytes"
    with pytest.raises(ch.FrameError) as e:
        ch.encode_frame(tag, b"x" * size)
    assert str(e.value) == message
    with pytest.raises(ch.FrameError) as e:  # refused from the header alone
        ch.decode_frame(header)
    assert str(e.value) == message


def test_oversized_settings_refused_with_a_clear_error() -> None:
    big = ch.Settings(Workload(("x" * (64 << 10),), (), "", "", "vm1"), "0" * 32)
    with pytest.raises(ch.FrameError, match=r"^SET1 frame of 65\d{3} bytes exceeds the limit "
                                            r"of 65536 bytes$"):
        ch.encode_settings(big, time_ns=T, seed=SEED)


@pytest.mark.parametrize(("data", "message"), [
    (b"HEL", "incomplete frame header"),
    (b"XXXX\0\0\0\0", "unknown frame type b'XXXX'"),
    (b"STP1\0\0\0\x0510", "incomplete frame payload"),
])
def test_malformed_frames(data: bytes, message: str) -> None:
    with pytest.raises(ch.FrameError) as e:
        ch.decode_frame(data)
    assert str(e.value) == message


@pytest.mark.parametrize(("kw", "seed", "message"), [
    ({"work": replace(BASIC.work, argv=())}, SEED, "the settings have no command"),
    ({"machine_id": "XYZ"}, SEED, "invalid machine id 'XYZ'"),
    ({}, b"short", "the seed must be 32 to 256 bytes, not 5"),
    ({"work": replace(BASIC.work, argv=("a\0b",))}, SEED,
     "the settings' arg contains a NUL byte"),
    ({"net": ch.GuestNet("02:00", "1.2.3.4/24", "1.2.3.1")}, SEED,
     "invalid MAC address '02:00'"),
    ({"net": ch.GuestNet(NET.mac, "1.2.3.4", "1.2.3.1")}, SEED,
     "invalid guest address '1.2.3.4'"),
])
def test_settings_refusals(kw: dict[str, object], seed: bytes, message: str) -> None:
    with pytest.raises(ch.FrameError) as e:
        ch.encode_settings(replace(BASIC, **kw), time_ns=T, seed=seed)  # type: ignore[arg-type]
    assert str(e.value) == message


def test_decode_settings_refusals() -> None:
    for payload, message in ((b"arg=x", "settings record not ended by NUL"),
                             (b"bogus=1\0", "unknown settings record 'bogus'"),
                             (b"user=a\0user=b\0", "settings record 'user' repeated")):
        with pytest.raises(ch.FrameError, match=message):
            decode_settings(payload)


# -- the guest's reader: agent.c ------------------------------------------------------------

@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("agent")
    return agentbin.ensure_agent(d / "cache", scratch=d)


def _agent(agent: Path, tmp: Path, frame: bytes, mode: str = "print"
           ) -> subprocess.CompletedProcess[bytes]:
    f = tmp / "frame"
    f.write_bytes(frame)
    return subprocess.run([str(agent), mode, str(f)], capture_output=True, timeout=10,
                          check=False)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(_text, min_size=1, max_size=4),
       env=st.lists(st.tuples(st.from_regex(r"[A-Z_]{1,6}", fullmatch=True), _text),
                    max_size=4), workdir=_text)
def test_agent_prints_what_a_shell_reads_back(agent: Path, tmp_path: Path, argv: list[str],
                                              env: list[tuple[str, str]],
                                              workdir: str) -> None:
    s = ch.Settings(Workload(tuple(argv), tuple(env), workdir, "1:2", "vm1"), "0f" * 16, NET)
    res = _agent(agent, tmp_path, ch.encode_settings(s, time_ns=T, seed=SEED))
    assert res.returncode == 0, res.stderr
    (tmp_path / "cfg").write_bytes(res.stdout)
    out = subprocess.run(
        ["/bin/busybox", "sh", "-c", '. "$1"; printf "%s\\0" "$KILN_HOSTNAME" '
         '"$KILN_WORKDIR" "$KILN_USER" "$KILN_MAC" "$KILN_IP" "$KILN_GW" "$KILN_DNS" '
         '"$KILN_MACHINE_ID" "$KILN_PATH" "$KILN_HAS_HOME" "$@"', "sh",
         str(tmp_path / "cfg")], capture_output=True, check=True).stdout
    path = next((v for k, v in reversed(env) if k == "PATH"), None)  # the last one
    got = [x.decode() for x in out.split(b"\0")[:-1]]
    assert got[:8] == ["vm1", workdir, "1:2", NET.mac, NET.ip, NET.gateway, "192.0.2.53",
                       "0f" * 16]
    assert got[9] == ("1" if any(k == "HOME" for k, _ in env) else "0")
    assert got[10:] == [*(f"{k}={v}" for k, v in env), "--", *argv]
    assert got[8] == (path if path is not None else
                      "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


@pytest.mark.parametrize(("frame", "code", "message"), [
    (b"SET1\0\x01\0\x01" + b"x" * 100, 2,
     b"kiln-agent: refused: SET1 frame of 65537 bytes exceeds the limit of 65536 bytes\n"),
    (b"STP1\0\0\x10\0", 2,
     b"kiln-agent: refused: STP1 frame of 4096 bytes exceeds the limit of 16 bytes\n"),
    (b"JUNK\0\0\0\0", 2, b"kiln-agent: refused: unknown frame type 4a554e4b\n"),
    (b"SET1\0\0\0\x20short", 2, b"kiln-agent: frame cut short: SET1\n"),
    (b"SE", 2, b"kiln-agent: the control channel closed\n"),
    (b"SET1\0\0\0\x06arg=x\0", 2, b"kiln-agent: settings incomplete\n"),
    (b"SET1\0\0\0\x06bad=x\0", 2, b"kiln-agent: unknown settings record: bad\n"),
    (b"SET1\0\0\0\x05arg=x", 2, b"kiln-agent: settings not NUL-terminated\n"),
    (b"STP1\0\0\0\x0210", 3, b""),  # a stop instead of the settings
])
def test_agent_refuses_bad_frames(agent: Path, tmp_path: Path, frame: bytes, code: int,
                                  message: bytes) -> None:
    res = _agent(agent, tmp_path, frame)
    assert (res.returncode, res.stderr, res.stdout) == (code, message, b"")


def test_install_deps_names_the_agent_as_kiln_does() -> None:
    """scripts/install-deps.sh hashes the same sources in the same order: its prebuilt
    binary is the one kiln looks for (else every root would build its own)."""
    repo = agentbin.SOURCES[0].parents[2]
    script = (repo / "scripts/install-deps.sh").read_text()
    line = next(x for x in script.splitlines() if x.startswith("agent=") and "sha256sum" in x)
    names = re.findall(r"\$g/(\S+)", line)
    assert [f"runner/guest_init/{n}" for n in names] == [
        str(p.relative_to(repo)) for p in agentbin.SOURCES]


def test_agent_binary_is_cached_by_source_hash(agent: Path, tmp_path: Path) -> None:
    assert agent.name == agentbin.binary_name(agentbin.source_bytes())
    assert os.access(agent, os.X_OK)
    assert agentbin.ensure_agent(agent.parent).name == agent.name  # found, not rebuilt

"""VM records in SQLite: ids, lookup by id/prefix/name, the resources named up front,
uid allocation, the one-way end of a VM, liveness by pid + start time."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from helper.base.errors import Conflict, NotFound
from runner.vm import state


def make(st: state.State, vm_id: str, name: str | None = None, uid: bool = True) -> state.VMRecord:
    return st.create(vm_id=vm_id, name=name, vmm="qemu", volume="sha256:" + "0" * 64,
                     snapshot="vm" + vm_id, vm_dir=st.vms_dir / vm_id,
                     cgroups=["/sys/fs/cgroup/cpu/kiln/" + vm_id], want_uid=uid,
                     auto_remove=False, spec={"argv": ["echo"]})


def test_ids_are_base32_lowercase() -> None:
    ids = {state.new_vm_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[a-z2-7]{12}", i) for i in ids)


def test_record_names_every_resource_before_it_exists(tmp_path: Path) -> None:
    st = state.State(tmp_path)
    rec = make(st, "aaaaaaaaaaaa", "web")
    assert (rec.state, rec.snapshot, rec.dir) == ("creating", "vmaaaaaaaaaaaa",
                                                  str(tmp_path / "vms" / "aaaaaaaaaaaa"))
    assert rec.cgroup_dirs == ["/sys/fs/cgroup/cpu/kiln/aaaaaaaaaaaa"]
    assert rec.owner_pid == os.getpid()
    assert state.alive(rec.owner_pid, rec.owner_start)
    assert json.loads(rec.spec) == {"argv": ["echo"]}
    assert rec.uid is not None
    assert state.UID_BASE <= rec.uid < state.UID_BASE + state.UID_COUNT
    assert make(st, "bbbbbbbbbbbb").uid != rec.uid  # both live: never the same uid


def test_find_by_id_prefix_name(tmp_path: Path) -> None:
    st = state.State(tmp_path)
    make(st, "abcdefghijkl", "web")
    make(st, "abcdzzzzzzzz")
    assert st.find("web").id == "abcdefghijkl"
    assert st.find("abcde").id == "abcdefghijkl"
    with pytest.raises(Conflict) as c:
        st.find("abcd")
    assert c.value.message == "VM id 'abcd' is ambiguous"
    with pytest.raises(NotFound) as n:
        st.find("x%")
    assert (n.value.message, n.value.hint) == ("no VM 'x%'", "list VMs with `kiln ps --all`")
    with pytest.raises(Conflict) as dup:
        make(st, "qqqqqqqqqqqq", "web")
    assert dup.value.message == "a VM named 'web' already exists"


def test_finish_is_one_way(tmp_path: Path) -> None:
    st = state.State(tmp_path)
    make(st, "aaaaaaaaaaaa")
    st.finish("aaaaaaaaaaaa", "failed", None, "kiln run (the VM's owner) died")
    st.finish("aaaaaaaaaaaa", "exited", 0, "")  # too late: the first end stays
    rec = st.get("aaaaaaaaaaaa")
    assert rec is not None
    assert (rec.state, rec.exit_code, rec.reason) == ("failed", None,
                                                      "kiln run (the VM's owner) died")
    assert rec.summary()["state"] == "failed"


def test_alive_checks_start_time_and_zombies() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        start = state.proc_start_time(p.pid)
        assert start is not None
        assert state.alive(p.pid, start)
        assert not state.alive(p.pid, start + 1)  # a reused pid is not the same process
    finally:
        p.kill()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # now a zombie, not yet reaped
    assert not state.alive(p.pid, start)
    p.wait()
    assert not state.alive(p.pid, start)
    assert not state.alive(None, None)


def test_orphan_memory(tmp_path: Path) -> None:
    st = state.State(tmp_path)
    st.set_orphans({("dir", "abcdefghijkl")})
    assert state.State(tmp_path).seen_orphans() == {("dir", "abcdefghijkl")}
    st.set_orphans(set())
    assert st.seen_orphans() == set()


def test_root_key_and_host_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (tmp_path / "link").symlink_to(a)
    key = state.root_key(a)
    assert re.fullmatch(r"[a-z2-7]{8}", key)
    assert state.root_key(str(a)) == key == state.root_key(tmp_path / "link")  # real path
    assert state.root_key(b) != key
    name = state.host_name(key, "abcdefghijkl")
    assert name == key + "abcdefghijkl"
    assert re.fullmatch(r"[a-z2-7]{1,32}", name)  # a valid jail id / kiln-helper VM id
    assert state.vm_of_host(name, key) == "abcdefghijkl"
    for other in [state.host_name(state.root_key(b), "abcdefghijkl"),  # another root's
                  "abcdefghijkl",  # from before root keys: its root is unknown
                  name + "a", name[:-1], key + "abcdefghijk1", key + "ABCDEFGHIJKL"]:
        assert state.vm_of_host(other, key) is None
    assert state.vm_of_host(name, "") is None


def test_net_document_steps_and_ps_ip(tmp_path: Path) -> None:
    """--net tap names its objects in the first INSERT (``recorded``: held, no ip yet);
    ``kiln ps`` shows the address only while the VM holds it."""
    st = state.State(tmp_path)
    rec = st.create(vm_id="aaaaaaaaaaaa", name=None, vmm="qemu", volume="v", snapshot="s",
                    vm_dir=tmp_path / "d", cgroups=[], want_uid=True, auto_remove=False,
                    spec={}, uid_range=(900_000, 10),
                    net={"step": state.NET_RECORDED, "tap": "kt-aaaaaaaaaaaa", "ip": None})
    assert 900_000 <= (rec.uid or 0) < 900_010
    assert (rec.net_held, rec.summary()["ip"]) == (True, None)
    st.update(rec.id, net=json.dumps({**rec.net_doc, "step": state.NET_ATTACHED,
                                      "ip": "10.213.0.2"}))
    cur = st.get(rec.id)
    assert cur is not None
    assert (cur.net_held, cur.summary()["ip"]) == (True, "10.213.0.2")
    st.update(rec.id, net=json.dumps({**cur.net_doc, "step": state.NET_RELEASED}))
    cur = st.get(rec.id)
    assert cur is not None
    assert (cur.net_held, cur.summary()["ip"], cur.net_doc["tap"]) == \
        (False, None, "kt-aaaaaaaaaaaa")
    plain = make(st, "bbbbbbbbbbbb")
    assert (plain.net, plain.net_held, plain.summary()["ip"]) == ("{}", False, None)


def test_old_database_gains_the_net_column(tmp_path: Path) -> None:
    """A database from before --net tap (and before the Firecracker driver) opens, gains
    both columns, and its VMs hold no network."""
    db = sqlite3.connect(tmp_path / "vms.db")
    schema = state._SCHEMA.replace("    fc TEXT NOT NULL DEFAULT '{}',\n", "").replace(
        "    net TEXT NOT NULL DEFAULT '{}',\n", "")
    assert "net TEXT" not in schema
    db.executescript(schema)
    db.execute("INSERT INTO vms (id, state, vmm, volume, snapshot, dir, created) "
               "VALUES ('aaaaaaaaaaaa', 'exited', 'qemu', 'v', 's', 'd', 0)")
    db.commit()
    db.close()
    st = state.State(tmp_path)
    rec = st.get("aaaaaaaaaaaa")
    assert rec is not None
    assert (rec.net, rec.net_held, rec.fc, rec.summary()["ip"]) == ("{}", False, "{}", None)
    cols = [r[1] for r in sqlite3.connect(tmp_path / "vms.db").execute(
        "PRAGMA table_info(vms)")]
    assert cols[-2:] == ["fc", "net"]
    state.State(tmp_path)  # a second open adds nothing


def test_vm_uids_start_at_a_random_offset_and_never_repeat_a_live_one(tmp_path: Path) -> None:
    """Other callers draw VM uids from the same range (the helper refuses one another
    caller's VM holds), so the scan starts at a random offset instead of the range's first."""
    st = state.State(tmp_path)
    uids = [st.create(vm_id=f"u{i}", name=None, vmm="qemu", volume="sha256:" + "0" * 64,
                      snapshot=f"vmu{i}", vm_dir=st.vms_dir / f"u{i}", cgroups=[],
                      want_uid=True, auto_remove=False, spec={},
                      uid_range=(900_000, 4)).uid for i in "abcd"]
    assert sorted(u for u in uids if u is not None) == [900_000, 900_001, 900_002, 900_003]
    with pytest.raises(Conflict, match="no free VM uid"):
        st.create(vm_id="ue", name=None, vmm="qemu", volume="sha256:" + "0" * 64,
                  snapshot="vmue", vm_dir=st.vms_dir / "ue", cgroups=[], want_uid=True,
                  auto_remove=False, spec={}, uid_range=(900_000, 4))
    st.finish("ub", "exited", 0, "")  # a finished VM's uid is free again
    assert st.create(vm_id="uf", name=None, vmm="qemu", volume="sha256:" + "0" * 64,
                     snapshot="vmuf", vm_dir=st.vms_dir / "uf", cgroups=[], want_uid=True,
                     auto_remove=False, spec={}, uid_range=(900_000, 4)).uid == uids[1]
    starts = set()
    for i in range(8):
        (tmp_path / str(i)).mkdir()
        starts.add(state.State(tmp_path / str(i)).create(
            vm_id="v", name=None, vmm="qemu", volume="sha256:" + "0" * 64, snapshot="vmv",
            vm_dir=tmp_path / "v", cgroups=[], want_uid=True, auto_remove=False, spec={},
            uid_range=(900_000, 65_536)).uid)
    assert len(starts) > 1  # 8 fresh roots: not all on one uid (chance of failure ~1e-34)


def test_reassign_uid_records_another_free_one_never_a_refused_one(tmp_path: Path) -> None:
    """The helper refused the VM's uid (another caller's VM holds it): the record gets a
    uid free in this root and not refused before; none left is "no free VM uid"."""
    st = state.State(tmp_path)
    mk = dict(name=None, vmm="qemu", volume="sha256:" + "0" * 64, cgroups=[], want_uid=True,
              auto_remove=False, spec={}, uid_range=(900_000, 4))
    other = st.create(vm_id="oa", snapshot="vmoa", vm_dir=st.vms_dir / "oa", **mk)
    rec = st.create(vm_id="ra", snapshot="vmra", vm_dir=st.vms_dir / "ra", **mk)
    assert rec.uid is not None
    assert other.uid is not None
    refused = {rec.uid}
    seen = {other.uid, rec.uid}
    for _ in range(2):
        rec = st.reassign_uid("ra", (900_000, 4), refused)
        assert rec.uid not in seen  # not the other VM's, not a refused one
        assert st.get("ra") == rec  # recorded
        refused.add(rec.uid)  # type: ignore[arg-type]
        seen.add(rec.uid)  # type: ignore[arg-type]
    assert seen == {900_000, 900_001, 900_002, 900_003}
    with pytest.raises(Conflict, match="no free VM uid"):
        st.reassign_uid("ra", (900_000, 4), refused)

"""Reconciling the kiln network: what exists (``observe``) and removing what a gone VM left
(``reclaim``).

``observe`` lists every kiln-named object of the network — taps, veths, VM namespaces,
port forwards — with its ownership tag, and every lease. An untagged object whose name is
a leased VM's (a create cut short by a crash: ``helper.net.host`` makes objects under a
temporary name, tags, then renames) is adopted: listed with the lease's tag, so that
owner's reconcile removes it. ``reclaim`` removes a root's objects of one caller by the
pure ``helper.net.core.reclaim_plan``, through ``helper.net.host``'s steps.
"""

from __future__ import annotations

import contextlib

from helper.base.errors import NotFound
from helper.net import core as nc
from helper.net import host
from helper.net import lease as netlease
from helper.net.config import NetSection


def _obj(kind_: str, name: str, tag: nc.Tag | None, leases: dict[str, nc.Tag]) -> nc.Obj:
    if tag is None and (owner := leases.get(name[3:])) is not None:
        return nc.Obj(kind_, name, owner, adopted=True)
    return nc.Obj(kind_, name, tag)


def observe(sec: NetSection) -> list[nc.Obj]:
    """Every kiln-named object of this network (tagged or not) and every lease. An untagged
    one whose name is a leased VM's (a create cut short by a crash) is adopted: listed with
    the lease's tag, so that owner's reconcile removes it."""
    book = netlease.read_book(sec)
    leases = {nc.short_id(x.vm): x.tag for x in book.leases}
    objs = [nc.Obj("lease", x.vm, x.tag) for x in book.leases]
    for d in host.ip_json(sec.namespace, "-d", "link", "show"):
        name = str(d.get("ifname", ""))
        tag = nc.parse_tag(d.get("ifalias"))
        k = {"tun": "tap", "veth": "veth"}.get(host.kind(d))
        if k is not None and (name.startswith((nc.TAP, nc.VETH)) or name.startswith(nc.TMP)):
            objs.append(_obj(k, name, tag, leases))
    objs += [_obj("netns", n, host.netns_tag(n), leases) for n in host.netns_names()]
    for r in nc.chain_rules(host.rules(sec.namespace, ("nat",))["nat"], nc.DNAT_CHAIN):
        f = nc.parse_forward(r)
        if f is not None:
            objs.append(nc.Obj("forward", str(f.host_port), f.tag))
    return objs


def reclaim(sec: NetSection, root: str, keep: list[str], uid: int,
            only: list[str] | None = None) -> list[str]:
    """Remove ``root``'s objects (of ``uid``) whose VM is not in ``keep`` (with ``only``:
    and is in it); NAT goes when no lease is left. Returns ``kind:name`` of what went."""
    host.check_namespace(sec)
    removed: list[str] = []
    for o in nc.reclaim_plan(observe(sec), root, keep, uid, only):
        assert o.tag is not None
        adopt = o.tag if o.adopted else None
        if adopt is not None:
            x = netlease.read_book(sec).get(adopt.vm)
            if x is None or x.tag != adopt:
                continue  # the lease went or changed hands since observe: not adopted now
        with contextlib.suppress(NotFound):  # gone meanwhile (its namespace took it)
            if o.kind == "forward":
                host.forward_remove(sec, o.tag.vm, uid, int(o.name))
            elif o.kind == "tap":
                host.tap_detach(sec, o.name, uid, adopt)
            elif o.kind == "netns":
                host.netns_delete(sec, o.name, uid, adopt)
            elif o.kind == "veth":
                host.veth_delete(sec, o.name, uid, adopt)
            else:
                netlease.release(sec, o.name, uid)
            removed.append(f"{o.kind}:{o.name}")
    if removed:
        host.nat_remove(sec)
    return removed

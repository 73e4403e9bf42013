"""Test-suite wiring: markers decided by real probes, shared fixtures from tests/support."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from builder import probes
from tests.support import firecracker

pytest_plugins = [
    "tests.support.registry",
    "tests.support.images",
    "tests.support.oci",
    "tests.support.sudo",
]

# marker -> probe; a test carrying the marker is skipped with the probe's reason.
_PROBES: dict[str, Callable[[], probes.Probe]] = {
    "root": probes.can_mknod,
    "loop": probes.loop_devices,
    "dm": probes.dm_thin,
    "kvm": probes.kvm,
    "firecracker": firecracker.probe,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    for item in items:
        for name, probe in _PROBES.items():
            if item.get_closest_marker(name) is None:
                continue
            result = probe()
            if not result.ok:
                item.add_marker(pytest.mark.skip(reason=f"{name}: {result.detail}"))


@pytest.fixture(autouse=True)
def _no_ambient_kiln_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the user's real root."""
    monkeypatch.delenv("KILN_ROOT", raising=False)
    monkeypatch.setenv("KILN_TEST", "1")
    if "XDG_DATA_HOME" not in os.environ:
        monkeypatch.setenv("XDG_DATA_HOME", "/nonexistent-kiln-test-xdg")

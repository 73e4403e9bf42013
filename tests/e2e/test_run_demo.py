"""`kiln demo` and the demo volume, for real (registry on loopback, build, QEMU boot under
TCG here): the output's order, what to try next, and `kiln run DEMO -- CMD` running CMD
(the greeting is the recipe's cmd, not an entrypoint that swallows a command)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.demo import next_steps
from tests.support.cli import kiln

MOTD = (Path(__file__).parents[2] / "recipes" / "demo" / "motd").read_text()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(root, the output of `kiln demo --no-boot`, the demo volume's id)."""
    root = tmp_path_factory.mktemp("demo") / "root"
    kiln(root, "pool", "init", "--backend", "copy")  # the demo keeps an existing pool
    out = kiln(root, "demo", "--no-boot").stdout
    vid = json.loads(kiln(root, "volume", "ls", "--json").stdout)[0]["id"]
    return root, out, vid


def test_no_boot_prints_no_booting_line_and_ends_with_next_steps(
        demo: tuple[Path, str, str]) -> None:
    _, out, vid = demo
    v = vid[7:19]
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines[:3]] == ["volume", "path", "pool"]
    assert lines[0].startswith(f"volume    {vid} (built, ")
    assert lines[2] == "pool      copy (thin: False)"
    assert "booting" not in out
    steps = next_steps(vid)
    assert lines[3:] == ["next      " + steps[0], *("          " + s for s in steps[1:])]
    assert steps[0].startswith(f"kiln run --rm {v} ")
    assert any(s.startswith(f"kiln run --rm {v} -- sh -c 'exit 3'") for s in steps)


def test_booting_demo_prints_pool_before_the_guest_output(demo: tuple[Path, str, str]) -> None:
    root, _, vid = demo
    out = kiln(root, "demo").stdout
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines[:4]] == ["volume", "path", "pool", "booting"]
    assert lines[3] == f"booting   kiln run --rm {vid[7:19]}  (the guest's output follows)"
    guest = out.split("\n", 4)[4]
    assert guest.startswith(MOTD + "hello from kiln\nthe VM exited with 0\nnext      kiln run")


def test_a_command_runs_instead_of_the_greeting_and_its_exit_code_returns(
        demo: tuple[Path, str, str]) -> None:
    root, _, vid = demo
    res = kiln(root, "run", "--rm", vid[7:19], "--", "sh", "-c", "echo hi; exit 3",
               check=False)
    assert (res.returncode, res.stdout) == (3, "hi\n"), res.stderr


def test_entrypoint_replaces_and_empty_entrypoint_clears(demo: tuple[Path, str, str]) -> None:
    root, _, vid = demo
    # --entrypoint drops the image's cmd too (docker's rule): only "a b" is passed
    res = kiln(root, "run", "--rm", "--entrypoint", "/usr/local/bin/hello", vid[7:19],
               "--", "a", "b", check=False)
    assert (res.returncode, res.stdout) == (0, MOTD + "hello a b\n"), res.stderr
    res = kiln(root, "run", "--rm", "--entrypoint", "", vid[7:19], "--", "sh", "-c",
               "exit 4", check=False)
    assert (res.returncode, res.stdout) == (4, ""), res.stderr
    res = kiln(root, "run", "--rm", "--entrypoint", "", vid[7:19], check=False)
    assert (res.returncode, res.stderr) == (
        125, "error: nothing to run: --entrypoint ''\n"
        "hint: give a command after the source: kiln run SOURCE -- CMD ARG…\n")

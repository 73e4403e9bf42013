"""Kernel choice: libmagic tells bzImage from ELF; the default kernel and its minimal
initrd; exact errors for what is not a kernel."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from builder.doctor import find_kernel
from helper.base.errors import NotFound, UsageError
from runner import kernel


def test_kind_of_descriptions() -> None:
    assert kernel.kind_of("Linux kernel x86 boot executable bzImage, version 6.1.0 (x)") == \
        "bzImage"
    assert kernel.kind_of("ELF 64-bit LSB executable, x86-64, version 1 (SYSV), "
                          "statically linked") == "elf"
    assert kernel.kind_of("ELF 64-bit LSB shared object, x86-64") is None
    assert kernel.kind_of("ASCII text") is None


def test_not_a_kernel(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello\n")
    with pytest.raises(UsageError) as e:
        kernel.boot_files(tmp_path, p)
    assert e.value.message == f"{p} is not a Linux kernel (ASCII text)"
    with pytest.raises(NotFound) as nf:
        kernel.boot_files(tmp_path, tmp_path / "missing")
    assert nf.value.message == f"kernel {tmp_path / 'missing'} not found"


def test_elf_version_from_banner(tmp_path: Path) -> None:
    import shutil

    elf = tmp_path / "vmlinux"
    shutil.copyfile("/bin/true", elf)  # an ELF executable: libmagic says so
    with open(elf, "ab") as f:
        f.write(b"\0Linux version 9.9.9-test (x@y) #1 SMP\0")
    assert kernel.kind_of(kernel.describe(elf)) == "elf"
    assert kernel.kernel_version(elf) == "9.9.9-test"


def test_elf_banner_across_a_read_chunk_and_a_changed_file(tmp_path: Path) -> None:
    """The banner is searched in chunks: one that straddles two is found. ``boot_files``
    keeps it beside the description by the file's identity; a file changed in place
    (another mtime and size) is read again, not answered from the cache."""
    elf, initrd, cache = tmp_path / "vmlinux", tmp_path / "initrd", tmp_path / "cache"
    shutil.copyfile("/bin/true", elf)
    initrd.write_bytes(b"any")
    banner = b"Linux version 7.7.7-split (x@y) #1 SMP\0"
    with open(elf, "r+b") as f:
        f.seek(kernel._CHUNK - 10)
        f.write(banner)
    assert kernel.kernel_version(elf) == "7.7.7-split"
    assert kernel.boot_files(cache, elf, initrd).version == "7.7.7-split"
    doc = json.loads((cache / "describe.json").read_text())
    (key,) = [k for k in doc if k.endswith("#version")]
    assert doc[key] == "7.7.7-split"
    (cache / "describe.json").write_text(json.dumps({**doc, key: "6.6.6-cached"}))
    assert kernel.boot_files(cache, elf, initrd).version == "6.6.6-cached"
    with open(elf, "r+b") as f:
        f.seek(kernel._CHUNK - 10)
        f.write(b"Linux version 8.8.8-moved (x@y) #1 SMP\0\0")
    os.utime(elf, ns=(1, 1))
    assert kernel.kernel_version(elf) == "8.8.8-moved"
    assert kernel.boot_files(cache, elf, initrd).version == "8.8.8-moved"
    assert len(json.loads((cache / "describe.json").read_text())) == 2  # the old ones gone


def test_default_kernel_and_minimal_initrd(tmp_path: Path) -> None:
    found = find_kernel()
    if found is None:
        pytest.skip("no Debian cloud kernel in /boot")
    boot = kernel.boot_files(tmp_path)
    assert boot.kernel == found[0]
    assert boot.kind == "bzImage"
    assert boot.version == found[0].name.removeprefix("vmlinuz-")
    assert boot.initrd.parent == tmp_path
    given = kernel.boot_files(tmp_path, initrd=found[1])
    assert given.initrd == found[1]  # given: used as it is, nothing built


def test_kernel_without_modules_needs_initrd(tmp_path: Path) -> None:
    found = find_kernel()
    if found is None:
        pytest.skip("no Debian cloud kernel in /boot")
    with pytest.raises(NotFound) as e:
        kernel.boot_files(tmp_path, found[0], modules_root=tmp_path / "none")
    assert e.value.hint == "install the kernel's modules, or pass --initrd"


def test_libmagic_verdict_is_cached_by_file_identity(tmp_path: Path) -> None:
    found = find_kernel()
    if found is None:
        pytest.skip("no Debian cloud kernel in /boot")
    k = tmp_path / "vmlinuz-copy"
    shutil.copyfile(found[0], k)
    cache = tmp_path / "cache"
    kernel.boot_files(cache, k, initrd=found[1])
    doc = json.loads((cache / "describe.json").read_text())
    assert list(doc.values()) == [kernel.describe(k)]
    assert "bzImage" in next(iter(doc.values()))
    # The same identity answers from the cache, even with libmagic's verdict changed there.
    (cache / "describe.json").write_text(json.dumps({next(iter(doc)): "ELF 64-bit LSB "
                                                     "executable, x86-64"}))
    assert kernel.boot_files(cache, k, initrd=found[1]).kind == "elf"
    # A rewritten file is described again (mtime/ctime/size changed), the old entry dropped.
    k.write_bytes(b"not a kernel" * 100)
    with pytest.raises(UsageError) as e:
        kernel.boot_files(cache, k, initrd=found[1])
    assert e.value.message.startswith(f"{k} is not a Linux kernel (")
    assert len(json.loads((cache / "describe.json").read_text())) == 1

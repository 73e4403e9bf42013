"""What a recipe's ``[[files]]`` source must be: a regular file inside the recipe's
directory whose content is what its name, destination and mode claim (libmagic decides).

``CLAIMS_DOC`` states the rules for users (docs/recipes.md embeds it); ``check_claims`` is
the pure check of bytes against those claims and ``read_src`` the one place that opens a
src (no escapes, no symlinks, no special files). ``Bad`` is the validation failure with a
hint (``builder.recipe_rules``) that the recipe turns into a one-line ``RecipeError``.

Dependency direction: ``builder.recipe`` imports this module; this module imports only
``builder.recipe_rules``, so the recipe models and the file checks never form a cycle.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tomllib
from pathlib import Path

import magic

from builder.recipe_rules import Bad, normalize_mode

CLAIMS_DOC = """\
Every `[[files]]` src is untrusted input. Besides staying inside the recipe's directory and
being a regular file, it must be what its name and destination claim (libmagic decides):

- **Executable claim**: a `dst` whose parent directory is named `bin` or `sbin`, or a `mode`
  with any execute bit, claims an executable. The content must be an ELF executable or
  shared object, or a script starting with `#!`. When `platform` is given, an ELF must be
  built for that architecture.
- **Name claims**: the extension of `src` or of `dst` claims a type:
  `.gz`/`.tgz` gzip, `.xz` xz, `.bz2` bzip2, `.zst` zstd, `.zip` zip, `.tar` tar archive,
  `.so` ELF shared object, `.json` valid JSON, `.toml` valid TOML; and `.sh`, `.bash`,
  `.py`, `.conf`, `.cfg`, `.ini`, `.txt`, `.service`, `.socket`, `.timer`, `.list`,
  `.sources`, `.pem`, `.crt`, `.yaml`, `.yml`, `.md`, `.rules`, `.network`, `.env` claim
  text (UTF-8 without NUL bytes).
"""

_MIME_CLAIMS: dict[str, tuple[str, frozenset[str]]] = {
    ".gz": ("gzip data", frozenset({"application/gzip", "application/x-gzip"})),
    ".tgz": ("gzip data", frozenset({"application/gzip", "application/x-gzip"})),
    ".xz": ("xz data", frozenset({"application/x-xz"})),
    ".bz2": ("bzip2 data", frozenset({"application/x-bzip2"})),
    ".zst": ("zstd data", frozenset({"application/zstd"})),
    ".zip": ("a zip archive", frozenset({"application/zip"})),
    ".tar": ("a tar archive", frozenset({"application/x-tar"})),
    ".so": ("an ELF shared object", frozenset({"application/x-sharedlib"})),
}
_TEXT_EXTS = frozenset({".sh", ".bash", ".py", ".conf", ".cfg", ".ini", ".txt", ".service",
                        ".socket", ".timer", ".list", ".sources", ".pem", ".crt", ".yaml",
                        ".yml", ".md", ".rules", ".network", ".env"})
_ELF_MIMES = frozenset({"application/x-executable", "application/x-pie-executable",
                        "application/x-sharedlib"})
# GOARCH -> ELF e_machine
_ELF_MACHINE = {"amd64": 62, "arm64": 183, "386": 3, "arm": 40, "riscv64": 243,
                "ppc64le": 21, "s390x": 22, "mips64le": 8, "loong64": 258}
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
          (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_claims(data: bytes, src: str, dst: str, mode: str, platform: str | None) -> None:
    """Raise ``Bad`` when ``data`` is not what ``src``/``dst``/``mode`` claim (pure)."""
    mime = str(magic.from_buffer(data, mime=True))

    def what() -> str:
        return str(magic.from_buffer(data)).split(",")[0]

    parent = posixpath.basename(posixpath.dirname(dst))
    exec_bits = int(mode, 8) & 0o111
    in_bin = parent in ("bin", "sbin")
    if (in_bin or exec_bits) and not (mime in _ELF_MIMES or data.startswith(b"#!")):
        why = f"dst is in a {parent} directory" if in_bin \
            else f"mode {normalize_mode(mode)} is executable"
        raise Bad(f"{src!r} is {what()}, not an ELF executable or a '#!' script ({why})",
                  "add a '#!' line to scripts, or drop the execute bits and choose a dst "
                  "outside bin/sbin for data")
    if mime in _ELF_MIMES and platform and len(data) >= 20:
        arch = platform.split("/")[1]
        machine = int.from_bytes(data[18:20], "little" if data[5] == 1 else "big")
        if arch in _ELF_MACHINE and machine != _ELF_MACHINE[arch]:
            raise Bad(f"{src!r} is {what()}: not built for the recipe's platform {platform}",
                      "copy a binary built for that architecture")
    for name in (src, dst):
        ext = posixpath.splitext(name)[1].lower()
        if ext in _MIME_CLAIMS:
            label, mimes = _MIME_CLAIMS[ext]
            if mime not in mimes:
                raise Bad(f"{src!r} is named like {label} ({name!r}) but is {what()}",
                          "rename the file or fix its content")
        elif ext == ".json":
            try:
                json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise Bad(f"{src!r} is named like JSON ({name!r}) but does not parse: {e}",
                          "fix the JSON or rename the file") from None
        elif ext == ".toml":
            try:
                tomllib.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise Bad(f"{src!r} is named like TOML ({name!r}) but does not parse: {e}",
                          "fix the TOML or rename the file") from None
        elif ext in _TEXT_EXTS and not _is_text(data):
            raise Bad(f"{src!r} is named like a text file ({name!r}) but is {what()}",
                      "rename the file or fix its content")


def read_src(directory: Path, src: str) -> bytes:
    """The bytes of a ``[[files]]`` src, refusing escapes, symlinks and non-regular files."""
    full = directory / src
    try:
        st = full.lstat()
    except FileNotFoundError:
        raise Bad(f"{src!r} does not exist in {directory}",
                  "create the file or fix the path (relative to the recipe)") from None
    except OSError as e:
        raise Bad(f"{src!r} cannot be read: {e.strerror}", "fix the path or its permissions") \
            from None
    if not full.resolve().is_relative_to(directory.resolve()):
        raise Bad(f"{src!r} leads out of the recipe's directory through a symlink",
                  "copy the file into the recipe's directory")
    kind = next((name for test, name in _KINDS if test(st.st_mode)), None)
    if kind is not None:
        raise Bad(f"{src!r} is {kind}; only regular files can be copied",
                  "point src at a regular file")
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Bad(f"{src!r} cannot be read: {e.strerror}", "fix the file's permissions") \
            from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the lstat
            raise Bad(f"{src!r} is not a regular file", "point src at a regular file")
        return f.read()

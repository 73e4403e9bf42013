"""Pure rules for recipe values, shared by the recipe models and the file checks.

Everything here is a function of its arguments (no disk, no network): ``${VAR}``
expansion, image-reference syntax, absolute-path and size checks, mode normalization.
``Bad`` is the validation failure carrying its own hint; pydantic keeps the instance in the
error's ``ctx``, and ``builder.recipe`` turns it into kiln's one-line ``RecipeError``
(the message is built by ``builder.recipe_errors``).

Dependency direction: ``builder.recipe`` and ``builder.recipe_files`` import this module; it
imports only ``builder.units`` and ``helper.base.errors``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping

from builder.units import parse_size
from helper.base.errors import KilnError


class Bad(ValueError):
    """A validation failure with its own hint (pydantic keeps the instance in ``ctx``)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def normalize_mode(mode: str) -> str:
    """``"644"`` / ``"0644"`` → ``"0644"`` (four digits)."""
    return f"{int(mode, 8):04o}"


_VAR_RE = re.compile(r"\$(?:\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<dollar>\$))")
# distribution/reference grammar (without IPv6 literals)
_DOMAIN = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?"  # noqa: E501
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOCKER_REF_RE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
PATH_TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:")
_UNSUPPORTED = ("dir:", "containers-storage:", "docker-daemon:", "ostree:", "sif:", "tarball:")
_SOURCE_HINT = ("use docker://REGISTRY/NAME:TAG, oci:DIR[:TAG], oci-archive:FILE, "
                "docker-archive:FILE or a bare name like debian:bookworm")


def expand_vars(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` from ``environ``; ``$$`` is a literal ``$``; any other ``$`` is refused."""
    out: list[str] = []
    pos = 0
    while (i := text.find("$", pos)) >= 0:
        out.append(text[pos:i])
        m = _VAR_RE.match(text, i)
        if m is None:
            raise Bad(f"'$' at offset {i} must start ${{NAME}} or be doubled as $$",
                      "write ${NAME} to use an environment variable, $$ for a literal $")
        if m.group("dollar"):
            out.append("$")
        else:
            name = m.group("name")
            if name not in environ:
                raise Bad(f"environment variable {name} is not set",
                          f"export {name}=... before running kiln, or write the value "
                          "into the recipe")
            out.append(environ[name])
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def check_source(ref: str) -> str:
    """Validate an image reference string (transport syntax only; nothing is contacted)."""
    if not ref or ref != ref.strip() or any(c.isspace() for c in ref):
        raise Bad(f"{ref!r} is not an image reference (empty or contains spaces)", _SOURCE_HINT)
    if ref.startswith("docker://"):
        if not _DOCKER_REF_RE.match(ref[len("docker://"):]):
            raise Bad(f"{ref!r} is not a valid docker:// reference", _SOURCE_HINT)
        return ref
    for prefix in PATH_TRANSPORTS:
        if ref.startswith(prefix):
            if not ref[len(prefix):].split(":", 1)[0]:
                raise Bad(f"{ref!r} names no path after {prefix!r}", _SOURCE_HINT)
            return ref
    for prefix in _UNSUPPORTED:
        if ref.startswith(prefix):
            raise Bad(f"transport {prefix!r} is not supported", _SOURCE_HINT)
    if not _DOCKER_REF_RE.match(ref):
        raise Bad(f"{ref!r} is not a valid image reference", _SOURCE_HINT)
    return ref


def abs_path(value: str, what: str) -> str:
    if "\0" in value:
        raise Bad(f"{value!r} contains a NUL byte")
    if not value.startswith("/"):
        raise Bad(f"{value!r} is not an absolute path", f"write the full path, e.g. /{value}")
    if ".." in value.split("/"):
        raise Bad(f"{value!r} contains '..'", f"write {what} without '..' components")
    return "/" + posixpath.normpath(value).lstrip("/")


def size_or_none(text: str) -> int | None:
    try:
        n = parse_size(text)
    except KilnError:
        return None
    return n if n > 0 else None

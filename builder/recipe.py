"""Recipes: what to build, as a small TOML file validated by pydantic.

A recipe names an image (``source``) and a few changes kiln applies on top of it (files,
environment, entrypoint, ...). Loading is three steps, each reporting ONE line that names
the file and the key, plus a hint:

1. TOML parse (``tomllib``; syntax errors carry line and column);
2. ``${VAR}`` expansion in ``source`` only (``$$`` is a literal ``$``), then pydantic
   validation of shape and pure rules (``extra="forbid"``, frozen models);
3. checks that touch the disk: each ``[[files]]`` src must be a regular file inside the
   recipe's directory, and must be what it claims to be (``builder.recipe_files``; libmagic).

``key_material`` is the canonical, JSON-able summary of everything in the recipe that
changes the output, with file sources replaced by their content hashes: moving a recipe
directory keeps it, editing a file changes it. The pipeline adds the image digest; where the
image came from (``source``, ``platform``) is not in it.

Module layout (imports point one way: recipe_doc -> recipe -> recipe_files, recipe_errors
-> recipe_rules): pure value rules and ``Bad`` live in ``builder.recipe_rules``, the
file-claims checks in ``builder.recipe_files``, the one-line error messages in
``builder.recipe_errors``, the generated reference (``python -m builder.recipe_doc``) in
``builder.recipe_doc``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from builder.recipe_errors import describe
from builder.recipe_files import check_claims, read_src
from builder.recipe_rules import (
    PATH_TRANSPORTS,
    Bad,
    abs_path,
    check_source,
    expand_vars,
    normalize_mode,
    size_or_none,
)
from builder.units import parse_size
from helper.base.errors import UsageError


class RecipeError(UsageError):
    """A recipe file is missing, malformed or refers to something unusable."""


# --- field syntax (the other pure rules live in builder.recipe_rules) ---------------------

_MODE_RE = re.compile(r"^0?[0-7]{3,4}$")
_OWNER_RE = re.compile(r"^(\d{1,10}):(\d{1,10})$")
_PLATFORM_RE = re.compile(r"^([a-z0-9]+)/([a-z0-9_]+)(?:/([a-z0-9]+))?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER_RE = re.compile(r"^(?:\d+|[a-z_][a-z0-9_.-]*\$?)(?::(?:\d+|[a-z_][a-z0-9_.-]*))?$")
_PERCENT_RE = re.compile(r"^(\d+(?:\.\d+)?)%$")


# --- models -------------------------------------------------------------------------------


class FileSpec(BaseModel):
    """A file from the recipe's directory copied into the image (regular files only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    src: str = Field(description="File to copy, relative to the recipe's directory. It must "
                     "stay inside that directory (absolute paths, '..' escapes and symlinks "
                     "leading out are refused) and be a regular file (not a symlink, "
                     "directory, device, fifo or socket).")
    dst: str = Field(description="Absolute path in the image where the file is written "
                     "(normalized; '..' is refused).")
    mode: str = Field(default="0644", description="Permission bits as a quoted octal string, "
                      "e.g. \"0644\" or \"0755\" (setuid/setgid/sticky allowed as a 4th digit).")
    owner: str = Field(default="0:0", description="Numeric owner and group as \"UID:GID\".")

    _source_path: Path = PrivateAttr(default=Path())  # set by load_recipe once checked

    @property
    def source_path(self) -> Path:
        """Absolute host path of ``src`` (resolved and checked by ``load_recipe``)."""
        return self._source_path

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, gid = self.owner.split(":")
        return int(uid), int(gid)

    @field_validator("src")
    @classmethod
    def _src(cls, v: str) -> str:
        if "\0" in v or not v:
            raise Bad(f"{v!r} is not a file name")
        if v.startswith("/"):
            raise Bad(f"{v!r} is absolute", "give a path relative to the recipe's directory")
        norm = posixpath.normpath(v)
        if norm == ".." or norm.startswith("../"):
            raise Bad(f"{v!r} leads out of the recipe's directory",
                      "copy the file next to the recipe and name it relative to it")
        return norm

    @field_validator("dst")
    @classmethod
    def _dst(cls, v: str) -> str:
        if v.endswith("/"):
            raise Bad(f"{v!r} ends in '/'", "name the file itself, e.g. /etc/motd")
        norm = abs_path(v, "dst")
        if norm == "/":
            raise Bad("'/' is not a file path", "name the file itself, e.g. /etc/motd")
        return norm

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            raise Bad(f"got the integer {v}; write the mode as a quoted octal string like "
                      '"0644"', 'write e.g. mode = "0755"')
        if isinstance(v, str) and not _MODE_RE.match(v):
            raise Bad(f'{v!r} is not an octal mode like "0644"', 'write e.g. mode = "0755"')
        return v

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str) -> str:
        m = _OWNER_RE.match(v)
        if not m or max(int(m.group(1)), int(m.group(2))) >= 2**32 - 1:
            raise Bad(f'{v!r} is not a numeric "UID:GID" like "0:0"',
                      "names are not resolved here: look the numbers up in the image")
        return v


class Recipe(BaseModel):
    """A kiln recipe: an OCI image plus a few changes, built into an ext4 volume.

    Unknown keys are errors. Only ``source`` expands environment variables: ``${NAME}``
    is replaced by the variable's value (an unset variable is an error), ``$$`` is a
    literal ``$``, and any other ``$`` is refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="The image: docker://REGISTRY/NAME:TAG, oci:DIR[:TAG] "
                        "(a relative DIR is relative to the recipe file), oci-archive:FILE, "
                        "docker-archive:FILE, or a bare name like debian:bookworm. ${NAME} "
                        "expands from the environment; $$ is a literal $.")
    platform: str | None = Field(default=None, description="Platform to take from a "
                                 "multi-platform image, as os/arch[/variant] (e.g. "
                                 "linux/amd64, linux/arm64/v8); default: the host's.")
    size: str | None = Field(default=None, description="Fixed size of the ext4 volume, e.g. "
                             "\"2G\" (K, M, G, T suffixes, binary). Mutually exclusive with "
                             "headroom.")
    headroom: str | None = Field(default=None, description="Free space on top of the "
                                 "image's content: a percentage (\"25%\") or a size "
                                 "(\"512M\"). Mutually exclusive with size; when neither is "
                                 "given kiln picks its default headroom.")
    files: tuple[FileSpec, ...] = Field(default=(), description="Files to copy into the "
                                        "image, as [[files]] tables (see below).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables "
                                "added to (or replacing) the image's, as a table: env = { "
                                "LANG = \"C.UTF-8\" }.")
    entrypoint: tuple[str, ...] | None = Field(default=None, description="Replaces the "
                                               "image's entrypoint (exec form: an array of "
                                               "strings); [] clears it.")
    cmd: tuple[str, ...] | None = Field(default=None, description="Replaces the image's "
                                        "default arguments (an array of strings); [] "
                                        "clears them.")
    workdir: str | None = Field(default=None, description="Working directory of the "
                                "entrypoint: an absolute path.")
    user: str | None = Field(default=None, description="User the entrypoint runs as: "
                             "\"uid[:gid]\" or \"name[:group]\" (resolved in the image).")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels recorded in "
                                   "the volume's metadata (string values).")

    _path: Path = PrivateAttr(default=Path("recipe.toml"))

    @property
    def path(self) -> Path:
        """The recipe file."""
        return self._path

    @property
    def directory(self) -> Path:
        """The directory relative ``files`` and ``oci:`` paths are resolved against."""
        return self._path.parent

    @property
    def image_ref(self) -> str:
        """``source`` with a relative oci:/oci-archive:/docker-archive: path made absolute."""
        for prefix in PATH_TRANSPORTS:
            if self.source.startswith(prefix):
                rest = self.source[len(prefix):]
                if not rest.startswith("/"):
                    return f"{prefix}{(self.directory / rest).absolute()}"
        return self.source

    @property
    def size_bytes(self) -> int | None:
        return None if self.size is None else parse_size(self.size)

    @property
    def headroom_percent(self) -> float | None:
        m = _PERCENT_RE.match(self.headroom or "")
        return float(m.group(1)) if m else None

    @property
    def headroom_value(self) -> float | None:
        """Percentage headroom as a fraction (``"25%"`` → 0.25); ``None`` otherwise."""
        pct = self.headroom_percent
        return None if pct is None else pct / 100

    @property
    def headroom_bytes(self) -> int | None:
        if self.headroom is None or self.headroom_percent is not None:
            return None
        return parse_size(self.headroom)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return check_source(v)

    @field_validator("platform")
    @classmethod
    def _platform(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _PLATFORM_RE.match(v)
        if not m:
            raise Bad(f'{v!r} is not os/arch[/variant] like "linux/amd64"',
                      'write e.g. platform = "linux/amd64"')
        if m.group(1) != "linux":
            raise Bad(f"{v!r}: only linux images can boot as kiln VMs",
                      'write e.g. platform = "linux/amd64"')
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None and size_or_none(v) is None:
            raise Bad(f'{v!r} is not a size like "2G"', 'write e.g. size = "2G"')
        return v

    @field_validator("headroom")
    @classmethod
    def _headroom(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _PERCENT_RE.match(v)
        if m:
            if not 0 < float(m.group(1)) <= 1000:
                raise Bad(f"{v!r} is out of range (more than 0%, at most 1000%)")
            return v
        if size_or_none(v) is None:
            raise Bad(f'{v!r} is not a percentage like "25%" or a size like "512M"',
                      'write e.g. headroom = "25%"')
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not _ENV_NAME_RE.match(k):
                raise Bad(f"{k!r} is not a valid variable name",
                          "use letters, digits and _, not starting with a digit")
            if "\0" in val:
                raise Bad(f"{k}: value contains a NUL byte")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k or "\0" in k:
                raise Bad(f"{k!r} is not a label name")
        return v

    @field_validator("entrypoint", "cmd")
    @classmethod
    def _argv(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and any("\0" in a for a in v):
            raise Bad("an argument contains a NUL byte")
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        return None if v is None else abs_path(v, "workdir")

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not _USER_RE.match(v):
            raise Bad(f'{v!r} is not "uid[:gid]" or "name[:group]"',
                      'write e.g. user = "1000:1000" or user = "nobody"')
        return v

    @model_validator(mode="after")
    def _whole(self) -> Recipe:
        if self.size is not None and self.headroom is not None:
            raise Bad("size and headroom are mutually exclusive",
                      "keep size for a fixed volume size, or headroom for free space on "
                      "top of the content")
        seen: dict[str, int] = {}
        for i, f in enumerate(self.files):
            if f.dst in seen:
                raise Bad(f"files[{i}].dst: {f.dst!r} is also the dst of files[{seen[f.dst]}]",
                          "write each destination once")
            seen[f.dst] = i
        return self


# --- errors (the message itself is built by builder.recipe_errors) ------------------------


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = FileSpec if loc[:1] == ("files",) else Recipe
    return list(model.model_fields)


def _one_line(path: Path, err: ValidationError) -> RecipeError:
    msg, hint = describe(err, _keys_at)
    return RecipeError(f"{path}: {msg}", hint)


# --- files: on-disk checks (the rules live in builder.recipe_files) -----------------------------


def _check_files(recipe: Recipe) -> None:
    for i, spec in enumerate(recipe.files):
        try:
            data = read_src(recipe.directory, spec.src)
            spec._source_path = (recipe.directory / spec.src).resolve()
            check_claims(data, spec.src, spec.dst, spec.mode, recipe.platform)
        except Bad as e:
            raise RecipeError(f"{recipe.path}: files[{i}].src: {e}", e.hint) from None


# --- loading, key, schema -----------------------------------------------------------------


def load_recipe(path: Path, environ: Mapping[str, str] | None = None) -> Recipe:
    """Parse, expand, validate and check the recipe at ``path``; raise ``RecipeError``."""
    environ = os.environ if environ is None else environ
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found",
                          "check the path, or list the shipped ones in recipes/") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})",
                          "save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: TOML syntax error: {e}",
                          "fix the line shown; see https://toml.io for the syntax") from None
    if isinstance(data.get("source"), str):
        try:
            data["source"] = expand_vars(data["source"], environ)
        except Bad as e:
            raise RecipeError(f"{path}: source: {e}", e.hint) from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _one_line(path, e) from None
    recipe._path = path
    _check_files(recipe)
    return recipe


def key_material(recipe: Recipe) -> dict[str, Any]:
    """Everything in ``recipe`` that changes the output, canonical and JSON-able.

    File sources are replaced by the sha256 of their content and sorted by dst; sizes are
    bytes; modes are four octal digits. The image digest is NOT here: the pipeline adds it.
    Neither are ``source`` and ``platform``: they only say where to find the image, which
    the digest pins (one image from two registries, or spelled two ways, is one volume).
    """
    files = []
    for spec in recipe.files:
        digest = hashlib.sha256(read_src(recipe.directory, spec.src)).hexdigest()
        files.append({"dst": spec.dst, "mode": normalize_mode(spec.mode),
                      "owner": spec.owner, "sha256": digest})
    headroom: dict[str, float | int] | None = None
    if recipe.headroom_percent is not None:
        headroom = {"percent": recipe.headroom_percent}
    elif recipe.headroom_bytes is not None:
        headroom = {"bytes": recipe.headroom_bytes}
    return {
        "format": 2,  # 1 held source and platform
        "size": recipe.size_bytes,
        "headroom": headroom,
        "files": sorted(files, key=lambda f: str(f["dst"])),
        "env": dict(sorted(recipe.env.items())),
        "entrypoint": None if recipe.entrypoint is None else list(recipe.entrypoint),
        "cmd": None if recipe.cmd is None else list(recipe.cmd),
        "workdir": recipe.workdir,
        "user": recipe.user,
        "labels": dict(sorted(recipe.labels.items())),
    }


def recipe_schema() -> dict[str, Any]:
    """JSON Schema of a recipe (for ``kiln recipe schema`` and editors)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


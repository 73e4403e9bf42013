"""Recipes: exact error texts, env expansion, file claims, key material, schema and docs."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import tomllib
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder import recipe as R
from builder.recipe import RecipeError, key_material, load_recipe
from builder.recipe_doc import recipe_reference_markdown

REPO = Path(__file__).resolve().parents[2]
ALLOWED = ("cmd, entrypoint, env, files, headroom, labels, platform, size, source, user, "
           "workdir")
ELF_AARCH64 = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
               + struct.pack("<HHIQQQIHHHHHH", 2, 183, 1, 0x400000, 64, 0, 0, 64, 56, 0, 64,
                             0, 0))


@pytest.fixture
def rdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch cwd with a recipes/ directory, so messages show 'recipes/x.toml'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    return tmp_path / "recipes"


def write(rdir: Path, text: str, files: dict[str, bytes] | None = None) -> Path:
    for name, data in (files or {}).items():
        (rdir / name).parent.mkdir(parents=True, exist_ok=True)
        (rdir / name).write_bytes(data)
    (rdir / "x.toml").write_text(text)
    return Path("recipes/x.toml")


def error_of(path: Path, environ: dict[str, str] | None = None) -> tuple[str, str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, environ if environ is not None else {})
    assert "\n" not in e.value.message
    return e.value.message, e.value.hint


SRC = 'source = "docker://127.0.0.1:5000/demo/busybox:1"\n'


def files_recipe(src: str, dst: str = "/etc/motd", extra: str = "") -> str:
    return SRC + f'[[files]]\nsrc = "{src}"\ndst = "{dst}"\n{extra}'


# --- exact error texts ----------------------------------------------------------------------


def test_unknown_key(rdir: Path) -> None:
    msg, hint = error_of(write(rdir, 'sorce = "x"\n' + SRC))
    assert msg == f"recipes/x.toml: unknown key 'sorce' (allowed: {ALLOWED})"
    assert hint == "check the key's spelling"


def test_unknown_key_in_files(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, files_recipe("motd", extra='sr = "y"\n'), {"motd": b"hi\n"}))
    assert msg == ("recipes/x.toml: files[0]: unknown key 'sr' "
                   "(allowed: dst, mode, owner, src)")


def test_missing_source(rdir: Path) -> None:
    msg, hint = error_of(write(rdir, 'cmd = ["sh"]\n'))
    assert msg == "recipes/x.toml: missing required key 'source'"
    assert hint == "add source = ..."


def test_bad_mode(rdir: Path) -> None:
    msg, hint = error_of(write(rdir, files_recipe("motd", extra='mode = "644x"\n'),
                               {"motd": b"hi\n"}))
    assert msg == "recipes/x.toml: files[0].mode: '644x' is not an octal mode like \"0644\""
    assert hint == 'write e.g. mode = "0755"'


def test_integer_mode_is_refused_with_advice(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, files_recipe("motd", extra="mode = 0o644\n"),
                            {"motd": b"hi\n"}))
    assert msg == ("recipes/x.toml: files[0].mode: got the integer 420; write the mode as a "
                   'quoted octal string like "0644"')


def test_bad_owner(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, files_recipe("motd", extra='owner = "root:root"\n'),
                            {"motd": b"hi\n"}))
    assert msg == ("recipes/x.toml: files[0].owner: 'root:root' is not a numeric \"UID:GID\" "
                   'like "0:0"')


def test_unset_variable(rdir: Path) -> None:
    path = write(rdir, 'source = "docker://${KILN_DEMO_REGISTRY}/demo/busybox:1"\n')
    msg, hint = error_of(path, {})
    assert msg == "recipes/x.toml: source: environment variable KILN_DEMO_REGISTRY is not set"
    assert "export KILN_DEMO_REGISTRY=" in hint


def test_lone_dollar(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, 'source = "docker://reg/$NAME:1"\n'))
    assert msg == ("recipes/x.toml: source: '$' at offset 13 must start ${NAME} or be doubled "
                   "as $$")


def test_src_escaping_with_dotdot(rdir: Path) -> None:
    (rdir.parent / "secret").write_text("x")
    msg, _ = error_of(write(rdir, files_recipe("sub/../../secret")))
    assert msg == ("recipes/x.toml: files[0].src: 'sub/../../secret' leads out of the "
                   "recipe's directory")


def test_src_escaping_with_symlink(rdir: Path) -> None:
    (rdir / "passwd").symlink_to("/etc/passwd")
    msg, hint = error_of(write(rdir, files_recipe("passwd")))
    assert msg == ("recipes/x.toml: files[0].src: 'passwd' leads out of the recipe's "
                   "directory through a symlink")
    assert hint == "copy the file into the recipe's directory"


def test_src_escaping_with_symlinked_directory(rdir: Path) -> None:
    (rdir / "etc").symlink_to("/etc")
    msg, _ = error_of(write(rdir, files_recipe("etc/hostname")))
    assert msg == ("recipes/x.toml: files[0].src: 'etc/hostname' leads out of the recipe's "
                   "directory through a symlink")


def test_absolute_src(rdir: Path) -> None:
    msg, hint = error_of(write(rdir, files_recipe("/etc/passwd")))
    assert msg == "recipes/x.toml: files[0].src: '/etc/passwd' is absolute"
    assert hint == "give a path relative to the recipe's directory"


def test_missing_src(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, files_recipe("nope")))
    assert msg == "recipes/x.toml: files[0].src: 'nope' does not exist in recipes"


def test_src_that_is_a_symlink_inside(rdir: Path) -> None:
    (rdir / "real").write_text("hi\n")
    (rdir / "link").symlink_to("real")
    msg, _ = error_of(write(rdir, files_recipe("link")))
    assert msg == ("recipes/x.toml: files[0].src: 'link' is a symlink; only regular files "
                   "can be copied")


def test_src_under_a_file(rdir: Path) -> None:
    (rdir / "motd").write_text("hi\n")
    msg, _ = error_of(write(rdir, files_recipe("motd/x")))
    assert msg == ("recipes/x.toml: files[0].src: 'motd/x' cannot be read: Not a directory")


def test_src_directory_and_fifo(rdir: Path) -> None:
    (rdir / "d").mkdir()
    msg, _ = error_of(write(rdir, files_recipe("d")))
    assert msg == ("recipes/x.toml: files[0].src: 'd' is a directory; only regular files "
                   "can be copied")
    os.mkfifo(rdir / "f")
    msg, _ = error_of(write(rdir, files_recipe("f")))
    assert msg == "recipes/x.toml: files[0].src: 'f' is a fifo; only regular files can be copied"


def test_size_and_headroom(rdir: Path) -> None:
    msg, hint = error_of(write(rdir, SRC + 'size = "2G"\nheadroom = "25%"\n'))
    assert msg == "recipes/x.toml: size and headroom are mutually exclusive"
    assert hint.startswith("keep size for a fixed volume size")


def test_bad_platform(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, SRC + 'platform = "amd64"\n'))
    assert msg == "recipes/x.toml: platform: 'amd64' is not os/arch[/variant] like \"linux/amd64\""
    msg, _ = error_of(write(rdir, SRC + 'platform = "windows/amd64"\n'))
    assert msg == ("recipes/x.toml: platform: 'windows/amd64': only linux images can boot as "
                   "kiln VMs")


def test_bad_size_and_headroom(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, SRC + 'size = "2X"\n'))
    assert msg == "recipes/x.toml: size: '2X' is not a size like \"2G\""
    msg, _ = error_of(write(rdir, SRC + 'size = "0"\n'))
    assert msg == "recipes/x.toml: size: '0' is not a size like \"2G\""
    msg, _ = error_of(write(rdir, SRC + 'headroom = "lots"\n'))
    assert msg == ("recipes/x.toml: headroom: 'lots' is not a percentage like \"25%\" or a "
                   "size like \"512M\"")
    msg, _ = error_of(write(rdir, SRC + 'headroom = "0%"\n'))
    assert msg == "recipes/x.toml: headroom: '0%' is out of range (more than 0%, at most 1000%)"


def test_toml_syntax_error_has_line_and_column(rdir: Path) -> None:
    msg, hint = error_of(write(rdir, SRC + "cmd = [\n"))
    assert msg == "recipes/x.toml: TOML syntax error: Invalid value (at end of document)"
    assert hint.startswith("fix the line shown")
    msg, _ = error_of(write(rdir, SRC + "size 2G\n"))
    assert msg == ("recipes/x.toml: TOML syntax error: Expected '=' after a key in a "
                   "key/value pair (at line 2, column 6)")


def test_type_errors_name_toml_types(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, SRC + 'cmd = "sh"\n'))
    assert msg == "recipes/x.toml: cmd: expected an array, got a string"
    msg, _ = error_of(write(rdir, SRC + "env = { A = 1 }\n"))
    assert msg == "recipes/x.toml: env.A: expected a string, got an integer"
    msg, _ = error_of(write(rdir, 'source = 5\n'))
    assert msg == "recipes/x.toml: source: expected a string, got an integer"


def test_several_problems_are_counted(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, SRC + 'a = 1\nb = 2\nc = 3\n'))
    assert msg == (f"recipes/x.toml: unknown key 'a' (allowed: {ALLOWED}) "
                   "(and 2 more problems)")


def test_dst_rules(rdir: Path) -> None:
    files = {"motd": b"hi\n"}
    msg, _ = error_of(write(rdir, files_recipe("motd", dst="etc/motd"), files))
    assert msg == "recipes/x.toml: files[0].dst: 'etc/motd' is not an absolute path"
    msg, _ = error_of(write(rdir, files_recipe("motd", dst="/etc/../motd"), files))
    assert msg == "recipes/x.toml: files[0].dst: '/etc/../motd' contains '..'"
    msg, _ = error_of(write(rdir, files_recipe("motd", dst="/etc/"), files))
    assert msg == "recipes/x.toml: files[0].dst: '/etc/' ends in '/'"
    r = load_recipe(write(rdir, files_recipe("./motd", dst="//etc/./motd"), files), {})
    assert (r.files[0].src, r.files[0].dst) == ("motd", "/etc/motd")


def test_file_accessors(rdir: Path) -> None:
    r = load_recipe(write(rdir, 'headroom = "12.5%"\n' + files_recipe(
        "sub/../motd", extra='mode = "640"\nowner = "1000:100"\n'), {"motd": b"hi\n"}), {})
    f = r.files[0]
    assert f.source_path == (rdir / "motd").resolve()
    assert f.source_path.is_absolute()
    assert (f.mode_bits, f.uid_gid) == (0o640, (1000, 100))
    assert (r.headroom_value, r.headroom_bytes) == (0.125, None)


def test_duplicate_dst(rdir: Path) -> None:
    text = files_recipe("a") + '[[files]]\nsrc = "b"\ndst = "/etc//motd"\n'
    msg, _ = error_of(write(rdir, text, {"a": b"a\n", "b": b"b\n"}))
    assert msg == "recipes/x.toml: files[1].dst: '/etc/motd' is also the dst of files[0]"


def test_other_field_rules(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, SRC + 'workdir = "app"\n'))
    assert msg == "recipes/x.toml: workdir: 'app' is not an absolute path"
    msg, _ = error_of(write(rdir, SRC + 'user = "1000:"\n'))
    assert msg == "recipes/x.toml: user: '1000:' is not \"uid[:gid]\" or \"name[:group]\""
    msg, _ = error_of(write(rdir, SRC + 'env = { "MY-VAR" = "x" }\n'))
    assert msg == "recipes/x.toml: env: 'MY-VAR' is not a valid variable name"


@pytest.mark.parametrize(("source", "message"), [
    ("dir:/tmp/x", "transport 'dir:' is not supported"),
    ("docker://Reg/UPPER:1", "'docker://Reg/UPPER:1' is not a valid docker:// reference"),
    ("oci:", "'oci:' names no path after 'oci:'"),
    ("debian bookworm", "'debian bookworm' is not an image reference (empty or contains spaces)"),
])
def test_bad_sources(rdir: Path, source: str, message: str) -> None:
    msg, hint = error_of(write(rdir, f'source = "{source}"\n'))
    assert msg == f"recipes/x.toml: source: {message}"
    assert hint.startswith("use docker://")


def test_not_found_and_not_utf8(rdir: Path) -> None:
    msg, _ = error_of(Path("recipes/none.toml"))
    assert msg == "recipes/none.toml: recipe file not found"
    (rdir / "x.toml").write_bytes(b'source = "\xff"\n')
    msg, _ = error_of(Path("recipes/x.toml"))
    assert msg == "recipes/x.toml: not UTF-8 text (byte 10)"


# --- what loads -----------------------------------------------------------------------------


def test_env_expansion_and_escape(rdir: Path) -> None:
    path = write(rdir, 'source = "docker://${REG}/x/y:$${TAG}"\n')
    # "$${TAG}" is a literal "${TAG}", which then is not a valid tag: expansion ran first.
    msg, _ = error_of(path, {"REG": "127.0.0.1:5000"})
    assert msg == ("recipes/x.toml: source: 'docker://127.0.0.1:5000/x/y:${TAG}' is not a "
                   "valid docker:// reference")
    r = load_recipe(write(rdir, 'source = "docker://${REG}/x/y:1"\n'), {"REG": "h:5000"})
    assert r.source == "docker://h:5000/x/y:1"


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_dollar_escape_roundtrip(text: str) -> None:
    assert R.expand_vars(text.replace("$", "$$"), {}) == text


@given(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
                       st.text(max_size=10), max_size=4))
def test_expansion_substitutes_each_variable(env: dict[str, str]) -> None:
    text = "/".join("${" + k + "}" for k in env)
    assert R.expand_vars(text, env) == "/".join(env.values())


def test_full_recipe_and_accessors(rdir: Path) -> None:
    (rdir / "img").mkdir()
    text = ('source = "oci:img:1"\nplatform = "linux/arm64/v8"\nheadroom = "512M"\n'
            'entrypoint = []\ncmd = ["a", "b"]\nworkdir = "/srv//app/"\nuser = "nobody"\n'
            'labels = { "a.b" = "c" }\n')
    r = load_recipe(write(rdir, text), {})
    assert r.path == Path("recipes/x.toml")
    assert r.directory == Path("recipes")
    assert r.image_ref == f"oci:{rdir / 'img'}:1"
    assert (r.headroom_bytes, r.headroom_percent, r.size_bytes) == (512 << 20, None, None)
    assert r.headroom_value is None
    assert r.entrypoint == ()
    assert r.cmd == ("a", "b")
    assert r.workdir == "/srv/app"
    with pytest.raises(Exception, match="frozen"):
        r.source = "x"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["debian", "alpine", "ubuntu", "demo"])
def test_shipped_recipes_load(name: str) -> None:
    r = load_recipe(REPO / "recipes" / f"{name}.toml", {"KILN_DEMO_REGISTRY": "127.0.0.1:5000"})
    assert r.source.startswith("docker://")
    data = tomllib.loads((REPO / "recipes" / f"{name}.toml").read_text())
    jsonschema.validate(data, R.recipe_schema())  # the published schema agrees


def test_demo_recipe_shows_features() -> None:
    r = load_recipe(REPO / "recipes" / "demo.toml", {"KILN_DEMO_REGISTRY": "127.0.0.1:5000"})
    assert r.source == "docker://127.0.0.1:5000/demo/busybox:1"
    assert {f.dst for f in r.files} == {"/etc/motd", "/usr/local/bin/hello"}
    assert (r.entrypoint, r.cmd) == (None, ("/usr/local/bin/hello", "from kiln"))


# --- claims (libmagic) ----------------------------------------------------------------------


def test_script_in_bin_needs_shebang(rdir: Path) -> None:
    msg, hint = error_of(write(rdir, files_recipe("hello", dst="/usr/local/bin/hello"),
                               {"hello": b"echo hi\n"}))
    assert msg == ("recipes/x.toml: files[0].src: 'hello' is ASCII text, not an ELF executable "
                   "or a '#!' script (dst is in a bin directory)")
    assert hint.startswith("add a '#!' line")
    load_recipe(write(rdir, files_recipe("hello", dst="/usr/local/bin/hello"),
                      {"hello": b"#!/bin/sh\necho hi\n"}), {})


def test_executable_mode_needs_executable_content(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, files_recipe("data", dst="/opt/data", extra='mode = "755"\n'),
                            {"data": b"plain\n"}))
    assert msg == ("recipes/x.toml: files[0].src: 'data' is ASCII text, not an ELF executable "
                   "or a '#!' script (mode 0755 is executable)")


def test_elf_in_bin_and_platform(rdir: Path) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox-static not installed")
    shutil.copy(busybox, rdir / "bb")
    load_recipe(write(rdir, 'platform = "linux/amd64"\n'
                      + files_recipe("bb", dst="/bin/bb", extra='mode = "0755"\n')), {})
    text = SRC + 'platform = "linux/amd64"\n[[files]]\nsrc = "arm"\ndst = "/usr/bin/arm"\n'
    msg, _ = error_of(write(rdir, text, {"arm": ELF_AARCH64}))
    assert msg == ("recipes/x.toml: files[0].src: 'arm' is ELF 64-bit LSB executable: not "
                   "built for the recipe's platform linux/amd64")


@pytest.mark.parametrize(("name", "data", "message"), [
    ("a.gz", b"not gzip\n", "'a.gz' is named like gzip data ('a.gz') but is ASCII text"),
    ("a.tar", b"not tar\n", "'a.tar' is named like a tar archive ('a.tar') but is ASCII text"),
    ("a.json", b"{bad", "'a.json' is named like JSON ('a.json') but does not parse: "
                        "Expecting property name enclosed in double quotes: line 1 column 2 "
                        "(char 1)"),
    ("a.conf", b"\x00\x01\x02binary", "'a.conf' is named like a text file ('a.conf') but is "
                                      "data"),
    ("a.toml", b"x = ", "'a.toml' is named like TOML ('a.toml') but does not parse: Invalid "
                        "value (at end of document)"),
])
def test_name_claims(rdir: Path, name: str, data: bytes, message: str) -> None:
    msg, _ = error_of(write(rdir, files_recipe(name, dst="/opt/x"), {name: data}))
    assert msg == f"recipes/x.toml: files[0].src: {message}"


def test_dst_name_claims_too(rdir: Path) -> None:
    msg, _ = error_of(write(rdir, files_recipe("blob", dst="/etc/app.json"), {"blob": b"nope"}))
    assert msg.startswith("recipes/x.toml: files[0].src: 'blob' is named like JSON "
                          "('/etc/app.json') but does not parse")


def test_true_claims_pass(rdir: Path) -> None:
    files = {"a.gz": gzip.compress(b"x"), "a.json": b'{"a": 1}', "a.conf": "k = é\n".encode(),
             "empty.txt": b""}
    text = SRC + "".join(f'[[files]]\nsrc = "{n}"\ndst = "/opt/{n}"\n' for n in files)
    r = load_recipe(write(rdir, text, files), {})
    assert len(r.files) == 4


# --- key material ---------------------------------------------------------------------------


def test_key_material_survives_a_move_and_sees_edits(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "motd").write_text("hello\n")
    (a / "r.toml").write_text(files_recipe("motd"))
    before = key_material(load_recipe(a / "r.toml", {}))
    assert before["files"][0]["sha256"] == (
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
    b = tmp_path / "elsewhere" / "b"
    b.parent.mkdir()
    a.rename(b)
    assert key_material(load_recipe(b / "r.toml", {})) == before
    (b / "motd").write_text("hello!\n")
    after = key_material(load_recipe(b / "r.toml", {}))
    assert after != before
    assert json.loads(json.dumps(after)) == after  # JSON-able


def test_key_material_ignores_where_the_image_comes_from(rdir: Path) -> None:
    files = {"m": b"x\n"}
    rest = 'cmd = ["/bin/sh"]\n[[files]]\nsrc = "m"\ndst = "/etc/m"\n'
    one = load_recipe(write(rdir, 'source = "docker://localhost:5000/x:1"\n' + rest, files), {})
    two = load_recipe(write(rdir, 'source = "docker://127.0.0.1:41000/x@sha256:' + "a" * 64
                            + '"\nplatform = "linux/amd64"\n' + rest, files), {})
    assert key_material(one) == key_material(two)


def test_key_material_normalizes_equivalent_spellings(rdir: Path) -> None:
    files = {"m": b"x\n"}
    one = key_material(load_recipe(write(rdir, 'size = "2048M"\n'
                                         + files_recipe("m", extra='mode = "644"\n'), files),
                                   {}))
    two = key_material(load_recipe(write(rdir, 'size = "2G"\n'
                                         + files_recipe("./m", extra='mode = "0644"\n'), files),
                                   {}))
    assert one == two
    assert one["size"] == 2 << 30


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string of non-control chars is TOML


_names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True)
_values = st.text(alphabet=st.characters(exclude_categories=["Cs", "Cc"]), max_size=8)


@settings(max_examples=40, deadline=None)
@given(env=st.dictionaries(_names, _values, max_size=5),
       labels=st.dictionaries(_values, _values, max_size=4),
       contents=st.lists(st.binary(max_size=16).filter(lambda b: b"\0" not in b),
                         min_size=1, max_size=3),
       seed=st.randoms(use_true_random=False))
def test_key_material_ignores_order(tmp_path_factory: pytest.TempPathFactory,
                                    env: dict[str, str], labels: dict[str, str],
                                    contents: list[bytes], seed: object) -> None:
    import random

    rng: random.Random = seed  # type: ignore[assignment]
    labels = {k: v for k, v in labels.items() if k}
    d = tmp_path_factory.mktemp("order")
    specs = []
    for i, data in enumerate(contents):
        (d / f"f{i}").write_bytes(data)
        specs.append(f'[[files]]\nsrc = "f{i}"\ndst = "/opt/f{i}"\n')

    def text(order: list[int], env_items: list[tuple[str, str]],
             label_items: list[tuple[str, str]]) -> str:
        env_t = ", ".join(f"{k} = {_q(v)}" for k, v in env_items)
        lab_t = ", ".join(f"{_q(k)} = {_q(v)}" for k, v in label_items)
        return (f"env = {{ {env_t} }}\nlabels = {{ {lab_t} }}\n" + SRC
                + "".join(specs[i] for i in order))

    order = list(range(len(specs)))
    (d / "a.toml").write_text(text(order, list(env.items()), list(labels.items())))
    rng.shuffle(order)
    env_items, label_items = list(env.items()), list(labels.items())
    rng.shuffle(env_items)
    rng.shuffle(label_items)
    (d / "b.toml").write_text(text(order, env_items, label_items))
    ka = key_material(load_recipe(d / "a.toml", {}))
    kb = key_material(load_recipe(d / "b.toml", {}))
    assert ka == kb
    assert json.dumps(ka) == json.dumps(kb)  # same insertion order too: canonical


# --- schema and docs ------------------------------------------------------------------------


def _properties(schema: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    out = list(schema["properties"].items())  # type: ignore[attr-defined]
    for sub in schema.get("$defs", {}).values():  # type: ignore[attr-defined]
        out += list(sub["properties"].items())
    return out


def test_schema_describes_every_field() -> None:
    schema = R.recipe_schema()
    props = _properties(schema)
    assert {name for name, _ in props} >= {"source", "files", "src", "dst", "mode", "owner"}
    for name, prop in props:
        assert len(str(prop.get("description", ""))) > 20, name
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["FileSpec"]["additionalProperties"] is False


def test_schema_rejects_what_the_loader_rejects() -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"source": "x", "sorce": "y"}, R.recipe_schema())


def test_committed_reference_doc_is_generated() -> None:
    committed = (REPO / "docs" / "recipes.md").read_text()
    assert committed == recipe_reference_markdown(), (
        "docs/recipes.md is stale: run .venv/bin/python -m builder.recipe_doc > docs/recipes.md")

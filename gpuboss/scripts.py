"""The Lua scripts: where they are, how includes are resolved, and their SHA1s.

Each operation is one file ``lua/<name>-<N>.lua`` where N is the number of KEYS it takes. Shared pieces
live in ``lua/includes/<piece>.lua`` and are pulled in with a line ``--- @include "<piece>"``; every piece is
included once per script, in the order first named, and a missing or circular include is an error.

The same files also make one Redis function library (:func:`library`, Redis and Valkey 7 or later): every
include is defined once when the library is loaded, instead of on every EVALSHA, and each operation is a
function ``gpuboss_<hash>_<operation>`` called by FCALL. Lines of an include between ``--- @per-call begin``
and ``--- @per-call end`` read KEYS or ARGV: in the library, each is split into a declaration at load time and
an assignment at the start of every call that includes the piece. redis_io.py picks FCALL where the server
has functions, else EVALSHA; both recover from a flushed or restarted server by loading again and retrying.

A piece may name a call to make when the script returns, with a line ``--- @on-return <function>()`` (drop.lua
writes the usage counters it collected during the call that way): the script's own text (after its include
lines) then runs as a function, and each such call is made after it returned, before its reply is passed on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

INCLUDE_RE = re.compile(r'^--- @include "([A-Za-z0-9_]+)"\s*$', re.MULTILINE)
PER_CALL_RE = re.compile(r"^--- @per-call begin\n(?P<body>.*?)^--- @per-call end\n", re.MULTILINE | re.DOTALL)
PER_CALL_LINE_RE = re.compile(
    r"^local (?P<names>[A-Za-z_][A-Za-z0-9_]*(?:, [A-Za-z_][A-Za-z0-9_]*)*) = (?P<values>.+)$"
)
ON_RETURN_RE = re.compile(r"^--- @on-return (?P<call>[A-Za-z_][A-Za-z0-9_]*\(\))\s*$", re.MULTILINE)
LIBRARY_PREFIX = "gpuboss_"
NAME_RE = re.compile(r"^(?P<name>[a-z][A-Za-z0-9]*)-(?P<keys>\d+)\.lua$")


class ScriptError(Exception):
    """A script file is malformed: a bad name, or an include that is missing or circular."""


@dataclass(frozen=True)
class Script:
    name: str
    num_keys: int
    source: str
    sha: str


def lua_dir() -> Traversable:
    """The folder of scripts: ``gpuboss/lua`` in an installed wheel, else ``lua/`` of the checkout."""
    packaged = resources.files("gpuboss") / "lua"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "lua"


def resolve_includes(source: str, includes: Traversable, stack: tuple[str, ...] = ()) -> str:
    """Replace each include line with the piece's text (itself resolved), each piece once."""
    seen: set[str] = set()

    def expand(text: str, chain: tuple[str, ...]) -> str:
        def one(match: re.Match[str]) -> str:
            piece = match.group(1)
            if piece in chain:
                raise ScriptError(f"circular include: {' -> '.join((*chain, piece))}")
            if piece in seen:
                return f"-- (include {piece}: already above)"
            path = includes / f"{piece}.lua"
            if not path.is_file():
                raise ScriptError(f"missing include {piece!r} (looked for includes/{piece}.lua)")
            seen.add(piece)
            return expand(path.read_text(encoding="utf-8"), (*chain, piece))

        return INCLUDE_RE.sub(one, text)

    return expand(source, stack)


def split_body(text: str) -> tuple[str, str]:
    """A script's text up to its last include line, and the rest (its own code)."""
    cut = max((match.end() for match in INCLUDE_RE.finditer(text)), default=0)
    return text[:cut], text[cut:]


def load_script(path: Traversable, includes: Traversable) -> Script:
    match = NAME_RE.match(path.name)
    if not match:
        raise ScriptError(f"script file {path.name!r} is not named <operation>-<number of keys>.lua")
    text = path.read_text(encoding="utf-8")
    source = resolve_includes(text, includes, (match["name"],))
    hooks = ON_RETURN_RE.findall(source)
    if hooks:
        head, body = split_body(text)
        source = resolve_includes(head, includes, (match["name"],)) + (
            f"\nlocal function gpuboss_main(){body}\nend\nlocal gpuboss_reply = gpuboss_main()\n"
            + "".join(f"{hook}\n" for hook in hooks)
            + "return gpuboss_reply\n"
        )
    sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
    return Script(name=match["name"], num_keys=int(match["keys"]), source=source, sha=sha)


@cache
def all_scripts() -> dict[str, Script]:
    """Every script, by operation name, with includes resolved."""
    folder = lua_dir()
    includes = folder / "includes"
    scripts = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.endswith(".lua"):
            script = load_script(path, includes)
            scripts[script.name] = script
    return scripts


def get(name: str) -> Script:
    return all_scripts()[name]


@dataclass(frozen=True)
class Library:
    """Every operation as one Redis function library: ``functions`` maps an operation to its function name."""

    name: str
    source: str
    functions: dict[str, str]


def _per_call(piece: str, text: str) -> tuple[str, list[str]]:
    """Split a piece's per-call block into load-time declarations (the text returned) and per-call assignments."""
    binds: list[str] = []

    def one(match: re.Match[str]) -> str:
        out = []
        for line in match["body"].splitlines():
            if not line.strip() or line.lstrip().startswith("--"):
                out.append(line)
                continue
            local = PER_CALL_LINE_RE.match(line)
            if not local:
                raise ScriptError(f"includes/{piece}.lua: a per-call line must be 'local a, b = x, y': {line!r}")
            out.append(f"local {local['names']}")
            binds.append(f"  {local['names']} = {local['values']}")
        return "\n".join(out) + "\n"

    return PER_CALL_RE.sub(one, text), binds


@cache
def library() -> Library:
    """Every script of :func:`all_scripts` as functions of one library, each include defined once."""
    folder = lua_dir()
    includes = folder / "includes"
    order: list[str] = []  # every piece, after the pieces it includes
    texts: dict[str, str] = {}

    def visit(piece: str, chain: tuple[str, ...]) -> None:
        if piece in texts:
            return
        if piece in chain:
            raise ScriptError(f"circular include: {' -> '.join((*chain, piece))}")
        path = includes / f"{piece}.lua"
        if not path.is_file():
            raise ScriptError(f"missing include {piece!r} (looked for includes/{piece}.lua)")
        text = path.read_text(encoding="utf-8")
        for dep in INCLUDE_RE.findall(text):
            visit(dep, (*chain, piece))
        texts[piece] = text
        order.append(piece)

    bodies: dict[str, tuple[str, list[str]]] = {}
    for name in all_scripts():
        (path,) = (p for p in folder.iterdir() if NAME_RE.match(p.name) and NAME_RE.match(p.name)["name"] == name)  # type: ignore[index]
        text = path.read_text(encoding="utf-8")
        pieces: list[str] = []
        for piece in INCLUDE_RE.findall(text):
            visit(piece, (name,))
        for piece in order:
            if piece in _pieces_of(text, texts) and piece not in pieces:
                pieces.append(piece)
        bodies[name] = (text, pieces)

    prelude, binders = ["local KEYS, ARGV"], {}
    for piece in order:
        text, binds = _per_call(piece, INCLUDE_RE.sub(r"-- (include \1: defined above)", texts[piece]))
        prelude.append(text)
        if binds:
            binders[piece] = f"bind_{piece}"
            prelude.append(f"local function bind_{piece}()\n" + "\n".join(binds) + "\nend\n")
    functions = {}
    registrations = []
    digest = hashlib.sha1("\n".join(prelude).encode(), usedforsecurity=False)
    for name, (text, _) in bodies.items():
        digest.update(f"\n-- {name}\n{text}".encode())
    name_hash = digest.hexdigest()[:16]
    for name, (text, pieces) in bodies.items():
        function = f"{LIBRARY_PREFIX}{name_hash}_{name}"
        functions[name] = function
        calls = "".join(f"  {binders[p]}()\n" for p in pieces if p in binders)
        body = INCLUDE_RE.sub(r"-- (include \1: defined above)", text)
        hooks = [hook for p in pieces for hook in ON_RETURN_RE.findall(texts[p])]
        if hooks:
            registrations.append(
                f"local function main_{name}()\n{body}\nend\n"
                f"redis.register_function('{function}', function(keys, args)\n  KEYS, ARGV = keys, args\n{calls}"
                f"  local reply = main_{name}()\n" + "".join(f"  {hook}\n" for hook in hooks) + "  return reply\nend)\n"
            )
            continue
        registrations.append(
            f"redis.register_function('{function}', function(keys, args)\n  KEYS, ARGV = keys, args\n{calls}"
            f"{body}\nend)\n"
        )
    lib_name = f"{LIBRARY_PREFIX}{name_hash}"
    header = (
        f"#!lua name={lib_name}\n-- gpuboss's scripts as one function library, made from lua/ by gpuboss/scripts.py\n"
    )
    return Library(
        name=lib_name, source=header + "\n".join(prelude) + "\n" + "\n".join(registrations), functions=functions
    )


def _pieces_of(text: str, texts: dict[str, str]) -> set[str]:
    """The pieces a script includes, directly or through other pieces."""
    found: set[str] = set()
    todo = INCLUDE_RE.findall(text)
    while todo:
        piece = todo.pop()
        if piece not in found:
            found.add(piece)
            todo.extend(INCLUDE_RE.findall(texts[piece]))
    return found

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

A script may carry Redis function flags with a line ``--- @flags <flag> ...`` (only ``allow-oom``: the scripts that
keep leases alive or give memory back run on a server that is out of memory and refuses the others, so a full
shared Redis does not cost the holders their leases). They apply to its function in the library, and to the
script sent by EVALSHA as a first line ``#!lua flags=<flag>,...`` (:attr:`Script.flagged`), which Redis 7 and
Valkey read. Redis 6.2 cannot compile that line: there the script is sent without it (redis_io.py). A script
without flags is refused by a full server at its first write that may grow memory, unless it has written
before (it cannot be stopped halfway): so the text without flags of an ``allow-oom`` script starts with a write
that cannot grow memory and changes nothing (:data:`OOM_GUARD`), and runs on a full 6.2 as its function does on 7.

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
FLAGS_RE = re.compile(r"^--- @flags (?P<flags>.*?)\s*$", re.MULTILINE)
#: The function flags a script may carry (``--- @flags``).
KNOWN_FLAGS = frozenset({"allow-oom"})
#: The first line of an ``allow-oom`` script where flags are not read (Redis 6.2): a DEL of a key that never
#: exists (next to KEYS[1], so in its cluster slot) is a write that cannot grow memory (not ``denyoom``), after
#: which Redis lets the script write on a full server (it cannot stop a script halfway); it deletes nothing, and
#: nothing is replicated for it.
OOM_GUARD = "redis.call('DEL', KEYS[1] .. ':gpuboss-no-such-key') -- allow-oom where flags are not read"


class ScriptError(Exception):
    """A script file is malformed: a bad name, or an include that is missing or circular."""


@dataclass(frozen=True)
class Script:
    name: str
    num_keys: int
    #: the text sent by EVALSHA to a server that does not read a shebang line (Redis 6.2), and its SHA1; an
    #: ``allow-oom`` script's starts with :data:`OOM_GUARD`
    source: str
    sha: str
    #: the script's function flags (``--- @flags``)
    flags: tuple[str, ...]
    #: the text and SHA1 sent by EVALSHA to Redis 7 and later: with a first line ``#!lua flags=...`` when the
    #: script has flags, so that they apply there as to its function; else :attr:`source` and :attr:`sha`
    flagged: tuple[str, str]


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()


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


def with_hooks(body: str, hooks: list[str], main: str) -> str:
    """``body`` as the function ``main``, called, then each of ``hooks``; its reply returned."""
    if not hooks:
        return body
    calls = "".join(f"  {hook}\n" for hook in hooks)
    return f"local function {main}()\n{body}\nend\nlocal gpuboss_reply = {main}()\n{calls}return gpuboss_reply\n"


def load_script(path: Traversable, includes: Traversable) -> Script:
    match = NAME_RE.match(path.name)
    if not match:
        raise ScriptError(f"script file {path.name!r} is not named <operation>-<number of keys>.lua")
    text = path.read_text(encoding="utf-8")
    source = resolve_includes(text, includes, (match["name"],))
    hooks = ON_RETURN_RE.findall(source)
    if hooks:
        head, body = split_body(text)
        source = resolve_includes(head, includes, (match["name"],)) + "\n" + with_hooks(body, hooks, "gpuboss_main")
    flags = flags_of(path.name, text)
    flagged = f"#!lua flags={','.join(flags)}\n{source}" if flags else source
    plain = f"{OOM_GUARD}\n{source}" if "allow-oom" in flags else source
    return Script(match["name"], int(match["keys"]), plain, _sha1(plain), flags, (flagged, _sha1(flagged)))


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
    #: an operation's function flags (``--- @flags``), for the operations that have any
    flags: dict[str, tuple[str, ...]]


def flags_of(name: str, text: str) -> tuple[str, ...]:
    """The function flags a script's text declares (``--- @flags``); an unknown flag is a :class:`ScriptError`."""
    flags = tuple(flag for match in FLAGS_RE.finditer(text) for flag in match["flags"].split())
    unknown = sorted(set(flags) - KNOWN_FLAGS)
    if unknown:
        raise ScriptError(f"{name}: unknown function flags {unknown}; allowed: {sorted(KNOWN_FLAGS)}")
    return flags


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


def _read_pieces(folder: Traversable, texts: dict[str, str], order: list[str]) -> None:
    """Every include of every script into ``texts``, and into ``order`` each after the pieces it includes."""
    includes = folder / "includes"

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

    for path in folder.iterdir():
        match = NAME_RE.match(path.name)
        if match:
            for piece in INCLUDE_RE.findall(path.read_text(encoding="utf-8")):
                visit(piece, (match["name"],))


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


def _defined_above(text: str) -> str:
    return INCLUDE_RE.sub(r"-- (include \1: defined above)", text)


@cache
def library() -> Library:
    """Every script of :func:`all_scripts` as a function of one library, each include defined once.

    The library starts ``local KEYS, ARGV``; then every include (dependencies first), its per-call lines
    split into declarations and a ``bind_<piece>()`` function; then one ``redis.register_function`` per
    script, whose body is the script's own text after ``KEYS, ARGV = keys, args`` and the binds of the pieces
    it includes (wrapped as ``main()`` and followed by the pieces' ``@on-return`` calls, if any). The library
    and function names carry a hash of the whole, so that two gpuboss versions sharing a server each call
    their own.
    """
    folder = lua_dir()
    texts: dict[str, str] = {}
    order: list[str] = []
    _read_pieces(folder, texts, order)
    prelude = ["local KEYS, ARGV"]
    binders: set[str] = set()
    for piece in order:
        text, binds = _per_call(piece, _defined_above(texts[piece]))
        prelude.append(text)
        if binds:
            binders.add(piece)
            prelude.append(f"local function bind_{piece}()\n" + "\n".join(binds) + "\nend\n")
    bodies = {}
    flags: dict[str, tuple[str, ...]] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        match = NAME_RE.match(path.name)
        if match:
            text = path.read_text(encoding="utf-8")
            if found := all_scripts()[match["name"]].flags:
                flags[match["name"]] = found
            pieces = [piece for piece in order if piece in _pieces_of(text, texts)]
            calls = "".join(f"  bind_{piece}()\n" for piece in pieces if piece in binders)
            hooks = [hook for piece in pieces for hook in ON_RETURN_RE.findall(texts[piece])]
            body = with_hooks(_defined_above(text), hooks, "main")
            bodies[match["name"]] = f"  KEYS, ARGV = keys, args\n{calls}{body}"
    digest = _sha1("\n".join([*prelude, *bodies.values()]))
    name = f"{LIBRARY_PREFIX}{digest[:16]}"
    functions = {op: f"{name}_{op}" for op in bodies}
    source = [
        f"#!lua name={name}",
        "-- gpuboss's scripts as one function library, made from lua/ by gpuboss/scripts.py",
        *prelude,
    ]
    for op, body in bodies.items():
        if op in flags:
            listed = ", ".join(f"'{flag}'" for flag in flags[op])
            source.append(
                f"redis.register_function{{function_name = '{functions[op]}', callback = function(keys, args)\n"
                f"{body}\nend, flags = {{{listed}}}}}\n"
            )
        else:
            source.append(f"redis.register_function('{functions[op]}', function(keys, args)\n{body}\nend)\n")
    return Library(name=name, source="\n".join(source), functions=functions, flags=flags)

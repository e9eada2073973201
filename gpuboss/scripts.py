"""The Lua scripts: where they are, how includes are resolved, and their SHA1s.

Each operation is one file ``lua/<name>-<N>.lua`` where N is the number of KEYS it takes. Shared pieces
live in ``lua/includes/<piece>.lua`` and are pulled in with a line ``--- @include "<piece>"``; every piece is
included once per script, in the order first named, and a missing or circular include is an error.
Scripts are run with EVALSHA; the drivers load a script and retry once when Redis answers NOSCRIPT (after
``SCRIPT FLUSH`` or a restart).
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


def load_script(path: Traversable, includes: Traversable) -> Script:
    match = NAME_RE.match(path.name)
    if not match:
        raise ScriptError(f"script file {path.name!r} is not named <operation>-<number of keys>.lua")
    source = resolve_includes(path.read_text(encoding="utf-8"), includes, (match["name"],))
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

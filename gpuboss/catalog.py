"""What the shipped YAML registries (GPU profiles, models) share: reading YAML, matching names, and the error
for a name that matches nothing, with its near matches."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gpuboss.config import format_validation_error
from gpuboss.errors import ConfigError, InvalidRequest

#: Words a vendor puts in front of a product name, dropped before names are compared.
VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla", "quadro"})
_SEPARATORS = re.compile(r"[\s\-_/,():]+")


class UnknownName(InvalidRequest):
    """A name no registry entry matches. ``suggestions`` are the nearest known names (possibly none)."""

    def __init__(self, field: str, value: str, what: str, suggestions: Iterable[str] = ()) -> None:
        self.suggestions = list(suggestions)
        hint = f"did you mean {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        allowed = f"unknown {what}; {hint or 'no near match'}"
        super().__init__(field, value, allowed)


def name_tokens(name: str) -> tuple[str, ...]:
    """A name as lower-case words, vendor words dropped: ``"NVIDIA A100-SXM4-80GB"`` -> ``("a100", "sxm4", "80gb")``.

    A size written apart from its unit is joined (``"80 GB"`` -> ``"80gb"``)."""
    words = [w for w in _SEPARATORS.split(name.lower()) if w]
    joined: list[str] = []
    for w in words:
        if w in ("gb", "gib") and joined and joined[-1].isdigit():
            joined[-1] += "gb"
        else:
            joined.append("gb" if w == "gib" else w)
    return tuple(w for w in joined if w not in VENDOR_WORDS)


def normalize_name(name: str) -> str:
    return " ".join(name_tokens(name))


def near_matches(query: str, names: Iterable[str], limit: int = 5) -> list[str]:
    """Known names close to ``query``, nearest first: those containing all its words or contained in it,
    then those sharing a model number with it, then spelling neighbours (difflib)."""
    by_key: dict[str, str] = {}
    for n in names:
        by_key.setdefault(normalize_name(n), n)
    key = normalize_name(query)
    words = set(key.split())
    scored: list[tuple[int, float, str]] = []
    for k, n in by_key.items():
        kwords = set(k.split())
        ratio = difflib.SequenceMatcher(None, key, k).ratio()
        if words and (words <= kwords or kwords <= words):
            tier = 2
        elif any(any(c.isdigit() for c in w) for w in words & kwords):
            tier = 1
        elif ratio >= 0.6:
            tier = 0
        else:
            continue
        scored.append((tier, ratio, n))
    scored.sort(key=lambda t: (-t[0], -t[1]))
    return [n for _, _, n in scored[:limit]]


def shipped_text(filename: str) -> tuple[str, str]:
    """A YAML file shipped in ``gpuboss/data``: its text and a name for messages."""
    resource = resources.files("gpuboss").joinpath("data").joinpath(filename)
    return resource.read_text(encoding="utf-8"), f"gpuboss/data/{filename}"


def read_yaml_file(path: str | os.PathLike[str]) -> tuple[Any, str]:
    file = Path(path)
    try:
        return parse_yaml(file.read_text(encoding="utf-8"), str(file)), str(file)
    except OSError as err:
        raise ConfigError(f"{file}: cannot read ({err.strerror or err})") from None


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: malformed YAML: {err}") from None


def validation_error(err: ValidationError, source: str) -> ConfigError:
    return ConfigError(format_validation_error(err, source))

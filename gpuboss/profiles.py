"""GPU profiles: what a card model is (memory, compute capability, fast precisions, a batch-size hint).

``get_gpu_profile("RTX 4090")`` or ``get_gpu_profile("NVIDIA GeForce RTX 4090")`` (the name NVML reports)
returns a :class:`GpuProfile` from the registry shipped in ``gpuboss/data/gpu_profiles.yaml``;
``load_profiles(path)`` adds a user's own YAML file of the same form. A MIG instance's name
(``"NVIDIA A100-SXM4-80GB MIG 3g.40gb"``) gives its card's profile with the instance's memory. An unknown name
raises :class:`UnknownGpuProfile` (an :class:`~gpuboss.errors.InvalidRequest`) listing the near matches.

Matching: names are compared as lower-case words without the vendor words (NVIDIA, GeForce, Tesla, Quadro).
A name or alias that matches exactly wins; otherwise a profile matches when all its words are in the name
asked for and the words left over only say the form factor (PCIe, SXM4, HBM3, ...) or the memory the profile
has. Two profiles sharing a name (the 8 and 16 GB RTX 4060 Ti) are told apart by ``memory_mib``, else the
first listed wins.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpuboss.catalog import (
    UnknownName,
    near_matches,
    normalize_name,
    parse_yaml,
    read_yaml_file,
    shipped_text,
    validation_error,
)
from gpuboss.config import gb_to_mib
from gpuboss.errors import ConfigError, InvalidRequest

PRECISIONS = ("fp16", "bf16", "fp8", "int8", "int4", "fp4")

#: Words in a reported name that only tell the form factor or memory type, not the model.
FORM_WORDS = frozenset(
    {
        "pcie",
        "sxm",
        "sxm2",
        "sxm3",
        "sxm4",
        "sxm5",
        "fhhl",
        "hbm2",
        "hbm2e",
        "hbm3",
        "hbm3e",
        "gpu",
        "graphics",
        "edition",
        "generation",
        "founders",
        "workstation",
        "server",
    }
)
_SIZE_WORD = re.compile(r"^(\d+)gb$")
_MIG_SUFFIX = re.compile(r"\s+MIG\s+((?:\d+c\.)?\d+g\.(\d+)gb(?:\+\w+)?)\s*$", re.IGNORECASE)


class UnknownGpuProfile(UnknownName):
    """No GPU profile matches the name; ``suggestions`` are the nearest known ones."""


class GpuProfile(BaseModel):
    """What a GPU model is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    architecture: str = ""
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    vram_gb: float = Field(gt=0, allow_inf_nan=False)
    max_batch_hint: int = Field(ge=1)
    fp16: bool = False
    bf16: bool = False
    fp8: bool = False
    int8: bool = False
    int4: bool = False
    fp4: bool = False
    #: The MIG profile (``"3g.40gb"``) when this is a MIG instance's profile; None for a whole card.
    mig_profile: str | None = None

    @field_validator("aliases", mode="before")
    @classmethod
    def _aliases_list(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @property
    def capability(self) -> tuple[int, int]:
        """The compute capability as numbers: ``"8.9"`` -> ``(8, 9)``."""
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @property
    def vram_mib(self) -> int:
        return gb_to_mib(self.vram_gb)

    def supports(self, precision: str) -> bool:
        """Whether the card runs ``precision`` natively: fp32 always, tf32 from Ampere on, and the flags."""
        p = precision.lower()
        if p == "fp32":
            return True
        if p == "tf32":
            return self.capability >= (8, 0)
        if p not in PRECISIONS:
            raise InvalidRequest("precision", precision, f"must be one of fp32, tf32, {', '.join(PRECISIONS)}")
        return bool(getattr(self, p))


class ProfileRegistry:
    """A set of GPU profiles and the name index to find them."""

    def __init__(self, profiles: Iterable[GpuProfile]) -> None:
        merged: dict[str, GpuProfile] = {}
        for p in profiles:
            merged[normalize_name(p.name)] = p  # a later profile of the same name replaces the earlier
        self.profiles: list[GpuProfile] = list(merged.values())
        self._index: dict[str, list[GpuProfile]] = {}
        for p in self.profiles:
            for key in dict.fromkeys(normalize_name(n) for n in (p.name, *p.aliases)):
                self._index.setdefault(key, []).append(p)

    def __len__(self) -> int:
        return len(self.profiles)

    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def _loose(self, key: str) -> list[GpuProfile]:
        """Profiles all of whose words are in ``key``, the rest being form-factor words or their memory size."""
        asked = set(key.split())
        best: list[GpuProfile] = []
        best_score = 0
        for k, profiles in self._index.items():
            words = set(k.split())
            if not words <= asked:
                continue
            extra = asked - words
            for p in profiles:
                if all(w in FORM_WORDS or _size_fits(w, p.vram_gb) for w in extra):
                    if len(words) > best_score:
                        best, best_score = [p], len(words)
                    elif len(words) == best_score and p not in best:
                        best.append(p)
        return best

    def get(self, name: str, *, memory_mib: int | None = None) -> GpuProfile:
        """The profile of a GPU model; raises :class:`UnknownGpuProfile` listing near matches."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownGpuProfile("gpu", str(name), "GPU model (give a name such as 'RTX 4090')")
        mig = _MIG_SUFFIX.search(name)
        base = name[: mig.start()] if mig else name
        key = normalize_name(base)
        candidates = self._index.get(key) or self._loose(key)
        if not candidates:
            known = [n for p in self.profiles for n in (p.name, *p.aliases)]
            alias_to_name = {normalize_name(n): p.name for p in self.profiles for n in (p.name, *p.aliases)}
            near = list(dict.fromkeys(alias_to_name[normalize_name(n)] for n in near_matches(base, known)))
            raise UnknownGpuProfile("gpu", name, "GPU model", near)
        profile = candidates[0]
        if memory_mib is not None and len(candidates) > 1 and mig is None:
            profile = min(candidates, key=lambda p: abs(p.vram_mib - memory_mib))
        if mig is None:
            return profile
        mig_gb = float(mig.group(2)) if memory_mib is None else memory_mib / 1024
        scale = mig_gb / profile.vram_gb
        return profile.model_copy(
            update={
                "name": name.strip(),
                "vram_gb": mig_gb,
                "max_batch_hint": max(1, round(profile.max_batch_hint * scale)),
                "mig_profile": mig.group(1),
            }
        )


def _size_fits(word: str, vram_gb: float) -> bool:
    m = _SIZE_WORD.match(word)
    return m is not None and abs(int(m.group(1)) - vram_gb) <= max(1.0, 0.1 * vram_gb)


def parse_profiles(
    data: Any, source: str, architectures: Mapping[str, Mapping[str, Any]] | None = None
) -> list[GpuProfile]:
    """Profiles from a parsed YAML document: ``{architectures: {...}, profiles: [...]}``.

    ``architectures`` are known ones (the shipped) that the document may use besides its own."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'profiles' (and 'architectures')")
    unknown_keys = set(data) - {"architectures", "profiles"}
    if unknown_keys:
        raise ConfigError(
            f"{source}: unknown top-level keys {sorted(unknown_keys)}: allowed are architectures, profiles"
        )
    archs: dict[str, Mapping[str, Any]] = dict(architectures or {})
    own = data.get("architectures") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{source}: architectures must be a mapping of name to precision flags")
    for arch, flags in own.items():
        if not isinstance(flags, dict) or set(flags) - set(PRECISIONS):
            raise ConfigError(f"{source}: architectures.{arch} must map some of {', '.join(PRECISIONS)} to true/false")
        archs[str(arch)] = flags
    entries = data.get("profiles") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: profiles must be a list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: profiles.{i} must be a mapping")
        arch = entry.get("architecture", "")
        if arch and arch not in archs:
            raise ConfigError(
                f"{source}: profiles.{i}.architecture: unknown {arch!r}; known: {', '.join(sorted(archs))}"
            )
        values = {**(archs.get(arch) or {}), **entry}
        try:
            out.append(GpuProfile(**values))
        except ValidationError as err:
            raise validation_error(err, f"{source}: profiles.{i} ({entry.get('name', '?')})") from None
    return out


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[tuple[GpuProfile, ...], dict[str, Mapping[str, Any]]]:
    text, source = shipped_text("gpu_profiles.yaml")
    data = parse_yaml(text, source)
    return tuple(parse_profiles(data, source)), dict(data.get("architectures") or {})


def load_profiles(*extra_paths: str | os.PathLike[str]) -> ProfileRegistry:
    """The shipped profiles, extended (and overridden, name by name) by the user's YAML files, in order."""
    shipped, archs = _shipped()
    profiles = list(shipped)
    for path in extra_paths:
        data, source = read_yaml_file(path)
        profiles += parse_profiles(data, source, archs)
    return ProfileRegistry(profiles)


@functools.lru_cache(maxsize=1)
def default_profiles() -> ProfileRegistry:
    """The shipped registry (read once)."""
    return load_profiles()


def get_gpu_profile(name: str, *, memory_mib: int | None = None, registry: ProfileRegistry | None = None) -> GpuProfile:
    """The profile of a GPU model by its short name (``"RTX 4090"``, ``"A100 80GB"``) or the name NVML
    reports (``"NVIDIA GeForce RTX 4090"``, ``"NVIDIA A100-SXM4-80GB"``, ``"Tesla T4"``).

    ``memory_mib`` (the card's memory as NVML reports it) tells apart variants NVML names alike and gives a
    MIG instance its exact memory. Raises :class:`UnknownGpuProfile` listing near matches."""
    return (registry or default_profiles()).get(name, memory_mib=memory_mib)

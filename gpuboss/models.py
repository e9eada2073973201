"""A registry of models and the VRAM each quantization of them takes, so a caller can ask for a model by name.

``resolve_model("gemma3:12b")`` returns a :class:`ModelChoice`: the quantization to run and its size. With
``free_mib_by_gpu`` (the free VRAM of each GPU now) it is the best quantization that fits now, and says which
and why; with ``quantizations=[...]`` the caller's order of preference replaces the default quality order
(fp32 > fp16 > bf16 > fp8 > q8 > int8 > q6 > q5 > q4 > int4 > q3 > q2). The registry ships in
``gpuboss/data/models.yaml``; ``load_models(path)`` adds a user's own YAML file of the same form. An unknown
model raises :class:`UnknownModel` (an :class:`~gpuboss.errors.InvalidRequest`) listing near matches.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from gpuboss.catalog import UnknownName, near_matches, parse_yaml, read_yaml_file, shipped_text, validation_error
from gpuboss.errors import ConfigError, InvalidRequest

Kind = Literal["llm", "embedding", "image", "speech", "vision", "other"]

#: Quantization families, best quality first: the default order of preference.
QUALITY_ORDER = ("fp32", "fp16", "bf16", "fp8", "q8", "int8", "q6", "q5", "q4", "int4", "q3", "q2")

_FAMILIES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(fp32|f32|float32|full)$"), "fp32"),
    (re.compile(r"^(fp16|f16|float16|half)$"), "fp16"),
    (re.compile(r"^(bf16|bfloat16)$"), "bf16"),
    (re.compile(r"^(fp8|f8|float8|e4m3|e5m2)(_.*)?$"), "fp8"),
    (re.compile(r"^q8(_.*)?$"), "q8"),
    (re.compile(r"^(int8|w8a8|w8a16|8bit|8-bit)$"), "int8"),
    (re.compile(r"^q6(_.*)?$"), "q6"),
    (re.compile(r"^q5(_.*)?$"), "q5"),
    (re.compile(r"^q4(_.*)?$"), "q4"),
    (re.compile(r"^(int4|nf4|fp4|w4a16|awq|gptq|4bit|4-bit)$"), "int4"),
    (re.compile(r"^q3(_.*)?$"), "q3"),
    (re.compile(r"^q2(_.*)?$"), "q2"),
]


def quant_family(quantization: str) -> str | None:
    """The family of a quantization label: ``"q4_K_M"`` -> ``"q4"``, ``"f16"`` -> ``"fp16"``; None if unknown."""
    q = quantization.strip().lower()
    for pattern, family in _FAMILIES:
        if pattern.match(q):
            return family
    return None


def quality_rank(quantization: str) -> int:
    """Position in :data:`QUALITY_ORDER` (0 is best); unknown labels rank after every known one."""
    family = quant_family(quantization)
    return QUALITY_ORDER.index(family) if family is not None else len(QUALITY_ORDER)


class UnknownModel(UnknownName):
    """No model of the registry has that name; ``suggestions`` are the nearest known ones."""


class ModelVariant(BaseModel):
    """One quantization of one model: what a lease for it needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    model: str
    quantization: str
    #: MiB the running model holds.
    vram_mb: int = Field(gt=0)
    context_window: int | None = Field(default=None, gt=0)
    kind: Kind = "llm"

    @property
    def vram_mib(self) -> int:
        return self.vram_mb

    @property
    def vram_gb(self) -> float:
        """The size as ``vram_gb`` for ``lease()`` (exactly ``vram_mb`` MiB once gpuboss rounds it)."""
        return self.vram_mb / 1024


class ModelEntry(BaseModel):
    """A model and its quantizations, in the order the registry lists them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    provider: str
    kind: Kind
    context_window: int | None = None
    aliases: tuple[str, ...] = ()
    variants: tuple[ModelVariant, ...]

    def by_quality(self) -> list[ModelVariant]:
        """Best quality first; within a family, the bigger (more bits kept) first."""
        return sorted(self.variants, key=lambda v: (quality_rank(v.quantization), -v.vram_mb))

    def variant(self, quantization: str) -> ModelVariant:
        """The variant a label names: exactly (any case), else the first of the same family (``"q8"`` finds
        ``"q8_0"``). Raises :class:`InvalidRequest` listing the model's quantizations."""
        if isinstance(quantization, str):
            wanted = quantization.strip().lower()
            for v in self.variants:
                if v.quantization.lower() == wanted:
                    return v
            family = quant_family(wanted)
            for v in self.by_quality():
                if family is not None and quant_family(v.quantization) == family:
                    return v
        have = ", ".join(v.quantization for v in self.variants)
        raise InvalidRequest("quantizations", quantization, f"{self.model} comes in {have}")


class _VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vram_mb: int = Field(gt=0)
    context_window: int | None = Field(default=None, gt=0)


class _ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1)
    kind: Kind = "llm"
    context_window: int | None = Field(default=None, gt=0)
    aliases: list[str] = Field(default_factory=list)
    quantizations: dict[str, PositiveInt | _VariantSpec] = Field(min_length=1)


@dataclass(frozen=True)
class ModelChoice:
    """The variant chosen for a request, and why."""

    variant: ModelVariant
    #: True: it fits in the free VRAM given. False: nothing asked for fits now; this is the smallest, the one
    #: to wait for. None: no free VRAM was given, so fit was not checked.
    fits: bool | None
    #: The GPU it fits best on now (least free VRAM left after it), when ``fits``.
    gpu: str | None
    reason: str
    #: Every variant considered, in order of preference, with whether it fits now (None: not checked).
    considered: tuple[tuple[str, int, bool | None], ...] = ()

    @property
    def model(self) -> str:
        return self.variant.model

    @property
    def quantization(self) -> str:
        return self.variant.quantization

    @property
    def vram_mib(self) -> int:
        return self.variant.vram_mb


def _key(name: str) -> str:
    return name.strip().lower()


class ModelRegistry:
    """Models by name (and alias), case-insensitive."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        merged: dict[str, ModelEntry] = {}
        for e in entries:
            merged[_key(e.model)] = e  # a later entry of the same name replaces the earlier
        self.entries: list[ModelEntry] = list(merged.values())
        self._index: dict[str, ModelEntry] = {}
        for e in self.entries:
            for alias in e.aliases:
                self._index[_key(alias)] = e
        for e in self.entries:
            self._index[_key(e.model)] = e  # a name wins over another model's alias

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return [e.model for e in self.entries]

    def get(self, name: str) -> ModelEntry:
        """The model by name or alias; raises :class:`UnknownModel` listing near matches."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownModel("model", str(name), "model (give a name such as 'gemma3:12b')")
        entry = self._index.get(_key(name))
        if entry is None:
            near = near_matches(name, [n for e in self.entries for n in (e.model, *e.aliases)])
            by_alias = {_key(n): e.model for e in self.entries for n in (e.model, *e.aliases)}
            raise UnknownModel("model", name, "model", dict.fromkeys(by_alias[_key(n)] for n in near))
        return entry


def parse_models(data: Any, source: str) -> list[ModelEntry]:
    """Models from a parsed YAML document: a mapping of model name to its spec (see ``models.yaml``)."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of model name to its spec")
    out = []
    for name, raw in data.items():
        try:
            spec = _ModelSpec.model_validate(raw)
        except ValidationError as err:
            raise validation_error(err, f"{source}: {name}") from None
        variants = []
        for quant, v in spec.quantizations.items():
            vs = v if isinstance(v, _VariantSpec) else _VariantSpec(vram_mb=v)
            variants.append(
                ModelVariant(
                    provider=spec.provider,
                    model=str(name),
                    quantization=str(quant),
                    vram_mb=vs.vram_mb,
                    context_window=vs.context_window or spec.context_window,
                    kind=spec.kind,
                )
            )
        out.append(
            ModelEntry(
                model=str(name),
                provider=spec.provider,
                kind=spec.kind,
                context_window=spec.context_window,
                aliases=tuple(spec.aliases),
                variants=tuple(variants),
            )
        )
    return out


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[ModelEntry, ...]:
    text, source = shipped_text("models.yaml")
    return tuple(parse_models(parse_yaml(text, source), source))


def load_models(*extra_paths: str | os.PathLike[str]) -> ModelRegistry:
    """The shipped models, extended (and overridden, model by model) by the user's YAML files, in order."""
    entries = list(_shipped())
    for path in extra_paths:
        data, source = read_yaml_file(path)
        entries += parse_models(data, source)
    return ModelRegistry(entries)


@functools.lru_cache(maxsize=1)
def default_models() -> ModelRegistry:
    """The shipped registry (read once)."""
    return load_models()


def _best_fit(need: int, free: Mapping[str, int]) -> str | None:
    """The GPU left with the least free VRAM after ``need`` (ties: the smaller id), as the scripts place."""
    fitting = [(left - need, gpu) for gpu, left in free.items() if left >= need]
    return min(fitting)[1] if fitting else None


def resolve_model(
    name: str,
    quantizations: Sequence[str] | None = None,
    free_mib_by_gpu: Mapping[str, int] | None = None,
    *,
    registry: ModelRegistry | None = None,
) -> ModelChoice:
    """Choose the quantization of a model to run.

    ``quantizations`` is the order of preference (labels as the registry lists them, or their family:
    ``"q8"`` finds ``"q8_0"``); by default every quantization of the model, best quality first.
    ``free_mib_by_gpu`` maps each eligible GPU to its free VRAM now: the first preference that fits on one of
    them is chosen, with that GPU. If none fits, the smallest is chosen (``fits=False``): the one a waiting
    request should ask for. Without ``free_mib_by_gpu`` the first preference is chosen unchecked.
    """
    entry = (registry or default_models()).get(name)
    if quantizations is None:
        order = entry.by_quality()
    else:
        if isinstance(quantizations, str) or not quantizations:
            raise InvalidRequest("quantizations", quantizations, "must be a non-empty list of labels, or None")
        order = list(dict.fromkeys(entry.variant(q) for q in quantizations))
    label = f"{entry.model}: "
    if free_mib_by_gpu is None:
        chosen = order[0]
        return ModelChoice(
            chosen,
            None,
            None,
            label + f"{chosen.quantization} ({chosen.vram_mb} MiB), first preference; free VRAM not checked",
            tuple((v.quantization, v.vram_mb, None) for v in order),
        )
    free = {str(g): int(m) for g, m in free_mib_by_gpu.items()}
    considered = tuple((v.quantization, v.vram_mb, _best_fit(v.vram_mb, free) is not None) for v in order)
    for i, v in enumerate(order):
        gpu = _best_fit(v.vram_mb, free)
        if gpu is not None:
            skipped = "; ".join(f"{s.quantization} ({s.vram_mb} MiB) does not fit" for s in order[:i])
            reason = (
                f"{v.quantization} ({v.vram_mb} MiB) is the {'first preference' if i == 0 else 'best'} that fits now, "
                f"on {gpu} ({free[gpu]} MiB free)" + (f"; {skipped}" if skipped else "")
            )
            return ModelChoice(v, True, gpu, label + reason, considered)
    smallest = min(order, key=lambda v: v.vram_mb)
    most = max(free.items(), key=lambda kv: (kv[1], kv[0]), default=None)
    where = f"the most free is {most[1]} MiB on {most[0]}" if most else "no GPU was given"
    reason = (
        f"none of {', '.join(f'{v.quantization} ({v.vram_mb} MiB)' for v in order)} fits now ({where}); "
        f"{smallest.quantization}, the smallest, is the one to wait for"
    )
    return ModelChoice(smallest, False, None, label + reason, considered)

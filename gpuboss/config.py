"""Configuration: a pydantic model read from keyword arguments or from a YAML file.

``GPUBOSS_CONFIG`` names the file to read instead of the path given to ``from_config``, and
``GPUBOSS_REDIS_URL`` replaces the file's ``redis_url``. Keyword arguments given in code win over both.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gpuboss.errors import ConfigError
from gpuboss.keys import NAMESPACE_RE
from gpuboss.topology import FAKE_SCHEME, check_cluster_namespace, is_cluster_url, parse_url

ENV_CONFIG = "GPUBOSS_CONFIG"
ENV_REDIS_URL = "GPUBOSS_REDIS_URL"

#: The default priority classes and their ranks: a higher rank is served first (config ``priorities``).
PRIORITIES: dict[str, int] = {"low": 0, "normal": 1, "high": 2}
#: A priority class name (validated against the configuration's ``priorities``).
PriorityName = str
CLASS_RE = r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$"
WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def gb_to_mib(gb: float) -> int:
    """Gigabytes as the integer MiB gpuboss accounts in: ``ceil(gb * 1024)``."""
    return math.ceil(gb * 1024)


class GPUConfig(BaseModel):
    """One declared GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    name: str = ""
    vram_gb: float = Field(gt=0, le=2**20, allow_inf_nan=False)
    index: int = Field(default=0, ge=0)
    reserve_gb: float = Field(default=0, ge=0, le=2**20, allow_inf_nan=False)

    @model_validator(mode="after")
    def _reserve_below_capacity(self) -> GPUConfig:
        if gb_to_mib(self.reserve_gb) >= gb_to_mib(self.vram_gb):
            raise ValueError(f"reserve_gb ({self.reserve_gb}) must be less than vram_gb ({self.vram_gb})")
        return self

    @property
    def capacity_mib(self) -> int:
        return gb_to_mib(self.vram_gb)

    @property
    def reserve_mib(self) -> int:
        return gb_to_mib(self.reserve_gb)

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


class PauseRule(BaseModel):
    """``{class: low, while: [high], evict: true}``: no ``low`` grant while any ``high`` lease is active; with
    ``evict``, active ``low`` leases are asked to checkpoint when a ``high`` one is granted."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    paused: PriorityName = Field(alias="class")
    while_active: list[PriorityName] = Field(alias="while", min_length=1)
    evict: bool = False

    @model_validator(mode="after")
    def _not_itself(self) -> PauseRule:
        if self.paused in self.while_active:
            raise ValueError(f"a class cannot pause itself ({self.paused!r} in while)")
        return self

    def to_lua(self) -> dict[str, Any]:
        return {"class": self.paused, "while": list(self.while_active), "evict": self.evict}


class Aging(BaseModel):
    """A waiting request's priority rises by one class per ``every_s`` of waiting, by at most ``max_boost``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every_s: float = Field(gt=0, le=86400 * 7, allow_inf_nan=False)
    max_boost: int = Field(default=1, ge=1, le=100, strict=True)


class Window(BaseModel):
    """``{class: low, pause: "09:00-18:00", tz: Europe/Berlin, days: [mon, tue, wed, thu, fri]}``: requests of
    ``class`` are not granted during those hours (local time of ``tz``); active leases continue."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    paused: PriorityName = Field(alias="class")
    pause: str = Field(description="HH:MM-HH:MM, local time; an end before the start spans midnight")
    tz: str = "UTC"
    days: list[str] = Field(default_factory=lambda: list(DAYS))

    @field_validator("pause")
    @classmethod
    def _hours(cls, value: str) -> str:
        if not WINDOW_RE.fullmatch(value):
            raise ValueError(f"pause must be HH:MM-HH:MM (24 h clock, e.g. 09:00-18:00), not {value!r}")
        return value

    @field_validator("tz")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"tz must be an IANA time zone such as UTC or Europe/Berlin, not {value!r}") from None
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: list[str]) -> list[str]:
        bad = [d for d in value if d not in DAYS]
        if bad or not value:
            raise ValueError(f"days must be a non-empty list of {', '.join(DAYS)}; not {bad or value}")
        return value


class ServiceCap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_leases: int | None = Field(default=None, ge=1, le=1_000_000, strict=True)
    max_vram_gb: float | None = Field(default=None, gt=0, le=2**20, allow_inf_nan=False)


class ClassCap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_leases: int = Field(ge=1, le=1_000_000, strict=True)


class Caps(BaseModel):
    """Limits enforced atomically with the grant: a request over a cap waits (it does not block others)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    services: dict[str, ServiceCap] = Field(default_factory=dict)
    classes: dict[str, ClassCap] = Field(default_factory=dict)


class MaxHold(BaseModel):
    """A lease of the class held longer than ``seconds`` is asked to checkpoint (``evict``) or revoked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds: float = Field(gt=0, le=86400 * 30, allow_inf_nan=False)
    action: Literal["evict", "revoke"] = "evict"


class BossConfig(BaseModel):
    """Everything a :class:`~gpuboss.GPUBoss` or :class:`~gpuboss.AsyncGPUBoss` is built from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str | None = None
    namespace: str = "gpuboss"
    service: str = Field(default="default", min_length=1, max_length=128)
    gpus: list[GPUConfig] = Field(default_factory=list)
    default_priority: PriorityName = "normal"
    default_ttl: float = Field(default=30.0, gt=0, le=86400, allow_inf_nan=False)
    default_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    connect_timeout: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    #: About how many events the namespace's event log (a Redis stream) keeps; 0 keeps none (publish only).
    events_maxlen: int = Field(default=10_000, ge=0, le=10_000_000, strict=True)
    #: GPU discovery through NVML (docs/inventory.md): "auto" (what ``gpus: auto`` sets), "off", or None: auto
    #: when no GPU list is given and NVML works on this host.
    gpu_discovery: Literal["auto", "off"] | None = None
    #: The reserve (GB never leased out) of each discovered GPU.
    auto_reserve_gb: float = Field(default=0, ge=0, le=2**20, allow_inf_nan=False)
    #: Seconds between two NVML readings of this host's GPUs (and two host heartbeats).
    sample_interval_s: float = Field(default=2.0, ge=0.1, le=300, allow_inf_nan=False)
    #: A host silent for this long has its GPUs marked offline (no new grants there).
    host_timeout_s: float = Field(default=30.0, gt=0, le=86400, allow_inf_nan=False)
    #: A holder using more than its leases plus this (GB: its CUDA context, say) gets a ``vram_alert``.
    #: 1 GB: a torch process holds 684 MiB beyond its tensors on an H200 (CUDA 13), cuBLAS and attention loaded.
    alert_margin_gb: float = Field(default=1.0, ge=0, le=2**20, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _gpus_auto(cls, data: Any) -> Any:
        """``gpus: auto`` is ``gpus: []`` with ``gpu_discovery: auto``; ``gpu_discovery: off`` unquoted (YAML
        reads it as false) is ``'off'``, and true is ``'auto'``."""
        if isinstance(data, dict) and isinstance(data.get("gpu_discovery"), bool):
            data = {**data, "gpu_discovery": "auto" if data["gpu_discovery"] else "off"}
        if isinstance(data, dict) and isinstance(data.get("gpus"), str):
            if data["gpus"] != "auto":
                raise ValueError(f"gpus must be a list of GPUs or 'auto', not {data['gpus']!r}")
            if data.get("gpu_discovery") == "off":
                raise ValueError("gpus: 'auto' contradicts gpu_discovery: 'off'")
            data = {**data, "gpus": [], "gpu_discovery": "auto"}
        return data

    @model_validator(mode="after")
    def _discovery_fits(self) -> BossConfig:
        if self.gpu_discovery == "auto" and self.gpus:
            raise ValueError("gpus: give a list of GPUs or 'auto', not both (gpu_discovery: 'auto' with a list)")
        if self.host_timeout_s < 3 * self.sample_interval_s:
            raise ValueError(
                f"host_timeout_s ({self.host_timeout_s:g}) must be at least 3 x sample_interval_s "
                f"({self.sample_interval_s:g}), or a host would go offline between two beats"
            )
        return self

    # -- cooperative eviction (docs/eviction.md)
    #: Priority classes whose leases are preemptible unless the request says otherwise.
    preemptible: list[PriorityName] = Field(default_factory=lambda: list[PriorityName](["low"]))
    #: Seconds a lease asked to checkpoint gets before ``evict_on_grace`` decides.
    evict_grace_s: float = Field(default=30.0, gt=0, le=86400, allow_inf_nan=False)
    #: After the grace: "wait" (keep waiting, report it) or "revoke" (remove the victims' leases).
    evict_on_grace: Literal["wait", "revoke"] = "wait"
    #: Pause rules every process obeys (stored in Redis on first use); None leaves the namespace's rules alone.
    pause: list[PauseRule] | None = None

    # -- scheduling policy (docs/scheduling.md); each None leaves the namespace's rule alone
    #: Priority classes and their ranks (0..999, higher served first).
    priorities: dict[str, int] = Field(default_factory=lambda: dict(PRIORITIES))
    #: ``false`` removes the namespace's aging rule (None, left out, leaves it alone).
    aging: Aging | Literal[False] | None = None
    #: "strict": a request that does not fit holds everyone behind it; "backfill": later requests may use
    #: GPUs the first one cannot use, while the GPU it waits for is kept for it.
    queueing: Literal["strict", "backfill"] | None = None
    #: How many times a request that does not fit may be passed by later requests that fit (0: never, as
    #: ``queueing`` alone says); once passed that often, ``queueing`` applies to it.
    overtake: int | None = Field(default=None, ge=0, le=1000)
    windows: list[Window] | None = None
    caps: Caps | None = None
    max_hold: dict[str, MaxHold] | None = None
    #: When Redis cannot be reached: "error" raises RedisUnavailable at once, "wait" retries with backoff up
    #: to the request's timeout, "local" coordinates within this process only until Redis is back.
    on_redis_down: Literal["error", "wait", "local"] = "error"

    @field_validator("namespace")
    @classmethod
    def _namespace_chars(cls, value: str) -> str:
        if not NAMESPACE_RE.fullmatch(value):
            raise ValueError("namespace must be 1 to 64 of A-Z a-z 0-9 _ . - { }")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace_on_cluster(cls, value: str, info: ValidationInfo) -> str:
        """On a Redis Cluster every key of a namespace must hash to one slot: the namespace needs a hash tag."""
        if is_cluster_url(info.data.get("redis_url")):
            check_cluster_namespace(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_form(cls, value: str | None) -> str | None:
        """One of the forms in docs/topologies.md, with known options (the error never shows the password)."""
        if value is not None and not value.startswith(f"{FAKE_SCHEME}://"):
            parse_url(value)
        return value

    @model_validator(mode="after")
    def _known_classes(self) -> BossConfig:
        known = self.priorities
        if not known:
            raise ValueError("priorities: define at least one class")
        for name, rank in known.items():
            if not re.fullmatch(CLASS_RE, name):
                raise ValueError(f"priorities: class name {name!r} must be 1-32 of A-Z a-z 0-9 _ - (a letter first)")
            if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= 999:
                raise ValueError(f"priorities: rank of {name!r} must be an integer 0..999, not {rank!r}")
        if len(set(known.values())) != len(known):
            raise ValueError("priorities: two classes share a rank; give each its own")
        names = ", ".join(repr(n) for n in known)
        used: list[tuple[str, str]] = [("default_priority", self.default_priority)]
        used += [("preemptible", c) for c in self.preemptible]
        for rule in self.pause or []:
            used += [("pause.class", rule.paused)] + [("pause.while", c) for c in rule.while_active]
        used += [("windows.class", w.paused) for w in self.windows or []]
        used += [("caps.classes", c) for c in (self.caps.classes if self.caps else {})]
        used += [("max_hold", c) for c in self.max_hold or {}]
        for where, name in used:
            if name not in known:
                raise ValueError(f"{where}: unknown priority class {name!r}; the classes are {names}")
        return self

    @model_validator(mode="after")
    def _unique_gpus(self) -> BossConfig:
        ids = [g.id for g in self.gpus]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"gpus: duplicate id {', '.join(dupes)}")
        return self


#: What pydantic puts before the message of a ValueError (AssertionError) a validator raised.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def format_validation_error(err: ValidationError, source: str) -> str:
    """``source: field.path: message; ...``, without pydantic's ``Value error, `` before a validator's own
    message."""
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = str(item["msg"])
        for prefix in _PYDANTIC_PREFIXES:
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
                break
        lines.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(lines)


def build_config(source: str = "arguments", **values: Any) -> BossConfig:
    """Validate settings into a :class:`BossConfig`, raising :class:`ConfigError` naming the field."""
    try:
        return BossConfig(**values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None


def read_config_file(path: str | os.PathLike[str] | None, use_env: bool = True) -> tuple[dict[str, Any], str]:
    """The settings in a YAML file (``GPUBOSS_CONFIG`` wins over ``path`` unless not ``use_env``), and the
    path read."""
    chosen = (os.environ.get(ENV_CONFIG) if use_env else None) or (os.fspath(path) if path is not None else None)
    if not chosen:
        raise ConfigError(f"no configuration file: pass a path or set {ENV_CONFIG}")
    file = Path(chosen)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{file}: cannot read configuration ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: malformed YAML: {err}") from None
    except ValueError as err:  # a scalar the resolver reads as a value it cannot build: 2024-13-01, 4300+ digits
        raise ConfigError(f"{file}: malformed YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{file}: malformed YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of settings, not {type(data).__name__}")
    return {str(k): v for k, v in data.items()}, str(file)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> BossConfig:
    """Read a YAML file, apply ``GPUBOSS_REDIS_URL``, then the keyword overrides, and validate."""
    values, source = read_config_file(path)
    env_url = os.environ.get(ENV_REDIS_URL)
    if env_url:
        values["redis_url"] = env_url
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(source, **values)


def config_from_arguments(**values: Any) -> BossConfig:
    """Constructor arguments: ``GPUBOSS_REDIS_URL`` fills ``redis_url`` when the code gives none."""
    given = {k: v for k, v in values.items() if v is not None}
    if "redis_url" not in given and os.environ.get(ENV_REDIS_URL):
        given["redis_url"] = os.environ[ENV_REDIS_URL]
    return build_config("arguments", **given)

"""Configuration: a pydantic model read from keyword arguments or from a YAML file.

``GPUBOSS_CONFIG`` names the file to read instead of the path given to ``from_config``, and
``GPUBOSS_REDIS_URL`` replaces the file's ``redis_url``. Keyword arguments given in code win over both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gpuboss.errors import ConfigError
from gpuboss.keys import NAMESPACE_RE
from gpuboss.topology import FAKE_SCHEME, check_cluster_namespace, is_cluster_url, parse_url

ENV_CONFIG = "GPUBOSS_CONFIG"
ENV_REDIS_URL = "GPUBOSS_REDIS_URL"

#: Priority classes and their ranks: a higher rank is served first.
PRIORITIES: dict[str, int] = {"low": 0, "normal": 1, "high": 2}
PriorityName = Literal["low", "normal", "high"]


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
    alert_margin_gb: float = Field(default=0.5, ge=0, le=2**20, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _gpus_auto(cls, data: Any) -> Any:
        """``gpus: auto`` is ``gpus: []`` with ``gpu_discovery: auto``."""
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
    def _unique_gpus(self) -> BossConfig:
        ids = [g.id for g in self.gpus]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"gpus: duplicate id {', '.join(dupes)}")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{where}: {item['msg']}")
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

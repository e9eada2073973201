"""gpuboss: share GPUs between services without running out of memory.

VRAM leases are granted, queued by priority, renewed and reclaimed by atomic Lua scripts in Redis; there
is no central server. See the README and ``docs/``.
"""

from gpuboss.aio import AsyncGPUBoss
from gpuboss.client import GPUBoss
from gpuboss.config import BossConfig, GPUConfig, load_config
from gpuboss.core import GpuInfo
from gpuboss.errors import (
    BossClosed,
    ConfigError,
    EventLoopError,
    GPUBossError,
    InsufficientCapacity,
    InvalidRequest,
    LeaseEvicted,
    LeaseLost,
    LeaseTimeout,
    RedisOutOfMemory,
    RedisUnavailable,
)
from gpuboss.events import Event
from gpuboss.inventory import VRAMStatus
from gpuboss.keys import Keys
from gpuboss.lease import Device, Lease, LeaseState
from gpuboss.registry import DeviceOrdinalWarning
from gpuboss.sampler import VramOverBudgetWarning
from gpuboss.warm import WarmModel

__version__ = "0.1.0"

__all__ = [
    "AsyncGPUBoss",
    "BossClosed",
    "BossConfig",
    "ConfigError",
    "Device",
    "DeviceOrdinalWarning",
    "Event",
    "EventLoopError",
    "GPUBoss",
    "GPUBossError",
    "GPUConfig",
    "GpuInfo",
    "InsufficientCapacity",
    "InvalidRequest",
    "Keys",
    "Lease",
    "LeaseEvicted",
    "LeaseLost",
    "LeaseState",
    "LeaseTimeout",
    "RedisOutOfMemory",
    "RedisUnavailable",
    "VRAMStatus",
    "VramOverBudgetWarning",
    "WarmModel",
    "__version__",
    "load_config",
]

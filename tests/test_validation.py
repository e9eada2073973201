"""Bad input: a typed error naming the field and what is allowed, and nothing written to Redis."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from gpuboss import AsyncGPUBoss, ConfigError, GPUBoss, InvalidRequest, Keys

from tests.conftest import GPUS, raw_client, snapshot

BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"vram_gb": 0}, "vram_gb", "greater than 0"),
    ({"vram_gb": -1}, "vram_gb", "greater than 0"),
    ({"vram_gb": math.nan}, "vram_gb", "finite"),
    ({"vram_gb": math.inf}, "vram_gb", "finite"),
    ({"vram_gb": "8"}, "vram_gb", "must be a number"),
    ({"vram_gb": None}, "vram_gb", "must be a number"),
    ({"vram_gb": True}, "vram_gb", "must be a number"),
    ({"vram_gb": [8]}, "vram_gb", "must be a number"),
    ({"vram_gb": 1, "priority": "urgent"}, "priority", "'low', 'normal', 'high'"),
    ({"vram_gb": 1, "priority": 2}, "priority", "'low', 'normal', 'high'"),
    ({"vram_gb": 1, "timeout": -1}, "timeout", "seconds > 0"),
    ({"vram_gb": 1, "timeout": math.nan}, "timeout", "seconds > 0"),
    ({"vram_gb": 1, "timeout": "5"}, "timeout", "must be a number"),
    ({"vram_gb": 1, "ttl": 0}, "ttl", "greater than 0"),
    ({"vram_gb": 1, "ttl": -3}, "ttl", "greater than 0"),
    ({"vram_gb": 1, "ttl": math.inf}, "ttl", "greater than 0"),
    ({"vram_gb": 1, "device": "gpu9"}, "device", "gpu0 (cuda:0), gpu1 (cuda:1)"),
    ({"vram_gb": 1, "device": "cuda:7"}, "device", "must name a registered GPU"),
    ({"vram_gb": 1, "device": 7}, "device", "must name a registered GPU"),
    ({"vram_gb": 1, "device": -1}, "device", "a GPU id, 'cuda:N'"),
    ({"vram_gb": 1, "device": ""}, "device", "a GPU id, 'cuda:N'"),
    ({"vram_gb": 1, "on_lost": 5}, "on_lost", "callable"),
]


@contextmanager
def names_field(field: str, allowed: str) -> Iterator[None]:
    """Expect the block to raise :class:`InvalidRequest` for ``field``, naming it and the ``allowed`` values."""
    with pytest.raises(InvalidRequest) as err:
        yield
    assert err.value.field == field
    assert field in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize(("kwargs", "field", "allowed"), BAD_REQUESTS)
def test_bad_request_is_typed_and_writes_nothing(
    backend_url: str, namespace: str, kwargs: dict[str, Any], field: str, allowed: str
) -> None:
    boss = GPUBoss(backend_url, namespace=namespace, gpus=GPUS)
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    with names_field(field, allowed):
        boss.acquire(**kwargs)
    with pytest.raises(InvalidRequest), boss.lease(**kwargs):
        pass
    assert snapshot(client, namespace) == before
    boss.close()


@pytest.mark.parametrize(("kwargs", "field", "allowed"), BAD_REQUESTS[:3] + BAD_REQUESTS[-5:-2])
async def test_bad_request_async(
    backend_url: str, namespace: str, kwargs: dict[str, Any], field: str, allowed: str
) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPUS)
    before = snapshot(raw_client(backend_url), namespace)
    with pytest.raises(InvalidRequest, match=field):
        await boss.acquire(**kwargs)
    assert snapshot(raw_client(backend_url), namespace) == before
    await boss.close()


#: A request by model name (``model=``, sized from the model registry) with one bad argument: the model is
#: resolved first, so this checks that resolving it writes nothing (this boss's GPUs are not registered yet).
BAD_MODEL_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"priority": "bogus"}, "priority", "'low', 'normal', 'high'"),
    ({"timeout": -1}, "timeout", "seconds > 0"),
    ({"ttl": 0}, "ttl", "greater than 0"),
    ({"device": -1}, "device", "a GPU id, 'cuda:N'"),
    ({"device": "gpu9"}, "device", "gpu0 (cuda:0), gpu1 (cuda:1)"),
    ({"node": " padded"}, "node", "'any' (every host)"),
    ({"preemptible": "yes"}, "preemptible", "True or False"),
    ({"resume": "yes"}, "resume", "True or False"),
    ({"on_lost": 5}, "on_lost", "callable"),
    ({"on_evict": 5}, "on_evict", "callable"),
    ({"gpus": 0}, "gpus", "from 1 to 64"),
    ({"quantizations": []}, "quantizations", "non-empty list"),
    ({"quantizations": ["zz9"]}, "quantizations", "q4_K_M"),
]


@pytest.mark.parametrize(("kwargs", "field", "allowed"), BAD_MODEL_REQUESTS)
def test_bad_request_by_model_is_typed_and_writes_nothing(
    backend_url: str, namespace: str, kwargs: dict[str, Any], field: str, allowed: str
) -> None:
    boss = GPUBoss(backend_url, namespace=namespace, gpus=GPUS)
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    try:
        with names_field(field, allowed):
            boss.acquire(model="gemma3:4b", **{"timeout": 0, **kwargs})
        assert snapshot(client, namespace) == before
        with pytest.raises(InvalidRequest), boss.lease(model="gemma3:4b", **{"timeout": 0, **kwargs}):
            pass
        assert snapshot(client, namespace) == before
    finally:
        boss.close()


@pytest.mark.parametrize(("kwargs", "field", "allowed"), BAD_MODEL_REQUESTS)
async def test_bad_request_by_model_async(
    backend_url: str, namespace: str, kwargs: dict[str, Any], field: str, allowed: str
) -> None:
    boss = AsyncGPUBoss(backend_url, namespace=namespace, gpus=GPUS)
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    try:
        with names_field(field, allowed):
            await boss.acquire(model="gemma3:4b", **{"timeout": 0, **kwargs})
        assert snapshot(client, namespace) == before
    finally:
        await boss.close()


def test_choose_model_reads_only_and_a_lease_by_model_registers_afterwards(backend_url: str, namespace: str) -> None:
    """``choose_model`` counts this boss's unregistered GPUs as they will be, writes nothing, and leaves the
    registration to the first request that passes its checks."""
    boss = GPUBoss(backend_url, namespace=namespace, gpus=GPUS)
    client = raw_client(backend_url)
    try:
        choice = boss.choose_model("gemma3:12b")
        # As if registered: q8_0 (15360 MiB) fills gpu1's 15 GB exactly (fp16 fits neither).
        assert (choice.quantization, choice.gpu, choice.fits) == ("q8_0", "gpu1", True)
        assert snapshot(client, namespace) == {}
        lease = boss.acquire(model="gemma3:12b", timeout=0)
        assert (lease.quantization, lease.vram_mib) == ("q8_0", 15360)
        assert set(client.hkeys(Keys(namespace).gpus)) == {"gpu0", "gpu1"}
        boss.release(lease)
    finally:
        boss.close()


def test_unknown_device_after_registration_writes_nothing(boss: GPUBoss, backend_url: str, namespace: str) -> None:
    boss.release(boss.acquire(1))
    client = raw_client(backend_url)
    before = snapshot(client, namespace)
    with pytest.raises(InvalidRequest, match="device"):
        boss.acquire(1, device="gpu7")
    assert snapshot(client, namespace) == before


BAD_CONFIGS: list[tuple[str, str]] = [
    ("gpus: [{id: gpu0, vram_gb: 24, index: 0}\n", "malformed YAML"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("gpus: [{id: gpu0, vram_gb: -2}]\n", "gpus.0.vram_gb"),
    ("gpus: [{id: gpu0, vram_gb: 24, reserve_gb: 30}]\n", "reserve_gb"),
    ("gpus: [{id: gpu0, vram_gb: 24}, {id: gpu0, vram_gb: 16}]\n", "duplicate id gpu0"),
    ("gpus: [{id: gpu0, vram_gb: 24, colour: red}]\n", "gpus.0.colour"),
    ("default_priority: urgent\n", "default_priority"),
    ("default_ttl: 0\n", "default_ttl"),
    ("default_timeout: -1\n", "default_timeout"),
    ("namespace: 'has space'\n", "namespace"),
    ("redis_urll: redis://x\n", "redis_urll"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_bad_config_names_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        GPUBoss.from_config(path)
    assert str(path) in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        GPUBoss.from_config(tmp_path / "nope.yaml")


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ConfigError, match="default_priority"):
        GPUBoss("redis://127.0.0.1:1", default_priority="urgent")
    with pytest.raises(ConfigError, match="gpus"):
        GPUBoss("redis://127.0.0.1:1", gpus=[{"id": "g", "vram_gb": "lots"}])


def test_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_url: str, namespace: str) -> None:
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(f"redis_url: redis://127.0.0.1:1/0\nnamespace: {namespace}\nservice: a\n")
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text(
        f"redis_url: redis://127.0.0.1:1/0\nnamespace: {namespace}\nservice: b\n"
        "gpus: [{id: gpu0, vram_gb: 8, index: 0}]\ndefault_ttl: 12\n"
    )
    monkeypatch.setenv("GPUBOSS_CONFIG", str(chosen))
    monkeypatch.setenv("GPUBOSS_REDIS_URL", real_url)
    boss = GPUBoss.from_config(shipped)
    assert boss.config.service == "b" and boss.url == real_url and boss.config.default_ttl == 12
    lease = boss.acquire(1)
    assert lease.ttl == 12 and lease.service == "b"
    boss.close()
    # A URL given in code wins over the environment.
    assert GPUBoss("redis://127.0.0.1:1/0", gpus=GPUS).url == "redis://127.0.0.1:1/0"


def test_repository_config_example_is_valid() -> None:
    from gpuboss.config import load_config

    path = Path(__file__).resolve().parent.parent / "config.yaml"
    config = load_config(path)
    assert config.gpus, "the documented example declares at least one GPU"


def test_unreachable_redis_is_typed_bounded_and_hides_the_password() -> None:
    from gpuboss import RedisUnavailable

    boss = GPUBoss("redis://user:s3cret@127.0.0.1:1/0", gpus=GPUS, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as err:
        boss.acquire(1)
    assert time.monotonic() - started < 3
    assert "s3cret" not in str(err.value) and "127.0.0.1:1" in str(err.value)
    boss.close()


def test_lease_evicted_is_a_gpuboss_error() -> None:
    import gpuboss

    assert issubclass(gpuboss.LeaseEvicted, gpuboss.GPUBossError)
    assert "LeaseEvicted" in gpuboss.__all__


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu_discovery: off\n", "off"),  # unquoted: YAML reads false
        ("gpu_discovery: no\n", "off"),
        ("gpu_discovery: on\n", "auto"),
        ("gpu_discovery: 'off'\n", "off"),
        ("gpu_discovery: auto\n", "auto"),
    ],
)
def test_gpu_discovery_off_unquoted(tmp_path: Path, text: str, expected: str) -> None:
    from gpuboss.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path).gpu_discovery == expected


def test_gpus_auto_contradicts_unquoted_discovery_off(tmp_path: Path) -> None:
    from gpuboss.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("gpus: auto\ngpu_discovery: off\n")
    with pytest.raises(ConfigError, match="contradicts gpu_discovery"):
        load_config(path)


def test_validation_messages_carry_no_pydantic_prefix(tmp_path: Path) -> None:
    from gpuboss.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("gpus: [{id: gpu0, vram_gb: 24, reserve_gb: 30}]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: gpus.0: reserve_gb (30.0) must be less than vram_gb (24.0)"
    path.write_text("priorities: {low: 0, high: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "Value error" not in str(err.value) and "(top level): priorities: two classes share a rank" in str(err.value)

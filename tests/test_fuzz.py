"""Fuzzing with hypothesis: the public API and the config loader, fed random and hostile input.

Only the documented errors may come out (``InvalidRequest``, ``InsufficientCapacity``, ``ConfigError``, and
``LeaseTimeout`` for ``timeout=0`` when nothing fits), each exactly when an independent reading of the
documented argument domains says so, and a rejected call leaves Redis exactly as it was.

The bugs this fuzzing found are fixed; each has a narrow regression test at the end of this file, and the
inputs that hit them are inside the general properties too: the reference domains below model ints beyond
float range, sizes whose MiB overflow a float, ints too long to print, and ``cuda:N`` with any digits.
"""

from __future__ import annotations

import math
import string
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from gpuboss import GPUBoss, InsufficientCapacity, InvalidRequest, LeaseTimeout
from gpuboss.config import PRIORITIES, BossConfig, build_config, gb_to_mib, load_config
from gpuboss.devices import child_env_for_device
from gpuboss.errors import ConfigError
from gpuboss.lease import Lease
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import GPUS, raw_client, snapshot

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: The leasable MiB of tests/conftest.py's GPUS, by id, and their CUDA indexes.
LEASABLE = {"gpu0": 24 * 1024, "gpu1": 15 * 1024}
INDEXES = {0: "gpu0", 1: "gpu1"}
FLOAT_MAX = sys.float_info.max

# ---------------------------------------------------------------- hostile values

SPECIAL = [
    math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1e-300, 1e300, FLOAT_MAX, -1, 0, 1, 2,
    2**31, 2**63, 2**64, 10**30, -(10**30), 10**400, -(10**400), 1e306, 1e308, 86400, 86400.000001,
    2**20, 2**21, True, False, None,
    "", " ", "0", "1", "NaN", "inf", "high", "HIGH", "normal ", "low\x00", "gpu0", "gpu1", "gpu9", "gpu0\n",
    "cuda:0", "cuda:1", "cuda:2", "cuda:-1", "cuda:", "cuda:00", "cuda:0x1", "cuda:²", "cuda:\u0660", "cuda:+1",
    "cuda:" + "0" * 30 + "1", "cuda:" + "0" * 5000, "cuda:" + "1" * 5000, "cuda:" + "1" * 19,
    "gpü0", "GPU\uff10", "💥", "\u202egpu0",
    "cuda:0; DROP", "*", "gpuboss:*", b"gpu0", bytearray(b"x"), Decimal("1.5"), Fraction(1, 3), 1j,
    [], [1], {}, {"vram_gb": 1}, (), {1, 2}, object(), print, len, type, Ellipsis, NotImplemented,
]  # fmt: skip


def unprintable_int(digits: int) -> int:
    """Plus or minus 10**|digits|: an int that repr() refuses from 4300 digits on. Made in a draw (``.map``), as
    hypothesis prints its strategies, and cannot print one that holds such an int."""
    return 10 ** abs(digits) * (1 if digits > 0 else -1)


def hostile() -> st.SearchStrategy[Any]:
    """The hand-picked values above (a third of the draws), ints too long to print, anything hypothesis makes of
    the basic types, and lists and dicts of those."""
    special = st.sampled_from(SPECIAL)
    scalars = st.one_of(
        special,
        st.sampled_from([4400, -5000]).map(unprintable_int),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        st.binary(max_size=6),
        st.decimals(allow_nan=True),
        st.fractions(),
        st.complex_numbers(),
    )
    containers = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=5,
    )
    return st.one_of(special, scalars, containers)


def plausible_vram() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(1, 30), st.floats(0.0001, 30), st.sampled_from([0.5, 15, 15.0001, 24, 24.001]))


def plausible_device() -> st.SearchStrategy[Any]:
    return st.sampled_from([None, None, "gpu0", "gpu1", "cuda:0", "cuda:1", 0, 1, 2, "gpu9", "cuda:7"])


PLAUSIBLE = {
    "vram_gb": plausible_vram(),
    "priority": st.sampled_from([None, *PRIORITIES]),
    "timeout": st.sampled_from([None, 0, 0.5, 30, math.inf]),
    "ttl": st.sampled_from([None, 0.001, 1, 30, 86400]),
    "device": plausible_device(),
    "on_lost": st.sampled_from([None, print, lambda lease: None]),
}


def acquire_args(**fixed: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Plausible arguments with none, one or two of them replaced by a hostile value."""
    names = sorted(set(PLAUSIBLE) - set(fixed))
    spoiled = st.dictionaries(st.sampled_from(names), hostile(), max_size=2)
    return st.tuples(st.fixed_dictionaries(PLAUSIBLE), spoiled).map(lambda t: {**t[0], **t[1], **fixed})


# ---------------------------------------------------------------- the documented domains, read independently


def is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def as_float(x: object) -> float | None:
    """A number (int or float, not bool) as the float it stands for, or None: not a number, or beyond float
    range (an int that ``float()`` refuses)."""
    if not is_number(x):
        return None
    try:
        return float(x)  # type: ignore[arg-type]
    except OverflowError:
        return None


def cuda_target(device: str) -> str | None:
    """The GPU ``cuda:N`` names: N is ASCII decimal digits, leading zeros allowed, of any length."""
    digits = device[5:]
    if not (digits and digits.isascii() and digits.isdigit()):
        return None
    value = digits.lstrip("0") or "0"
    return next((gpu for index, gpu in INDEXES.items() if str(index) == value), None)


def expected(kw: dict[str, Any]) -> tuple[str, list[str], int]:
    """('invalid' | 'too_big' | 'ok', eligible gpu ids, MiB) from the documented argument domains."""
    priority, device, on_lost = kw["priority"], kw["device"], kw["on_lost"]
    vram, timeout, ttl = as_float(kw["vram_gb"]), as_float(kw["timeout"]), as_float(kw["ttl"])
    if not (vram is not None and math.isfinite(vram) and vram > 0):
        return "invalid", [], 0
    if priority is not None and not (isinstance(priority, str) and priority in PRIORITIES):
        return "invalid", [], 0
    if kw["timeout"] is not None and not (timeout is not None and not math.isnan(timeout) and timeout >= 0):
        return "invalid", [], 0
    if kw["ttl"] is not None and not (ttl is not None and math.isfinite(ttl) and 0 < ttl <= 86400):
        return "invalid", [], 0
    if on_lost is not None and not callable(on_lost):
        return "invalid", [], 0
    if device is None:
        eligible = sorted(LEASABLE)
    elif isinstance(device, str) and device in LEASABLE:
        eligible = [device]
    elif isinstance(device, str) and device.startswith("cuda:"):
        target = cuda_target(device)
        if target is None:
            return "invalid", [], 0
        eligible = [target]
    elif isinstance(device, int) and not isinstance(device, bool) and device in INDEXES:
        eligible = [INDEXES[device]]
    else:
        return "invalid", [], 0
    mib = math.ceil(Fraction(vram) * 1024)  # exact: no overflow for a finite vram_gb near float's limit
    if mib > max(LEASABLE[g] for g in eligible):
        return "too_big", eligible, mib
    return "ok", eligible, mib


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def fuzz_boss(backend_url: str, namespace: str) -> Iterator[GPUBoss]:
    b = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="fuzz")
    yield b
    b.close()


@pytest.fixture
def fake_boss(namespace: str) -> Iterator[GPUBoss]:
    """For checks that never reach Redis."""
    b = GPUBoss(f"fakeredis://{namespace}", namespace=namespace, gpus=GPUS, service="fuzz")
    yield b
    b.close()


@pytest.fixture
def client(backend_url: str) -> redis.Redis:
    return raw_client(backend_url)


def call(boss: GPUBoss, kw: dict[str, Any], use_with: bool) -> Lease:
    """Acquire through ``acquire()`` or a ``lease()`` block; the lease, released."""
    if use_with:
        with boss.lease(**kw) as device:
            assert device == device.lease.device
            return device.lease
    lease = boss.acquire(**kw)
    boss.release(lease)
    return lease


# ---------------------------------------------------------------- acquire / lease


@FUZZ
@given(kw=acquire_args(), use_with=st.booleans())
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": math.nan}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "device": "gpu9"}, use_with=True)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 25}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1e308}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 10**400}, use_with=True)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "timeout": 10**400}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "ttl": -(10**400)}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "priority": 10**5000}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "device": 10**5000}, use_with=True)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "device": "cuda:²"}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "device": "cuda:\u0661"}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "device": "cuda:" + "1" * 5000}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "device": "cuda:" + "0" * 5000 + "1"}, use_with=True)
def test_acquire_takes_only_its_domain_and_rejects_cleanly(
    fuzz_boss: GPUBoss, client: redis.Redis, namespace: str, kw: dict[str, Any], use_with: bool
) -> None:
    """GPUs free: a valid request that fits is granted at once; anything else raises InvalidRequest or
    InsufficientCapacity, and writes nothing."""
    want, eligible, mib = expected(kw)
    event(f"expected: {want}")
    before = snapshot(client, namespace)
    try:
        lease = call(fuzz_boss, kw, use_with)
    except (InvalidRequest, InsufficientCapacity) as err:
        wanted = InvalidRequest if want == "invalid" else InsufficientCapacity
        assert isinstance(err, wanted), f"{kw}: {type(err).__name__} ({err}), expected {want}"
        assert snapshot(client, namespace) == before, f"{kw}: the rejected call changed Redis"
        return
    assert want == "ok", f"{kw}: granted ({lease.device}), expected {want}"
    assert lease.gpu in eligible and lease.vram_mib == mib
    assert lease.device == f"cuda:{next(i for i, g in INDEXES.items() if g == lease.gpu)}"
    assert fuzz_boss.held() == []


@pytest.fixture
def full(backend_url: str, namespace: str) -> Iterator[None]:
    """Every GPU leased out to the brim by another boss, for an hour."""
    holder = GPUBoss(backend_url, namespace=namespace, gpus=GPUS, service="holder")
    holder.acquire(24, device="gpu0", ttl=3600)
    holder.acquire(15, device="gpu1", ttl=3600)
    yield
    holder.close()


@FUZZ
@given(kw=acquire_args(timeout=0), use_with=st.booleans())
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 0.0001, "timeout": 0}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1e308, "timeout": 0}, use_with=False)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 10**400, "timeout": 0}, use_with=True)
@example(kw={**dict.fromkeys(PLAUSIBLE), "vram_gb": 1, "timeout": 0, "device": "cuda:" + "0" * 5000}, use_with=False)
def test_try_once_on_full_gpus_changes_nothing(
    full: None, fuzz_boss: GPUBoss, client: redis.Redis, namespace: str, kw: dict[str, Any], use_with: bool
) -> None:
    """GPUs full, timeout=0: LeaseTimeout for a valid request, InvalidRequest or InsufficientCapacity
    otherwise; never a grant, and Redis is left exactly as it was."""
    want, _, _ = expected(kw)
    event(f"expected: {want}")
    wanted = {"ok": LeaseTimeout, "invalid": InvalidRequest, "too_big": InsufficientCapacity}[want]
    before = snapshot(client, namespace)
    with pytest.raises(wanted):
        call(fuzz_boss, kw, use_with)
    assert snapshot(client, namespace) == before, f"{kw}: the rejected call changed Redis"


# ---------------------------------------------------------------- configuration

FIELDS = [
    "redis_url", "namespace", "service", "gpus", "default_priority", "default_ttl", "default_timeout",
    "connect_timeout", "events_maxlen",
]  # fmt: skip
GPU_FIELDS = ["id", "name", "vram_gb", "index", "reserve_gb"]


def yaml_values() -> st.SearchStrategy[Any]:
    """What a YAML document can hold (safe_dump writes it, safe_load reads it back)."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["gpu0", "low", "normal", "high", "ns", "ns\n", "a:b", "{tag}", "", "x" * 65, 0.0, -1]),
    )
    return st.recursive(
        leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    )


def gpu_entries() -> st.SearchStrategy[Any]:
    entry = st.dictionaries(st.sampled_from(GPU_FIELDS) | st.text(max_size=4), yaml_values(), max_size=6)
    plausible = st.fixed_dictionaries(
        {"id": st.sampled_from(["gpu0", "gpu1", "g-0.a:b", "gpu 0", "gpu0\n", ""]), "vram_gb": yaml_values()},
        optional={"index": yaml_values(), "reserve_gb": yaml_values(), "name": yaml_values()},
    )
    return st.lists(entry | plausible, max_size=3) | yaml_values()


def settings_maps() -> st.SearchStrategy[dict[str, Any]]:
    keyed = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), yaml_values(), max_size=5)
    return st.tuples(keyed, gpu_entries(), st.booleans()).map(lambda t: {**t[0], "gpus": t[1]} if t[2] else t[0])


NAMESPACE_OK = set(string.ascii_letters + string.digits + "_.-{}")
GPU_ID_OK = set(string.ascii_letters + string.digits + "_.:-")


def check_accepted(config: BossConfig) -> None:
    """An accepted configuration is within every documented bound."""
    assert 1 <= len(config.namespace) <= 64 and set(config.namespace) <= NAMESPACE_OK, repr(config.namespace)
    assert 1 <= len(config.service) <= 128
    assert config.default_priority in PRIORITIES
    assert 0 < config.default_ttl <= 86400
    assert config.default_timeout is None or 0 <= config.default_timeout < math.inf
    assert 0 < config.connect_timeout <= 300
    assert 0 <= config.events_maxlen <= 10_000_000
    assert len({g.id for g in config.gpus}) == len(config.gpus)
    for gpu in config.gpus:
        assert 1 <= len(gpu.id) <= 128 and set(gpu.id) <= GPU_ID_OK, repr(gpu.id)
        assert 0 <= gpu.reserve_mib < gpu.capacity_mib == gb_to_mib(gpu.vram_gb) and gpu.index >= 0


@settings(FUZZ)
@given(values=settings_maps())
@example(values={"namespace": "a" * 65})
@example(values={"gpus": [{"id": "gpu0", "vram_gb": 1, "reserve_gb": 1}]})
@example(values={"gpus": [{"id": "gpu0", "vram_gb": 1}, {"id": "gpu0", "vram_gb": 2}]})
@example(values={"namespace": "gpuboss\n"})
@example(values={"gpus": [{"id": "gpu0", "vram_gb": 1e308}]})
@example(values={"gpus": [{"id": "gpu0", "vram_gb": 4, "reserve_gb": 1e308}]})
def test_config_files_load_or_raise_config_error(tmp_path: Path, values: dict[str, Any]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as err:
        event("ConfigError")
        assert str(path) in str(err), f"the error names the file: {err}"
        return
    event("accepted")
    check_accepted(config)


#: YAML scalars that the safe loader resolves to a value it then cannot build (a date, an int, a float).
YAML_TRAPS = [
    "2024-13-01", "2024-02-30", "0000-01-01", "2001-12-14t21:59:43.10-99:00", "1" * 5000, "-" + "9" * 4400,
    "!!int 0x", "!!int x", "!!float x", "!!binary ab=", "!!timestamp 2024-13-01", "1e999", ".nan", "0o8", "0x_",
    "!!python/name:os.system", "*x", "&a [*a]", "[" * 50, "{a: 1, a: 2}",
]  # fmt: skip


def yaml_documents() -> st.SearchStrategy[str]:
    """Settings files whose values are hand-picked traps or random text, at the top level or in a GPU."""
    scalar = st.sampled_from(YAML_TRAPS) | st.text(max_size=12).filter(lambda t: "\n" not in t)
    top = st.tuples(st.sampled_from([*FIELDS, "priorities", "x"]), scalar).map(lambda kv: f"{kv[0]}: {kv[1]}\n")
    gpu = st.tuples(st.sampled_from(GPU_FIELDS), scalar).map(lambda kv: f"gpus:\n- id: gpu0\n  {kv[0]}: {kv[1]}\n")
    return st.lists(top | gpu, min_size=1, max_size=3).map("".join)


@settings(FUZZ)
@given(text=st.text(max_size=200) | yaml_documents())
@example(text="gpus: [")
@example(text="- a\n- b")
@example(text="namespace: !!python/object/apply:os.system ['true']")
@example(text="a: &x [*x]")
@example(text="? [a]\n: b")
@example(text="namespace: 2024-13-01")
@example(text="default_ttl: " + "1" * 5000)
@example(text="gpus:\n- id: gpu0\n  vram_gb: !!int 0x")
def test_any_text_as_config_file_loads_or_raises_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError:
        event("ConfigError")
        return
    event("accepted")
    check_accepted(config)


@settings(FUZZ, max_examples=100)
@given(values=settings_maps())
def test_boss_settings_construct_or_raise_config_error(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``GPUBoss(url, **settings)`` and ``GPUBoss.from_config(file)``: a boss, or ConfigError; nothing is
    written to Redis either way (a boss writes on its first request, not when it is built)."""
    url = f"fakeredis://fuzz-{uuid.uuid4().hex[:8]}"
    client = raw_client(url)
    monkeypatch.delenv("GPUBOSS_CONFIG", raising=False)
    monkeypatch.setenv("GPUBOSS_REDIS_URL", url)  # never the embedded Redis
    kwargs = {k: v for k, v in values.items() if k not in ("redis_url", "config")}
    path = tmp_path / "boss.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    for build in (lambda: GPUBoss(url, **kwargs), lambda: GPUBoss.from_config(path)):
        try:
            boss = build()
        except ConfigError:
            event("ConfigError")
            continue
        event("accepted")
        check_accepted(boss.config)
        boss.close()
    assert client.keys("*") == []


def test_build_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="default_ttl"):
        build_config(default_ttl=math.nan)
    with pytest.raises(ConfigError, match=r"gpus\.0\.vram_gb"):
        build_config(gpus=[{"id": "gpu0", "vram_gb": -1}])


# ---------------------------------------------------------------- bugs fuzzing found (fixed), one regression test each


@pytest.mark.parametrize("name", ["vram_gb", "timeout", "ttl"])
def test_huge_int_argument_is_invalid_request(fake_boss: GPUBoss, name: str) -> None:
    kw: dict[str, Any] = {"vram_gb": 1, name: 10**400}
    with pytest.raises((InvalidRequest, InsufficientCapacity)):
        fake_boss.acquire(**kw)


def test_finite_but_enormous_vram_is_insufficient_capacity(fake_boss: GPUBoss) -> None:
    with pytest.raises(InsufficientCapacity):
        fake_boss.acquire(1e308)


@pytest.mark.parametrize("name", ["vram_gb", "timeout", "ttl", "priority", "device"])
def test_int_too_long_to_print_is_invalid_request(fake_boss: GPUBoss, name: str) -> None:
    """repr() refuses an int of 4300+ digits: the error shows its type instead of raising ValueError."""
    kw: dict[str, Any] = {"vram_gb": 1, name: 10**5000}
    with pytest.raises(InvalidRequest, match=f"invalid {name}=<int too large to show>"):
        fake_boss.acquire(**kw)


def test_request_beyond_the_largest_possible_gpu_never_fits(namespace: str) -> None:
    """A request above 1 PiB was clamped to exactly 1 PiB, so a 1 PiB GPU granted it."""
    boss = GPUBoss(f"fakeredis://{namespace}", namespace=namespace, gpus=[{"id": "gpu0", "vram_gb": 2**20}])
    try:
        with pytest.raises(InsufficientCapacity):
            boss.acquire(2**21, timeout=0)
        assert boss.acquire(2**20, timeout=0).vram_mib == 2**30
    finally:
        boss.close()


@pytest.mark.parametrize("device", ["cuda:²", "cuda:" + "1" * 5000], ids=["superscript-2", "5000-digits"])
def test_odd_cuda_digits_are_invalid_request(fake_boss: GPUBoss, device: str) -> None:
    with pytest.raises(InvalidRequest):
        fake_boss.acquire(1, device=device)


def test_cuda_index_with_many_leading_zeros_pins_that_gpu(fake_boss: GPUBoss) -> None:
    """``cuda:00`` named cuda:0 but ``cuda:`` with 11+ digits was refused whatever their value."""
    assert fake_boss.acquire(1, device="cuda:" + "0" * 30 + "1").gpu == "gpu1"


@pytest.mark.parametrize("device", ["cuda:²", "cuda:" + "1" * 5000], ids=["superscript-2", "5000-digits"])
def test_child_env_for_odd_cuda_digits_is_invalid_request(device: str) -> None:
    with pytest.raises(InvalidRequest):
        child_env_for_device(device, {})


def test_namespace_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(ConfigError):
        build_config(namespace="gpuboss\n")


@pytest.mark.parametrize("field", ["vram_gb", "reserve_gb"])
def test_enormous_gpu_size_is_config_error(field: str) -> None:
    gpu = {"id": "gpu0", "vram_gb": 4, field: 1e308}
    with pytest.raises(ConfigError):
        build_config(gpus=[gpu])


def test_config_file_that_is_not_utf8_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"namespace: \xff\xfe\n")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize(
    "text",
    ["namespace: 2024-13-01", "default_ttl: " + "1" * 5000, "gpus:\n- id: gpu0\n  vram_gb: !!int 0x"],
    ids=["impossible-date", "5000-digits", "empty-hex"],
)
def test_config_file_with_an_unbuildable_scalar_is_config_error(tmp_path: Path, text: str) -> None:
    """PyYAML resolves these to a date or an int, then raises ValueError building it."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)


def test_deeply_nested_config_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: " + "[" * 5000, encoding="utf-8")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("value", [None, 7, b"id", ["id"]])
def test_release_of_a_non_id_is_invalid_request(fake_boss: GPUBoss, value: object) -> None:
    with pytest.raises(InvalidRequest):
        fake_boss.release(value)  # type: ignore[arg-type]


def test_unknown_url_scheme_is_config_error(namespace: str) -> None:
    with pytest.raises(ConfigError):
        GPUBoss("http://localhost:6379", namespace=namespace, gpus=GPUS)

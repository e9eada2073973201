"""UUID -> this process's CUDA ordinal: CUDA_VISIBLE_DEVICES in each form, CUDA_DEVICE_ORDER, MIG, child_env."""

from __future__ import annotations

import pytest
from gpuboss import InvalidRequest
from gpuboss.devices import (
    FASTEST_FIRST,
    PCI_BUS_ID,
    child_env,
    cuda_order,
    cuda_ordinal,
    pci_key,
    visible_devices,
)
from gpuboss.nvml import PhysicalGpu, discover

from tests import fake_nvml as fk


@pytest.fixture(scope="module")
def mixed() -> tuple[PhysicalGpu, ...]:
    return discover(fk.mixed_host()).gpus


@pytest.fixture(scope="module")
def uniform() -> tuple[PhysicalGpu, ...]:
    return discover(fk.uniform_host()).gpus


@pytest.fixture(scope="module")
def mig() -> tuple[PhysicalGpu, ...]:
    return discover(fk.mig_host()).gpus


PCI = {"CUDA_DEVICE_ORDER": PCI_BUS_ID}


def test_pci_key_reads_every_bus_id_form() -> None:
    assert pci_key("00000000:41:00.0") == (0, 0x41, 0, 0)
    assert pci_key("0000:C1:00.1") == (0, 0xC1, 0, 1)
    assert pci_key("01:00.0") == (0, 1, 0, 0)
    assert pci_key("00000001:01:00.0") > pci_key("00000000:C1:00.0")  # domain first
    assert pci_key("garbage") > pci_key("0000FFFF:FF:1F.7")  # unreadable sorts last


# ---------------------------------------------------------------- order


def test_one_model_is_pci_bus_order_and_certain_without_device_order(uniform: tuple[PhysicalGpu, ...]) -> None:
    # NVML lists them out of bus order (81, 01, C1, 41); CUDA numbers them 01, 41, 81, C1.
    vis = visible_devices(uniform, env={})
    assert vis.uuids == (uniform[1].uuid, uniform[3].uuid, uniform[0].uuid, uniform[2].uuid)
    assert vis.order == FASTEST_FIRST and vis.certain and vis.warning is None


def test_mixed_models_with_pci_bus_id_are_certain(mixed: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mixed, env=PCI)
    assert vis.uuids == (fk.RTX3090, fk.T4, fk.RTX4090)
    assert vis.certain and vis.warning is None
    assert cuda_ordinal(fk.RTX4090, mixed, env=PCI).device == "cuda:2"


def test_mixed_models_fastest_first_is_a_guess_with_a_warning(mixed: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mixed, env={})
    assert vis.uuids == (fk.RTX4090, fk.RTX3090, fk.T4)  # newest compute capability first
    assert not vis.certain
    assert vis.warning is not None
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in vis.warning and "different models" in vis.warning
    o = cuda_ordinal(fk.RTX4090, mixed, env={"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert (o.ordinal, o.device, o.certain) == (0, "cuda:0", False)
    assert o.warning == vis.warning


def test_cuda_order_ties_keep_pci_order() -> None:
    gpus = [
        PhysicalGpu(0, "GPU-b", "NVIDIA L4", 23034, "00000000:82:00.0", (8, 9)),
        PhysicalGpu(1, "GPU-a", "NVIDIA L4", 23034, "00000000:02:00.0", (8, 9)),
        PhysicalGpu(2, "GPU-c", "NVIDIA L40S", 46068, "00000000:42:00.0", (8, 9)),
    ]
    order, certain = cuda_order(gpus, FASTEST_FIRST)
    assert [g.uuid for g in order] == ["GPU-c", "GPU-a", "GPU-b"]  # more memory first, then bus order
    assert not certain


def test_unknown_device_order_value_is_fastest_first(mixed: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mixed, env={"CUDA_DEVICE_ORDER": "pci_bus_id"})
    assert vis.order == FASTEST_FIRST and not vis.certain
    assert any("'pci_bus_id'" in n for n in vis.notes)


# ---------------------------------------------------------------- CUDA_VISIBLE_DEVICES: indices


def test_indices_select_and_reorder(mixed: tuple[PhysicalGpu, ...]) -> None:
    assert visible_devices(mixed, env={**PCI, "CUDA_VISIBLE_DEVICES": "0,2"}).uuids == (fk.RTX3090, fk.RTX4090)
    vis = visible_devices(mixed, env={**PCI, "CUDA_VISIBLE_DEVICES": "2,0"})
    assert vis.uuids == (fk.RTX4090, fk.RTX3090) and vis.certain
    o = cuda_ordinal(fk.RTX3090, mixed, env={**PCI, "CUDA_VISIBLE_DEVICES": "2,0"})
    assert o.device == "cuda:1" and o.certain


def test_indices_on_mixed_models_without_pci_order_are_uncertain(mixed: tuple[PhysicalGpu, ...]) -> None:
    # Index 0 is CUDA's fastest-first device 0, which gpuboss can only guess, even for a single index.
    vis = visible_devices(mixed, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert vis.uuids == (fk.RTX4090,) and not vis.certain and vis.warning is not None


def test_indices_on_one_model_are_certain_in_any_order(uniform: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(uniform, env={"CUDA_VISIBLE_DEVICES": "3,1"})
    assert vis.uuids == (uniform[2].uuid, uniform[3].uuid) and vis.certain


@pytest.mark.parametrize(
    ("value", "expected", "bad_entry"),
    [
        ("0,2,-1,1", [0, 2], 2),  # the CUDA documentation's own example
        ("0,7,1", [0], 1),  # out of range
        ("0,abc,1", [0], 1),  # neither index nor UUID
        ("1,GPU-00003090", [1], 1),  # a UUID in a list of indices
        ("-1", [], 0),
        ("3", [], 0),
    ],
)
def test_an_invalid_entry_hides_itself_and_the_rest(
    mixed: tuple[PhysicalGpu, ...], value: str, expected: list[int], bad_entry: int
) -> None:
    pci_order = [fk.RTX3090, fk.T4, fk.RTX4090]
    vis = visible_devices(mixed, env={**PCI, "CUDA_VISIBLE_DEVICES": value})
    assert list(vis.uuids) == [pci_order[i] for i in expected]
    assert any(f"entry {bad_entry} " in n for n in vis.notes)


def test_empty_value_hides_every_gpu(mixed: tuple[PhysicalGpu, ...]) -> None:
    for value in ("", "  "):
        vis = visible_devices(mixed, env={"CUDA_VISIBLE_DEVICES": value})
        assert vis.uuids == () and "empty" in vis.notes[0]
    o = cuda_ordinal(fk.T4, mixed, env={"CUDA_VISIBLE_DEVICES": ""})
    assert o.ordinal is None and o.device is None
    assert o.reason is not None and "CUDA_VISIBLE_DEVICES=''" in o.reason


def test_a_device_listed_twice_hides_every_gpu(mixed: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mixed, env={**PCI, "CUDA_VISIBLE_DEVICES": "1,0,1"})
    assert vis.uuids == () and "twice" in vis.notes[-1]


def test_spaces_and_trailing_text_after_an_index(mixed: tuple[PhysicalGpu, ...]) -> None:
    # CUDA reads an index like strtol: surrounding spaces and trailing characters do not matter.
    vis = visible_devices(mixed, env={**PCI, "CUDA_VISIBLE_DEVICES": " 2 , 1x"})
    assert vis.uuids == (fk.RTX4090, fk.T4)


# ---------------------------------------------------------------- CUDA_VISIBLE_DEVICES: UUIDs


def test_uuids_fix_the_order_even_on_mixed_models(mixed: tuple[PhysicalGpu, ...]) -> None:
    env = {"CUDA_VISIBLE_DEVICES": f"{fk.T4},{fk.RTX3090}"}  # no CUDA_DEVICE_ORDER
    vis = visible_devices(mixed, env=env)
    assert vis.uuids == (fk.T4, fk.RTX3090)
    assert vis.certain and vis.warning is None
    assert cuda_ordinal(fk.RTX3090, mixed, env=env).device == "cuda:1"
    hidden = cuda_ordinal(fk.RTX4090, mixed, env=env)
    assert hidden.ordinal is None and hidden.reason is not None and "does not make it visible" in hidden.reason


def test_uuid_prefixes_as_cuda_allows(mixed: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mixed, env={"CUDA_VISIBLE_DEVICES": "GPU-00004090,GPU-0000700"})
    assert vis.uuids == (fk.RTX4090, fk.T4)


def test_an_ambiguous_or_unknown_uuid_truncates(mixed: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mixed, env={"CUDA_VISIBLE_DEVICES": f"{fk.T4},GPU-0000,{fk.RTX3090}"})
    assert vis.uuids == (fk.T4,)
    assert "several devices" in vis.notes[0] and "entry 1" in vis.notes[0]
    vis = visible_devices(mixed, env={"CUDA_VISIBLE_DEVICES": f"{fk.T4},GPU-deadbeef,{fk.RTX3090}"})
    assert vis.uuids == (fk.T4,) and "no device of this host" in vis.notes[0]


def test_an_index_in_a_list_of_uuids_truncates(mixed: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mixed, env={"CUDA_VISIBLE_DEVICES": f"{fk.RTX4090},0"})
    assert vis.uuids == (fk.RTX4090,) and "an index in a list of UUIDs" in vis.notes[0]


# ---------------------------------------------------------------- MIG


def test_nothing_set_on_a_mig_host_sees_only_the_first_mig_instance(mig: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mig, env={})
    assert vis.uuids == (fk.MIG_A,)
    assert vis.certain  # a single device: the order does not matter
    assert any(fk.RTX4090 in n and "one MIG instance" in n for n in vis.notes)
    assert cuda_ordinal(fk.MIG_A, mig, env={}).device == "cuda:0"
    assert cuda_ordinal(fk.RTX4090, mig, env={}).ordinal is None


def test_a_mig_uuid_is_the_only_device(mig: tuple[PhysicalGpu, ...]) -> None:
    env = {"CUDA_VISIBLE_DEVICES": fk.MIG_B}
    assert visible_devices(mig, env=env).uuids == (fk.MIG_B,)
    assert cuda_ordinal(fk.MIG_B, mig, env=env).device == "cuda:0"


def test_only_the_first_of_several_mig_uuids(mig: tuple[PhysicalGpu, ...]) -> None:
    vis = visible_devices(mig, env={"CUDA_VISIBLE_DEVICES": f"{fk.RTX4090},{fk.MIG_B},{fk.MIG_A}"})
    assert vis.uuids == (fk.MIG_B,)
    assert fk.MIG_A in vis.notes[0] and fk.RTX4090 in vis.notes[0]


def test_a_listed_mig_enabled_gpu_stands_for_its_first_instance(mig: tuple[PhysicalGpu, ...]) -> None:
    assert visible_devices(mig, env={**PCI, "CUDA_VISIBLE_DEVICES": "1"}).uuids == (fk.MIG_A,)
    assert visible_devices(mig, env={"CUDA_VISIBLE_DEVICES": "GPU-0000a100"}).uuids == (fk.MIG_A,)
    assert visible_devices(mig, env={**PCI, "CUDA_VISIBLE_DEVICES": "0"}).uuids == (fk.RTX4090,)


def test_mig_uuid_prefix_and_legacy_form(mig: tuple[PhysicalGpu, ...]) -> None:
    assert visible_devices(mig, env={"CUDA_VISIBLE_DEVICES": "MIG-000000b2"}).uuids == (fk.MIG_B,)
    legacy = f"MIG-{fk.A100}/5/0"
    assert visible_devices(mig, env={"CUDA_VISIBLE_DEVICES": legacy}).uuids == (fk.MIG_B,)
    vis = visible_devices(mig, env={"CUDA_VISIBLE_DEVICES": f"MIG-{fk.A100}/9/0"})
    assert vis.uuids == () and "no MIG instance with GPU instance 9" in vis.notes[0]


def test_mig_enabled_gpu_without_instances_is_unusable() -> None:
    nvml = fk.mig_host()
    nvml.gpus[1].migs.clear()
    gpus = discover(nvml).gpus
    vis = visible_devices(gpus, env={})
    assert vis.uuids == (fk.RTX4090,)
    assert any("no MIG instance" in n for n in vis.notes)


def test_ordinal_of_a_mig_enabled_gpu_or_a_stranger(mig: tuple[PhysicalGpu, ...]) -> None:
    parent = cuda_ordinal(fk.A100, mig, env={})
    assert parent.ordinal is None and parent.reason is not None and "MIG enabled" in parent.reason
    stranger = cuda_ordinal("GPU-ffffffff-0000-0000-0000-000000000000", mig, env={})
    assert stranger.ordinal is None and stranger.reason is not None and "not a GPU of this host" in stranger.reason


def test_reads_this_process_environment_by_default(
    mixed: tuple[PhysicalGpu, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_devices(mixed).uuids == (fk.T4,)
    assert cuda_ordinal(fk.T4, mixed).device == "cuda:0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda_ordinal(fk.T4, mixed).device == "cuda:1"


# ---------------------------------------------------------------- child_env


def test_child_env_names_gpus_by_uuid(mixed: tuple[PhysicalGpu, ...]) -> None:
    assert child_env(fk.T4) == {"CUDA_VISIBLE_DEVICES": fk.T4}
    env = child_env([fk.RTX4090, fk.RTX3090])
    assert env == {"CUDA_VISIBLE_DEVICES": f"{fk.RTX4090},{fk.RTX3090}"}
    # What the child then sees: exactly those, in that order, whatever its CUDA_DEVICE_ORDER.
    vis = visible_devices(mixed, env=env)
    assert vis.uuids == (fk.RTX4090, fk.RTX3090) and vis.certain
    assert child_env((fk.MIG_A,)) == {"CUDA_VISIBLE_DEVICES": fk.MIG_A}


@pytest.mark.parametrize(
    ("uuids", "words"),
    [
        ([], "at least one"),
        (["0"], "GPU UUID"),
        (["GPU-a,GPU-b"], "GPU UUID"),
        ([" GPU-a"], "GPU UUID"),
        ([fk.T4, fk.T4], "must not repeat"),
        ([fk.MIG_A, fk.MIG_B], "MIG instance must be alone"),
        ([fk.RTX4090, fk.MIG_A], "MIG instance must be alone"),
    ],
)
def test_child_env_rejects_what_cuda_would_misread(uuids: list[str], words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        child_env(uuids)
    assert info.value.field == "uuids" and words in str(info.value)

"""The NVML wrapper against a fake NVML: discovery (MIG included), sampling, and NVML being absent."""

from __future__ import annotations

import sys
import time

import pynvml
import pytest
from gpuboss import GPUBossError
from gpuboss.nvml import (
    Discovery,
    MigInstance,
    NvmlSession,
    NvmlStatus,
    NvmlUnavailable,
    PhysicalGpu,
    discover,
    sample,
)

from tests import fake_nvml as fk


def test_discover_reads_every_gpu_in_nvml_order() -> None:
    nvml = fk.mixed_host()
    found = discover(nvml)
    assert found.available and found.status is NvmlStatus.OK and found.reason == ""
    assert found.driver_version == "550.54.15"
    assert [g.uuid for g in found.gpus] == [fk.RTX3090, fk.T4, fk.RTX4090]
    assert [g.index for g in found.gpus] == [0, 1, 2]
    t4 = found.gpus[1]
    assert t4 == PhysicalGpu(
        index=1,
        uuid=fk.T4,
        name="Tesla T4",
        memory_total_mib=15360,
        pci_bus_id="00000000:02:00.0",  # bytes in the ctypes structure, text here
        compute_capability=(7, 5),
        mig_enabled=False,
        mig=(),
    )
    assert found.problems == ()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_discover_lists_mig_instances_as_gpus_of_their_own() -> None:
    found = discover(fk.mig_host())
    rtx, a100 = found.gpus
    assert not rtx.mig_enabled and rtx.mig == ()
    assert a100.mig_enabled
    # Slot 1 is empty (NOT_FOUND) and is skipped; slots 0 and 2 hold instances.
    assert a100.mig == (
        MigInstance(
            uuid=fk.MIG_A,
            name="NVIDIA A100-SXM4-80GB MIG 3g.40gb",
            mig_index=0,
            memory_total_mib=40192,
            parent_uuid=fk.A100,
            gpu_instance_id=1,
            compute_instance_id=0,
        ),
        MigInstance(
            uuid=fk.MIG_B,
            name="NVIDIA A100-SXM4-80GB MIG 2g.20gb",
            mig_index=2,
            memory_total_mib=19968,
            parent_uuid=fk.A100,
            gpu_instance_id=5,
            compute_instance_id=0,
        ),
    )
    # What can be leased: the 4090 and the two instances, never the A100 itself.
    assert [u.uuid for u in found.units()] == [fk.RTX4090, fk.MIG_A, fk.MIG_B]


def test_mig_enabled_without_instances_has_no_units() -> None:
    nvml = fk.mig_host()
    nvml.gpus[1].migs.clear()
    found = discover(nvml)
    assert found.gpus[1].mig_enabled and found.gpus[1].mig == ()
    assert [u.uuid for u in found.units()] == [fk.RTX4090]


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [
        (fk.LIBRARY_NOT_FOUND, NvmlStatus.LIBRARY_NOT_FOUND, "libnvidia-ml.so.1"),
        (fk.DRIVER_NOT_LOADED, NvmlStatus.DRIVER_NOT_LOADED, "driver is not loaded"),
        (fk.NO_PERMISSION, NvmlStatus.NO_PERMISSION, "refused"),
        (fk.LIB_RM_VERSION_MISMATCH, NvmlStatus.VERSION_MISMATCH, "differ in version"),
        (fk.UNKNOWN, NvmlStatus.ERROR, "Unknown Error"),
    ],
)
def test_nvml_absent_is_a_result_not_a_crash(code: int, status: NvmlStatus, words: str) -> None:
    nvml = fk.FakeNvml([], init_error=code)
    found = discover(nvml)
    assert not found.available
    assert found.status is status
    assert found.gpus == ()
    assert words in found.reason
    sampled = sample(nvml)
    assert not sampled.available and sampled.status is status and sampled.samples == ()
    assert words in sampled.reason
    with pytest.raises(NvmlUnavailable) as info:
        NvmlSession.open(nvml)
    assert info.value.status is status
    assert isinstance(info.value, GPUBossError)


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    found = discover()
    assert found.status is NvmlStatus.NOT_INSTALLED
    assert "nvidia-ml-py" in found.reason
    assert sample().status is NvmlStatus.NOT_INSTALLED


def test_real_pynvml_on_this_machine_never_crashes() -> None:
    found = discover()  # the real pynvml: a GPU host reads its cards, any other machine gets a reason
    assert isinstance(found, Discovery)
    if found.available:
        assert all(g.uuid.startswith("GPU-") and g.memory_total_mib > 0 for g in found.gpus)
    else:
        assert found.status is not NvmlStatus.OK and found.reason.startswith("NVML unavailable: ")


def test_a_gpu_lost_mid_read_is_left_out_and_named() -> None:
    nvml = fk.mixed_host()
    nvml.gpus[1].lost = True
    found = discover(nvml)
    assert [g.uuid for g in found.gpus] == [fk.RTX3090, fk.RTX4090]
    assert len(found.problems) == 1 and "GPU 1" in found.problems[0] and "GPU is lost" in found.problems[0]
    sampled = sample(nvml)
    assert [s.uuid for s in sampled.samples] == [fk.RTX3090, fk.RTX4090]
    assert "GPU 1" in sampled.problems[0]


def test_a_gpu_that_cannot_be_opened_is_left_out() -> None:
    nvml = fk.FakeNvml(fk.mixed_host().gpus, unopenable=frozenset({0}))
    found = discover(nvml)
    assert [g.index for g in found.gpus] == [1, 2]
    assert "GPU 0" in found.problems[0] and "cannot open" in found.problems[0]


def test_sample_reads_memory_utilisation_temperature_and_processes() -> None:
    before = time.time()
    sampled = sample(fk.mig_host())
    assert sampled.available
    assert before <= sampled.sampled_at <= time.time()
    by = sampled.by_uuid()
    assert list(by) == [fk.RTX4090, fk.MIG_A, fk.MIG_B]
    rtx = by[fk.RTX4090]
    # 10200 MiB and one byte used: used rounds up, free down, so the GPU never looks emptier than it is.
    assert (rtx.total_mib, rtx.used_mib, rtx.free_mib) == (24564, 10201, 24564 - 10201)
    assert (rtx.gpu_util_pct, rtx.memory_util_pct, rtx.temperature_c) == (87, 45, 71)
    assert [(p.pid, p.used_mib) for p in rtx.processes] == [(fk.GPU_PID, 9000), (fk.STRAY_PID, 1200)]
    assert rtx.processes[0].gpu_instance_id is None  # NVML's "no instance" marker is not an id
    assert rtx.parent_uuid is None


def test_sample_of_mig_instances() -> None:
    by = sample(fk.mig_host()).by_uuid()
    mig = by[fk.MIG_A]
    assert mig.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert (mig.total_mib, mig.used_mib, mig.free_mib) == (40192, 30500, 40192 - 30500)
    assert mig.gpu_util_pct is None and mig.memory_util_pct is None  # unsupported on MIG instances
    assert mig.temperature_c == 55  # the card's
    assert mig.parent_uuid == fk.A100
    assert [(p.pid, p.used_mib, p.gpu_instance_id) for p in mig.processes] == [(fk.MIG_PID, 30000, 1)]
    assert by[fk.MIG_B].processes == ()


def test_mig_processes_listed_only_on_the_parent_are_attributed_by_gpu_instance() -> None:
    by = sample(fk.mig_host(mig_processes_on_parent=True)).by_uuid()
    assert [p.pid for p in by[fk.MIG_A].processes] == [fk.MIG_PID]
    assert by[fk.MIG_B].processes == ()


def test_unsupported_readings_are_none() -> None:
    nvml = fk.mixed_host()
    nvml.gpus[0].utilization = None
    nvml.gpus[0].temperature = None
    s = sample(nvml).samples[0]
    assert (s.gpu_util_pct, s.memory_util_pct, s.temperature_c) == (None, None, None)
    assert s.total_mib == 24576


def test_process_memory_nvml_cannot_measure_is_none() -> None:
    nvml = fk.mixed_host()
    nvml.gpus[2].processes = [fk.FakeProcess(99, None)]
    s = sample(nvml).by_uuid()[fk.RTX4090]
    assert [(p.pid, p.used_mib) for p in s.processes] == [(99, None)]


def test_a_session_reads_many_times_with_one_initialisation() -> None:
    nvml = fk.mixed_host()
    with NvmlSession.open(nvml) as session:
        first = session.sample().by_uuid()[fk.T4]
        nvml.gpus[1].used_mib = 4000
        second = session.sample().by_uuid()[fk.T4]
        assert (first.used_mib, second.used_mib) == (0, 4000)
        assert nvml.inits == 1 and nvml.shutdowns == 0
    assert nvml.shutdowns == 1
    session.close()  # closing twice is harmless
    assert nvml.shutdowns == 1


def test_errors_use_pynvml_classes() -> None:
    # The fake raises what the real bindings raise; the wrapper reads the code, not the class.
    err = fk.error(fk.NOT_SUPPORTED)
    assert isinstance(err, pynvml.NVMLError_NotSupported)


# ---------------------------------------------------------------- memory the driver reserves


def test_the_v2_memory_call_gives_the_drivers_reservation_apart_from_used() -> None:
    nvml = fk.h200_host()
    (gpu,) = discover(nvml).gpus
    assert (gpu.memory_total_mib, gpu.memory_reserved_mib, gpu.memory_usable_mib) == (143771, 616, 143771 - 616)
    nvml.gpus[0].used_mib = 4096
    (s,) = sample(nvml).samples
    # As nvidia-smi shows it: used is what processes allocated; total = reserved + used + free.
    assert (s.total_mib, s.reserved_mib, s.used_mib, s.free_mib) == (143771, 616, 4096, 143771 - 616 - 4096)
    assert set(nvml.memory_calls) == {2}


def test_a_driver_without_the_v2_call_is_read_with_v1_which_counts_the_reservation_as_used() -> None:
    nvml = fk.h200_host(memory_v2=False)
    with NvmlSession.open(nvml) as session:
        (gpu,) = session.discover().gpus
        (s,) = session.sample().samples
    assert (gpu.memory_total_mib, gpu.memory_reserved_mib, gpu.memory_usable_mib) == (143771, 0, 143771)
    assert (s.reserved_mib, s.used_mib, s.free_mib) == (0, 616, 143771 - 616), "free is the same either way"
    assert nvml.memory_calls == [1, 1], "v2 is asked once per session, then v1 only"


def test_a_mig_instance_without_the_v2_call_is_read_with_v1_and_its_card_with_v2() -> None:
    nvml = fk.mig_host()
    a100 = nvml.gpus[1]
    a100.reserved_mib = 512
    a100.migs[0].memory_v2 = False
    a100.migs[2].reserved_mib = 64
    found = {u.uuid: u for u in discover(nvml).units()}
    assert (found[fk.MIG_A].memory_reserved_mib, found[fk.MIG_B].memory_reserved_mib) == (0, 64)
    (card,) = [g for g in discover(nvml).gpus if g.uuid == fk.A100]
    assert card.memory_reserved_mib == 512, "the card itself is still read with v2"
    by = sample(nvml).by_uuid()
    assert (by[fk.MIG_A].used_mib, by[fk.MIG_B].reserved_mib, by[fk.MIG_B].used_mib) == (30500, 64, 0)


def test_a_sampling_of_some_gpus_reads_only_those() -> None:
    nvml = fk.uniform_host()
    with NvmlSession.open(nvml) as session:
        wanted = fk.uuid_of(0x1002)
        (only,) = session.sample({wanted}).samples
        assert only.uuid == wanted and nvml.memory_calls == [2], "one memory read, not four"
        assert len(session.sample().samples) == 4
    mig = fk.mig_host()
    with NvmlSession.open(mig) as session:
        (instance,) = session.sample({fk.MIG_B}).samples
    assert (instance.uuid, instance.parent_uuid) == (fk.MIG_B, fk.A100)

"""GPU profiles: the shipped registry, the names NVML reports, MIG names, user extensions, unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpuboss import ConfigError, GPUBossError, InvalidRequest
from gpuboss.nvml import discover
from gpuboss.profiles import (
    GpuProfile,
    UnknownGpuProfile,
    default_profiles,
    get_gpu_profile,
    load_profiles,
)

from tests import fake_nvml as fk


@pytest.mark.parametrize(
    ("name", "profile", "vram_gb", "capability"),
    [
        ("RTX 4090", "RTX 4090", 24, "8.9"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 24, "8.9"),
        ("GeForce RTX 2080 Ti", "RTX 2080 Ti", 11, "7.5"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090", 24, "8.6"),
        ("NVIDIA GeForce RTX 4070 Ti SUPER", "RTX 4070 Ti Super", 16, "8.9"),
        ("NVIDIA GeForce RTX 5090", "RTX 5090", 32, "12.0"),
        ("Tesla T4", "T4", 16, "7.5"),
        ("Tesla V100-SXM2-16GB", "V100 16GB", 16, "7.0"),
        ("Tesla V100-PCIE-32GB", "V100 32GB", 32, "7.0"),
        ("NVIDIA A10", "A10", 24, "8.6"),
        ("NVIDIA A10G", "A10G", 24, "8.6"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 40, "8.0"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB", 80, "8.0"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB", 80, "8.0"),
        ("A100 80GB", "A100 80GB", 80, "8.0"),
        ("a100 80 gb", "A100 80GB", 80, "8.0"),
        ("NVIDIA L4", "L4", 24, "8.9"),
        ("NVIDIA L40S", "L40S", 48, "8.9"),
        ("NVIDIA H100 PCIe", "H100 PCIe", 80, "9.0"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 80, "9.0"),
        ("NVIDIA H100 NVL", "H100 NVL", 94, "9.0"),
        ("NVIDIA H200", "H200", 141, "9.0"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada", 48, "8.9"),
        ("Quadro RTX 8000", "RTX 8000", 48, "7.5"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTX PRO 6000 Blackwell", 96, "12.0"),
    ],
)
def test_names_nvml_reports_and_short_names(name: str, profile: str, vram_gb: float, capability: str) -> None:
    p = get_gpu_profile(name)
    assert (p.name, p.vram_gb, p.compute_capability) == (profile, vram_gb, capability)


def test_form_factor_words_do_not_hide_a_model() -> None:
    # No alias spells these; the extra words only say the form factor or the memory the profile has.
    assert get_gpu_profile("NVIDIA A100-SXM4-PCIE-80GB").name == "A100 80GB"
    assert get_gpu_profile("NVIDIA L40S PCIe 48GB").name == "L40S"
    with pytest.raises(UnknownGpuProfile):
        get_gpu_profile("NVIDIA L40S 24GB")  # a size the L40S does not have is not a form factor


def test_precision_flags_follow_the_architecture() -> None:
    t4, a100, l4, h100, b = (get_gpu_profile(n) for n in ("T4", "A100 80GB", "L4", "H100 SXM", "RTX 5090"))
    assert (t4.fp16, t4.bf16, t4.fp8, t4.int8, t4.int4) == (True, False, False, True, True)
    assert (a100.bf16, a100.fp8, a100.int4) == (True, False, True)
    assert (l4.fp8, l4.int4) == (True, True)
    assert (h100.fp8, h100.int4, h100.fp4) == (True, False, False)
    assert (b.fp8, b.fp4) == (True, True)
    p100 = get_gpu_profile("Tesla P100-PCIE-16GB")
    assert (p100.fp16, p100.int8) == (True, False)  # the profile overrides its architecture


def test_supports_and_capability() -> None:
    l40s = get_gpu_profile("L40S")
    assert l40s.capability == (8, 9) and l40s.vram_mib == 48 * 1024
    assert l40s.supports("fp8") and l40s.supports("FP32") and l40s.supports("tf32")
    v100 = get_gpu_profile("V100 32GB")
    assert not v100.supports("bf16") and not v100.supports("tf32")
    with pytest.raises(InvalidRequest) as info:
        v100.supports("fp64")
    assert info.value.field == "precision"


def test_variants_nvml_names_alike_are_told_apart_by_memory() -> None:
    assert get_gpu_profile("NVIDIA GeForce RTX 4060 Ti").name == "RTX 4060 Ti 8GB"  # the first listed
    assert get_gpu_profile("NVIDIA GeForce RTX 4060 Ti", memory_mib=16380).name == "RTX 4060 Ti 16GB"
    assert get_gpu_profile("NVIDIA GeForce RTX 4060 Ti", memory_mib=8188).name == "RTX 4060 Ti 8GB"
    assert get_gpu_profile("NVIDIA GeForce RTX 3080", memory_mib=12288).name == "RTX 3080 12GB"
    assert get_gpu_profile("NVIDIA GeForce RTX 3080", memory_mib=10240).name == "RTX 3080"


def test_a_mig_instance_gets_its_card_profile_with_its_memory() -> None:
    p = get_gpu_profile("NVIDIA A100-SXM4-80GB MIG 3g.40gb")
    assert p.mig_profile == "3g.40gb"
    assert p.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert p.vram_gb == 40 and p.compute_capability == "8.0" and p.bf16
    assert p.max_batch_hint == 32  # half the card, half the hint
    exact = get_gpu_profile("NVIDIA H100 80GB HBM3 MIG 1g.10gb", memory_mib=9856)
    assert exact.vram_gb == 9856 / 1024 and exact.mig_profile == "1g.10gb" and exact.max_batch_hint >= 1


def test_every_gpu_the_fake_nvml_reports_has_a_profile() -> None:
    for host in (fk.mixed_host(), fk.mig_host()):
        for unit in discover(host).units():
            p = get_gpu_profile(unit.name, memory_mib=unit.memory_total_mib)
            # NVML reports a little less than the memory sold (ECC and firmware keep some: T4 15360 MiB of 16 GB).
            assert 0 <= p.vram_mib - unit.memory_total_mib <= 0.07 * p.vram_mib


def test_the_registry_covers_the_cards_the_issue_names() -> None:
    wanted = [
        "RTX 2080 Ti",
        "RTX 3060",
        "RTX 3090",
        "RTX 4080",
        "RTX 4090",
        "RTX 5080",
        "RTX 5090",
        "T4",
        "V100 16GB",
        "V100 32GB",
        "A10",
        "A10G",
        "A100 40GB",
        "A100 80GB",
        "L4",
        "L40S",
        "H100 PCIe",
        "H100 SXM",
        "H200",
    ]
    names = default_profiles().names()
    assert [w for w in wanted if w not in names] == []


def test_every_shipped_name_and_alias_finds_its_profile() -> None:
    reg = default_profiles()
    for p in reg.profiles:
        assert reg.get(p.name) is p
        for alias in p.aliases:
            found = reg.get(alias, memory_mib=p.vram_mib)
            assert found.vram_gb == p.vram_gb, (alias, found.name, p.name)


@pytest.mark.parametrize(
    ("name", "near"),
    [
        ("A100", ["A100 40GB", "A100 80GB"]),
        ("H100", ["H100 PCIe", "H100 SXM", "H100 NVL"]),
        ("RTX 4095", ["RTX 4090"]),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", ["RTX 4090"]),
    ],
)
def test_unknown_or_ambiguous_names_list_near_matches(name: str, near: list[str]) -> None:
    with pytest.raises(UnknownGpuProfile) as info:
        get_gpu_profile(name)
    err = info.value
    assert isinstance(err, InvalidRequest) and isinstance(err, GPUBossError)
    assert err.field == "gpu" and err.value == name
    assert set(near) <= set(err.suggestions)
    assert f"did you mean {near[0]!r}" in str(err) or all(repr(n) in str(err) for n in near)


def test_no_near_match_says_so() -> None:
    with pytest.raises(UnknownGpuProfile) as info:
        get_gpu_profile("Voodoo 2")
    assert info.value.suggestions == [] and "no near match" in str(info.value)
    with pytest.raises(UnknownGpuProfile):
        get_gpu_profile("   ")


def test_users_extend_and_override_from_their_own_yaml(tmp_path: Path) -> None:
    extra = tmp_path / "mine.yaml"
    extra.write_text(
        """
architectures:
  future: {fp16: true, bf16: true, fp8: true, int8: true, int4: true, fp4: true}
profiles:
  - {name: Lab Card 9000, aliases: [ACME LabCard-9000], architecture: future,
     compute_capability: "13.0", vram_gb: 512, max_batch_hint: 256}
  - {name: RTX 4090, architecture: ada, compute_capability: "8.9", vram_gb: 24, max_batch_hint: 99}
""",
        encoding="utf-8",
    )
    reg = load_profiles(extra)
    lab = get_gpu_profile("NVIDIA ACME LabCard-9000", registry=reg)
    assert (lab.name, lab.vram_gb, lab.fp4, lab.capability) == ("Lab Card 9000", 512, True, (13, 0))
    assert get_gpu_profile("NVIDIA GeForce RTX 4090", registry=reg).max_batch_hint == 99
    assert len(reg) == len(default_profiles()) + 1
    assert get_gpu_profile("RTX 4090").max_batch_hint == 16  # the shipped registry is untouched


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("profiles: [", "malformed YAML"),
        ("- just a list", "top level must be a mapping"),
        ("profiles: {a: 1}", "profiles must be a list"),
        ("gpus: []", "unknown top-level keys"),
        (
            "profiles: [{name: X, architecture: warp, compute_capability: '1.0', vram_gb: 1, max_batch_hint: 1}]",
            "unknown 'warp'",
        ),
        ("profiles: [{name: X, compute_capability: 'eight', vram_gb: 1, max_batch_hint: 1}]", "compute_capability"),
        ("profiles: [{name: X, compute_capability: '8.0', vram_gb: -1, max_batch_hint: 1}]", "vram_gb"),
        ("profiles: [{name: X, compute_capability: '8.0', vram_gb: 1, max_batch_hint: 1, colour: red}]", "colour"),
        ("architectures: {x: {fp99: true}}", "architectures.x"),
    ],
)
def test_a_bad_user_file_is_a_config_error_naming_file_and_field(tmp_path: Path, text: str, words: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_profiles(bad)
    assert str(bad) in str(info.value) and words in str(info.value)


def test_a_missing_user_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_profiles(tmp_path / "nope.yaml")


def test_profiles_are_frozen() -> None:
    p = get_gpu_profile("T4")
    assert isinstance(p, GpuProfile)
    with pytest.raises(ValueError):
        p.vram_gb = 99  # type: ignore[misc]

"""The model registry: lookups, the best quantization that fits now, preferences, user files, unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpuboss import ConfigError, InvalidRequest
from gpuboss.config import gb_to_mib
from gpuboss.models import (
    QUALITY_ORDER,
    ModelRegistry,
    UnknownModel,
    default_models,
    load_models,
    quality_rank,
    quant_family,
    resolve_model,
)


def sizes(name: str) -> dict[str, int]:
    return {v.quantization: v.vram_mb for v in default_models().get(name).variants}


def test_the_shipped_registry_has_the_issue_examples() -> None:
    reg = default_models()
    gemma = reg.get("gemma3:12b")
    assert gemma.provider == "ollama" and gemma.kind == "llm" and gemma.context_window == 131072
    assert [v.quantization for v in gemma.variants] == ["q4_K_M", "q8_0", "fp16"]
    s = sizes("gemma3:12b")
    assert s["q4_K_M"] < s["q8_0"] < s["fp16"]
    assert reg.get("llama3.1:8b").kind == "llm"
    assert reg.get("mistral").model == "mistral:7b"  # an alias
    assert reg.get("nomic-embed-text").kind == "embedding"
    assert reg.get("SDXL").kind == "image" and reg.get("sdxl").context_window is None


def test_best_quality_first_when_free_vram_is_not_given() -> None:
    choice = resolve_model("gemma3:12b")
    assert choice.quantization == "fp16" and choice.fits is None and choice.gpu is None
    assert "not checked" in choice.reason
    assert [q for q, _, _ in choice.considered] == ["fp16", "q8_0", "q4_K_M"]


def test_the_best_that_fits_now_and_where() -> None:
    s = sizes("gemma3:12b")
    free = {"GPU-big": s["q8_0"] + 5000, "GPU-snug": s["q8_0"] + 100, "GPU-small": s["q4_K_M"]}
    choice = resolve_model("gemma3:12b", free_mib_by_gpu=free)
    assert choice.quantization == "q8_0" and choice.fits is True
    assert choice.gpu == "GPU-snug"  # best fit: the least left over, as the scripts place
    assert choice.vram_mib == s["q8_0"]
    assert "q8_0" in choice.reason and "GPU-snug" in choice.reason and "fp16" in choice.reason
    assert choice.considered == (("fp16", s["fp16"], False), ("q8_0", s["q8_0"], True), ("q4_K_M", s["q4_K_M"], True))


def test_fp16_when_it_fits() -> None:
    choice = resolve_model("llama3.1:8b", free_mib_by_gpu={"GPU-a": 80 * 1024})
    assert (choice.quantization, choice.fits, choice.gpu) == ("fp16", True, "GPU-a")
    assert "first preference" in choice.reason


def test_nothing_fits_now_gives_the_smallest_to_wait_for() -> None:
    s = sizes("gemma3:12b")
    choice = resolve_model("gemma3:12b", free_mib_by_gpu={"GPU-a": s["q4_K_M"] - 1, "GPU-b": 100})
    assert choice.quantization == "q4_K_M" and choice.fits is False and choice.gpu is None
    assert f"the most free is {s['q4_K_M'] - 1} MiB on GPU-a" in choice.reason
    assert all(fits is False for _, _, fits in choice.considered)
    empty = resolve_model("gemma3:12b", free_mib_by_gpu={})
    assert empty.fits is False and "no GPU was given" in empty.reason


def test_an_explicit_preference_order_wins_over_quality() -> None:
    s = sizes("gemma3:12b")
    free = {"GPU-a": 80 * 1024}
    choice = resolve_model("gemma3:12b", ["q4_K_M", "fp16"], free)
    assert choice.quantization == "q4_K_M"  # everything fits, the caller prefers q4
    assert [q for q, _, _ in choice.considered] == ["q4_K_M", "fp16"]
    # Families stand for the labels: "q8" finds q8_0, "f16" finds fp16.
    choice = resolve_model("gemma3:12b", ["f16", "q8"], {"GPU-a": s["q8_0"]})
    assert choice.quantization == "q8_0" and choice.fits


def test_a_quantization_the_model_lacks_is_invalid() -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_model("gemma3:12b", ["q3_K_S"])
    assert info.value.field == "quantizations" and "q4_K_M, q8_0, fp16" in str(info.value)
    with pytest.raises(InvalidRequest):
        resolve_model("gemma3:12b", [])
    with pytest.raises(InvalidRequest):
        resolve_model("gemma3:12b", "fp16")  # a string is not a list of labels


@pytest.mark.parametrize(
    ("name", "near"),
    [("gemma3:13b", "gemma3:12b"), ("llama3:8b", "llama3.1:8b"), ("nomic-embed", "nomic-embed-text")],
)
def test_unknown_models_list_near_matches(name: str, near: str) -> None:
    with pytest.raises(UnknownModel) as info:
        resolve_model(name)
    err = info.value
    assert isinstance(err, InvalidRequest) and err.field == "model" and err.value == name
    assert near in err.suggestions and repr(near) in str(err)


def test_lookup_is_case_insensitive_and_knows_aliases() -> None:
    assert resolve_model("Gemma3:12B").model == "gemma3:12b"
    assert resolve_model("google/gemma-3-12b-it").model == "gemma3:12b"
    with pytest.raises(UnknownModel, match="no near match"):
        resolve_model("zzzz")


def test_quantization_families_and_quality_order() -> None:
    assert quant_family("q4_K_M") == "q4" and quant_family("Q8_0") == "q8" and quant_family("f16") == "fp16"
    assert quant_family("bfloat16") == "bf16" and quant_family("awq") == "int4" and quant_family("mystery") is None
    ranked = sorted(["q4_0", "fp16", "mystery", "q8_0", "fp32", "q5_K_M"], key=quality_rank)
    assert ranked == ["fp32", "fp16", "q8_0", "q5_K_M", "q4_0", "mystery"]
    assert QUALITY_ORDER.index("fp16") < QUALITY_ORDER.index("q8") < QUALITY_ORDER.index("q4")


def test_vram_gb_for_a_lease_is_exactly_the_registry_size() -> None:
    for entry in default_models().entries:
        for v in entry.variants:
            assert gb_to_mib(v.vram_gb) == v.vram_mib


def test_users_extend_and_override_from_their_own_yaml(tmp_path: Path) -> None:
    extra = tmp_path / "models.yaml"
    extra.write_text(
        """
my-llm:
  provider: vllm
  kind: llm
  context_window: 8192
  quantizations:
    awq: 6000
    fp16: {vram_mb: 20000, context_window: 4096}
gemma3:12b:
  provider: ollama
  quantizations:
    q4_K_M: 9000
""",
        encoding="utf-8",
    )
    reg = load_models(extra)
    mine = reg.get("my-llm")
    assert [(v.quantization, v.vram_mb, v.context_window) for v in mine.variants] == [
        ("awq", 6000, 8192),
        ("fp16", 20000, 4096),
    ]
    assert resolve_model("my-llm", free_mib_by_gpu={"g": 7000}, registry=reg).quantization == "awq"
    assert [v.quantization for v in reg.get("gemma3:12b").variants] == ["q4_K_M"]  # replaced whole
    assert sizes("gemma3:12b")["q4_K_M"] != 9000  # the shipped registry is untouched
    assert isinstance(reg, ModelRegistry) and len(reg) == len(default_models()) + 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("gemma: [", "malformed YAML"),
        ("- a\n- b", "top level must be a mapping"),
        ("m: {provider: x, quantizations: {}}", "quantizations"),
        ("m: {provider: x, kind: robot, quantizations: {fp16: 1}}", "kind"),
        ("m: {provider: x, quantizations: {fp16: -5}}", "fp16"),
        ("m: {provider: x, quantizations: {fp16: 100}, license: mit}", "license"),
    ],
)
def test_a_bad_user_file_is_a_config_error(tmp_path: Path, text: str, words: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_models(bad)
    assert str(bad) in str(info.value) and words in str(info.value)

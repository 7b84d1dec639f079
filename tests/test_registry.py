import pytest

from bench.models import create_model, list_models
from bench.registry import Registry


def _registry_with(*names):
    reg = Registry("widget")
    for name in names:
        reg.register(name)(lambda name=name: f"built {name}")
    return reg


def test_register_returns_the_builder_and_get_finds_it():
    reg = Registry("widget")

    def make():
        return 7

    assert reg.register("seven")(make) is make
    assert reg.get("seven") is make
    assert reg.get("seven")() == 7
    assert "seven" in reg
    assert "eight" not in reg


def test_duplicate_name_is_an_error_and_keeps_the_first_builder():
    reg = _registry_with("a")
    first = reg.get("a")
    with pytest.raises(ValueError, match=r"widget 'a' is registered twice"):
        reg.register("a")(lambda: "second")
    assert reg.get("a") is first
    assert reg.names() == ["a"]


def test_unknown_name_raises_key_error_naming_the_known_ones():
    reg = _registry_with("zeta", "alpha")
    with pytest.raises(KeyError) as info:
        reg.get("beta")
    message = str(info.value)
    assert "unknown widget 'beta'" in message
    assert "known: alpha, zeta" in message


def test_unknown_name_in_an_empty_registry_says_none_are_known():
    with pytest.raises(KeyError, match="known: none"):
        Registry("widget").get("x")


def test_names_are_sorted_and_complete():
    reg = _registry_with("c", "a", "b")
    assert reg.names() == ["a", "b", "c"]
    assert Registry("widget").names() == []


def test_the_model_registry_lists_the_four_models_and_rejects_unknown_ones():
    assert list_models() == ["bottleneck_resnet", "hw4_resnet", "resnet18_finetune", "resnet_b"]
    with pytest.raises(KeyError, match="known: bottleneck_resnet, hw4_resnet, resnet18_finetune, resnet_b"):
        create_model("resnet50", num_classes=10)

from __future__ import annotations

import pytest

from oncoslide.errors import ConfigError, UnknownNameError
from oncoslide.registry import Registry


def _registry() -> Registry[object]:
    reg: Registry[object] = Registry("widget")

    @reg.register("alpha", reference="A et al.", has_attention=True)
    class Alpha:
        def __init__(self, size: int, scale: float = 1.0) -> None:
            self.size, self.scale = size, scale

    @reg.register("beta_small")
    def beta(size: int = 3) -> tuple[str, int]:
        return ("beta", size)

    @reg.register("beta_large")
    def beta_large() -> str:
        return "large"

    return reg


def test_create_builds_with_keywords() -> None:
    reg = _registry()
    alpha = reg.create("alpha", size=4, scale=2.0)
    assert (alpha.size, alpha.scale) == (4, 2.0)  # type: ignore[attr-defined]
    assert reg.create("beta_small") == ("beta", 3)
    assert reg.create("beta_small", size=7) == ("beta", 7)


def test_decorator_returns_the_factory_unchanged() -> None:
    reg = _registry()
    alpha_cls = reg.get("alpha")
    assert isinstance(alpha_cls, type) and alpha_cls.__name__ == "Alpha"
    assert alpha_cls(size=1).size == 1


def test_list_is_sorted_and_filters_with_fnmatch() -> None:
    reg = _registry()
    assert reg.list() == ["alpha", "beta_large", "beta_small"]
    assert reg.list("beta_*") == ["beta_large", "beta_small"]
    assert reg.list("*small") == ["beta_small"]
    assert reg.list("gamma*") == []
    assert list(reg) == reg.list() and len(reg) == 3
    assert "alpha" in reg and "gamma" not in reg


def test_metadata_is_a_copy() -> None:
    reg = _registry()
    meta = reg.metadata("alpha")
    assert meta == {"reference": "A et al.", "has_attention": True}
    meta["reference"] = "changed"
    assert reg.metadata("alpha")["reference"] == "A et al."
    assert reg.metadata("beta_large") == {}


@pytest.mark.parametrize("call", ["get", "create", "metadata"])
def test_unknown_name_lists_the_known_ones(call: str) -> None:
    reg = _registry()
    with pytest.raises(UnknownNameError) as info:
        getattr(reg, call)("gamma")
    err = info.value
    assert isinstance(err, KeyError)
    assert (err.kind, err.name) == ("widget", "gamma")
    assert err.known == ["alpha", "beta_large", "beta_small"]
    assert str(err) == "unknown widget 'gamma'; known: alpha, beta_large, beta_small"


def test_bad_keywords_raise_config_error_naming_the_entry() -> None:
    reg = _registry()
    with pytest.raises(ConfigError, match=r"widget 'alpha'.*unexpected keyword.*colour"):
        reg.create("alpha", size=1, colour="red")
    with pytest.raises(ConfigError, match=r"widget 'alpha'.*missing.*size"):
        reg.create("alpha")


def test_duplicate_and_bad_registrations_are_refused() -> None:
    reg = _registry()
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("alpha")(lambda: None)
    with pytest.raises(ConfigError):
        reg.register("")
    with pytest.raises(ConfigError):
        reg.register(" padded ")
    with pytest.raises(ConfigError, match="callables"):
        reg.register("not_callable")(42)  # type: ignore[type-var]
    assert reg.list() == ["alpha", "beta_large", "beta_small"]


def test_model_registry_is_wired() -> None:
    from oncoslide.models import MODELS, create_model, list_models

    assert list_models() == [
        "abmil", "abmil_plain", "composition", "fusion_late", "ghanet", "hmil", "max", "mean",
        "mome",
        "omics_snn", "pathlupi", "roupkt", "slide-finetune", "transmil", "zoo_finetune",
        "zoo_probe",
    ]  # fmt: skip
    assert list_models("abmil*") == ["abmil", "abmil_plain"]
    assert MODELS.metadata("transmil")["has_attention"] is True
    with pytest.raises(UnknownNameError, match="known: abmil"):
        create_model("clam", in_dim=8, n_outputs=2)


def test_unregister_removes_an_entry() -> None:
    from oncoslide.registry import Registry

    reg: Registry[object] = Registry("thing")
    reg.register("a", note=1)(dict)
    reg.unregister("a")
    assert "a" not in reg and reg.list() == []
    with pytest.raises(UnknownNameError):
        reg.unregister("a")
    reg.register("a")(dict)  # the name is free again

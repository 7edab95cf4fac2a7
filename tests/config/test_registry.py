import pickle

import pytest

from coevo.config.registry import Registry, UnknownNameError


def _strategies() -> Registry[type]:
    registry: Registry[type] = Registry("strategy")

    @registry.register("fedprox")
    class FedProx: ...

    @registry.register("fedavg")
    class FedAvg: ...

    @registry.register("scaffold")
    class Scaffold: ...

    return registry


def test_register_returns_object_unchanged_and_get_finds_it() -> None:
    registry: Registry[object] = Registry("codec")

    def topk() -> None: ...

    assert registry.register("topk")(topk) is topk
    assert registry.get("topk") is topk


def test_names_are_sorted_and_container_protocol_works() -> None:
    registry = _strategies()
    assert registry.names() == ["fedavg", "fedprox", "scaffold"]
    assert list(registry) == ["fedavg", "fedprox", "scaffold"]
    assert len(registry) == 3
    assert "fedavg" in registry
    assert "fedsgd" not in registry


def test_duplicate_name_is_rejected_naming_both_objects() -> None:
    registry: Registry[object] = Registry("policy")

    def first() -> None: ...

    def second() -> None: ...

    registry.register("greedy")(first)
    with pytest.raises(ValueError, match="policy 'greedy' is already registered") as caught:
        registry.register("greedy")(second)
    message = str(caught.value)
    assert "first" in message
    assert "second" in message
    assert registry.get("greedy") is first


def test_empty_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Registry[object]("policy").register("")


def test_unknown_name_lists_choices_and_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError) as caught:
        _strategies().get("fedprx")
    assert str(caught.value) == (
        "unknown strategy 'fedprx'; choose one of: fedavg, fedprox, scaffold; "
        "did you mean 'fedprox'?"
    )
    assert isinstance(caught.value, KeyError)
    assert caught.value.choices == ("fedavg", "fedprox", "scaffold")


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(LookupError) as caught:
        _strategies().get("qffl")
    assert str(caught.value) == "unknown strategy 'qffl'; choose one of: fedavg, fedprox, scaffold"


def test_unknown_name_in_empty_registry() -> None:
    with pytest.raises(UnknownNameError, match=r"choose one of: \(none registered\)"):
        Registry[object]("attack").get("labelflip")


def test_unknown_name_error_survives_pickling() -> None:
    error = UnknownNameError("strategy", "fedprx", ["fedprox"])
    assert str(pickle.loads(pickle.dumps(error))) == str(error)

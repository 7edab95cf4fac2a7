import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from coevo.config.loading import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    load_yaml,
    parse,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Train(_Frozen):
    lr: float = 0.1
    epochs: int = 1


class FedAvg(_Frozen):
    name: Literal["fedavg"] = "fedavg"
    lr: float = 0.1


class FedProx(_Frozen):
    name: Literal["fedprox"] = "fedprox"
    lr: float = 0.1
    mu: float = 0.01


class Codec(_Frozen):
    bits: int = 8


class Constant(_Frozen):
    value: float = 1.0


class Cosine(_Frozen):
    period: int = 10


Strategy = Annotated[FedAvg | FedProx, Field(discriminator="name")]


class Run(_Frozen):
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    train: Train = Train()
    strategies: list[Strategy] = []
    codec: Codec | None = None
    schedule: Constant | Cosine = Constant()


BASE: dict[str, Any] = {
    "seed": 0,
    "train": {"lr": 0.1, "epochs": 1},
    "strategies": [{"name": "fedavg", "lr": 0.1}, {"name": "fedprox", "mu": 0.01}],
}


def _problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(Run, data, source="run.yaml")
    return str(caught.value)


# apply_overrides


def test_override_nested_mapping_and_list_element() -> None:
    result = apply_overrides(BASE, ["train.lr=0.01", "strategies.1.mu=0.5"])
    assert result["train"] == {"lr": 0.01, "epochs": 1}
    assert result["strategies"][1] == {"name": "fedprox", "mu": 0.5}
    assert result["strategies"][0] == BASE["strategies"][0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.1", 0.1),
        ("3", 3),
        ("true", True),
        ("[1, 2]", [1, 2]),
        ("{bits: 4}", {"bits": 4}),
        ("null", None),
        ("fedprox", "fedprox"),
        ("'3'", "3"),
        ("a=b", "a=b"),
    ],
)
def test_override_value_is_parsed_as_yaml(text: str, expected: object) -> None:
    assert apply_overrides({}, [f"knob={text}"]) == {"knob": expected}


def test_override_creates_missing_keys() -> None:
    result = apply_overrides(BASE, ["codec.bits=4", "train.warmup=2"])
    assert result["codec"] == {"bits": 4}
    assert result["train"] == {"lr": 0.1, "epochs": 1, "warmup": 2}


def test_overrides_apply_in_order() -> None:
    assert apply_overrides({}, ["seed=1", "seed=2"]) == {"seed": 2}


def test_overrides_leave_input_untouched() -> None:
    before = copy.deepcopy(BASE)
    result = apply_overrides(BASE, ["train.lr=0.5", "strategies.0.lr=0.2", "codec.bits=2"])
    assert before == BASE
    assert result["strategies"] is not BASE["strategies"]


@pytest.mark.parametrize("override", ["train.lr", "=1", "train..lr=1", "train.=1"])
def test_override_without_key_path_and_value_is_rejected(override: str) -> None:
    with pytest.raises(ConfigError, match=r"expected the form key\.path=value") as caught:
        apply_overrides(BASE, [override])
    assert repr(override) in str(caught.value)


def test_override_past_list_end_names_override_and_segment() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(BASE, ["strategies.5.lr=0.1"])
    message = str(caught.value)
    assert "override 'strategies.5.lr=0.1'" in message
    assert "strategies.5: index 5 is past the end of a 2-item list (use an index 0..1)" in message


def test_override_with_non_integer_list_segment_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"strategies\.first: not an index of a 2-item list"):
        apply_overrides(BASE, ["strategies.first.lr=0.1"])


def test_override_into_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(BASE, ["train.lr.value=1"])
    message = str(caught.value)
    assert "override 'train.lr.value=1'" in message
    assert "train.lr.value: train.lr is 0.1, not a mapping or list" in message


def test_override_with_invalid_yaml_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"value '\[1,' is not valid YAML"):
        apply_overrides(BASE, ["train.lr=[1,"])


def test_overrides_given_as_one_string_are_rejected() -> None:
    with pytest.raises(TypeError, match=r"list of key\.path=value strings"):
        apply_overrides(BASE, "seed=1")


def test_every_bad_override_is_listed() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(BASE, ["seed", "train.lr=0.2", "strategies.9.mu=1"])
    assert len(caught.value.problems) == 2
    assert str(caught.value).count("\n") == 1


# parse


def test_parse_builds_nested_models() -> None:
    run = parse(Run, BASE)
    assert run.train == Train(lr=0.1, epochs=1)
    assert run.strategies == [FedAvg(), FedProx()]


def test_parse_names_dotted_path_and_input_for_bad_value() -> None:
    message = _problems({"train": {"lr": "fast"}})
    assert message.startswith("run.yaml: train.lr: Input should be a valid number")
    assert "(got 'fast')" in message


def test_parse_path_into_list_skips_discriminator_tag() -> None:
    message = _problems({"strategies": [{"name": "fedavg"}, {"name": "fedprox", "mu": "x"}]})
    assert "run.yaml: strategies.1.mu: Input should be a valid number" in message
    assert "fedprox.mu" not in message


def test_parse_unknown_field_lists_allowed_names_and_suggests() -> None:
    message = _problems({"train": {"lrr": 0.1}})
    assert message == (
        "run.yaml: train.lrr: unknown field, did you mean 'lr'? (allowed: epochs, lr)"
    )


def test_parse_unknown_field_in_list_of_union_models() -> None:
    message = _problems({"strategies": [{"name": "fedprox", "beta": 0.9}]})
    assert "strategies.0.beta: unknown field (allowed: lr, mu, name)" in message


def test_parse_unknown_field_at_top_level_and_in_optional_model() -> None:
    message = _problems({"sede": 1, "codec": {"bitz": 4}})
    assert "run.yaml: sede: unknown field, did you mean 'seed'? (allowed: codec, " in message
    assert "codec.bitz: unknown field, did you mean 'bits'? (allowed: bits)" in message


def test_parse_keeps_allowed_literal_values() -> None:
    message = _problems({"device": "tpu"})
    assert "device: Input should be 'cpu' or 'cuda' (got 'tpu')" in message


def test_parse_unknown_discriminator_lists_tags() -> None:
    message = _problems({"strategies": [{"name": "fedsgd"}]})
    assert "strategies.0: " in message
    assert "'fedavg', 'fedprox'" in message


def test_parse_labels_members_of_plain_union() -> None:
    message = _problems({"schedule": {"period": 5, "value": 2.0}})
    assert "schedule.period: as Constant: unknown field (allowed: value)" in message
    assert "schedule.value: as Cosine: unknown field (allowed: period)" in message


def test_parse_lists_every_problem_one_per_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(Run, {"seed": "x", "device": "tpu", "train": {"bogus": 1}})
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("config: ") for line in lines)
    assert caught.value.problems == tuple(lines)


# load_yaml, load_config, dump_config


def test_load_yaml_reads_mapping_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("seed: 3\ntrain:\n  lr: 0.5\n")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "run.yaml") == {"seed": 3, "train": {"lr": 0.5}}
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_load_yaml_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_yaml(path)
    assert str(path) in str(caught.value)


def test_load_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ntrain:\n  lr: [0.1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+, column \d+") as caught:
        load_yaml(path)
    assert str(caught.value).startswith(str(path))


def test_load_yaml_rejects_non_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level is a list"):
        load_yaml(path)


def test_load_config_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\nstrategies:\n  - name: fedavg\n  - name: fedprox\n")
    run = load_config(Run, path, ["strategies.1.mu=0.5", "codec.bits=4", "device=cuda"])
    assert run.strategies == [FedAvg(), FedProx(mu=0.5)]
    assert run.codec == Codec(bits=4)
    assert run.device == "cuda"


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.lr: Input should be a valid"):
        load_config(Run, path, ["train.lr=fast"])


def test_dump_then_load_gives_equal_config(tmp_path: Path) -> None:
    run = Run(
        seed=7,
        device="cuda",
        train=Train(lr=1e-5, epochs=3),
        strategies=[FedProx(mu=0.5), FedAvg(lr=0.25)],
        codec=Codec(bits=4),
        schedule=Cosine(period=3),
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(run))
    assert load_config(Run, path) == run
    assert path.read_text().startswith("seed: 7\ndevice: cuda\n")

"""The settings dataclasses round-trip through JSON and refuse unknown keys (datainf.settings)."""

from __future__ import annotations

import json

import pytest

from datainf.errors import ConfigError
from datainf.explain.text_generation import TextGenerationConfig
from datainf.explain.text_to_image import TextToImageConfig
from datainf.finetune import FinetuneConfig
from datainf.settings import name_tuple


@pytest.mark.parametrize(
    "config",
    [
        FinetuneConfig(target_modules=("query", "key"), modules_to_save=("pooler.dense",), epochs=2),
        TextGenerationConfig(dataset="math", methods=("datainf",), loss_on="all"),
        TextToImageConfig(dataset="subject", timesteps=(25, 925), r=2),
    ],
)
def test_json_round_trip_restores_tuples(config: object) -> None:
    data = json.loads(json.dumps(config.to_dict()))  # type: ignore[attr-defined]
    assert all(not isinstance(v, tuple) for v in config.to_dict().values())  # type: ignore[attr-defined]
    back = type(config).from_dict(data)  # type: ignore[attr-defined]
    assert back == config
    tuple_fields = [k for k, v in vars(config).items() if isinstance(v, tuple)]
    assert tuple_fields and all(isinstance(getattr(back, k), tuple) for k in tuple_fields)


@pytest.mark.parametrize(
    ("cls", "name"),
    [(FinetuneConfig, "fine-tuning"), (TextGenerationConfig, "text-generation"), (TextToImageConfig, "text-to-image")],
)
def test_unknown_key_is_refused_with_the_known_ones(cls: type, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"Unknown {name} setting\(s\) \['epochz'\]; known: .*'seed'"):
        cls.from_dict({"seed": 1, "epochz": 3})


def test_values_are_still_checked_by_the_dataclass() -> None:
    with pytest.raises(ConfigError):
        TextGenerationConfig.from_dict({"loss_on": "prompt"})


def test_name_lists_accept_a_comma_string_or_a_sequence() -> None:
    assert name_tuple(" query, value ,,") == ("query", "value")
    assert name_tuple(["to_q", 3]) == ("to_q", "3")
    assert FinetuneConfig(target_modules="query,key", modules_to_save="pooler.dense").target_modules == ("query", "key")
    assert TextGenerationConfig(methods="datainf, hessian-free").methods == ("datainf", "hessian_free")

"""The one parser of settings given as text (tasks/typed_values.py): what every settings class
(-o task options, serve arguments, deployment scaling, Tune's trial configs) converts with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from tasks.typed_values import typed_fields


@dataclass(frozen=True)
class Example:
    count: int = 3
    rate: float = 0.5
    flag: bool = False
    name: str = "a"
    sizes: tuple[int, ...] = (4, 3)
    costs: tuple[float, ...] | None = None
    limit: float | None = None
    extra: dict | None = None


def test_text_and_json_values_become_the_declared_types():
    typed = typed_fields(Example, {"count": "7", "rate": "1e-3", "flag": "Yes", "name": 5, "sizes": "4, 3,2",
                                   "costs": [1, "2.5"], "limit": "", "extra": {"k": "v"}}, "example option")
    assert typed == {"count": 7, "rate": 0.001, "flag": True, "name": "5", "sizes": (4, 3, 2), "costs": (1.0, 2.5),
                     "limit": None, "extra": {"k": "v"}}
    assert type(typed["count"]) is int and all(type(c) is float for c in typed["costs"])
    from_tune = typed_fields(Example, {"count": np.int64(2), "rate": np.float32(0.25), "flag": 0}, "trial setting")
    assert from_tune == {"count": 2, "rate": 0.25, "flag": False} and type(from_tune["count"]) is int


@pytest.mark.parametrize("values, message", [
    ({"cuont": "1"}, r"unknown example option\(s\) cuont; known: costs, count, extra"),
    ({"count": "3.5"}, r"example option count='3.5': expected int like 3$"),
    ({"flag": "maybe"}, r"example option flag='maybe': expected bool like False"),
    ({"sizes": "4,x"}, r"expected comma-separated ints like \(4, 3\)"),
    ({"limit": "lots"}, r"expected float or empty like None"),
])
def test_an_unknown_key_or_a_bad_value_is_one_line_naming_it(values, message):
    with pytest.raises(ValueError, match=message):
        typed_fields(Example(), values, "example option")

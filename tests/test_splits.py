"""The gate split: a share of train's groups held out from the experts, the same on every run."""

from __future__ import annotations

import pytest

from tasks.base import Listing, carve_gate_split


def _listing(groups: int, per_group: int = 3) -> Listing:
    return Listing(sources=[{"source_id": f"v_g{g:02d}_c{c}", "group": g} for g in range(groups)
                            for c in range(per_group)], problems=["train: 1 listed clip not on disk"])


def test_whole_groups_go_to_the_gate_split_in_the_share_asked_and_the_same_every_time():
    train, gate = carve_gate_split(_listing(20), 0.25)
    assert len({s["group"] for s in gate.sources}) == 5 and len(gate.sources) == 15
    assert not {s["group"] for s in gate.sources} & {s["group"] for s in train.sources}
    assert sorted(s["source_id"] for s in train.sources + gate.sources) == \
        sorted(s["source_id"] for s in _listing(20).sources)  # nothing dropped, nothing twice
    assert train.problems == ["train: 1 listed clip not on disk"] and gate.problems == []  # named once
    again = carve_gate_split(_listing(20), 0.25)
    assert again[1].sources == gate.sources  # a hash of the group's name, not a random draw


def test_sources_without_a_group_are_their_own_group_and_both_sides_keep_one():
    listing = Listing(sources=[{"source_id": f"img{i}"} for i in range(2)])
    train, gate = carve_gate_split(listing, 0.9)
    assert len(train.sources) == 1 and len(gate.sources) == 1
    train, gate = carve_gate_split(Listing(sources=[{"source_id": "only"}]), 0.5)
    assert len(train.sources) == 1 and gate.sources == []  # prepare says why in one line


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="gate_share"):
        carve_gate_split(_listing(4), share)


def test_prepare_says_in_one_line_when_train_is_one_group(tmp_path):
    import numpy as np
    from PIL import Image

    from pipelines.prepare import prepare
    from pipelines.runtime import RunConfig, UserError

    for split, count in (("train", 1), ("val", 1), ("test", 1)):
        (tmp_path / "images" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / split / f"{i}.png")
    cfg = RunConfig(task_name="superres", root=str(tmp_path / "run"), profile="smoke", data_root=str(tmp_path / "images"))
    with pytest.raises(UserError, match="are one group: at least two are needed"):
        prepare(cfg)

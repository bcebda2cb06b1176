"""Action data and model pieces: UCF-101's real list files and clip, motion vectors from real
MPEG-4 part 2 and H.264 bitstreams, decord frames, the synthetic tree, the experts and the gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_same_listing, assert_same_rows
from bmoe.gating import build_gate, count_macs
from tasks import BadInput, get_task
from tasks.action import synthetic
from tasks.action.figure import draw_embedding, embedding_columns
from tasks.action.frames import UnreadableFrames, frame_indices, rgb_frames
from tasks.action.motion_vectors import GRID, NoMotion, Undecodable, motion_grids, rasterise
from tasks.action.readers import BadDataRoot, list_split, read_class_index
from tasks.action.task import pack

SPLITS = ("train", "val", "test")


def _real_root(samples: Path) -> Path:
    root = samples / "ucf101"
    if not (root / "UCF-101").is_dir():
        pytest.skip("no UCF-101 sample clip")
    return root


def _listed(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_bytes().decode().split("\r\n") if line.strip()]


# -- readers: the real split files (CRLF, 1-based labels) and the real clip ------------------------


def test_real_split_files_and_clip(samples):
    root = _real_root(samples)
    classes = read_class_index(root)
    assert len(classes) == len(_listed(root / "ucfTrainTestlist" / "classInd.txt"))
    on_disk = {p.relative_to(root / "UCF-101").as_posix() for p in (root / "UCF-101").glob("*/*.avi")}
    listings = {split: list_split(root, split, 1) for split in SPLITS}
    clips = [c for listing in listings.values() for c in listing.clips]
    assert {f"{c.class_name}/{c.path.name}" for c in clips} == on_disk & set(
        _listed(root / "ucfTrainTestlist" / "trainlist01.txt") + _listed(root / "ucfTrainTestlist" / "testlist01.txt"))
    for clip in clips:  # label = the 1-based number in classInd.txt, minus one; val groups g05, g10, ...
        assert classes[clip.label] == clip.class_name
        assert (clip.group % 5 == 0) == (clip in listings["val"].clips)
    # every listed clip is either used or counted as missing (a partial download is normal)
    for split, kind in (("train", "train"), ("val", "train"), ("test", "test")):
        missing = [p for p in listings[split].problems if "not on disk" in p]
        assert len(missing) == 1 and f"{kind}list01.txt" in missing[0]
    total_missing = sum(int(listings[s].problems[-1].split(": ")[1].split()[0]) for s in SPLITS)
    listed = len(_listed(root / "ucfTrainTestlist" / "trainlist01.txt")) + len(
        _listed(root / "ucfTrainTestlist" / "testlist01.txt"))
    assert total_missing + len(clips) == listed


def test_missing_split_file_and_layout_are_one_line_errors(samples, tmp_path):
    root = _real_root(samples)
    if not (root / "ucfTrainTestlist" / "trainlist02.txt").exists():
        with pytest.raises(BadDataRoot, match="trainlist02.txt"):
            list_split(root, "train", 2)
    with pytest.raises(BadDataRoot, match="splits 1, 2 and 3"):
        list_split(root, "train", 4)
    with pytest.raises(BadDataRoot, match="UCF-101's layout"):
        read_class_index(tmp_path)
    task = get_task("action", "smoke")
    with pytest.raises(BadInput, match="UCF-101's layout"):
        task.list_sources(tmp_path, "train")


def test_real_clip_motion_vectors_and_frames(samples):
    """The real Xvid (MPEG-4 part 2) clip: vectors from its bitstream, frames through decord."""
    root = _real_root(samples)
    clip = next((root / "UCF-101").glob("*/*.avi"))
    grids = motion_grids(clip, 12)
    assert grids.shape == (12, GRID, GRID, 2) and grids.dtype == np.float32
    assert (np.abs(grids).sum(axis=(1, 2, 3)) > 0).all()  # every taken frame carries motion
    assert np.allclose(motion_grids(clip, 12, scale=0.5), grids * 0.5)
    frames = rgb_frames(clip, 2, 36, 48)  # 48 px wide: a width decord 0.6 cannot resize to itself
    assert frames.shape == (2, 36, 48, 3) and frames.dtype == np.uint8 and frames.std() > 5
    task = get_task("action", "smoke", {"classes": 101})
    sources = task.list_sources(root, "train").sources + task.list_sources(root, "test").sources
    row = task.load(next(s for s in sources if Path(s["path"]) == clip))[0]
    assert row["x0"].shape == (4, GRID, GRID, 2) and row["x1"].shape == (1, 36, 48, 3)
    assert 0 < row["enc0"] and 0 < row["enc1"] and row["enc2"] == row["enc0"] + row["enc1"]
    with pytest.raises(BadInput, match=f"outside the experts' {len(synthetic.CLASSES)} classes"):
        get_task("action", "smoke").load(next(s for s in sources if Path(s["path"]) == clip))


# -- motion vectors: direction, codecs, clips without motion -----------------------------------------


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_motion_vectors_follow_the_motion(tmp_path, codec):
    """A square sliding right (and one rising) reads as +dx (and -dy) in both codecs; H.264's
    B-frames point to the future and must come out with the same sign."""
    rng = np.random.default_rng(0)
    for cls, axis, sign in ((synthetic.CLASSES[0], 0, 1), (synthetic.CLASSES[2], 1, -1)):
        path = synthetic.encode_clip(synthetic.render_clip(cls, 14, 120, 160, rng), tmp_path / f"{cls.name}.avi",
                                     codec=codec)
        v = motion_grids(path, 10)
        moving = np.linalg.norm(v, axis=-1) > 1.0  # the object's blocks, not the background's jitter
        assert moving.sum() > 20
        along, across = sign * v[moving][:, axis].mean(), abs(v[moving][:, 1 - axis].mean())
        assert along > 0.5 and along > across, (along, across)


def test_all_intra_clip_and_undecodable_file_are_named(tmp_path):
    rng = np.random.default_rng(1)
    video = synthetic.render_clip(synthetic.CLASSES[0], 6, 64, 80, rng)
    intra = tmp_path / "intra.avi"
    import av

    with av.open(str(intra), mode="w") as container:  # GOP of 1: every frame intra-coded
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width, stream.pix_fmt = 64, 80, "yuv420p"
        stream.options = {"g": "1"}
        for array in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(NoMotion, match="intra.avi"):
        motion_grids(intra, 4)
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00AVI not really a video")
    with pytest.raises(Undecodable, match="junk.avi"):
        motion_grids(junk, 4)
    with pytest.raises(UnreadableFrames, match="junk.avi"):
        rgb_frames(junk, 1, 36, 48)
    task = get_task("action", "smoke")
    for path in (intra, junk):
        with pytest.raises(BadInput, match=path.name):
            task.load({"source_id": path.stem, "path": str(path), "label": 0, "group": "x_g01"})


def test_rasterise_block_average():
    """One 16x16 block covering the top-left quarter of a 48x48 frame: its velocity fills the
    grid's top-left 12x12 cells; a block with source=+1 (future reference) flips sign."""
    dtype = [("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"), ("dst_x", "<i2"),
             ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")]
    past = np.array([(-1, 24, 24, 0, 0, 12, 12, 0, -6, 2, 2)], dtype=dtype)  # velocity (+3, -1)
    grid = rasterise(past, 48, 48)
    assert np.allclose(grid[:12, :12], [3.0, -1.0]) and np.allclose(grid[12:], 0) and np.allclose(grid[:, 12:], 0)
    future = past.copy()
    future["source"] = 1
    assert np.allclose(rasterise(future, 48, 48)[:12, :12], [-3.0, 1.0])
    assert rasterise(past[:0], 48, 48).shape == (GRID, GRID, 2)


def test_frame_indices_cover_the_clip():
    assert frame_indices(10, 1) == [5]
    assert frame_indices(10, 2) == [2, 7]
    assert frame_indices(3, 5) == [0, 0, 1, 2, 2]


# -- the synthetic UCF-101 tree: layout, CRLF lists, labels, missing clips ---------------------------


def test_synthetic_tree_is_read_by_the_real_reader(tmp_path):
    classes = synthetic.CLASSES[:2]
    root = synthetic.write_ucf101_tree(tmp_path, clips_per_group=1, frames=6, height=64, width=80, groups=10,
                                       classes=classes)
    raw = (root / "ucfTrainTestlist" / "trainlist01.txt").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 0  # CRLF, as the official files
    assert raw.split(b"\r\n")[0].endswith(b" 1")  # 1-based labels
    listings = {split: list_split(root, split) for split in SPLITS}
    assert {split: len(listings[split].clips) for split in SPLITS} == {"train": 4, "val": 2, "test": 14}
    assert all(not listing.problems for listing in listings.values())
    assert {c.label for c in listings["test"].clips} == {0, 1}
    # a clip the list names but the disk lacks is counted, the others are used
    gone = listings["train"].clips[0].path
    gone.unlink()
    train = list_split(root, "train")
    assert len(train.clips) == 3 and len(train.problems) == 1
    assert "1 listed train clips not on disk" in train.problems[0]
    # a line whose label contradicts classInd.txt is a named problem
    lists = root / "ucfTrainTestlist" / "trainlist01.txt"
    lists.write_bytes(raw.replace(b".avi 1\r\n", b".avi 2\r\n", 1))
    assert any("does not match" in p for p in list_split(root, "train").problems)


def test_without_validation_groups_on_disk_validation_comes_from_the_train_groups_present(tmp_path):
    classes = synthetic.CLASSES[:2]
    root = synthetic.write_ucf101_tree(tmp_path, clips_per_group=1, frames=6, height=64, width=80, groups=10,
                                       classes=classes)  # g01-g07 test, g08-g09 train, g10 validation
    for clip in (root / "UCF-101").glob("*/*_g10_*.avi"):
        clip.unlink()  # a partial download: no clip of the usual validation group
    listings = {split: list_split(root, split) for split in SPLITS}
    assert {c.group for c in listings["val"].clips} == {9} and {c.group for c in listings["train"].clips} == {8}
    assert "validation takes group(s) g09 of the 2 train groups present" in listings["val"].problems[0]
    assert not any("validation takes" in p for p in listings["train"].problems + listings["test"].problems)


def test_embedded_data_is_written_once(tmp_path):
    task = get_task("action", "smoke", {"groups": 8})
    root = task.embedded_data(tmp_path)
    clips = sorted((root / "UCF-101").glob("*/*.avi"))
    assert len(clips) == len(synthetic.CLASSES) * 8
    stamp = (root / "embedded.json").stat().st_mtime_ns
    assert task.embedded_data(tmp_path) == root and (root / "embedded.json").stat().st_mtime_ns == stamp
    row = task.load(task.list_sources(root, "test").sources[0])[0]
    assert row["gate"].shape == (task.settings.F_t, GRID, GRID, 2)


# -- task: data costs, packing, experts, gate, heuristic, figure -------------------------------------


def test_paper_data_costs_and_gate_match_tables_viii_and_x():
    task = get_task("action", "paper")
    assert task.data_costs() / 1000 == pytest.approx([737.28, 1843.2, 2580.48])  # Table VIII: 737.3, 1843.0, 2580.5
    spec = task.gate_spec()
    assert spec.input_shape == (320, 24, 24)  # Table X: F_t * 2 channels of 24 x 24
    c_g = count_macs(build_gate(spec), spec.input_shape)
    assert 1e7 < c_g < 1e8
    demo = get_task("action", "demo")
    d = demo.data_costs()
    assert d[0] < d[1] < d[2] == d[0] + d[1] and d[2] / 3 >= d[0]  # d_max/3 is a reachable target


def test_experts_train_and_evaluate_on_packed_inputs(one_thread):
    task = get_task("action", "smoke")
    s = task.settings
    rng = np.random.default_rng(0)
    B = 6
    grids = rng.normal(0, 2, size=(B, s.F_t, GRID, GRID, 2)).astype(np.float32)
    frames = rng.integers(0, 256, size=(B, s.F_s, s.H_s, s.W_s, 3), dtype=np.uint8)
    labels = rng.integers(0, s.classes, size=B)
    packed = np.stack([pack(g, f) for g, f in zip(grids, frames)])
    mv_back, rgb_back = task.unpack(torch.as_tensor(packed))
    assert torch.equal(mv_back, torch.as_tensor(grids)) and torch.equal(rgb_back, torch.as_tensor(frames))
    for n, x in enumerate((grids, frames, packed)):
        torch.manual_seed(0)
        model = task.build_expert(n)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        batch = {"x": torch.as_tensor(x), "label": torch.as_tensor(labels)}
        first = float(task.train_loss(n, model, batch).detach())
        for _ in range(15):
            loss = task.train_loss(n, model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert float(task.train_loss(n, model, batch).detach()) < first  # it learns
        model.eval()
        with torch.no_grad():
            out = task.evaluate(n, model, {"x": x, "label": labels}, torch.device("cpu"))
        assert out["loss"].shape == out["score"].shape == (B,) and set(np.unique(out["score"])) <= {0.0, 1.0}
        assert any(k.startswith("emb") for k in out) == (n == 0)


def test_metric_gate_tensor_heuristic_and_figure(tmp_path):
    task = get_task("action", "smoke")
    M = 12
    rng = np.random.default_rng(0)
    cache = pd.DataFrame({"label": np.arange(M) % 3, "score_0": (np.arange(M) % 2).astype(float),
                          "score_1": np.zeros(M), "score_2": np.ones(M),
                          **{f"emb{k:02d}_0": rng.normal(size=M) for k in range(5)}})
    assert task.metric(cache, np.zeros(M, dtype=int))["performance"] == pytest.approx(50.0)
    assert task.metric(cache, np.full(M, 2))["performance"] == pytest.approx(100.0)
    gate = rng.normal(size=(M, task.settings.F_t, GRID, GRID, 2)).astype(np.float32)
    x = task.gate_tensor(gate)
    assert x.shape == (M, 2 * task.settings.F_t, GRID, GRID)
    assert build_gate(task.gate_spec(), 0.25)(x).shape == (M, 3)
    # heuristic: a camera pan (uniform field) or a still clip is harder than an object moving alone
    still = np.zeros((1, 4, GRID, GRID, 2))
    pan = np.ones((1, 4, GRID, GRID, 2)) * 2.0
    alone = np.zeros((1, 4, GRID, GRID, 2))
    alone[:, :, 8:14, 8:14, 0] = 3.0
    h = task.heuristic(np.concatenate([still, pan, alone]))
    assert h[2] < h[0] < h[1]
    assert len(embedding_columns(cache)) == 5
    path = draw_embedding(cache, np.arange(M) % 3, task.expert_names(), tmp_path / "fig9.png")
    assert path.stat().st_size > 10_000


# -- a data root in an object store (moto S3 on 127.0.0.1) ------------------------------------------


def test_ucf101_tree_in_s3_gives_the_same_samples_and_an_unreadable_object_is_named(
        tmp_path, s3_bucket, s3_requests, monkeypatch):
    import socket
    import tempfile

    from storage import upload_tree
    from tasks import UnreadableInput

    local = synthetic.write_ucf101_tree(tmp_path / "ucf", clips_per_group=1, frames=6, height=64, width=80,
                                        groups=10, classes=synthetic.CLASSES[:2])
    gone = next((local / "UCF-101").glob("*/*_g08_c01.avi"))
    gone.unlink()  # listed, not on disk: counted on both sides
    remote = s3_bucket / "ucf"
    upload_tree(local, remote)
    scratch = tmp_path / "scratch"  # where decord's temporary copies of remote clips go
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    task = get_task("action", "smoke")
    for split in SPLITS:
        ours, theirs = assert_same_listing(task, local, remote, split, s3_requests, (".avi",))
        for a, b in list(zip(ours.sources, theirs.sources))[:3]:  # decoding: a few per split (time)
            assert_same_rows(task.load(a), task.load(b))
    assert list(scratch.iterdir()) == []  # every temporary copy deleted
    problems = task.list_sources(remote, "train").problems
    assert len(problems) == 1 and "1 listed train clips not on disk" in problems[0]

    source = task.list_sources(remote, "test").sources[0]
    (remote / "UCF-101" / source["group"].rsplit("_g", 1)[0] / f"{source['source_id']}.avi").unlink()
    with pytest.raises(UnreadableInput) as err:  # listed, then gone before a worker reads it
        task.load(source)
    assert str(err.value).startswith(f"{source['path']}: cannot be read on node {socket.gethostname()} (")
    assert "\n" not in str(err.value)
    junk = task.list_sources(remote, "test").sources[0]
    (remote / "UCF-101" / junk["group"].rsplit("_g", 1)[0] / f"{junk['source_id']}.avi").write_bytes(b"RIFF junk")
    with pytest.raises(BadInput, match=junk["source_id"]) as err:  # read fine, not a video: plain BadInput
        task.load(junk)
    assert not isinstance(err.value, UnreadableInput)


def test_a_data_roots_label_set_comes_from_its_class_index(tmp_path):
    """-o classes is not needed for real data: classInd.txt's classes, unless -o says otherwise;
    later stages (no --data-root) take the label set the prepare recorded."""
    from cli.main import _config
    from pipelines.runtime import label_options
    from storage import write_json

    root = synthetic.write_ucf101_tree(tmp_path / "ucf", clips_per_group=1, frames=6, height=64, width=80, groups=8,
                                       classes=synthetic.CLASSES[:3])
    assert label_options("action", "smoke", str(root)) == {"classes": "3"}
    assert _config("action", str(tmp_path / "run"), "smoke", str(root), None).task().settings.classes == 3
    assert _config("action", str(tmp_path / "run"), "smoke", str(root), None, ["classes=5"]).task_options["classes"] == "5"
    embedded = _config("action", str(tmp_path / "run"), "smoke", None, None).task().settings.classes
    assert embedded == len(synthetic.CLASSES)  # the profile's count is the embedded data's
    cfg = _config("action", str(tmp_path / "run"), "smoke", None, None)
    write_json(cfg.layout.manifest(), {"data_root": str(root), "label_options": {"classes": "3"}})
    assert _config("action", str(tmp_path / "run"), "smoke", None, None).task().settings.classes == 3

"""The detection task's data, experts and metric: a synthetic COCO tree written here, the real
COCO samples read in place, bad inputs named and counted, and the pooled COCOeval checked
against pycocotools' plain sequence."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_same_listing, assert_same_rows
from bmoe.gating import build_gate, count_macs
from tasks import BadInput, get_task
from tasks.detection import metrics, models, readers, synthetic


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A tiny synthetic COCO tree in the real layout: 8 train2017 and 8 val2017 scenes."""
    root = tmp_path_factory.mktemp("coco")
    return synthetic.write_coco_tree(root, {"train2017": 8, "val2017": 8}, seed=3)


def test_synthetic_tree_is_real_coco_with_coco_category_ids(tree):
    from pycocotools.coco import COCO

    coco = COCO(str(tree / "annotations" / "instances_val2017.json"))
    assert sorted(coco.getCatIds()) == sorted(synthetic.CATEGORY_IDS)
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} >= {"sports ball", "donut"}
    assert all((tree / "val2017" / img["file_name"]).is_file() for img in coco.loadImgs(coco.getImgIds()))
    anns = coco.loadAnns(coco.getAnnIds())
    sides = [a["bbox"][3] for a in anns]
    assert min(sides) < 0.1 * 240 and max(sides) > 0.25 * 240  # tiny to large objects


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_each_scene_kind_holds_objects_of_its_size_bands(kind):
    """The kinds are what routing can exploit: large scenes hold only large objects, small ones
    only small objects, mixed ones one large among small ones (sides within the drawn band of
    the short side: the shape's own box)."""
    bands = {"large": (0.40, 0.70), "medium": (0.12, 0.22), "small": (0.04, 0.09)}
    allowed = {"mixed": ("large", "small")}.get(kind, (kind,))
    rng = np.random.default_rng(7)
    for _ in range(5):
        pixels, anns, drawn = synthetic.scene(rng, 320, 240, kind=kind)
        assert drawn == kind and pixels.shape == (240, 320, 3) and anns
        found = [next((b for b in allowed if bands[b][0] * 240 - 1 <= max(a["bbox"][2:]) <= bands[b][1] * 240 + 1),
                      None) for a in anns]
        assert None not in found, f"an object of a {kind} scene outside the bands {allowed}"
        if kind == "mixed":
            assert found.count("large") == 1


def test_an_unknown_scene_kind_is_refused():
    with pytest.raises(ValueError, match="unknown scene kind 'tiny'"):
        synthetic.scene(np.random.default_rng(0), kind="tiny")


def test_splits_and_rows(tree):
    task = get_task("detection", "smoke")
    listings = {split: task.list_sources(tree, split) for split in ("train", "val", "test")}
    assert len(listings["train"].sources) == 8
    assert len(listings["val"].sources) + len(listings["test"].sources) == 8  # val2017 halved
    ids = [s["image_id"] for lst in listings.values() for s in lst.sources]
    assert len(ids) == len(set(ids)) and all(not lst.problems for lst in listings.values())

    rows = task.load(listings["val"].sources[0])
    row = rows[0]
    s = task.settings
    assert row["gate"].shape == (s.gate_crop, s.gate_crop, 3)
    for n, r in enumerate(s.resolutions):
        assert row[f"x{n}"].shape == (r, r, 3) and row[f"x{n}"].dtype == np.uint8
    assert [row[f"enc{n}"] for n in range(3)] == sorted(row[f"enc{n}"] for n in range(3))  # JPEG bytes grow with R
    np.testing.assert_allclose(task.data_costs(), [3 * r * r * 4 for r in s.resolutions])  # d_n = 3 R^2 K
    gt = metrics.unpack_gt(row["gt"])
    valid = row["labels"] > 0
    assert set(row["labels"][valid]) <= set(synthetic.CATEGORY_IDS)  # COCO ids, not 0..C-1
    assert valid.sum() == (gt[:, 5] == 0).sum()
    assert (row["boxes"][valid] >= 0).all() and (row["boxes"][valid] <= 1).all()


def test_real_coco_samples(samples):
    """The real val2017 JSON with its 6 JPEGs: one JSON only, so a 60/20/20 split; COCO ids kept."""
    task = get_task("detection", "paper")
    root = samples / "coco"
    raw = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    listings = {split: task.list_sources(root, split) for split in ("train", "val", "test")}
    assert sum(len(lst.sources) for lst in listings.values()) == len(raw["images"]) == 6
    assert all(lst.sources for lst in listings.values())
    kept = [a for lst in listings.values() for s in lst.sources for a in s["anns"]]
    problems = [p for lst in listings.values() for p in lst.problems]
    assert len(kept) + len(problems) >= len(raw["annotations"])  # nothing silently lost
    assert {int(a[4]) for a in kept} == {a["category_id"] for a in raw["annotations"] if a["bbox"][2] > 0}
    assert any(a[5] == 1 for a in kept)  # iscrowd regions travel (COCOeval ignores them)

    source = listings["train"].sources[0]
    row = task.load(source)[0]
    assert row["image_id"] == source["image_id"] and (row["img_w"], row["img_h"]) == (source["width"], source["height"])
    assert row["x2"].shape == (300, 300, 3) and row["gate"].shape == (224, 224, 3)
    assert set(row["labels"][row["labels"] > 0]) <= {int(a[4]) for a in source["anns"]}

    # the demo's label set leaves out most real categories: each one named or counted
    small = get_task("detection", "smoke").list_sources(root, "train")
    assert any("outside this task's label set" in p for p in small.problems)


def test_bad_inputs_are_named_counted_and_the_rest_used(tree, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(tree, root)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    images = data["images"]
    (root / "train2017" / images[0]["file_name"]).unlink()  # listed, not on disk
    (root / "train2017" / images[1]["file_name"]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # unreadable
    target = [a for a in data["annotations"] if a["image_id"] == images[2]["id"]]
    target[0]["bbox"][2] = 0.0  # zero-area box
    target[-1]["bbox"] = [300.0, 200.0, 80.0, 80.0] if len(target) > 1 else target[-1]["bbox"]  # outside 320x240
    data["annotations"].append({"id": 999999, "image_id": 123456789, "bbox": [1, 1, 5, 5], "category_id": 37,
                                "area": 25, "iscrowd": 0})  # of an image that is not listed
    path.write_text(json.dumps(data))

    shutil.copy(path, root / "annotations" / "instances_minival2014.json")  # a second instances JSON: named once
    task = get_task("detection", "smoke")
    listing = task.list_sources(root, "train")
    text = "\n".join(listing.problems)
    assert "instances_minival2014.json: not read" in text
    assert not any("minival" in line for s in ("val", "test") for line in task.list_sources(root, s).problems)
    assert len(listing.sources) == 7
    assert images[0]["file_name"] in text and "not on disk" in text and "1 of 8 listed images" in text
    assert "zero-area box" in text and "annotation 999999" in text
    if len(target) > 1:
        assert "reaches outside" in text
    broken = next(s for s in listing.sources if s["image_id"] == images[1]["id"])
    with pytest.raises(BadInput, match=images[1]["file_name"]):
        task.load(broken)
    with pytest.raises(BadInput, match="instances"):
        task.list_sources(tmp_path / "nothing-here", "train")


def test_16_bit_gray_mpo_and_oversized_images_decode_as_in_every_image_task(tmp_path):
    """Detection reads (and serving decodes) 16-bit grayscale scaled, not clipped to white; an MPO
    as its first picture; an image past Pillow's decompression-bomb limit is a named bad image."""
    import struct
    import zlib

    from PIL import Image

    from tasks.images import decode_request_image

    gray8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))[:, :64]  # (48, 64), mean about 126
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # the same picture, 16 bits
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    eight, sixteen = (readers.load_image(tmp_path / f, 64, 48) for f in ("gray8.png", "gray16.png"))
    assert np.array_equal(eight, sixteen) and abs(sixteen.mean() - gray8.mean()) < 0.5
    assert np.array_equal(decode_request_image((tmp_path / "gray16.png").read_bytes()), eight)

    first = np.zeros((48, 64, 3), dtype=np.uint8)
    first[:, :32] = (200, 40, 40)
    second = np.full((48, 64, 3), 255, dtype=np.uint8)
    Image.fromarray(first).save(tmp_path / "camera.jpg", format="MPO", save_all=True,
                                append_images=[Image.fromarray(second)], quality=95)
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    picture = readers.load_image(tmp_path / "camera.jpg", 64, 48)
    assert np.abs(picture.astype(int) - first).mean() < 4  # the first picture, not the second
    assert np.array_equal(decode_request_image((tmp_path / "camera.jpg").read_bytes()), picture)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    huge = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))  # 400M pixels claimed
    (tmp_path / "huge.png").write_bytes(huge)
    with pytest.raises(readers.BadImage, match="huge.png.*DecompressionBomb"):
        readers.load_image(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(BadInput, match="more than"):
        decode_request_image(huge)


def test_problem_lines_are_capped_but_counted():
    problems = readers._Problems("instances_x.json", "train")
    for i in range(readers.LIMIT + 5):
        problems.add("missing", f"{i}.jpg: not on disk")
    lines = problems.finish()
    assert len(lines) == readers.LIMIT + 1 and "25 in all" in lines[-1]


def _jittered(gt: np.ndarray, rng, keep: float) -> np.ndarray:
    """Detections near the non-crowd ground truth (some dropped) plus a false positive."""
    rows = [[*(g[:4] + rng.normal(0, 2, 4)), rng.uniform(0.3, 1), g[4]]
            for g in gt if g[5] == 0 and rng.random() < keep]
    rows.append([5, 5, 20, 20, rng.uniform(0, 0.5), gt[0, 4] if len(gt) else 1])
    return np.array(rows, dtype=np.float32).reshape(-1, 6)


def test_pooled_cocoeval_equals_plain_cocoeval(samples, tree):
    """Per-image matches reused across assignments give exactly COCOeval's pooled numbers."""
    task = get_task("detection", "paper")
    sources = [s for root in (samples / "coco", tree) for split in ("train", "val", "test")
               for s in task.list_sources(root, split).sources]
    rng = np.random.default_rng(0)
    gts = [np.asarray(s["anns"], dtype=np.float64).reshape(-1, 7) for s in sources]
    cache = pd.DataFrame({"image_id": [s["image_id"] for s in sources], "img_w": [s["width"] for s in sources],
                          "img_h": [s["height"] for s in sources], "gt": [metrics.pack(g, np.float64) for g in gts]})
    for n, keep in enumerate((0.3, 0.6, 0.95)):
        cache[f"dets_{n}"] = [metrics.pack(_jittered(g, rng, keep), np.float32) for g in gts]
    ground = metrics.coco_from_rows(cache["image_id"], list(zip(cache["img_w"], cache["img_h"])), gts)
    for seed in range(3):
        assignment = np.random.default_rng(seed).integers(0, 3, len(cache))
        pooled = task.metric(cache, assignment)
        results = [{"image_id": int(cache["image_id"][i]), "bbox": [float(v) for v in r[:4]], "score": float(r[4]),
                    "category_id": int(r[5])}
                   for i, n in enumerate(assignment) for r in metrics.unpack_dets(cache[f"dets_{n}"][i])]
        plain = metrics.coco_map(ground, results)
        assert pooled["performance"] == pytest.approx(plain["map50"], abs=1e-12)  # AP@0.5, as the paper scores
        assert pooled["map_50_95"] == pytest.approx(plain["map"], abs=1e-12)
        assert 0 < plain["map"] < 1
    best = [task.metric(cache, np.full(len(cache), n))["performance"] for n in range(3)]
    assert best[0] < best[1] < best[2]  # more boxes found, higher mAP


def test_expert_per_image_loss_and_detections(tree, one_thread):
    task = get_task("detection", "smoke")
    rows = [r for s in task.list_sources(tree, "train").sources[:3] for r in task.load(s)]
    n = 2
    batch = {"x": np.stack([r[f"x{n}"] for r in rows]), "boxes": np.stack([r["boxes"] for r in rows]),
             "labels": np.stack([r["labels"] for r in rows]), "gt": np.array([r["gt"] for r in rows], dtype=object),
             "img_w": np.array([r["img_w"] for r in rows]), "img_h": np.array([r["img_h"] for r in rows]),
             "image_id": np.array([r["image_id"] for r in rows])}
    torch.manual_seed(0)
    model = task.build_expert(n).eval()
    with torch.no_grad():
        out = task.evaluate(n, model, batch, torch.device("cpu"))
    assert set(out) >= {"loss", "score", "dets"} and len(out["dets"]) == 3
    # each image's loss is its own (as a batch of one), whatever else is in the batch
    with torch.no_grad():
        images, targets = task._inputs(n, {k: torch.as_tensor(batch[k][1:2]) for k in ("x", "boxes", "labels")},
                                       flip=False)
        alone, _ = models.losses_and_detections(model, images, targets)
    assert float(alone[0]) == pytest.approx(float(out["loss"][1]), rel=1e-4)
    for blob in out["dets"]:
        dets = metrics.unpack_dets(blob)
        assert set(dets[:, 5].astype(int)) <= set(synthetic.CATEGORY_IDS)  # COCO ids
        assert (dets[:, 0] >= -1e-3).all() and (dets[:, 0] + dets[:, 2] <= 320 + 1e-3).all()  # image pixels


def test_paper_expert_upsamples_a_small_input_server_side():
    """ssd300_vgg16 (weights=None) takes a 100 px P_n: its own transform resizes it to 300
    after transmission, and maps detections back to the transmitted 100 px frame."""
    model = models.build_detector("vgg16", 81, 100).eval()
    assert models.input_size("vgg16", 100) == 300
    batch, _ = model.transform([torch.rand(3, 100, 100)])
    assert tuple(batch.tensors.shape) == (1, 3, 300, 300)
    back = model.transform.postprocess([{"boxes": torch.tensor([[30.0, 60.0, 150.0, 300.0]])}], batch.image_sizes,
                                       [(100, 100)])
    np.testing.assert_allclose(back[0]["boxes"].numpy(), [[10.0, 20.0, 50.0, 100.0]], rtol=1e-5)
    resnet = models.build_detector("resnet50", 81, 150)
    assert resnet.transform.fixed_size == (300, 300) and sum(p.numel() for p in resnet.parameters()) > 1e7


def test_gate_is_table_iv_on_the_centre_crop():
    paper = get_task("detection", "paper")
    spec = paper.gate_spec()
    assert spec.in_size == (224, 224) and spec.n_experts == 3
    macs = count_macs(build_gate(spec), spec.input_shape)
    assert 2e7 < macs < 1e8  # Table IV: C_g < 1e8
    smoke = get_task("detection", "smoke")
    gate = np.random.default_rng(0).integers(0, 255, (4, 48, 48, 3), dtype=np.uint8)
    assert build_gate(smoke.gate_spec(), 0.25)(smoke.gate_tensor(gate)).shape == (4, 3)
    assert smoke.heuristic(gate).shape == (4,)


def test_options_and_profiles():
    task = get_task("detection", "demo", {"resolutions": "40,60,120", "categories": "coco"})
    assert task.settings.resolutions == (40, 60, 120) and len(task.settings.categories) == 80
    with pytest.raises(ValueError, match="unknown detection option"):
        get_task("detection", "demo", {"resolution": "1"})
    with pytest.raises(ValueError, match="unknown detection model"):
        get_task("detection", "demo", {"model": "yolo"})


# -- a data root in an object store (moto S3 on 127.0.0.1) ------------------------------------------


def test_coco_tree_in_s3_gives_the_same_samples_and_an_unreadable_object_is_named(
        tree, tmp_path, s3_bucket, s3_requests):
    import socket

    from storage import upload_tree
    from tasks import UnreadableInput

    local = tmp_path / "coco"
    shutil.copytree(tree, local)
    data = json.loads((local / "annotations" / "instances_val2017.json").read_text())
    gone = data["images"][0]["file_name"]
    (local / "val2017" / gone).unlink()  # listed, not on disk: named and counted on both sides
    remote = s3_bucket / "coco"
    upload_tree(local, remote)

    task = get_task("detection", "smoke")
    for split in ("train", "val", "test"):
        ours, theirs = assert_same_listing(task, local, remote, split, s3_requests, (".jpg",))
        for a, b in list(zip(ours.sources, theirs.sources))[:3]:  # decoding: a few per split (time)
            assert_same_rows(task.load(a), task.load(b))
    problems = task.list_sources(remote, "val").problems + task.list_sources(remote, "test").problems
    assert any(gone in p and "not on disk" in p for p in problems)
    assert any("1 of" in p and "listed images are not under s3://" in p for p in problems)

    source = task.list_sources(remote, "train").sources[0]
    (remote / "train2017" / source["path"].rsplit("/", 1)[1]).unlink()  # gone before a worker reads it
    with pytest.raises(UnreadableInput) as err:
        task.load(source)
    assert str(err.value).startswith(f"{source['path']}: cannot be read on node {socket.gethostname()} (")
    assert "\n" not in str(err.value)
    (remote / "annotations" / "instances_train2017.json").write_bytes(b"{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        task.list_sources(remote, "train")


def test_a_data_roots_label_set_comes_from_its_instances_json(tree, tmp_path):
    from pipelines.runtime import label_options

    root = tmp_path / "coco"
    shutil.copytree(tree, root)
    for path in (root / "annotations").glob("instances_*.json"):  # COCO's files declare the same categories
        data = json.loads(path.read_text())
        data["categories"].append({"id": 90, "name": "toothbrush", "supercategory": "indoor"})
        path.write_text(json.dumps(data))  # the smaller is read
    wanted = sorted([*synthetic.CATEGORY_IDS, 90])
    assert label_options("detection", "smoke", str(root)) == {"categories": ",".join(map(str, wanted))}
    task = get_task("detection", "smoke", label_options("detection", "smoke", str(root)))
    assert task.settings.categories == tuple(wanted)
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    assert label_options("detection", "smoke", str(root)) == {}  # prepare names what is wrong with it

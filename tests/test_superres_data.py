"""Super-resolution data and model pieces: readers on real and hand-made files, patches, LR,
byte counts, the experts' shapes, the data property the mixture relies on, and pooled PSNR."""

from __future__ import annotations

import math
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_same_listing, assert_same_rows
from tasks import UnreadableInput
from tasks.superres.metrics import (
    PSNR_CAP_DB,
    image_psnr,
    mean_image_psnr,
    patch_errors,
    per_image_psnr,
    rgb_to_y,
)
from tasks.superres.models import build_expert
from tasks.superres.patches import (
    data_cost_bytes,
    downscale,
    from_patches,
    lr_side,
    png_bytes,
    sent_bytes,
    sent_values,
    to_patches,
    upscale_bicubic,
)
from tasks.superres.readers import BadDataRoot, BadImage, _name_hash, find_images, load_rgb
from tasks.superres.synthetic import (
    PHOTO_SPLITS,
    embedded_images,
    fill_region,
    procedural_image,
    write_div2k_tree,
    write_png_folder,
)

SET5 = Path(__file__).resolve().parents[2] / "shared" / "samples" / "set5"
SPLITS = ("train", "val", "test")


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _png16_rgb(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


# -- readers: real Set5 files ----------------------------------------------------------------------


def test_set5_real_files_split_and_load():
    if not SET5.is_dir():
        pytest.skip(f"real Set5 sample files not found at {SET5}")
    listings = {split: find_images(SET5, split) for split in SPLITS}
    names = [p.name for split in SPLITS for p in listings[split].paths]
    assert sorted(names) == sorted(p.name for p in (SET5 / "HR").glob("*.png"))  # each once
    assert all(listings[s].paths for s in SPLITS), "5 images: every split gets one"
    assert all(listing.layout == "folder" and listing.root == SET5 / "HR" for listing in listings.values())
    assert set(listings["train"].lr_dirs) == {2, 3, 4}
    assert listings["train"].problems == []
    for path in listings["val"].paths + listings["test"].paths:
        img = load_rgb(path)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 64
        # our PIL bicubic LR reproduces the benchmark's own (MATLAB-style) LR images
        for scale in (2, 4):
            theirs = load_rgb(SET5 / f"X{scale}" / path.name, min_side=1)
            ours = downscale(img, scale)
            assert ours.shape == theirs.shape
            assert np.abs(ours.astype(int) - theirs).mean() < 1.0


# -- readers: DIV2K layout and plain folders ------------------------------------------------------


def test_div2k_layout_splits(tmp_path):
    for i in (1, 2, 3):
        _save(tmp_path / "DIV2K_train_HR" / f"{i:04d}.png", _noise(64, 80, i))
        _save(tmp_path / "DIV2K_train_LR_bicubic" / "X2" / f"{i:04d}x2.png", _noise(32, 40, i))
        _save(tmp_path / "DIV2K_train_LR_bicubic" / "X4" / f"{i:04d}x4.png", _noise(16, 20, i))
    for i in range(801, 806):
        _save(tmp_path / "DIV2K_valid_HR" / f"{i:04d}.png", _noise(64, 64, i))
    (tmp_path / "DIV2K_train_HR" / "readme.txt").write_text("not an image")  # ignored silently
    _save(tmp_path / "DIV2K_train_HR" / "0004.bmp", _noise(64, 64))  # maybe an image: reported

    train = find_images(tmp_path, "train")
    assert train.layout == "div2k"
    assert [p.name for p in train.paths] == ["0001.png", "0002.png", "0003.png"]
    assert set(train.lr_dirs) == {2, 4}
    assert len(train.problems) == 1 and "0004.bmp" in train.problems[0]
    val, test = find_images(tmp_path, "val"), find_images(tmp_path, "test")
    assert [p.name for p in val.paths] == ["0801.png", "0802.png", "0803.png"]  # ceil(5 / 2)
    assert [p.name for p in test.paths] == ["0804.png", "0805.png"]
    assert val.lr_dirs == {} and val.problems == []
    with pytest.raises(ValueError, match="unknown split"):
        find_images(tmp_path, "dev")


def test_div2k_train_only_is_split_by_name_hash_and_says_so(tmp_path):
    for i in range(1, 11):
        _save(tmp_path / "DIV2K_train_HR" / f"{i:04d}.png", _noise(64, 64, i))
    listings = {split: find_images(tmp_path, split) for split in SPLITS}
    assert all(listing.paths and listing.layout == "div2k" for listing in listings.values())
    names = [p.name for listing in listings.values() for p in listing.paths]
    assert sorted(names) == [f"{i:04d}.png" for i in range(1, 11)]  # each image in exactly one split
    assert "DIV2K_valid_HR is missing" in listings["train"].problems[0] and "by a hash" in listings["train"].problems[0]
    assert listings["val"].problems == listings["test"].problems == []  # said once


def test_hidden_files_subfolders_and_images_beside_hr_are_named_once(tmp_path):
    for i in range(6):
        _save(tmp_path / "HR" / f"{i}.png", _noise(64, 64, i))
    _save(tmp_path / "HR" / "extra" / "deep.png", _noise(64, 64))  # a subfolder of the image folder
    (tmp_path / "HR" / ".DS_Store").write_bytes(b"\x00")
    _save(tmp_path / "HR" / ".hidden.png", _noise(64, 64))
    _save(tmp_path / "beside.png", _noise(64, 64))  # next to HR/: not an HR image
    _save(tmp_path / "HR" / "scan.tif", _noise(64, 64))
    listings = {split: find_images(tmp_path, split) for split in SPLITS}
    text = "\n".join(line for listing in listings.values() for line in listing.problems)
    assert sum(len(listing.paths) for listing in listings.values()) == 6
    assert "extra: a subfolder, not read" in text
    assert "2 hidden file(s) or folder(s) skipped: .DS_Store, .hidden.png" in text
    assert "1 image(s) beside HR/ not read" in text and "beside.png" in text
    assert text.count("scan.tif") == 1  # once, not once per split


def test_plain_folder_hash_split_gives_every_split_an_image(tmp_path):
    # three names whose hashes all fall in the train band: the repair must still fill val and test
    names = [n for n in (f"img{i}.png" for i in range(200)) if _name_hash(n) < 0.6][:3]
    for name in names:
        _save(tmp_path / name, _noise(64, 64))
    splits = {s: [p.name for p in find_images(tmp_path, s).paths] for s in SPLITS}
    assert all(len(splits[s]) == 1 for s in SPLITS)
    assert sorted(sum(splits.values(), [])) == sorted(names)
    assert splits == {s: [p.name for p in find_images(tmp_path, s).paths] for s in SPLITS}  # stable


def test_split_folders_layout(tmp_path):
    _save(tmp_path / "train" / "a.png", _noise(64, 64))
    _save(tmp_path / "train" / "b.jpg", _noise(64, 64))
    _save(tmp_path / "valid" / "HR" / "c.png", _noise(64, 64))
    (tmp_path / "valid" / "X4").mkdir()
    assert [p.name for p in find_images(tmp_path, "train").paths] == ["a.png", "b.jpg"]
    val = find_images(tmp_path, "val")
    assert [p.name for p in val.paths] == ["c.png"] and set(val.lr_dirs) == {4}
    test = find_images(tmp_path, "test")
    assert test.paths == [] and "no test/ folder" in test.problems[0]


def test_plain_folder_errors(tmp_path):
    with pytest.raises(BadDataRoot, match="not a folder"):
        find_images(tmp_path / "missing", "train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadDataRoot, match="no .png/.jpg/.jpeg images"):
        find_images(tmp_path, "train")


# -- load_rgb: modes and refusals -----------------------------------------------------------------


def test_load_rgb_converts_modes(tmp_path):
    gray = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    img = load_rgb(_save(tmp_path / "gray.png", gray))
    assert img.shape == (64, 64, 3) and (img == gray[:, :, None]).all()

    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 128)
    rgba[0, 0] = (255, 255, 255, 0)  # fully transparent: black, whatever colour hides under it
    img = load_rgb(_save(tmp_path / "rgba.png", rgba))
    assert tuple(img[1, 1]) == (100, 50, 25) and tuple(img[0, 0]) == (0, 0, 0)

    la = np.zeros((64, 64, 2), dtype=np.uint8)
    la[...] = (200, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (load_rgb(tmp_path / "la.png") == 200).all()

    Image.fromarray(_noise(64, 64)).convert("P").save(tmp_path / "palette.png")
    assert load_rgb(tmp_path / "palette.png").shape == (64, 64, 3)

    jpeg = load_rgb(_save(tmp_path / "photo.jpg", _noise(70, 90)))
    assert jpeg.shape == (70, 90, 3)


def test_load_rgb_scales_16_bit(tmp_path):
    gray16 = np.zeros((64, 64), dtype=np.uint16)
    gray16[0, :3] = (0, 32768, 65535)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    img = load_rgb(tmp_path / "gray16.png")
    assert img.dtype == np.uint8 and [tuple(v) for v in img[0, :3]] == [(0,) * 3, (128,) * 3, (255,) * 3]

    rgb16 = np.zeros((64, 64, 3), dtype=np.uint16)
    rgb16[0, 0] = (65535, 256 * 100, 0)
    img = load_rgb(_png16_rgb(tmp_path / "rgb16.png", rgb16))
    assert tuple(img[0, 0]) == (255, 100, 0) and img.dtype == np.uint8


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


def test_load_rgb_refuses_bad_files(tmp_path):
    good = _save(tmp_path / "good.png", _noise(128, 128))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadImage) as err:
        load_rgb(truncated)
    _one_line_naming(err, truncated)

    text = tmp_path / "text.png"
    text.write_text("this is not a PNG\n")
    with pytest.raises(BadImage) as err:
        load_rgb(text)
    assert "not a readable PNG/JPEG" in _one_line_naming(err, text)

    small = _save(tmp_path / "small.png", _noise(40, 200))
    with pytest.raises(BadImage) as err:
        load_rgb(small)
    assert "smaller than one 64x64 patch" in _one_line_naming(err, small)

    # a file this node cannot read is not a bad image: UnreadableInput, naming the file and the node
    with pytest.raises(UnreadableInput) as err:
        load_rgb(tmp_path / "missing.png")
    message = _one_line_naming(err, tmp_path / "missing.png")
    assert not isinstance(err.value, BadImage) and f"on node {socket.gethostname()}" in message


# -- patches, LR, bytes --------------------------------------------------------------------------


def test_patches_round_trip():
    img = _noise(200, 300)
    patches, positions = to_patches(img)
    assert patches.shape == (3 * 4, 64, 64, 3) and patches.dtype == np.uint8
    assert positions.tolist()[:5] == [[0, 0], [0, 64], [0, 128], [0, 192], [64, 0]]
    assert (patches[5] == img[64:128, 64:128]).all()
    back = from_patches(patches, positions, (192, 256, 3))
    assert (back == img[:192, :256]).all()


@pytest.mark.parametrize(("scale", "side"), [(2, 32), (3, 21), (4, 16)])
def test_downscale_shapes_and_costs(scale, side):
    patch = _noise(64, 64)
    assert lr_side(scale) == side
    assert downscale(patch, scale).shape == (side, side, 3)
    batch = downscale(np.stack([patch, patch]), scale)
    assert batch.shape == (2, side, side, 3) and batch.dtype == np.uint8
    assert upscale_bicubic(batch).shape == (2, 64, 64, 3)
    assert data_cost_bytes(scale) == pytest.approx((64 / scale) ** 2 * 3 * 4)
    assert sent_values(scale) == side * side * 3 and sent_bytes(scale, K=1) == side * side * 3
    assert data_cost_bytes(4) == 3072.0 and sent_values(3) == 1323


def test_png_bytes_smaller_for_flat_than_noise():
    flat = np.full((64, 64, 3), 120, dtype=np.uint8)
    assert png_bytes(flat) < png_bytes(_noise(64, 64)) / 10


# -- experts ----------------------------------------------------------------------------------------



@pytest.mark.parametrize("kind", ["espcn", "fsrcnn"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_experts_output_64(kind, scale, one_thread):
    torch.manual_seed(0)
    model = build_expert(kind, scale, width=0.25)
    x = torch.rand(2, 3, lr_side(scale), lr_side(scale))  # (B, 3, h, w)
    y = model(x)
    assert y.shape == (2, 3, 64, 64)
    # residual to bicubic with a near-zero last layer: an untrained expert starts at bicubic
    bicubic = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)
    assert (y - bicubic).abs().mean() < 0.02


def test_expert_full_size_and_unknown_kind():
    model = build_expert("espcn", 2, out_size=None)
    assert model(torch.rand(1, 3, 10, 12)).shape == (1, 3, 20, 24)
    with pytest.raises(ValueError, match="unknown super-resolution expert 'srcnn'"):
        build_expert("srcnn", 2)


@pytest.mark.parametrize("kind", ["espcn", "fsrcnn"])
def test_experts_learn_from_scratch(kind, one_thread):
    rng = np.random.default_rng(1)
    hr = np.stack([fill_region(k, rng, 64, 64) for k in ("stripes", "shapes", "glyphs", "noise")])
    hr_t = torch.from_numpy(hr).permute(0, 3, 1, 2).float() / 255.0  # (4, 3, 64, 64)
    lr_t = torch.from_numpy(downscale(hr, 4)).permute(0, 3, 1, 2).float() / 255.0  # (4, 3, 16, 16)
    torch.manual_seed(0)
    model = build_expert(kind, 4, width=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(lr_t), hr_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0]  # better than the bicubic it starts from


# -- the data property ------------------------------------------------------------------------------


def _bicubic_mse(patches: np.ndarray, scale: int) -> np.ndarray:
    """(P,) per-patch MSE of bicubic down-then-up at `scale`."""
    sr = upscale_bicubic(downscale(patches, scale)).astype(np.float64)
    return ((sr - patches) ** 2).mean(axis=(1, 2, 3))


def test_flat_patches_need_less_resolution_than_textured():
    rng = np.random.default_rng(0)
    flat = np.stack([fill_region(k, rng, 64, 64) for k in ("flat", "gradient", "lowfreq")])
    textured = np.stack([fill_region(k, rng, 64, 64) for k in ("stripes", "noise", "checker", "glyphs")])
    assert _bicubic_mse(flat, 4).max() < 0.05 * _bicubic_mse(textured, 4).min()
    assert (_bicubic_mse(textured, 2) < 0.8 * _bicubic_mse(textured, 4)).all()  # x2 pays off there
    assert _bicubic_mse(flat, 4).max() - _bicubic_mse(flat, 2).min() < 1.0  # ...and not here

    # whole procedural canvases: a good share of near-flat patches, and difficulty spanning
    # orders of magnitude
    patches = np.concatenate([to_patches(procedural_image(np.random.default_rng(s)))[0] for s in range(4)])
    errors = _bicubic_mse(patches, 4)
    assert 0.15 < (errors < 5.0).mean() < 0.7
    assert np.percentile(errors, 10) < 0.01 * np.percentile(errors, 90)


def test_embedded_images_sizes_splits_and_folders(tmp_path):
    splits = {s: embedded_images(s, n_procedural=2, seed=0, max_side=128) for s in SPLITS}
    for split, images in splits.items():
        ids = [image_id for image_id, _ in images]
        assert len(ids) == len(set(ids))
        assert {f"skimage-{n}" for n in PHOTO_SPLITS[split]} & set(ids), f"no photos loaded for {split}"
        for _, img in images:
            assert img.dtype == np.uint8 and img.shape[2] == 3
            assert img.shape[0] % 64 == 0 and img.shape[1] % 64 == 0 and max(img.shape[:2]) <= 128
    again = embedded_images("val", n_procedural=3, seed=0, max_side=128)
    assert all((a[1] == b[1]).all() for a, b in zip(splits["val"], again))  # seeded per (seed, split, i)

    paths = write_png_folder(splits["test"], tmp_path / "flat")
    assert (load_rgb(paths[0]) == splits["test"][0][1]).all()

    for split, images in splits.items():  # split folders: train/ val/ test/ read back as they are
        write_png_folder(images, tmp_path / "splits" / split)
    for split in SPLITS:
        listing = find_images(tmp_path / "splits", split)
        assert listing.layout == "splits" and listing.problems == []
        assert [p.stem for p in listing.paths] == sorted(image_id for image_id, _ in splits[split])

    splits["val"], splits["test"] = splits["val"][:4], splits["test"][:4]
    root = write_div2k_tree(tmp_path / "div2k", splits)
    for split in SPLITS:
        read = [p.stem.split("_", 1)[1] for p in find_images(root, split).paths]
        assert read == [image_id for image_id, _ in splits[split]]


# -- metrics ----------------------------------------------------------------------------------------


def test_rgb_to_y_matches_matlab_range():
    assert rgb_to_y(np.array([0.0, 0.0, 0.0])) == pytest.approx(16.0)
    assert rgb_to_y(np.array([255.0, 255.0, 255.0])) == pytest.approx(235.0)
    assert rgb_to_y(np.array([255.0, 0.0, 0.0])) == pytest.approx(16 + 65.481)


def test_psnr_pools_before_the_log():
    assert image_psnr(0.0, 10) == PSNR_CAP_DB
    assert image_psnr(255.0**2 * 10, 10) == pytest.approx(0.0)
    assert math.isnan(image_psnr(0.0, 0))
    # image "a": one perfect patch and one with MSE 255^2 -> pooled MSE 255^2 / 2 -> 3.0103 dB
    # (per-patch PSNR averaged would claim (100 + 0) / 2 = 50 dB); image "b": MSE 255^2 / 100 -> 20 dB
    ids = np.array(["a", "a", "b"])
    sse = np.array([0.0, 255.0**2 * 10, 255.0**2 / 100 * 20])
    count = np.array([10, 10, 20])
    per_image = per_image_psnr(ids, sse, count)
    assert per_image["a"] == pytest.approx(10 * math.log10(2))
    assert per_image["b"] == pytest.approx(20.0)
    assert mean_image_psnr(ids, sse, count) == pytest.approx((10 * math.log10(2) + 20.0) / 2)


def test_border_mask_counts_by_hand():
    hr = np.full((6, 64, 64, 3), 100.0)
    positions = np.array([[0, 0], [0, 64], [0, 128], [64, 0], [64, 64], [64, 128]])
    shape = (128, 192)  # a 2 x 3 grid of patches
    sr = hr.copy()
    sr[:, 0, 0] = 0.0  # an error on each patch's top-left pixel
    errors = patch_errors(sr, hr, positions, shape, scale=2)
    assert errors.count_y.tolist() == [62 * 62, 62 * 64, 62 * 62] * 2
    assert errors.count_rgb.tolist() == [3 * c for c in errors.count_y]
    # the top-left pixel lies in the image border only for the image's top row/left column patches
    y_err = (rgb_to_y(np.array([100.0] * 3)) - 16.0) ** 2
    assert errors.sse_y.tolist() == pytest.approx([0, 0, 0, 0, y_err, y_err])
    assert errors.sse_rgb.tolist() == pytest.approx([0, 0, 0, 0, 3 * 100.0**2, 3 * 100.0**2])
    assert patch_errors(sr, hr, positions, shape, scale=3).count_y[0] == 61 * 61


# -- a data root in an object store (moto S3 on 127.0.0.1) ------------------------------------------


def test_div2k_tree_in_s3_gives_the_same_samples_and_an_unreadable_object_is_named(
        tmp_path, s3_bucket, s3_requests):
    from storage import upload_tree
    from tasks import BadInput, UnreadableInput, get_task

    local = tmp_path / "DIV2K"
    for i in (1, 2):
        _save(local / "DIV2K_train_HR" / f"{i:04d}.png", _noise(64, 128, i))
        _save(local / "DIV2K_train_LR_bicubic" / "X2" / f"{i:04d}x2.png", _noise(32, 64, i))
    for i in range(801, 805):
        _save(local / "DIV2K_valid_HR" / f"{i:04d}.png", _noise(64, 64, i))
    _save(local / "DIV2K_train_HR" / "0003.bmp", _noise(64, 64))  # maybe an image: a problem line
    remote = s3_bucket / "DIV2K"
    assert upload_tree(local, remote) == 9

    task = get_task("superres", "smoke")
    for split in SPLITS:
        ours, theirs = assert_same_listing(task, local, remote, split, s3_requests, (".png", ".bmp"))
        for a, b in zip(ours.sources, theirs.sources):
            assert_same_rows(task.load(a), task.load(b))
    listing = find_images(remote, "train")
    assert listing.layout == "div2k" and set(listing.lr_dirs) == {2} and listing.problems[0].endswith(
        "convert it to PNG to use it") and "s3://" in listing.problems[0]

    source = task.list_sources(remote, "val").sources[0]
    (remote / "DIV2K_valid_HR" / "0801.png").unlink()  # listed, then gone before a worker reads it
    with pytest.raises(UnreadableInput) as err:
        task.load(source)
    assert str(err.value).startswith(f"{remote}/DIV2K_valid_HR/0801.png: cannot be read on node "
                                     f"{socket.gethostname()} (") and "\n" not in str(err.value)
    (remote / "DIV2K_valid_HR" / "0802.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # read fine, bad content
    with pytest.raises(BadInput, match="not a readable PNG/JPEG") as err:
        task.load(task.list_sources(remote, "val").sources[0])
    assert not isinstance(err.value, UnreadableInput)

"""Images as people have them: odd modes, nested folders, broken files."""

import numpy as np
import pytest
import torch
from PIL import Image

from phreg.data.images import EpochSampler, ImageDataset, collate, load_rgb
from phreg.data.scan import embedded_photos, scan_images
from phreg.errors import UsageError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    files = {
        "L": save(Image.fromarray(gray, "L"), tmp_path / "l.png"),
        "P": save(Image.fromarray(gray, "L").convert("P"), tmp_path / "p.bmp"),
        "RGBA": save(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), tmp_path / "rgba.png"),  # transparent -> white
        "CMYK": save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), tmp_path / "cmyk.tif"),
        "I;16": save(Image.fromarray(gray.astype(np.uint16) * 257), tmp_path / "deep.png"),
        "1": save(Image.fromarray(gray > 127).convert("1"), tmp_path / "bw.png"),
        "webp": save(Image.new("RGB", (64, 64), (10, 200, 30)), tmp_path / "x.webp"),
    }
    out = {k: np.asarray(load_rgb(p)) for k, p in files.items()}
    assert all(a.shape == (64, 64, 3) and a.dtype == np.uint8 for a in out.values())
    np.testing.assert_array_equal(out["L"][..., 0], gray)
    np.testing.assert_array_equal(out["P"][..., 1], gray)
    assert (out["RGBA"] == 255).all()
    assert out["CMYK"][0, 0].tolist() == [255, 0, 0]
    np.testing.assert_allclose(out["I;16"][..., 2].astype(int), gray.astype(int), atol=1)  # 16-bit scaled, not clipped
    assert set(np.unique(out["1"])) == {0, 255}


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    save(img, tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_scan_is_recursive_and_sorts_out_broken_files(tmp_path):
    good = [save(Image.new("RGB", (30, 30)), tmp_path / d / f"{i}.jpg") for i, d in enumerate(["a", "a/b", "c"])]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    usable, bad = scan_images(tmp_path)
    assert usable == sorted(good) and [p.name for p in bad] == ["broken.png"]


def test_empty_and_all_broken_folders_are_errors(tmp_path):
    with pytest.raises(UsageError, match="no image files"):
        scan_images(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"nope")
    (tmp_path / "y.png").write_bytes(b"")
    with pytest.raises(UsageError, match="no usable image .* all 2 image files are unreadable"):
        scan_images(tmp_path)
    with pytest.raises(UsageError, match="not found"):
        scan_images(tmp_path / "missing")


def test_truncated_file_is_replaced_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    a = save(noisy, tmp_path / "a.jpg", quality=95)
    save(Image.new("RGB", (64, 64), (0, 255, 0)), tmp_path / "b.png")
    a.write_bytes(a.read_bytes()[: len(a.read_bytes()) // 2])  # header fine, data cut: only decoding fails
    usable, bad = scan_images(tmp_path)
    assert len(usable) == 2 and not bad
    data = ImageDataset(usable, 32, MEAN, STD)
    sample = data[(0, 0)]
    assert sample["bad"] == [str(a)]
    assert sample["pixels"][:, 0, 0].tolist() == [0, 255, 0]  # the next usable image took its place
    batch = collate([data[(0, 0)], data[(0, 1)]])
    assert batch["pixels"].shape == (2, 3, 32, 32) and batch["pixels"].dtype == torch.uint8
    assert batch["bad"] == [str(a)]
    green = (torch.tensor([0.0, 1.0, 0.0]) - 0.5) / 0.25
    torch.testing.assert_close(data.normalize(batch["pixels"])[0, :, 0, 0], green)


def test_crops_are_a_function_of_seed_epoch_index():
    files, _ = scan_images(None)
    data = ImageDataset(files, 112, MEAN, STD, seed=1)
    a, b, c = data[(0, 2)]["pixels"], data[(0, 2)]["pixels"], data[(1, 2)]["pixels"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    center = ImageDataset(files, 112, MEAN, STD, train=False)
    assert torch.equal(center[(0, 2)]["pixels"], center[(5, 2)]["pixels"])
    assert a.shape == (3, 112, 112)


def test_sampler_order_depends_on_epoch_only():
    s = EpochSampler(10, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(i for _, i in first) == list(range(10)) and {e for e, _ in second} == {1}
    assert [i for _, i in first] != [i for _, i in second]
    s.set_epoch(0)
    assert list(s) == first


def test_embedded_photos_ship_with_the_package():
    files, bad = scan_images(embedded_photos())
    assert len(files) == 4 and not bad

"""ctprune.train.data: .npz files, image folders, synthetic inputs, and one DataError per kind of bad data."""

import numpy as np
import pytest
from PIL import Image

from ctprune.errors import DataError
from ctprune.train.data import load_data, synthetic_data

SHAPE = ("batch", 1, 6, 5)


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 1, 6, 5), dtype=np.float32)
    y = rng.integers(0, 3, 7)
    data = load_data(_npz(tmp_path, x=x, y=y), SHAPE, num_classes=3)
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)
    assert data.y.dtype == np.int64 and len(data) == 7 and not data.synthetic


def test_npz_without_labels(tmp_path):
    x = np.zeros((3, 1, 6, 5), np.float32)
    data = load_data(_npz(tmp_path, x=x), [None, 1, 6, 5])
    assert data.y is None and not data.has_labels


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope.npz", SHAPE)


def test_no_x(tmp_path):
    with pytest.raises(DataError, match=r"no array named 'x' \(found: inputs\)"):
        load_data(_npz(tmp_path, inputs=np.zeros((2, 1, 6, 5), np.float32)), SHAPE)


def test_shape_mismatch_names_both_shapes(tmp_path):
    with pytest.raises(DataError) as err:
        load_data(_npz(tmp_path, x=np.zeros((4, 1, 5, 6), np.float32)), SHAPE)
    assert "(4, 1, 5, 6)" in str(err.value) and "(?, 1, 6, 5)" in str(err.value)


def test_labels_out_of_range(tmp_path):
    x = np.zeros((3, 1, 6, 5), np.float32)
    with pytest.raises(DataError) as err:
        load_data(_npz(tmp_path, x=x, y=np.array([0, 4, 10])), SHAPE, num_classes=10)
    assert "0 to 10" in str(err.value) and "10 classes" in str(err.value)
    with pytest.raises(DataError, match="-1 to 1"):
        load_data(_npz(tmp_path, x=x, y=np.array([0, 1, -1])), SHAPE, num_classes=10)


def test_wrong_dtypes(tmp_path):
    with pytest.raises(DataError, match="dtype uint8; expected float32"):
        load_data(_npz(tmp_path, x=np.zeros((2, 1, 6, 5), np.uint8)), SHAPE)
    x = np.zeros((2, 1, 6, 5), np.float32)
    with pytest.raises(DataError, match="labels 'y' have dtype float64"):
        load_data(_npz(tmp_path, x=x, y=np.array([0.0, 1.0])), SHAPE, num_classes=2)


def test_label_count_mismatch(tmp_path):
    x = np.zeros((3, 1, 6, 5), np.float32)
    with pytest.raises(DataError, match="3 samples but 'y' holds 2"):
        load_data(_npz(tmp_path, x=x, y=np.array([0, 1])), SHAPE)


def test_not_an_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_data(path, SHAPE)


def _image_folder(tmp_path, mode, sizes):
    rng = np.random.default_rng(1)
    expected = {}
    for cls in ("b_cat", "a_dog"):
        (tmp_path / cls).mkdir()
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
            Image.fromarray(arr, mode).save(tmp_path / cls / f"{i}.png")
            expected[(cls, i)] = arr
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    return expected


def test_image_folder_nchw_gray(tmp_path):
    pixels = _image_folder(tmp_path, "L", [(5, 6), (5, 6)])
    data = load_data(tmp_path, SHAPE, num_classes=2, mean=[0.5], std=[0.25])
    assert data.x.shape == (4, 1, 6, 5) and data.x.dtype == np.float32
    np.testing.assert_array_equal(data.y, [0, 0, 1, 1])  # sorted class names: a_dog=0, b_cat=1
    want = (pixels[("a_dog", 1)].astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(data.x[1, 0], want, rtol=1e-6)


def test_image_folder_nhwc_rgb_resized(tmp_path):
    _image_folder(tmp_path, "RGB", [(9, 7), (4, 4)])
    data = load_data(tmp_path, ["N", 8, 8, 3], input_size=(8, 8), mean=[0.1, 0.2, 0.3], std=0.5)
    assert data.x.shape == (4, 8, 8, 3)
    assert abs(float(data.x[..., 2].min()) - (0 - 0.3) / 0.5) < 0.5


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(tmp_path, SHAPE)
    _image_folder(tmp_path, "L", [(5, 6)])
    with pytest.raises(DataError, match="2 class folders, but the model has 1 classes"):
        load_data(tmp_path, SHAPE, num_classes=1)
    with pytest.raises(DataError, match="--mean has 2 values; the model input has 1 channels"):
        load_data(tmp_path, SHAPE, mean=[0.1, 0.2])
    with pytest.raises(DataError, match="give --input-size"):
        load_data(tmp_path, ["N", 1, "h", "w"])
    with pytest.raises(DataError, match="does not fit"):
        load_data(tmp_path, SHAPE, input_size=(7, 7))


def test_synthetic_data_is_seeded():
    a, b, c = (synthetic_data(SHAPE, 5, seed=s) for s in (3, 3, 4))
    assert a.x.shape == (5, 1, 6, 5) and a.x.dtype == np.float32 and a.y is None and a.synthetic
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    with pytest.raises(DataError, match="fixed input shape"):
        synthetic_data(["N", 3, "h", "w"], 2)

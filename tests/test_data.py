import numpy as np
import pytest
from PIL import Image

from sepconv.convert.data import DataOptions, check_labels, load_data, split
from sepconv.convert.errors import DataError, InvalidOptionError

SHAPE = (None, 16, 16, 3)


def write_images(folder, count, color, size=(20, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, color).save(folder / f"img{i}.png")


def test_npz_float_taken_as_is(tmp_path):
    x = np.random.default_rng(0).random((5, 16, 16, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    data = load_data(tmp_path / "d.npz", SHAPE)
    np.testing.assert_array_equal(data.x, x, err_msg="float arrays are already preprocessed")
    assert data.y.tolist() == [0, 1, 2, 3, 4]


def test_npz_uint8_grayscale_resized_and_scaled(tmp_path):
    x = np.full((3, 8, 8), 255, np.uint8)
    onehot = np.eye(4)[[1, 3, 0]]
    np.savez(tmp_path / "d.npz", x=x, y=onehot)
    data = load_data(tmp_path / "d.npz", SHAPE, DataOptions(scale="symmetric"))
    assert data.x.shape == (3, 16, 16, 3) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x, 1.0, atol=1e-6, err_msg="255 maps to 1 in [-1, 1]")
    assert data.y.tolist() == [1, 3, 0]


def test_mean_std(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((2, 16, 16, 3), 255, np.uint8))
    data = load_data(tmp_path / "d.npz", SHAPE, DataOptions(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))
    np.testing.assert_allclose(data.x[0, 0, 0], [2.0, 1.0, 0.5], rtol=1e-6, err_msg="(1 - mean) / std")
    assert data.y is None


def test_folder_with_classes_and_cap(tmp_path):
    write_images(tmp_path / "cat", 4, (255, 0, 0))
    write_images(tmp_path / "dog", 2, (0, 0, 255))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_data(tmp_path, SHAPE)
    assert data.class_names == ("cat", "dog") and len(data) == 6
    assert sorted(data.y.tolist()) == [0, 0, 0, 0, 1, 1]
    cat = data.x[data.y == 0][0]
    np.testing.assert_allclose(cat[..., 0], 1.0, err_msg="red scaled to 1")
    capped = load_data(tmp_path, SHAPE, DataOptions(max_samples=3))
    assert sorted(capped.y.tolist()) == [0, 0, 1], "a cap takes classes in turn"


def test_flat_folder_is_unlabelled(tmp_path):
    write_images(tmp_path, 3, (10, 20, 30))
    data = load_data(tmp_path, (None, 16, 16, 1))
    assert data.y is None and data.x.shape == (3, 16, 16, 1)


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "holds no images"),
    (lambda p: np.savez(p, y=np.arange(3)), "no array 'x'"),
    (lambda p: p.write_bytes(b"junk"), "cannot be read as .npz"),
    (lambda p: np.savez(p, x=np.zeros((2, 16, 16, 2))), "2 channels but the model takes 3"),
    (lambda p: np.savez(p, x=np.zeros((2, 16, 16, 3)), y=np.arange(3)), "3 values"),
    (lambda p: np.savez(p, x=np.zeros((2, 16, 16, 3)), y=np.array([0.5, 1.5])), "integer class labels"),
    (lambda p: np.savez(p, x=np.array(["a", "b"])), "numeric array"),
])
def test_bad_data(tmp_path, setup, match):
    path = tmp_path / "data.npz"
    setup(path)
    with pytest.raises(DataError, match=match):
        load_data(path, SHAPE)


def test_wrong_kind_and_model_input(tmp_path):
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="unrecognized data file"):
        load_data(tmp_path / "d.csv", SHAPE)
    with pytest.raises(DataError, match="one image input of fixed size"):
        load_data(tmp_path / "d.csv", (None, 10))
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot be read as an image"):
        load_data(folder, SHAPE)


def test_labels_checked_and_split(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 16, 16, 3), np.float32), y=np.arange(10))
    data = load_data(tmp_path / "d.npz", SHAPE)
    with pytest.raises(DataError, match="label 9 is out of range for a model with 5 outputs"):
        check_labels(data, 5)
    train, heldout = split(data, heldout=0.3)
    assert len(train) == 7 and len(heldout) == 3
    assert sorted(train.y.tolist() + heldout.y.tolist()) == list(range(10)), "disjoint and complete"
    again, _ = split(data, heldout=0.3)
    assert again.y.tolist() == train.y.tolist(), "the same seed gives the same split"
    train, heldout = split(data, heldout=0.999)
    assert len(train) == 1 and len(heldout) == 9, "at least one sample on each side"


def test_bad_options():
    for kwargs, match in [(dict(scale="percent"), "scale"), (dict(max_samples=0), "max_samples"),
                          (dict(std=(1.0, 0.0)), "std")]:
        with pytest.raises(InvalidOptionError, match=match):
            DataOptions(**kwargs)

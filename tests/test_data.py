import numpy as np
import pytest
from PIL import Image

from helpers import png_claiming

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


@pytest.mark.parametrize("side", [100_000, 9_000], ids=["beyond PIL's limit", "beyond sepconv's limit"])
def test_decompression_bomb_png_is_refused_before_decoding(tmp_path, side):
    write_images(tmp_path / "cat", 2, (255, 0, 0))
    png_claiming(tmp_path / "cat" / "bomb.png", side, side)
    with pytest.raises(DataError, match=r"bomb\.png: .*decompression bomb") as caught:
        load_data(tmp_path, SHAPE)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("values, what", [
    (np.array([np.nan]), "NaN"), (np.array([np.inf, -np.inf]), "infinity"),
    (np.array([1e39]), "float64 beyond float32"),
])
def test_non_finite_inputs_are_refused_and_counted(tmp_path, values, what):
    x = np.random.default_rng(0).random((6, 16, 16, 3))
    x[2, 0, 0, : len(values)] = values
    x[4, 1, 1, 0] = values[0]
    np.savez(tmp_path / "d.npz", x=x)
    with pytest.raises(DataError, match=rf"d\.npz: {len(values) + 1} non-finite values \(NaN or infinity\) in 2 of 6 "
                                        rf"samples"):
        load_data(tmp_path / "d.npz", SHAPE)


def test_non_finite_after_normalisation_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((2, 16, 16, 3), 3e38, np.float32))
    with pytest.raises(DataError, match="1,536 non-finite values"):
        load_data(tmp_path / "d.npz", SHAPE, DataOptions(std=(1e-3,)))


def test_mean_std_must_match_the_channels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(InvalidOptionError, match=r"--mean has 2 values \[0.5, 0.5\] but the model's input has 3 "
                                                 r"channels"):
        load_data(tmp_path / "d.npz", SHAPE, DataOptions(mean=(0.5, 0.5)))
    with pytest.raises(InvalidOptionError, match="--std has 4 values"):
        load_data(tmp_path / "d.npz", SHAPE, DataOptions(std=(1.0, 1.0, 1.0, 1.0)))
    one = load_data(tmp_path / "d.npz", SHAPE, DataOptions(mean=(0.5,), std=(0.5,)))
    np.testing.assert_allclose(one.x, -1.0, err_msg="one value applies to every channel")


@pytest.mark.parametrize("x", [np.array(5.0), np.array("abc"), np.array(["a", "b"])], ids=["0-d", "0-d string",
                                                                                         "strings"])
def test_x_of_the_wrong_kind_with_max_samples(tmp_path, x):
    np.savez(tmp_path / "d.npz", x=x)
    with pytest.raises(DataError, match="'x' must be a non-empty numeric array of images"):
        load_data(tmp_path / "d.npz", SHAPE, DataOptions(max_samples=2))


def test_bad_options():
    for kwargs, match in [(dict(scale="percent"), "scale"), (dict(max_samples=0), "max_samples"),
                          (dict(std=(1.0, 0.0)), "std")]:
        with pytest.raises(InvalidOptionError, match=match):
            DataOptions(**kwargs)

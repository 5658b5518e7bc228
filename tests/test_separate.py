import json

import keras
import numpy as np
import pytest
from helpers import (assert_same_outputs, assert_snapshot_equal, count_layers, layers_by_path, random_inputs,
                     snapshot)
from models import CASES

from sepconv.convert import SeparationOptions, separate

from sepconv.convert.separation import svd
from sepconv.convert.errors import InvalidOptionError, UnsupportedModelError
from sepconv.convert.separation.rewrites import registered_rewrites

L = keras.layers
# float16 compute keeps ~3 significant digits; the contract for mixed precision is float16's, not float32's.
MIXED_PRECISION_RTOL = 2e-2


def _rtol(name):
    return MIXED_PRECISION_RTOL if name == "mixed_precision" else 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_rank_is_exact(name):
    model = CASES[name]()
    before = snapshot(model)
    inputs = random_inputs(model)
    new, report = separate(model, rank="full", only_if_smaller=False)
    assert_same_outputs(model, new, inputs, rtol=_rtol(name), what=f"{name} at full rank")
    assert_snapshot_equal(before, snapshot(model), what=f"input model of {name}")
    eligible = [l for l in layers_by_path(model).values() if type(l) is L.Conv2D and l.kernel.shape[0] * l.kernel.shape[1] > 1]
    assert len(report.separated) == len(eligible) > 0
    assert count_layers(new, L.SeparableConv2D) == len(eligible), "every eligible Conv2D must become separable"
    assert count_layers(new, L.Conv2D) == count_layers(model, L.Conv2D) - len(eligible)
    for row in report.separated:
        assert row.rank == row.full_rank
        assert row.relative_error == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_other_layers_keep_config_and_weights(name):
    model = CASES[name]()
    new, report = separate(model, rank=2)
    old_layers, new_layers = layers_by_path(model), layers_by_path(new)
    assert sorted(old_layers) == sorted(new_layers), "layer names and paths must be kept"
    separated = {row.path for row in report.separated}
    for path, old in old_layers.items():
        fresh = new_layers[path]
        if path in separated:
            assert type(fresh) is L.SeparableConv2D and fresh.depth_multiplier == 2
            continue
        assert type(fresh) is type(old), path
        assert fresh.get_config() == old.get_config(), f"{path}: config changed"
        for a, b in zip(old.get_weights(), fresh.get_weights()):
            np.testing.assert_array_equal(b, a, err_msg=f"{path}: weights changed")
        assert fresh is not old, f"{path}: the new model must not share layer objects with the input"


def test_conv_options_are_carried():
    model = CASES["conv_options"]()
    new, report = separate(model, rank=2)
    old, sep = model.get_layer("regularised"), new.get_layer("regularised")
    assert isinstance(sep, L.SeparableConv2D)
    config = sep.get_config()
    assert keras.regularizers.get(config["pointwise_regularizer"]).get_config() == old.kernel_regularizer.get_config()
    assert keras.regularizers.get(config["bias_regularizer"]).get_config() == old.bias_regularizer.get_config()
    assert config["activity_regularizer"] == old.get_config()["activity_regularizer"]
    assert config["pointwise_constraint"] == old.get_config()["kernel_constraint"]
    assert config["bias_constraint"] == old.get_config()["bias_constraint"]
    assert config["activation"] == "gelu"
    assert new.get_layer("frozen").trainable is False and model.get_layer("frozen").trainable is False
    x = random_inputs(model)
    model(x, training=True)
    new(x, training=True)
    # kernel (now pointwise) L2, bias L1 and activity L2 of "regularised": three losses on both sides
    assert len(model.losses) == 3 and len(new.losses) == 3


def test_mixed_precision_policy_is_kept():
    model = CASES["mixed_precision"]()
    new, _ = separate(model, rank="full", only_if_smaller=False)
    for name in ("mp1", "mp2"):
        layer = new.get_layer(name)
        assert isinstance(layer, L.SeparableConv2D)
        assert layer.dtype_policy.name == "mixed_float16"
        assert layer.depthwise_kernel.dtype == "float32", "variables stay float32 under mixed precision"


def test_shared_layer_stays_shared():
    model = CASES["shared"]()
    new, report = separate(model, rank="full", only_if_smaller=False)
    assert count_layers(new, L.SeparableConv2D) == 1
    assert len(new.get_layer("shared_conv")._inbound_nodes) == 3
    row = report.row("shared_conv")
    assert row.macs_before == 3 * 10 * 10 * 9 * 4 * 4, "MACs count every call of a shared layer"


def test_nested_paths_in_report():
    new, report = separate(CASES["nested"](), rank=1)
    paths = {row.path for row in report.separated}
    assert paths == {"top_conv", "mid/mid_conv", "mid/deep/deep_conv", "inner_seq/seq_conv"}
    assert isinstance(new.get_layer("mid").get_layer("deep").get_layer("deep_conv"), L.SeparableConv2D)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_reported_error_matches_kernels(rank):
    model = CASES["functional_branches"]()
    new, report = separate(model, rank=rank, only_if_smaller=False)
    for row in report.separated:
        original = model.get_layer(row.path).kernel.numpy().astype(np.float64)
        layer = new.get_layer(row.path)
        rebuilt = svd.reconstruct(layer.depthwise_kernel.numpy().astype(np.float64),
                                  layer.pointwise_kernel.numpy().astype(np.float64))
        direct = np.linalg.norm(rebuilt - original) / np.linalg.norm(original)
        np.testing.assert_allclose(row.relative_error, direct, rtol=1e-4,
                                   err_msg=f"{row.path}: reported kernel error differs from a direct comparison")
        assert row.params_after == layer.count_params()
        assert row.params_before == model.get_layer(row.path).count_params()


def test_energy_picks_smallest_rank():
    model = CASES["functional_branches"]()
    _, report = separate(model, energy=0.8, only_if_smaller=False)
    for row in report.separated:
        spectrum = svd.spectrum(model.get_layer(row.path).kernel.numpy())
        assert spectrum.retained_energy(row.rank) >= 0.8
        if row.rank > 1:
            assert spectrum.retained_energy(row.rank - 1) < 0.8


def test_skip_reasons_are_named():
    x_in = keras.Input((12, 12, 8))
    x = L.Conv2D(8, 1, name="pointwise")(x_in)
    x = L.Conv2D(8, 3, groups=4, padding="same", name="grouped")(x)
    x = L.Conv2D(8, 3, padding="same", name="head_keep")(x)
    x = L.Conv2D(4, 3, padding="same", name="costly")(x)
    x = L.Conv2D(16, 3, padding="same", name="body")(x)
    model = keras.Model(x_in, x)
    new, report = separate(model, rank="full", exclude="head_*")
    reasons = {row.path: row.reason for row in report.kept}
    assert "1x1" in reasons["pointwise"]
    assert "groups=4" in reasons["grouped"]
    assert "excluded by pattern 'head_*'" in reasons["head_keep"]
    assert "separable cost >= original" in reasons["costly"]
    assert "separable cost >= original" in reasons["body"]
    _, report = separate(model, rank=1, include=["body"])
    assert [row.path for row in report.separated] == ["body"]
    assert "not matched by include" in report.row("costly").reason
    assert count_layers(new, L.SeparableConv2D) == 0


def test_per_layer_ranks_win_over_the_policy():
    model = CASES["functional_branches"]()
    paths = [row.path for row in separate(model, rank=1, only_if_smaller=False)[1].separated]
    first, second = paths[0], paths[1]
    new, report = separate(model, rank=1, only_if_smaller=False, ranks={first: 2, second: 0})
    assert report.row(first).rank == 2 and new.get_layer(first).depth_multiplier == 2
    assert report.row(second).status == "kept" and "K=0" in report.row(second).reason
    assert all(row.rank == 1 for row in report.separated if row.path not in (first, second))
    with pytest.raises(InvalidOptionError, match="ranks="):
        SeparationOptions(ranks={first: -1})


class MyConv(L.Conv2D):
    pass


def test_unsupported_layers_reported_all_at_once():
    x_in = keras.Input((12, 12, 3))
    x = MyConv(4, 3, padding="same", name="custom_conv")(x_in)
    x = L.Conv2DTranspose(4, 3, padding="same", name="transpose")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.Conv2D(8, 3, padding="same", name="plain")(x)
    y = L.Conv1D(4, 3, name="c1d")(L.Reshape((12 * 12, 8))(x))
    z = L.Conv3D(2, 3, padding="same", name="c3d")(L.Reshape((12, 12, 8, 1))(x))
    model = keras.Model(x_in, [y, z])
    new, report = separate(model, rank=1)
    unsupported = {row.path: row.reason for row in report.unsupported}
    assert set(unsupported) == {"custom_conv", "transpose", "c1d", "c3d"}
    assert "subclass of Conv2D" in unsupported["custom_conv"]
    assert "Conv1D" in unsupported["c1d"]
    assert report.row("dw").reason == "already depthwise/separable"
    assert [row.path for row in report.separated] == ["plain"]
    assert type(new.get_layer("custom_conv")) is MyConv


def test_convolutions_inside_subclassed_layers_are_reported():
    class Block(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = L.Conv2D(4, 3, padding="same", name="hidden")

        def call(self, x):
            return self.conv(x)

    x_in = keras.Input((8, 8, 3))
    model = keras.Model(x_in, Block(name="block")(x_in))
    new, report = separate(model, rank=1)
    (row,) = report.rows
    assert row.path == "block" and row.status == "unsupported" and "hidden" in row.reason
    assert_same_outputs(model, new, random_inputs(model), what="model with an opaque block")


def test_layer_that_cannot_be_recreated_is_named():
    class Fixed(L.Layer):
        def __init__(self, scale):
            super().__init__(name="fixed")
            self.scale = scale

        def call(self, x):
            return x * self.scale

    x_in = keras.Input((8, 8, 3))
    model = keras.Model(x_in, Fixed(2.0)(L.Conv2D(4, 3, name="conv")(x_in)))
    with pytest.raises(UnsupportedModelError, match="'fixed' .*cannot be re-created from its config"):
        separate(model, rank=1)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = L.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(UnsupportedModelError, match="subclassed model .*Functional or Sequential"):
        separate(net)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank=0"), (dict(rank=-2), "rank=-2"), (dict(rank="low"), "rank='low'"), (dict(rank=True), "rank"),
    (dict(rank=1.5), "rank=1.5"), (dict(energy=0), "energy=0"), (dict(energy=1.2), "energy=1.2"),
    (dict(energy="high"), "energy"), (dict(rank=1, energy=0.9), "both"), (dict(include=[""]), "include"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        SeparationOptions(**kwargs)


def test_why_not_separated_is_one_short_line():
    """A MobileNet-like model has dozens of layers nothing separates: the line groups them by reason and names a few,
    where it used to list every layer (3,756 characters on the zoo's nested MobileNetV2)."""
    x_in = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(x_in)
    for i in range(6):
        x = L.DepthwiseConv2D(3, padding="same", name=f"dw_{i}")(x)
        x = L.Conv2D(8, 1, name=f"pw_{i}")(x)
    _, report = separate(keras.Model(x_in, x), rank=1, exclude="stem")
    assert not report.separated
    line = report.why_not_separated()
    assert line == ("stem: excluded by pattern 'stem'; already depthwise/separable: 6 layers (dw_0, dw_1, dw_2 and 3 "
                    "more); 1x1 kernel: already pointwise: 6 layers (pw_0, pw_1, pw_2 and 3 more)"), line
    assert report.why_not_separated(groups=1) == "stem: excluded by pattern 'stem'; 12 more layers for other reasons"
    _, separated = separate(keras.Model(x_in, L.Conv2D(8, 3, name="c")(x_in)), rank=1)
    assert separated.why_not_separated() == "every layer was separated"


def test_report_serialises_and_prints():
    model = CASES["functional_branches"]()
    new, report = separate(model, rank=1)
    data = json.loads(report.to_json())
    assert data["totals"]["model_params_before"] == model.count_params()
    assert data["totals"]["model_params_after"] == new.count_params()
    assert data["totals"]["separated"] == len(report.separated)
    assert data["policy"]["rank"] == 1
    by_path = {row["path"]: row for row in data["layers"]}
    assert by_path["shortcut_1x1"]["status"] == "kept"
    assert by_path["stem"]["macs_before"] == 16 * 16 * 9 * 4 * 8
    assert by_path["stem"]["macs_after"] == 16 * 16 * (9 * 4 * 1 + 4 * 1 * 8)
    text = str(report)
    for row in report.rows:
        assert row.path in text
    assert "smaller" in text and "kept: 1x1 kernel" in text
    assert "| layer" in report.table("github")


def test_default_policy_is_energy():
    from sepconv.convert import DEFAULT_ENERGY

    _, report = separate(CASES["functional_branches"]())
    assert report.policy["energy"] == DEFAULT_ENERGY and report.policy["rank"] is None


def test_every_registered_rewrite_has_a_test_case():
    """A new registered rewrite must come with a model in tests/models.py that exercises it."""
    covered = set()
    for build in CASES.values():
        covered |= {type(layer) for layer in build()._flatten_layers(include_self=False)}
    missing = [cls.__name__ for cls in registered_rewrites() if cls not in covered]
    assert not missing, f"registered rewrites with no test model: {missing}"

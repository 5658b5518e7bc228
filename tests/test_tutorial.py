"""The published tutorial's figures, reproduced by conversion rather than by writing the separable network by hand."""

import keras
import pytest
from helpers import count_layers

from sepconv.convert import separate

from sepconv.convert.demo import digits as demo


def test_single_layer_counts():
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(64, 3, padding="same")])
    assert model.count_params() == 1_792
    new, report = separate(model, rank=1)
    assert new.count_params() <= 286
    assert new.count_params() == 3 * 9 + 3 * 64 + 64  # depthwise, pointwise, bias
    assert report.rows[0].params_after == new.count_params()


def test_tutorial_network_counts():
    model = demo.tutorial_network()
    assert model.count_params() == 1_186_378
    handwritten = demo.tutorial_network(separable=True)
    assert handwritten.count_params() == 174_821
    new, report = separate(model, rank=1)
    assert new.count_params() == 174_821, "K=1 must give exactly the hand-written separable network's size"
    assert count_layers(new, keras.layers.SeparableConv2D) == 6
    assert count_layers(new, keras.layers.Conv2D) == 0
    assert [type(l).__name__ for l in new.layers] == [type(l).__name__ for l in handwritten.layers]
    assert report.totals["params_ratio"] == pytest.approx(1_186_378 / 174_821)

"""Full-rank separation is exact on one member of every keras.applications family that contains Conv2D.

Built with weights=None (nothing is downloaded) at small input sizes. BatchNorm statistics stay at their initial
values, and the kernels are random, which has the flattest spectra a kernel can have: the hardest case for exactness.
"""

import keras
import pytest
from helpers import assert_same_outputs, count_layers, layers_by_path, random_inputs

from sepconv.convert import separate

A = keras.applications
# (family, builder, input size): the smallest size each family accepts, or a little more to keep every stage non-empty.
FAMILIES = [
    ("vgg", A.VGG16, 32),
    ("resnet", A.ResNet50, 32),
    ("resnet_v2", A.ResNet50V2, 32),
    ("inception", A.InceptionV3, 75),
    ("inception_resnet", A.InceptionResNetV2, 75),
    ("xception", A.Xception, 71),
    ("densenet", A.DenseNet121, 32),
    ("mobilenet", A.MobileNet, 32),
    ("mobilenet_v2", A.MobileNetV2, 32),
    ("mobilenet_v3", A.MobileNetV3Small, 32),
    ("efficientnet", A.EfficientNetB0, 32),
    ("efficientnet_v2", A.EfficientNetV2B0, 32),
    ("convnext", A.ConvNeXtTiny, 32),
    ("nasnet", A.NASNetMobile, 32),
]


@pytest.mark.slow
@pytest.mark.parametrize("family, build, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_full_rank_is_exact(family, build, size):
    keras.utils.set_random_seed(0)
    model = build(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None)
    new, report = separate(model, rank="full", only_if_smaller=False)
    eligible = [l for l in layers_by_path(model).values()
                if type(l) is keras.layers.Conv2D and l.groups == 1 and l.kernel.shape[0] * l.kernel.shape[1] > 1]
    assert len(report.separated) == len(eligible) > 0, f"{family}: every spatial Conv2D must be separated"
    assert count_layers(new, keras.layers.SeparableConv2D) == count_layers(model, keras.layers.SeparableConv2D) + len(
        eligible)
    assert_same_outputs(model, new, random_inputs(model, batch=2), what=f"{family} at full rank")

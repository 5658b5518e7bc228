"""The separation maths against a plain numpy reference: a depthwise conv followed by a pointwise one."""

import numpy as np
import pytest

from sepconv.convert.separation import svd


def conv2d_valid(x, kernel):
    """Reference 'valid' 2-D convolution (cross-correlation, as Keras computes it) of x (H, W, cin)."""
    kh, kw, cin, cout = kernel.shape
    h, w = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    out = np.zeros((h, w, cout))
    for i in range(kh):
        for j in range(kw):
            out += x[i:i + h, j:j + w, :] @ kernel[i, j]
    return out


def separable_valid(x, depthwise, pointwise):
    kh, kw, cin, rank = depthwise.shape
    h, w = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    mid = np.zeros((h, w, cin, rank))
    for i in range(kh):
        for j in range(kw):
            mid += x[i:i + h, j:j + w, :, None] * depthwise[i, j]
    return mid.reshape(h, w, cin * rank) @ pointwise[0, 0]


@pytest.mark.parametrize("shape", [(3, 3, 4, 16), (3, 5, 2, 3), (1, 3, 5, 2), (5, 5, 3, 40)])
def test_full_rank_reproduces_the_convolution(shape):
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal(shape)
    x = rng.standard_normal((9, 11, shape[2]))
    spec = svd.spectrum(kernel)
    assert spec.full_rank == min(shape[0] * shape[1], shape[3])
    depthwise, pointwise = svd.factorise(spec, spec.full_rank)
    assert depthwise.shape == shape[:3] + (spec.full_rank,)
    assert pointwise.shape == (1, 1, shape[2] * spec.full_rank, shape[3])
    np.testing.assert_allclose(separable_valid(x, depthwise, pointwise), conv2d_valid(x, kernel), rtol=1e-10,
                               atol=1e-10, err_msg="full-rank separation must compute the same convolution")
    np.testing.assert_allclose(svd.reconstruct(depthwise, pointwise), kernel, atol=1e-12,
                               err_msg="reconstruct must invert factorise at full rank")


def test_low_rank_error_is_the_best_one():
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((3, 3, 6, 8))
    spec = svd.spectrum(kernel)
    for rank in range(1, spec.full_rank + 1):
        rebuilt = svd.reconstruct(*svd.factorise(spec, rank))
        direct = np.linalg.norm(rebuilt - kernel) / np.linalg.norm(kernel)
        np.testing.assert_allclose(spec.relative_error(rank), direct, rtol=1e-9, atol=1e-12,
                                   err_msg=f"relative error at K={rank}")
        # Eckart-Young: per channel, the truncated SVD beats any other rank-K factorisation, e.g. a random one
        other = rng.standard_normal((9, rank)) @ rng.standard_normal((rank, 8))
        for c in range(6):
            best = np.linalg.norm(rebuilt[:, :, c, :].reshape(9, 8) - kernel[:, :, c, :].reshape(9, 8))
            assert best <= np.linalg.norm(other - kernel[:, :, c, :].reshape(9, 8)) + 1e-12


def test_rank_for_energy_and_padding():
    kernel = np.zeros((3, 3, 2, 4))
    kernel[:, :, 0, 0] = 1.0  # rank one in channel 0, nothing in channel 1
    spec = svd.spectrum(kernel)
    assert spec.rank_for_energy(1.0) == 1
    assert spec.retained_energy(1) == pytest.approx(1.0)
    depthwise, pointwise = svd.factorise(spec, 6)  # beyond the exact rank (4): zero-padded
    assert depthwise.shape == (3, 3, 2, 6) and pointwise.shape == (1, 1, 12, 4)
    np.testing.assert_allclose(svd.reconstruct(depthwise, pointwise), kernel, atol=1e-12, err_msg="padded rank")
    assert svd.spectrum(np.zeros((3, 3, 1, 1))).relative_error(1) == 0.0


def test_spectrum_rejects_wrong_rank():
    with pytest.raises(ValueError, match="kernel"):
        svd.spectrum(np.zeros((3, 3, 4)))

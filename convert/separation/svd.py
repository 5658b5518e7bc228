"""The separation maths, in numpy only: per-input-channel SVD of a Conv2D kernel.

For each input channel c, the slice W[:, :, c, :] reshaped to (kh*kw, cout) has an SVD U S V^T. Its best rank-K
approximation maps onto a depthwise kernel (kh, kw, cin, K) and a pointwise kernel (1, 1, cin*K, cout):

    depthwise[:, :, c, j]    = U[:, j] * sqrt(S_j)
    pointwise[0, 0, c*K + j] = sqrt(S_j) * V[j, :]

which is exactly the channel order of Keras' SeparableConv2D (depthwise output channel c*K + j).

The spatial form (Jaderberg et al., "Speeding up Convolutional Neural Networks with Low Rank Expansions", BMVC 2014;
AIMET's "spatial SVD") factors the whole kernel instead: W reshaped to a (kh*cin) x (kw*cout) matrix, row (i, c) and
column (j, o), has an SVD U S V^T whose best rank-r approximation maps onto a vertical kh x 1 convolution to r channels
and a horizontal 1 x kw convolution from them:

    vertical[i, 0, c, j]   = U[(i, c), j] * sqrt(S_j)
    horizontal[0, k, j, o] = sqrt(S_j) * V[j, (k, o)]

Both halves are dense convolutions; the pair is exact at r = min(kh*cin, kw*cout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class _Spectrum:
    """What both factorisations' spectra answer from their singular values `s` (last axis: descending)."""

    s: np.ndarray

    @property
    def full_rank(self) -> int:
        """The rank at which the factorisation is exact."""
        return self.s.shape[-1]

    def retained_energy(self, rank: int) -> float:
        """Fraction of the kernel's squared Frobenius norm kept by the best rank-`rank` factorisation."""
        total = float(np.sum(self.s**2))
        if total == 0.0:
            return 1.0
        return float(np.sum(self.s[..., :rank] ** 2)) / total

    def relative_error(self, rank: int) -> float:
        """||W - W_K||_F / ||W||_F for the best rank-`rank` factorisation (0 for an all-zero kernel)."""
        return float(np.sqrt(max(0.0, 1.0 - self.retained_energy(rank))))

    def rank_for_energy(self, energy: float) -> int:
        """The smallest K whose retained energy is at least `energy` (a fraction in (0, 1])."""
        for rank in range(1, self.full_rank + 1):
            # A hair of slack so that energy=1.0 is met by the exact rank despite float64 round-off.
            if self.retained_energy(rank) >= energy - 1e-12:
                return rank
        return self.full_rank


@dataclass(frozen=True)
class KernelSpectrum(_Spectrum):
    """Singular values of every input channel's slice of a (kh, kw, cin, cout) kernel; exact at K = min(kh*kw, cout)."""

    kernel: np.ndarray  # (kh, kw, cin, cout), float64
    u: np.ndarray  # (cin, kh*kw, r)
    s: np.ndarray  # (cin, r), descending per channel
    vt: np.ndarray  # (cin, r, cout)


@dataclass(frozen=True)
class SpatialSpectrum(_Spectrum):
    """Singular values of a (kh, kw, cin, cout) kernel as a (kh*cin) x (kw*cout) matrix; exact at
    r = min(kh*cin, kw*cout)."""

    kernel: np.ndarray  # (kh, kw, cin, cout), float64
    u: np.ndarray  # (kh*cin, r)
    s: np.ndarray  # (r,), descending
    vt: np.ndarray  # (r, kw*cout)


def spatial_spectrum(kernel: np.ndarray) -> SpatialSpectrum:
    """The SVD of a Conv2D kernel (kh, kw, cin, cout) reshaped to (kh*cin) x (kw*cout)."""
    kernel = _kernel(kernel)
    kh, kw, cin, cout = kernel.shape
    u, s, vt = np.linalg.svd(np.transpose(kernel, (0, 2, 1, 3)).reshape(kh * cin, kw * cout), full_matrices=False)
    return SpatialSpectrum(kernel=kernel, u=u, s=s, vt=vt)


def spatial_factorise(spec: SpatialSpectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The (vertical (kh, 1, cin, r), horizontal (1, kw, r, cout)) kernels of the best rank-`rank` spatial
    factorisation, in float64; a rank above the exact one is padded with zero components."""
    kh, kw, cin, cout = spec.kernel.shape
    used = min(rank, spec.full_rank)
    root = np.sqrt(spec.s[:used])
    vertical = np.zeros((kh * cin, rank))
    vertical[:, :used] = spec.u[:, :used] * root
    horizontal = np.zeros((rank, kw * cout))
    horizontal[:used] = spec.vt[:used] * root[:, None]
    return (vertical.reshape(kh, 1, cin, rank),
            horizontal.reshape(rank, kw, cout).transpose(1, 0, 2).reshape(1, kw, rank, cout))


def spatial_reconstruct(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The (kh, kw, cin, cout) kernel that a vertical + horizontal pair computes (the inverse of
    `spatial_factorise`)."""
    return np.einsum("icr,kro->ikco", vertical[:, 0], horizontal[0])


def _kernel(kernel) -> np.ndarray:
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"Expected a (kh, kw, cin, cout) kernel, got shape {kernel.shape}")
    return kernel


def spectrum(kernel: np.ndarray) -> KernelSpectrum:
    """Per-input-channel SVD of a Conv2D kernel of shape (kh, kw, cin, cout)."""
    kernel = _kernel(kernel)
    kh, kw, cin, cout = kernel.shape
    slices = np.transpose(kernel, (2, 0, 1, 3)).reshape(cin, kh * kw, cout)
    u, s, vt = np.linalg.svd(slices, full_matrices=False)
    return KernelSpectrum(kernel=kernel, u=u, s=s, vt=vt)


def factorise(spec: KernelSpectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The (depthwise, pointwise) kernels of the best rank-`rank` separation, in float64.

    A rank above the exact one is padded with zero components, so the shapes always follow `rank`.
    """
    kh, kw, cin, cout = spec.kernel.shape
    used = min(rank, spec.full_rank)
    root = np.sqrt(spec.s[:, :used])  # (cin, used)
    depthwise = np.zeros((kh, kw, cin, rank))
    depthwise[:, :, :, :used] = (spec.u[:, :, :used] * root[:, None, :]).transpose(1, 0, 2).reshape(kh, kw, cin, used)
    pointwise = np.zeros((cin, rank, cout))
    pointwise[:, :used, :] = spec.vt[:, :used, :] * root[:, :, None]
    return depthwise, pointwise.reshape(1, 1, cin * rank, cout)


def reconstruct(depthwise: np.ndarray, pointwise: np.ndarray) -> np.ndarray:
    """The (kh, kw, cin, cout) kernel that a depthwise + pointwise pair computes (the inverse of `factorise`)."""
    kh, kw, cin, rank = depthwise.shape
    cout = pointwise.shape[-1]
    return np.einsum("hwck,cko->hwco", depthwise, pointwise.reshape(cin, rank, cout))

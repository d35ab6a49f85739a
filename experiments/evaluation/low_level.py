"""Low-level metrics, per image pair, vectorised in torch (float64).

- PixCorr: Pearson r between the flattened colour images at 425 px (3 x 425 x 425 values), as MindEye2's
  ``np.corrcoef`` per image.
- SSIM: scikit-image's ``structural_similarity(gt, rec, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0)`` on ``rgb2gray`` images at 425 px. skimage filters with an
  11-tap Gaussian (truncate 3.5) and averages the SSIM map after cropping 5 pixels from each border, so the
  cropped map is exactly a *valid* separable convolution, which is what this computes (no padding mode needed).
  It agrees with skimage on float64 input to rounding error (the tests check 1e-6).
"""

from __future__ import annotations

import torch

from experiments.evaluation.preprocessing import PIXCORR, SSIM, rgb2gray

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r between row i of ``a`` and row i of ``b`` ((B, D) each), computed in float64 -> (B,)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1))


def pixcorr(gt425: torch.Tensor, rec425: torch.Tensor) -> torch.Tensor:
    """Per-image PixCorr of (B, 3, 425, 425) colour images in [0, 1] -> (B,) float64."""
    return pearson_rows(gt425, rec425)


def gaussian_kernel(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian kernel (radius int(truncate * sigma + 0.5)), float64."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return phi / phi.sum()


def _valid_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (..., H, W), valid region only -> (..., H - 2r, W - 2r): weighted sums of
    shifted views accumulated in place (fast in float64 on CPU and GPU alike)."""
    taps = kernel.tolist()
    h, w = x.shape[-2] - len(taps) + 1, x.shape[-1] - len(taps) + 1
    rows = x[..., 0:h, :] * taps[0]
    for i, tap in enumerate(taps[1:], 1):
        rows.add_(x[..., i:i + h, :], alpha=tap)
    out = rows[..., :, 0:w] * taps[0]
    for i, tap in enumerate(taps[1:], 1):
        out.add_(rows[..., :, i:i + w], alpha=tap)
    return out


def ssim_gray(gt: torch.Tensor, rec: torch.Tensor, data_range: float = 1.0, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM per image of grayscale (B, H, W) images -> (B,) float64 (skimage's Gaussian, population variant)."""
    x, y = gt.double(), rec.double()
    kernel = gaussian_kernel(sigma)
    if min(x.shape[-2:]) < len(kernel):
        raise ValueError(f"SSIM needs images of at least {len(kernel)} pixels per side, got {tuple(x.shape[-2:])}")
    ux, uy = _valid_filter(x, kernel), _valid_filter(y, kernel)
    uxx, uyy, uxy = _valid_filter(x * x, kernel), _valid_filter(y * y, kernel), _valid_filter(x * y, kernel)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def ssim(gt425: torch.Tensor, rec425: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (B, 3, 425, 425) colour images in [0, 1] (converted with rgb2gray) -> (B,) float64."""
    return ssim_gray(rgb2gray(gt425), rgb2gray(rec425))


def low_level_metrics(gt256: torch.Tensor, rec256: torch.Tensor, antialias: bool = False) -> dict[str, torch.Tensor]:
    """PixCorr and SSIM of a batch of 256 px pairs (each resized to 425 px as the recipe says)."""
    gt, rec = PIXCORR(gt256, antialias), PIXCORR(rec256, antialias)
    if SSIM != PIXCORR:  # both 425 px, no normalisation: one resize serves both
        return {"pixcorr": pixcorr(gt, rec), "ssim": ssim(SSIM(gt256, antialias), SSIM(rec256, antialias))}
    return {"pixcorr": pixcorr(gt, rec), "ssim": ssim(gt, rec)}

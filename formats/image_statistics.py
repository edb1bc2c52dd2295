"""Per-image input statistics, computed from the very uint8 (N, 3, H, W) tensor the client sends.

Cheap (numpy only, no scipy: the client computes them for its monitor records) and chosen for what
moves when scanners, stains or acquisition change: per-channel mean and standard deviation,
brightness (ITU-R BT.601 luma), saturation (HSV), and the blue ratio B ÷ (R + G + B), a simple
proxy for the haematoxylin (blue-purple) vs eosin (pink) balance of an H&E stain.
"""

from __future__ import annotations

import numpy as np

INPUT_STATISTICS = ("mean_red", "mean_green", "mean_blue", "std_red", "std_green", "std_blue",
                    "brightness", "saturation", "blue_ratio")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def input_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """{name: float64 array of one value per image}, values on the 0–255 scale except saturation and
    blue_ratio (0–1)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {images.shape}")
    pixels = images.reshape(len(images), 3, -1).astype(np.float32)
    means, stds = pixels.mean(axis=2), pixels.std(axis=2)
    brightest, darkest = pixels.max(axis=1), pixels.min(axis=1)
    saturation = np.divide(brightest - darkest, brightest, out=np.zeros_like(brightest), where=brightest > 0).mean(axis=1)
    result = {f"mean_{c}": means[:, i] for i, c in enumerate(("red", "green", "blue"))}
    result |= {f"std_{c}": stds[:, i] for i, c in enumerate(("red", "green", "blue"))}
    result["brightness"] = means @ LUMA
    result["saturation"] = saturation
    result["blue_ratio"] = means[:, 2] / np.maximum(means.sum(axis=1), 1e-6)
    # Rounded here, once: the baseline file and the records carry 4 decimals, and a window compared
    # with a baseline must see the same values for the same pixels (a constant statistic, such as the
    # blue ratio of a grayscale scan, would otherwise differ in its last digits and fail every KS test).
    return {name: np.round(values.astype(np.float64), 4) for name, values in result.items()}

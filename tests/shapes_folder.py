"""A tiny labelled image folder drawn by the tests themselves (no downloads): 3 classes of 12x12 grayscale
PNGs, horizontal bars, vertical bars and a centred square, with noise."""

import numpy as np
from PIL import Image


def draw_shapes(root, n_per_class=40, seed=0):
    rng = np.random.default_rng(seed)
    for name in ("hbars", "vbars", "square"):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, (12, 12))
            if name == "hbars":
                img[::3, :] += 180
            elif name == "vbars":
                img[:, ::3] += 180
            else:
                img[3:9, 3:9] += 180
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(root / name / f"{i:03d}.png")
    return root

"""Attention-map figures like the paper's: images beside students' and teachers' maps."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np


def attention_figure(path: str, images: np.ndarray, columns: list[tuple[str, np.ndarray]], *,
                     title: str = '') -> str:
  """Writes a PNG grid: one row per image, first the image, then one map per column.

  Args:
    path: output PNG path.
    images: (N, H, W, C) images in [0, 1] (C = 1 or 3).
    columns: ``(label, maps)`` pairs, maps (N, h, w) attention maps (any scale; each
      is shown with its own colour range, resized to the image by nearest neighbour).
    title: a figure title.
  """
  n = len(images)
  cols = 1 + len(columns)
  fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n + 0.6), squeeze=False)
  for i in range(n):
    image = np.clip(images[i], 0.0, 1.0)
    axes[i, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image,
                      cmap='gray' if image.shape[-1] == 1 else None)
    for j, (_, maps) in enumerate(columns, start=1):
      axes[i, j].imshow(_upsample(maps[i], image.shape[:2]), cmap='jet')
  for j, label in enumerate(['image'] + [label for label, _ in columns]):
    axes[0, j].set_title(label, fontsize=7)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.png'  # atomic: the pipeline skips a figure that exists
  fig.savefig(tmp, dpi=120)
  os.replace(tmp, path)
  plt.close(fig)
  return path


def _upsample(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  ry, rx = max(shape[0] // m.shape[0], 1), max(shape[1] // m.shape[1], 1)
  return np.kron(m, np.ones((ry, rx)))

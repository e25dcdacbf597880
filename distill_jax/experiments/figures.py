"""Attention-map figures like the paper's: images beside students' and teachers' maps."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from distill_jax.trainers import search_plots  # pylint: disable=g-import-not-at-top,wrong-import-position

COLOUR_MAP = 'viridis'  # perceptually uniform (not jet)
SCALE_NOTE = 'colour: attention map value, one scale for every map (colour bar)'


def attention_plot(images: np.ndarray, columns: list[tuple[str, np.ndarray]], *,
                   title: str = '') -> plt.Figure:
  """The figure of :func:`attention_figure` (the caller closes it).

  Every map is drawn on one colour scale (the range of all the maps), shown by one colour
  bar: maps of one attention point are L2-normalised (Zagoruyko & Komodakis), so their
  values compare across networks.
  """
  n = len(images)
  cols = 1 + len(columns)
  fig, axes = plt.subplots(n, cols, figsize=(1.75 * cols + 0.9, 1.6 * n + 1.2), squeeze=False,
                           constrained_layout=True)
  shown = [[_upsample(maps[i], images.shape[1:3]) for i in range(n)] for _, maps in columns]
  lo = min((float(m.min()) for col in shown for m in col), default=0.0)
  hi = max((float(m.max()) for col in shown for m in col), default=1.0)
  hi = max(hi, lo + 1e-12)
  mappable = None
  for i in range(n):
    image = np.clip(images[i], 0.0, 1.0)
    axes[i, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image,
                      cmap='gray' if image.shape[-1] == 1 else None, vmin=0.0, vmax=1.0)
    for j, col in enumerate(shown, start=1):
      mappable = axes[i, j].imshow(col[i], cmap=COLOUR_MAP, vmin=lo, vmax=hi)
  for j, label in enumerate(['test image'] + [label for label, _ in columns]):
    axes[0, j].set_title(label, fontsize=7)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  if mappable is not None:
    bar = fig.colorbar(mappable, ax=axes[:, 1:].ravel().tolist(), shrink=0.9, aspect=30)
    bar.set_label('attention map value (one scale for every map)', fontsize=7)
    bar.ax.tick_params(labelsize=6)
  fig.suptitle(f'{title}\n{SCALE_NOTE}' if title else SCALE_NOTE, fontsize=8)
  return fig


def attention_figure(path: str, images: np.ndarray, columns: list[tuple[str, np.ndarray]], *,
                     title: str = '', tensorboard_dir: str = '') -> str:
  """Writes a grid: one row per image, first the image, then one map per column.

  ``path`` (PNG) and the same figure as a PDF beside it (``.pdf``), each atomically (a
  pipeline skips a figure that exists); with ``tensorboard_dir``, also a small
  TensorBoard image (tag ``attention``) there. Returns ``path``.

  Args:
    path: output PNG path.
    images: (N, H, W, C) images in [0, 1] (C = 1 or 3).
    columns: ``(label, maps)`` pairs, maps (N, h, w) attention maps, resized to the image
      by nearest neighbour; labels may hold several lines (network, point, test error).
    title: a figure title.
    tensorboard_dir: a TensorBoard log directory ('' = none).
  """
  fig = attention_plot(np.asarray(images), columns, title=title)
  try:
    search_plots.save_figure(fig, path, dpi=120, pdf=True)
    if tensorboard_dir:
      with search_plots.TensorBoardImages(tensorboard_dir) as tb:
        tb.write_images(0, {'attention': search_plots.figure_rgb(fig)})
  finally:
    plt.close(fig)
  return path


def _upsample(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  ry, rx = max(shape[0] // m.shape[0], 1), max(shape[1] // m.shape[1], 1)
  return np.kron(m, np.ones((ry, rx)))

"""Pictures of a DARTS search: the architecture weights as heatmaps, the derived cells as graphs.

Matplotlib only (headless, the Agg backend), drawn in the spirit of the figures of Liu,
Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019), figures 4-5:
the cell inputs ``c_{k-2}``, ``c_{k-1}``, intermediate nodes 0-3 and the output
``c_{k}`` (the concatenation of the intermediate nodes) as boxes, each kept edge
labelled with its operation.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from distill_jax.genotypes import NUM_INPUTS, NUM_NODES, PRIMITIVES, Genotype  # noqa: E402
from distill_jax.models.supernet import EDGES  # noqa: E402

ALPHAS_FILE = 'alphas.png'
CELL_FILES = {'normal': 'normal_cell.png', 'reduce': 'reduce_cell.png'}
INPUT_NAMES = ('c_{k-2}', 'c_{k-1}')


def _state_name(i: int) -> str:
  return INPUT_NAMES[i] if i < NUM_INPUTS else str(i - NUM_INPUTS)


def edge_labels() -> list[str]:
  """``'0 <- c_{k-2}'``-style names of the 14 edges (rows of the alphas)."""
  return [f'{node} \u2190 {_state_name(inp)}' for node, inp in EDGES]


def plot_alphas(weights: Mapping[str, np.ndarray], path: str) -> None:
  """Heatmaps (edges x operations) of the softmax weights of both cell types."""
  fig, axes = plt.subplots(1, 2, figsize=(13, 6.5), constrained_layout=True)
  for ax, kind in zip(axes, ('normal', 'reduce')):
    w = np.asarray(weights[kind])
    image = ax.imshow(w, cmap='viridis', vmin=0.0, vmax=max(float(w.max()), 1e-6), aspect='auto')
    ax.set_xticks(range(len(PRIMITIVES)), PRIMITIVES, rotation=45, ha='right')
    ax.set_yticks(range(len(EDGES)), edge_labels())
    ax.set_title(f'{kind} cell: softmax(alpha)')
    for e in range(w.shape[0]):
      for o in range(w.shape[1]):
        ax.text(o, e, f'{w[e, o]:.2f}', ha='center', va='center', fontsize=6,
                color='white' if w[e, o] < 0.6 * w.max() else 'black')
    fig.colorbar(image, ax=ax, shrink=0.8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_cell(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str,
              path: str) -> None:
  """One derived cell: boxes for the states, arrows labelled with the kept operations."""
  positions = {0: (0.0, 2.4), 1: (0.0, 0.6)}
  for k in range(NUM_NODES):
    positions[NUM_INPUTS + k] = (2.2 + 1.9 * k, 3.0 if k % 2 == 0 else 0.0)
  out = NUM_INPUTS + NUM_NODES
  positions[out] = (2.2 + 1.9 * NUM_NODES + 0.6, 1.5)

  fig, ax = plt.subplots(figsize=(12, 4.8))
  colours = {'input': '#9ecae1', 'node': '#fdd49e', 'output': '#a1d99b'}
  for i, (x, y) in positions.items():
    kind = 'input' if i < NUM_INPUTS else 'output' if i == out else 'node'
    label = 'c_{k}' if i == out else _state_name(i)
    ax.text(x, y, f'${label}$' if '_' in label else label, ha='center', va='center',
            fontsize=13, zorder=3,
            bbox=dict(boxstyle='round,pad=0.45', facecolor=colours[kind], edgecolor='black'))
  for e, (op, src) in enumerate(pairs):
    dst = NUM_INPUTS + e // 2
    (x0, y0), (x1, y1) = positions[src], positions[dst]
    rad = 0.25 if e % 2 else -0.25
    ax.annotate('', xy=(x1, y1), xytext=(x0, y0), zorder=1,
                arrowprops=dict(arrowstyle='-|>', color='#444444', shrinkA=16, shrinkB=16,
                                connectionstyle=f'arc3,rad={rad}'))
    # Label near the middle of the (curved) edge, pushed sideways by the bend.
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    dx, dy = x1 - x0, y1 - y0
    mx, my = mx + rad * dy * 0.5, my - rad * dx * 0.5
    ax.text(mx, my, op, ha='center', va='center', fontsize=8, zorder=2,
            bbox=dict(boxstyle='round,pad=0.15', facecolor='white', edgecolor='none', alpha=0.85))
  for i in concat:
    (x0, y0), (x1, y1) = positions[i], positions[out]
    ax.annotate('', xy=(x1, y1), xytext=(x0, y0), zorder=1,
                arrowprops=dict(arrowstyle='-|>', color='#999999', linestyle='dashed',
                                shrinkA=16, shrinkB=18))
  xs = [p[0] for p in positions.values()]
  ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
  ax.set_ylim(-0.9, 3.9)
  ax.set_title(title)
  ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_search_plots(workdir: str, weights: Mapping[str, np.ndarray], genotype: Genotype
                       ) -> list[str]:
  """Writes ``alphas.png``, ``normal_cell.png`` and ``reduce_cell.png``; returns their paths."""
  paths = [os.path.join(workdir, ALPHAS_FILE)]
  plot_alphas(weights, paths[0])
  for kind in ('normal', 'reduce'):
    path = os.path.join(workdir, CELL_FILES[kind])
    plot_cell(getattr(genotype, kind), getattr(genotype, f'{kind}_concat'),
              f'{kind} cell', path)
    paths.append(path)
  return paths

"""Pictures of a DARTS search: the architecture weights as heatmaps, the derived cells as graphs.

Matplotlib only (headless, the Agg backend), drawn in the spirit of the figures of Liu,
Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019), figures 4-5:
the cell inputs ``c_{k-2}``, ``c_{k-1}``, intermediate nodes 0-3 and the output
``c_{k}`` (the concatenation of the intermediate nodes) as boxes, each kept edge
labelled with its operation.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from distill_jax.genotypes import NUM_INPUTS, NUM_NODES, PRIMITIVES, Genotype  # noqa: E402
from distill_jax.models.supernet import EDGES  # noqa: E402

ALPHAS_FILE = 'alphas.png'
CELL_FILES = {'normal': 'normal_cell.png', 'reduce': 'reduce_cell.png'}
INPUT_NAMES = ('c_{k-2}', 'c_{k-1}')


def _state_name(i: int, math: bool = False) -> str:
  if i >= NUM_INPUTS:
    return str(i - NUM_INPUTS)
  return f'${INPUT_NAMES[i]}$' if math else INPUT_NAMES[i]


def edge_labels() -> list[str]:
  """``'0 <- c_{k-2}'``-style names of the 14 edges (rows of the alphas)."""
  return [f'{node} \u2190 {_state_name(inp, math=True)}' for node, inp in EDGES]


def plot_alphas(weights: Mapping[str, np.ndarray], path: str) -> None:
  """Heatmaps (edges x operations) of the softmax weights of both cell types.

  The colour scale of each panel spans its own range (early in a search all weights are
  close to 1/8); each cell shows its value.
  """
  fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), constrained_layout=True)
  for ax, kind in zip(axes, ('normal', 'reduce')):
    w = np.asarray(weights[kind])
    lo, hi = float(w.min()), float(w.max())
    hi = max(hi, lo + 1e-9)
    image = ax.imshow(w, cmap='viridis', vmin=lo, vmax=hi, aspect='auto')
    ax.set_xticks(range(len(PRIMITIVES)), PRIMITIVES, rotation=45, ha='right')
    ax.set_yticks(range(len(EDGES)), edge_labels())
    ax.set_title(f'{kind} cell: softmax(alpha) per edge')
    digits = 2 if hi - lo > 0.05 else 3 if hi - lo > 0.005 else 4
    for e in range(w.shape[0]):
      for o in range(w.shape[1]):
        ax.text(o, e, f'{w[e, o]:.{digits}f}', ha='center', va='center', fontsize=6.5,
                color='white' if w[e, o] < lo + 0.6 * (hi - lo) else 'black')
    fig.colorbar(image, ax=ax, shrink=0.8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _bezier(p0: np.ndarray, p1: np.ndarray, bend: float, num: int = 60) -> np.ndarray:
  """Points of the quadratic Bezier from ``p0`` to ``p1`` bent sideways by ``bend``."""
  mid = (p0 + p1) / 2
  d = p1 - p0
  control = mid + bend * np.array([d[1], -d[0]])
  t = np.linspace(0.0, 1.0, num)[:, None]
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * control + t ** 2 * p1


def _outside(points: np.ndarray, centres: Sequence[np.ndarray], half: tuple[float, float]
             ) -> np.ndarray:
  """The points outside the boxes (half-widths ``half``) around ``centres``."""
  keep = np.ones(len(points), bool)
  for c in centres:
    keep &= (np.abs(points[:, 0] - c[0]) > half[0]) | (np.abs(points[:, 1] - c[1]) > half[1])
  return points[keep]


def _arrow(ax: Any, points: np.ndarray, **style: Any) -> None:
  ax.plot(points[:, 0], points[:, 1], zorder=1, **style)
  ax.annotate('', xy=points[-1], xytext=points[-2], zorder=1,
              arrowprops=dict(arrowstyle='-|>', color=style.get('color'), lw=0,
                              mutation_scale=14, shrinkA=0, shrinkB=0))


def plot_cell(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str,
              path: str) -> None:
  """One derived cell: boxes for the states, arrows labelled with the kept operations.

  Layout: the cell inputs at the upper and lower left, nodes 0-3 in a row, the output
  ``c_{k}`` at the upper right; edges from the inputs are straight, edges between nodes
  arc below the row, the (dashed) concatenation lines rise to the output.
  """
  row = 1.5
  positions = {0: (0.0, 3.2), 1: (0.0, -0.2)}
  for k in range(NUM_NODES):
    positions[NUM_INPUTS + k] = (2.2 + 2.2 * k, row)
  out = NUM_INPUTS + NUM_NODES
  positions[out] = (2.2 + 2.2 * NUM_NODES + 0.6, 3.2)
  positions = {k: np.asarray(v, float) for k, v in positions.items()}
  half = (0.32, 0.24)  # box half-sizes in data units, for trimming the arrows

  fig, ax = plt.subplots(figsize=(13, 5))
  colours = {'input': '#9ecae1', 'node': '#fdd49e', 'output': '#a1d99b'}
  for i, (x, y) in positions.items():
    kind = 'input' if i < NUM_INPUTS else 'output' if i == out else 'node'
    label = 'c_{k}' if i == out else _state_name(i)
    ax.text(x, y, f'${label}$' if '_' in label else label, ha='center', va='center',
            fontsize=13, zorder=3,
            bbox=dict(boxstyle='round,pad=0.45', facecolor=colours[kind], edgecolor='black'))
  for e, (op, src) in enumerate(pairs):
    dst = NUM_INPUTS + e // 2
    from_input = src < NUM_INPUTS
    # Arcs below the row bend right of their direction (positive bend), longer ones lower.
    curve = _bezier(positions[src], positions[dst], 0.0 if from_input else 0.2)
    _arrow(ax, _outside(curve, [positions[src], positions[dst]], half), color='#333333', lw=1.3)
    mx, my = curve[int(0.72 * (len(curve) - 1))] if from_input else curve[len(curve) // 2]
    ax.text(mx, my, op, ha='center', va='center', fontsize=9, zorder=2,
            bbox=dict(boxstyle='round,pad=0.2', facecolor='white', edgecolor='#bbbbbb'))
  for i in concat:
    line = _bezier(positions[i], positions[out], 0.0)
    _arrow(ax, _outside(line, [positions[i], positions[out]], half), color='#999999', lw=1.0,
           linestyle='--')
  xs = [p[0] for p in positions.values()]
  ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
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

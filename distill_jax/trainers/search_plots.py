"""Pictures of a DARTS search: the architecture weights as heatmaps and over the epochs,
the derived cells as graphs; and the figure helpers the experiments' figures share.

Matplotlib only (headless, the Agg backend), drawn in the spirit of the figures of Liu,
Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019), figures 4-5:
the cell inputs ``c_{k-2}``, ``c_{k-1}``, intermediate nodes 0-3 and the output
``c_{k}`` (the concatenation of the intermediate nodes) as boxes, each kept edge
labelled with its operation. Files are written atomically (:func:`save_figure`); the
same figures, small, go to TensorBoard as images (:func:`figure_rgb`,
:class:`TensorBoardImages`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
import tensorboardX  # noqa: E402  pylint: disable=g-import-not-at-top

from distill_jax import genotypes as genotypes_lib  # noqa: E402
from distill_jax.genotypes import NUM_INPUTS, NUM_NODES, PRIMITIVES, Genotype  # noqa: E402
from distill_jax.models.supernet import EDGES  # noqa: E402

ALPHAS_FILE = 'alphas.png'
ALPHA_HISTORY_FILE = 'alphas_history.png'
CELL_FILES = {'normal': 'normal_cell.png', 'reduce': 'reduce_cell.png'}
INPUT_NAMES = ('c_{k-2}', 'c_{k-1}')
TENSORBOARD_DPI = 45  # TensorBoard images stay small (a 14 x 6.5 in figure: 630 x 292 px)
# One colour per operation (PRIMITIVES order) in the alphas-over-epochs plot.
OP_COLOURS = ('#7f7f7f', '#1f77b4', '#17becf', '#2ca02c', '#d62728', '#ff7f0e', '#9467bd',
              '#8c564b')


# ---------------------------------------------------------------------------- helpers


def save_figure(fig: plt.Figure, path: str, *, dpi: float = 110, pdf: bool = False) -> None:
  """Writes ``fig`` to ``path`` (and, with ``pdf``, to the same name ending ``.pdf``, first),
  each atomically: a temporary file, then ``os.replace``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  outs = ([os.path.splitext(path)[0] + '.pdf'] if pdf else []) + [path]
  for out in outs:
    ext = os.path.splitext(out)[1]
    tmp = f'{out}.tmp{os.getpid()}{ext}'
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, out)


def figure_rgb(fig: plt.Figure, dpi: float = TENSORBOARD_DPI) -> np.ndarray:
  """``fig`` rendered at ``dpi`` as an (H, W, 3) uint8 array (a TensorBoard image)."""
  old = fig.get_dpi()
  fig.set_dpi(dpi)
  try:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  finally:
    fig.set_dpi(old)


class TensorBoardImages:
  """Images in TensorBoard's event format in ``logdir`` (tensorboardX), in an event file
  of their own beside the scalars' (suffix ``.images``); ``write_images`` as clu's
  metric writers name it, with (H, W, 3) images. ``purge_step``: a resumed run's first
  step again (TensorBoard drops the killed run's images from there)."""

  def __init__(self, logdir: str, purge_step: int | None = None):
    self._writer = tensorboardX.SummaryWriter(logdir, purge_step=purge_step,
                                              filename_suffix='.images')

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    for tag, image in images.items():
      self._writer.add_image(tag, np.asarray(image), global_step=step, dataformats='HWC')
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

  def __enter__(self) -> 'TensorBoardImages':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _state_name(i: int, math: bool = False) -> str:
  if i >= NUM_INPUTS:
    return str(i - NUM_INPUTS)
  return f'${INPUT_NAMES[i]}$' if math else INPUT_NAMES[i]


def edge_labels() -> list[str]:
  """``'0 <- c_{k-2}'``-style names of the 14 edges (rows of the alphas)."""
  return [f'{node} \u2190 {_state_name(inp, math=True)}' for node, inp in EDGES]


# ---------------------------------------------------------------------------- alphas


def alphas_figure(weights: Mapping[str, np.ndarray], title: str = '') -> plt.Figure:
  """Heatmaps (edges x operations) of the softmax weights of both cell types.

  The colour scale of each panel spans its own range (early in a search all weights are
  close to 1/8), shown by its colour bar; each cell shows its value.
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
  if title:
    fig.suptitle(title)
  return fig


def plot_alphas(weights: Mapping[str, np.ndarray], path: str, title: str = '') -> None:
  """Writes :func:`alphas_figure` to ``path``."""
  fig = alphas_figure(weights, title)
  save_figure(fig, path)
  plt.close(fig)


def read_alpha_history(path: str) -> list[tuple[float, dict[str, np.ndarray]]]:
  """``(epoch, {'normal', 'reduce'}: (14, 8) softmax weights)`` per epoch, in step order,
  from a search's ``genotypes.jsonl`` (its ``alphas_softmax``). A step written twice (a
  resumed search repeats the epochs after its checkpoint) counts once, its last line;
  lines without alphas (older searches) or cut by a kill are skipped."""
  by_step: dict[int, tuple[float, dict[str, np.ndarray]]] = {}
  if not os.path.exists(path):
    return []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        by_step[int(row['step'])] = (float(row['epoch']), {
            kind: np.asarray(row['alphas_softmax'][kind], np.float64)
            for kind in ('normal', 'reduce')})
      except (ValueError, KeyError, TypeError):
        continue
  return [by_step[s] for s in sorted(by_step)]


def alpha_history_figure(history: Sequence[tuple[float, Mapping[str, np.ndarray]]],
                         title: str = '') -> plt.Figure:
  """One panel per edge of each cell type (rows: normal, then reduce; 7 edges a row),
  each a line per operation: its softmax weight over the epochs."""
  epochs = np.asarray([epoch for epoch, _ in history], np.float64)
  cols = 7
  rows_per_kind = -(-len(EDGES) // cols)
  fig, axes = plt.subplots(2 * rows_per_kind, cols, figsize=(16, 9.5), sharex=True,
                           sharey=True, constrained_layout=True, squeeze=False)
  marker = 'o' if len(epochs) <= 12 else None
  labels = edge_labels()
  for k, kind in enumerate(('normal', 'reduce')):
    w = np.stack([np.asarray(weights[kind]) for _, weights in history])  # (epochs, 14, 8)
    for e in range(len(EDGES)):
      ax = axes[k * rows_per_kind + e // cols, e % cols]
      for o, op in enumerate(PRIMITIVES):
        ax.plot(epochs, w[:, e, o], color=OP_COLOURS[o], lw=1.2, marker=marker, ms=3, label=op,
                linestyle='--' if op == 'none' else '-')
      ax.set_title(f'{kind}: {labels[e]}', fontsize=8)
      ax.tick_params(labelsize=7)
  for ax in axes[-1]:
    ax.set_xlabel('epoch', fontsize=8)
  for ax in axes[:, 0]:
    ax.set_ylabel('softmax(alpha)', fontsize=8)
  handles, names = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, names, loc='outside lower center', ncol=len(PRIMITIVES), fontsize=8)
  fig.suptitle(title or 'softmax(alpha) of each operation per edge over the epochs')
  return fig


def plot_alpha_history(history: Sequence[tuple[float, Mapping[str, np.ndarray]]], path: str,
                       title: str = '') -> None:
  """Writes :func:`alpha_history_figure` to ``path``."""
  fig = alpha_history_figure(history, title)
  save_figure(fig, path)
  plt.close(fig)


# ---------------------------------------------------------------------------- cells

HALF = (0.32, 0.24)  # box half-sizes in data units, for trimming the arrows
PORT = 0.11  # a node's two incoming edges end this far above and below its centre
# Arcs between intermediate nodes bend below the row, more the more nodes they span: their
# tangents at a node (slope 2 x bend) differ, so arcs leaving or entering a node fan out.
SPAN_BENDS = (0.12, 0.26, 0.40)
TWIN_BEND = 0.14  # both edges of a node from one state: bent apart by this much


def cell_positions() -> dict[int, np.ndarray]:
  """Box centres: the inputs at the upper and lower left, nodes 0-3 in a row, the output
  at the upper right (state index -> (x, y))."""
  positions = {0: (0.0, 3.2), 1: (0.0, -0.2)}
  for k in range(NUM_NODES):
    positions[NUM_INPUTS + k] = (2.2 + 2.2 * k, 1.5)
  positions[NUM_INPUTS + NUM_NODES] = (2.2 + 2.2 * NUM_NODES + 0.6, 3.2)
  return {k: np.asarray(v, float) for k, v in positions.items()}


def _bezier(p0: np.ndarray, p1: np.ndarray, bend: float, num: int = 120) -> np.ndarray:
  """Points of the quadratic Bezier from ``p0`` to ``p1`` bent sideways by ``bend``."""
  t = np.linspace(0.0, 1.0, num)[:, None]
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * _control(p0, p1, bend) + t ** 2 * p1


def _control(p0: np.ndarray, p1: np.ndarray, bend: float) -> np.ndarray:
  d = p1 - p0
  return (p0 + p1) / 2 + bend * np.array([d[1], -d[0]])


def _outside(points: np.ndarray, centres: Sequence[np.ndarray], half: tuple[float, float]
             ) -> np.ndarray:
  """The points outside the boxes (half-widths ``half``) around ``centres``."""
  keep = np.ones(len(points), bool)
  for c in centres:
    keep &= (np.abs(points[:, 0] - c[0]) > half[0]) | (np.abs(points[:, 1] - c[1]) > half[1])
  return points[keep]


def cell_edge_paths(pairs: Sequence[tuple[str, int]], concat: Sequence[int]) -> list[dict]:
  """The drawn edges of one cell: ``{'op', 'src', 'dst', 'points', 'label_at'}`` per kept
  operation (in ``pairs`` order), then one per concatenated node (``op`` ``'concat'``)
  to the output; ``points`` outside the boxes.

  No two edges lie on top of each other: a node's two incoming edges end at two ports
  (the one arriving from higher up at the upper port), arcs of different spans leave and
  enter at different angles (:data:`SPAN_BENDS`), two edges from one state to one node
  bend apart, and the concatenation lines end at ports spread over the output's box.
  """
  pos = cell_positions()
  out = NUM_INPUTS + NUM_NODES
  bends = []
  for e, (_, src) in enumerate(pairs):
    dst = NUM_INPUTS + e // 2
    bend = 0.0 if src < NUM_INPUTS else SPAN_BENDS[min(dst - src, len(SPAN_BENDS)) - 1]
    if pairs[e ^ 1][1] == src:
      bend += TWIN_BEND if e % 2 == 0 else -TWIN_BEND
    bends.append(bend)
  paths = []
  for e, (op, src) in enumerate(pairs):
    dst = NUM_INPUTS + e // 2
    other = e ^ 1
    # The edge arriving from higher up (its control point) takes the upper port.
    height = _control(pos[src], pos[dst], bends[e])[1]
    other_height = _control(pos[pairs[other][1]], pos[dst], bends[other])[1]
    upper = height > other_height or (height == other_height and e < other)
    end = pos[dst] + np.array([0.0, PORT if upper else -PORT])
    curve = _bezier(pos[src], end, bends[e])
    at = curve[int(0.72 * (len(curve) - 1))] if src < NUM_INPUTS else curve[len(curve) // 2]
    paths.append({'op': op, 'src': src, 'dst': dst, 'label_at': at,
                  'points': _outside(curve, [pos[src], pos[dst]], HALF)})
  offsets = np.linspace(0.15, -0.15, len(concat)) if len(concat) > 1 else [0.0]
  for i, offset in zip(sorted(concat), offsets):
    line = _bezier(pos[i], pos[out] + np.array([0.0, offset]), 0.0)
    paths.append({'op': 'concat', 'src': i, 'dst': out, 'label_at': None,
                  'points': _outside(line, [pos[i], pos[out]], HALF)})
  return paths


def _arrow(ax: Any, points: np.ndarray, **style: Any) -> None:
  ax.plot(points[:, 0], points[:, 1], zorder=1, **style)
  ax.annotate('', xy=points[-1], xytext=points[-2], zorder=1,
              arrowprops=dict(arrowstyle='-|>', color=style.get('color'), lw=0,
                              mutation_scale=14, shrinkA=0, shrinkB=0))


def cell_figure(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str
                ) -> plt.Figure:
  """One derived cell: boxes for the states, arrows labelled with the kept operations
  (:func:`cell_edge_paths`); the (dashed) concatenation lines rise to the output."""
  positions = cell_positions()
  out = NUM_INPUTS + NUM_NODES
  fig, ax = plt.subplots(figsize=(13, 5))
  colours = {'input': '#9ecae1', 'node': '#fdd49e', 'output': '#a1d99b'}
  for i, (x, y) in positions.items():
    kind = 'input' if i < NUM_INPUTS else 'output' if i == out else 'node'
    label = 'c_{k}' if i == out else _state_name(i)
    ax.text(x, y, f'${label}$' if '_' in label else label, ha='center', va='center',
            fontsize=13, zorder=3,
            bbox=dict(boxstyle='round,pad=0.45', facecolor=colours[kind], edgecolor='black'))
  for path in cell_edge_paths(pairs, concat):
    if path['op'] == 'concat':
      _arrow(ax, path['points'], color='#999999', lw=1.0, linestyle='--')
      continue
    _arrow(ax, path['points'], color='#333333', lw=1.3)
    mx, my = path['label_at']
    ax.text(mx, my, path['op'], ha='center', va='center', fontsize=9, zorder=2,
            bbox=dict(boxstyle='round,pad=0.2', facecolor='white', edgecolor='#bbbbbb'))
  xs = [p[0] for p in positions.values()]
  ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
  ax.set_ylim(-0.9, 3.9)
  ax.set_title(title)
  ax.axis('off')
  fig.tight_layout()
  return fig


def plot_cell(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str,
              path: str) -> None:
  """Writes :func:`cell_figure` to ``path``."""
  fig = cell_figure(pairs, concat, title)
  save_figure(fig, path)
  plt.close(fig)


# ---------------------------------------------------------------------------- a search


def genotype_name(genotype: Genotype, workdir: str) -> str:
  """The published name of ``genotype`` if it is one (``DARTS_V1``...), else
  ``'genotype searched in <workdir's name>'``."""
  for name, published in genotypes_lib.GENOTYPES.items():
    if published == genotype:
      return name
  return f'genotype searched in {os.path.basename(os.path.normpath(workdir))}'


def write_search_plots(workdir: str, weights: Mapping[str, np.ndarray], genotype: Genotype, *,
                       epoch: float | None = None, step: int | None = None,
                       history: Sequence[tuple[float, Mapping[str, np.ndarray]]] = (),
                       thumbnails: bool = False) -> dict[str, np.ndarray]:
  """Writes ``alphas.png``, ``alphas_history.png`` (with ``history``: see
  :func:`read_alpha_history`), ``normal_cell.png`` and ``reduce_cell.png``, titled with the
  genotype's name and ``epoch`` (else ``step``). With ``thumbnails``, returns them
  small for TensorBoard (:func:`figure_rgb`) by tag (``'alphas'``, ``'alphas_history'``, ``'normal_cell'``,
  ``'reduce_cell'``), else ``{}``."""
  when = (f'epoch {epoch:g}' if epoch is not None else f'step {step}' if step is not None
          else 'final')
  name = genotype_name(genotype, workdir)
  figs = {'alphas': (ALPHAS_FILE, alphas_figure(weights, f'{name}, {when}'))}
  if history:
    figs['alphas_history'] = (ALPHA_HISTORY_FILE, alpha_history_figure(
        history, f'{name}: softmax(alpha) of each operation per edge, epochs '
        f'{history[0][0]:g}-{history[-1][0]:g}'))
  for kind in ('normal', 'reduce'):
    figs[f'{kind}_cell'] = (CELL_FILES[kind], cell_figure(
        getattr(genotype, kind), getattr(genotype, f'{kind}_concat'),
        f'{name}: {kind} cell, {when}'))
  images = {}
  for tag, (file, fig) in figs.items():
    save_figure(fig, os.path.join(workdir, file))
    if thumbnails:
      images[tag] = figure_rgb(fig)
    plt.close(fig)
  return images

"""DARTS cell genotypes: the operation set, the published cells, JSON I/O and validation.

A genotype describes the two cell types of a DARTS network (Liu, Simonyan & Yang,
"DARTS: Differentiable Architecture Search", ICLR 2019, arXiv:1806.09055): a *normal*
cell and a *reduction* cell. Each cell has two inputs (nodes 0 and 1, the outputs of
the two previous cells) and four intermediate nodes (2..5). The genotype lists eight
``(op, input)`` pairs per cell type; pairs ``2k`` and ``2k + 1`` feed intermediate node
``2 + k``, which is the sum of the two operations applied to their inputs. The cell
output concatenates the nodes in the ``*_concat`` list (``(2, 3, 4, 5)`` in the paper).

This module is pure Python (no JAX/Flax import) so that configs and search code can use
it freely. Genotypes are hashable (tuples all the way down) because networks keep them
as static fields of Flax modules.

The JSON shape matches the one used by the authors' release::

  {"normal": [["sep_conv_3x3", 1], ... 8 pairs], "normal_concat": [2, 3, 4, 5],
   "reduce": [...], "reduce_concat": [2, 3, 4, 5]}
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, Mapping, NamedTuple, Sequence, Union

# The candidate operations, in the order of the paper's release (the search supernet's
# architecture weights index this tuple).
PRIMITIVES: tuple[str, ...] = (
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
)

# Intermediate nodes per cell; a cell genotype has 2 * NUM_NODES (op, input) pairs.
NUM_NODES = 4
NUM_INPUTS = 2

Pair = tuple[str, int]


class Genotype(NamedTuple):
  """A DARTS architecture: the edges and output nodes of the normal and reduction cells.

  Attributes:
    normal: ``2 * NUM_NODES`` ``(op, input_index)`` pairs of the normal cell.
    normal_concat: node indices concatenated to form the normal cell's output.
    reduce: pairs of the reduction cell.
    reduce_concat: node indices concatenated to form the reduction cell's output.
  """
  normal: tuple[Pair, ...]
  normal_concat: tuple[int, ...]
  reduce: tuple[Pair, ...]
  reduce_concat: tuple[int, ...]


_DEFAULT_CONCAT = tuple(range(NUM_INPUTS, NUM_INPUTS + NUM_NODES))

# DARTS (first order) from the paper's release, 'DARTS_V1'.
DARTS_V1 = Genotype(
    normal=(
        ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
        ('skip_connect', 0), ('sep_conv_3x3', 1),
        ('skip_connect', 0), ('sep_conv_3x3', 1),
        ('sep_conv_3x3', 0), ('skip_connect', 2),
    ),
    normal_concat=_DEFAULT_CONCAT,
    reduce=(
        ('max_pool_3x3', 0), ('max_pool_3x3', 1),
        ('skip_connect', 2), ('max_pool_3x3', 0),
        ('max_pool_3x3', 0), ('skip_connect', 2),
        ('skip_connect', 2), ('avg_pool_3x3', 0),
    ),
    reduce_concat=_DEFAULT_CONCAT,
)

# DARTS (second order) from the paper's release, 'DARTS_V2' (the release's default 'DARTS').
DARTS_V2 = Genotype(
    normal=(
        ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
        ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
        ('sep_conv_3x3', 1), ('skip_connect', 0),
        ('skip_connect', 0), ('dil_conv_3x3', 2),
    ),
    normal_concat=_DEFAULT_CONCAT,
    reduce=(
        ('max_pool_3x3', 0), ('max_pool_3x3', 1),
        ('skip_connect', 2), ('max_pool_3x3', 1),
        ('max_pool_3x3', 0), ('skip_connect', 2),
        ('skip_connect', 2), ('max_pool_3x3', 1),
    ),
    reduce_concat=_DEFAULT_CONCAT,
)

GENOTYPES: dict[str, Genotype] = {
    'DARTS_V1': DARTS_V1,
    'DARTS_V2': DARTS_V2,
    'DARTS': DARTS_V2,
}

GenotypeLike = Union[str, Genotype, Mapping[str, Any]]


def genotype_names() -> list[str]:
  """Names of the built-in genotypes accepted by :func:`get_genotype`."""
  return sorted(GENOTYPES)


def _check_pairs(field: str, pairs: Any) -> tuple[Pair, ...]:
  """Validates and normalises one cell's pairs to a tuple of ``(str, int)`` tuples."""
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
    raise ValueError(f'genotype.{field} must be a list of (op, input) pairs; got {pairs!r}')
  if len(pairs) != 2 * NUM_NODES:
    raise ValueError(
        f'genotype.{field} has {len(pairs)} (op, input) pairs; allowed: exactly '
        f'{2 * NUM_NODES} (two per intermediate node)')
  out = []
  for e, pair in enumerate(pairs):
    if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
      raise ValueError(f'genotype.{field}[{e}]={pair!r} is not an (op, input) pair')
    op, idx = pair
    if op not in PRIMITIVES:
      raise ValueError(
          f'genotype.{field}[{e}] op={op!r} is not a DARTS operation; allowed: '
          f'{", ".join(PRIMITIVES)}')
    if isinstance(idx, bool) or not isinstance(idx, int):
      raise ValueError(f'genotype.{field}[{e}] input={idx!r} is not an integer node index')
    node = NUM_INPUTS + e // 2
    if not 0 <= idx < node:
      raise ValueError(
          f'genotype.{field}[{e}] input={idx} does not come from an earlier node of node '
          f'{node}; allowed: 0..{node - 1}')
    out.append((str(op), int(idx)))
  return tuple(out)


def _check_concat(field: str, concat: Any) -> tuple[int, ...]:
  """Validates and normalises a concat list (accepts ``range``)."""
  if isinstance(concat, (str, bytes)) or not isinstance(concat, (Sequence, range)):
    raise ValueError(f'genotype.{field} must be a list of node indices; got {concat!r}')
  concat = tuple(concat)
  n = NUM_INPUTS + NUM_NODES
  if not concat or len(set(concat)) != len(concat) or any(
      isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in concat):
    raise ValueError(
        f'genotype.{field}={list(concat)} must be distinct node indices; allowed: 0..{n - 1}')
  return tuple(int(i) for i in concat)


def validate_genotype(g: Genotype) -> Genotype:
  """Checks a genotype and returns it with every list turned into a tuple (hashable)."""
  return Genotype(
      normal=_check_pairs('normal', g.normal),
      normal_concat=_check_concat('normal_concat', g.normal_concat),
      reduce=_check_pairs('reduce', g.reduce),
      reduce_concat=_check_concat('reduce_concat', g.reduce_concat),
  )


def genotype_to_json(g: Genotype) -> dict[str, list]:
  """The released JSON shape: lists of ``[op, input]`` pairs and lists of node indices."""
  g = validate_genotype(g)
  return {
      'normal': [[op, idx] for op, idx in g.normal],
      'normal_concat': list(g.normal_concat),
      'reduce': [[op, idx] for op, idx in g.reduce],
      'reduce_concat': list(g.reduce_concat),
  }


def genotype_from_json(d: Mapping[str, Any]) -> Genotype:
  """Builds a validated :class:`Genotype` from the released JSON shape.

  The concat lists may be omitted (default ``[2, 3, 4, 5]``); other keys are rejected.
  """
  if not isinstance(d, Mapping):
    raise ValueError(f'a genotype dict must be a mapping; got {type(d).__name__}')
  allowed = Genotype._fields
  unknown = sorted(set(d) - set(allowed))
  if unknown:
    raise ValueError(f'genotype key {unknown[0]!r} is unknown; allowed: {", ".join(allowed)}')
  for key in ('normal', 'reduce'):
    if key not in d:
      raise ValueError(f'genotype dict lacks {key!r}; required: normal, reduce')
  return validate_genotype(Genotype(
      normal=d['normal'],
      normal_concat=d.get('normal_concat', _DEFAULT_CONCAT),
      reduce=d['reduce'],
      reduce_concat=d.get('reduce_concat', _DEFAULT_CONCAT),
  ))


def save_genotype(path: str | os.PathLike, g: Genotype) -> None:
  """Writes ``g`` as JSON (the released shape) to ``path``."""
  with open(path, 'w') as f:
    json.dump(genotype_to_json(g), f, indent=1)
    f.write('\n')


def load_genotype(path: str | os.PathLike) -> Genotype:
  """Reads a genotype JSON file written by :func:`save_genotype` (or by hand); a missing,
  unreadable, truncated or invalid file is a one-line ValueError naming the path."""
  path = os.fspath(path)
  prefix = f'genotype={path!r} is invalid:'
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'{prefix} the file does not exist') from None
  except OSError as e:
    raise ValueError(f'{prefix} the file cannot be read ({e.strerror})') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{prefix} not valid JSON (truncated?): {e.msg} at line {e.lineno} '
                     f'column {e.colno}') from None
  except UnicodeDecodeError:
    raise ValueError(f'{prefix} not a text (JSON) file') from None
  try:
    return genotype_from_json(d)
  except ValueError as e:
    raise ValueError(f'{prefix} {e}') from None


def get_genotype(name_or_value: GenotypeLike) -> Genotype:
  """Resolves a genotype from a built-in name, a ``.json`` path, a dict, or a Genotype.

  Args:
    name_or_value: ``'DARTS_V1'``, ``'DARTS_V2'`` (alias ``'DARTS'``), a path to a JSON
      file in the released shape, a dict in that shape, or a :class:`Genotype`
      (lists inside are converted to tuples).

  Returns:
    A validated, hashable :class:`Genotype`.
  """
  if isinstance(name_or_value, Genotype):
    return validate_genotype(name_or_value)
  if isinstance(name_or_value, Mapping):
    return genotype_from_json(name_or_value)
  if isinstance(name_or_value, (str, os.PathLike)):
    name = os.fspath(name_or_value)
    if name in GENOTYPES:
      return GENOTYPES[name]
    if name.endswith('.json'):
      return load_genotype(name)
    close = difflib.get_close_matches(name, genotype_names(), n=1)
    raise ValueError(
        f'genotype={name!r} is not a known genotype; allowed: {", ".join(genotype_names())} '
        'or a path to a .json file' + (f' (closest: {close[0]})' if close else ''))
  raise ValueError(
      f'genotype={name_or_value!r} has type {type(name_or_value).__name__}; allowed: a name, '
      'a .json path, a dict or a Genotype')

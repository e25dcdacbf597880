"""How a job runs, beside what it computes (the config): mode and shard.

Every job module (:mod:`distill_jax.trainers.train`, :mod:`distill_jax.trainers.search`,
:mod:`distill_jax.experiments.grid`, :mod:`distill_jax.experiments.darts_fisher`) has ``validate(config)`` and
``run(config, workdir, options)``; ``python -m distill_jax.main`` builds the options from
``--mode`` and ``--shard``.
"""

from __future__ import annotations

import dataclasses

MODES = ('train', 'evaluate', 'report')


@dataclasses.dataclass(frozen=True)
class JobOptions:
  """``mode``: ``train`` (run or resume, then report), ``evaluate`` (score what is saved,
  train nothing) or ``report`` (write the reports of finished runs only); ``shard`` of
  ``num_shards``: the part of a job's independent runs this process does."""
  mode: str = 'train'
  shard: int = 0
  num_shards: int = 1

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'--mode={self.mode!r} is invalid; allowed: {", ".join(MODES)}')
    if not (isinstance(self.num_shards, int) and self.num_shards >= 1
            and isinstance(self.shard, int) and 0 <= self.shard < self.num_shards):
      raise ValueError(f'--shard={self.shard}/{self.num_shards} is invalid: use i/n with '
                       '0 <= i < n, e.g. --shard=0/4')


def parse_shard(text: str) -> tuple[int, int]:
  """``'1/4'`` -> ``(1, 4)``; anything else is a one-line ValueError."""
  try:
    i, n = (int(part) for part in text.split('/'))
  except ValueError:
    raise ValueError(f'--shard={text!r} is invalid: use i/n, e.g. --shard=0/4') from None
  JobOptions(shard=i, num_shards=n)
  return i, n

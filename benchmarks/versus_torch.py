r"""The KD + AT train step in JAX against the same step in plain PyTorch, interleaved.

  pip install torch==2.13.0        # optional benchmark extra, CPU build on a CPU machine
  python benchmarks/versus_torch.py --json /tmp/versus_torch.json
  python benchmarks/versus_torch.py --variants=jax,jax_cores,torch_compile --rounds=8

WRN-16-2 student from a frozen WRN-40-2 teacher, batch 128, CIFAR-sized uint8 input,
augmentation + forward + KD + AT + backward + SGD update in every variant. Each variant
lives in its own worker process (own XLA flags / thread pools, so no variant's threads
idle-spin while another is timed); after every worker has compiled and warmed up, the
coordinator asks them in turn for ``--steps`` steps, ``--rounds`` times, so a change of
machine load hits all variants alike. Reported: median seconds per step, images/s, first
step (compile) seconds, and every variant's images/s over the best PyTorch variant's.

JAX variants (``distill_jax.trainers.steps.train_step``, the trainer's own step):
  jax            one device (XLA's default CPU setup; on a GPU, the GPU)
  jax_bf16       the same with bfloat16 compute (float32 parameters)
  jax_cores      one XLA CPU device per core (``JAX_NUM_CPU_DEVICES``, the trainer's
                 ``--cpu_devices``), the batch sharded over them; README "Benchmarks" says why
  jax_cores_bf16 the same with bfloat16 compute (float32 parameters)
PyTorch variants (``torch_kd_at.py``, on CUDA when PyTorch sees it): torch_eager,
torch_channels_last, torch_compile, torch_compile_channels_last, torch_amp_bf16 and
torch_compile_amp_bf16 (autocast bfloat16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TAG = '@@'  # prefix of protocol lines on a worker's stdout
JAX_VARIANTS = {
    'jax': ({}, 'float32'),
    'jax_cores': ({'cores_as_devices': True}, 'float32'),
    'jax_cores_bf16': ({'cores_as_devices': True}, 'bfloat16'),
    'jax_bf16': ({}, 'bfloat16'),
}
TORCH_VARIANTS = ('torch_eager', 'torch_channels_last', 'torch_compile',
                  'torch_compile_channels_last', 'torch_amp_bf16', 'torch_compile_amp_bf16')
DEFAULT_VARIANTS = 'jax,jax_cores,torch_eager,torch_channels_last,torch_compile'


def _say(obj) -> None:
  print(TAG + json.dumps(obj), flush=True)


def worker(variant: str, batch: int) -> None:
  """Builds one variant, reports its first step, then serves 'run K' requests."""
  if variant in JAX_VARIANTS:
    sys.path.insert(0, HERE)
    import train_step  # pylint: disable=import-outside-toplevel
    first, run = train_step.make_runner('wrn', 'kd_at', batch,
                                        compute_dtype=JAX_VARIANTS[variant][1])
    import jax  # pylint: disable=import-outside-toplevel
    info = {'devices': jax.device_count(), 'backend': jax.default_backend()}
  else:
    import torch  # pylint: disable=import-outside-toplevel
    import torch_kd_at  # pylint: disable=import-outside-toplevel
    first, run = torch_kd_at.make_runner(variant.removeprefix('torch_'), batch)
    info = {'threads': torch.get_num_threads(), 'torch': torch.__version__}
  run()  # one more warm-up step after compilation
  _say({'first_step_s': first, **info})
  for line in sys.stdin:
    if line.startswith('run'):
      _say([run() for _ in range(int(line.split()[1]))])
    else:
      break


def _env(variant: str) -> dict:
  # Variants share an accelerator: none takes most of its memory up front.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  options = JAX_VARIANTS.get(variant, ({}, None))[0]
  if options.get('cores_as_devices'):
    env['JAX_NUM_CPU_DEVICES'] = str(os.cpu_count())
  return env


class Worker:
  """A variant's process and its line protocol."""

  def __init__(self, variant: str, batch: int):
    self.variant = variant
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f'--worker={variant}', f'--batch={batch}'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(variant), cwd=HERE)

  def read(self):
    for line in self.proc.stdout:
      if line.startswith(TAG):
        return json.loads(line[len(TAG):])
    raise RuntimeError(f'worker {self.variant} exited with {self.proc.wait()}')

  def steps(self, k: int) -> list[float]:
    self.proc.stdin.write(f'run {k}\n')
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def compare(variants: list[str], batch: int, rounds: int, steps: int) -> dict:
  results = {}
  workers = []
  for v in variants:  # built one at a time, so compile times are not disturbed
    w = Worker(v, batch)
    results[v] = {'setup': w.read(), 'step_s': []}
    workers.append(w)
    print(f'{v}: ready, first step {results[v]["setup"]["first_step_s"]:.1f} s', flush=True)
  for r in range(rounds):
    for w in workers:
      results[w.variant]['step_s'] += w.steps(steps)
    print(f'round {r + 1}/{rounds}', flush=True)
  for w in workers:
    w.close()
  for v, res in results.items():
    res['median_step_s'] = statistics.median(res['step_s'])
    res['images_per_s'] = batch / res['median_step_s']
  torch_best = max((v for v in results if v.startswith('torch')),
                   key=lambda v: results[v]['images_per_s'], default=None)
  summary = {'batch': batch, 'rounds': rounds, 'steps_per_round': steps, 'cpu_count': os.cpu_count(),
             'best_torch': torch_best, 'variants': results}
  if torch_best:
    best = results[torch_best]['images_per_s']
    for v, res in results.items():
      res['over_best_torch'] = res['images_per_s'] / best
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variants', default=DEFAULT_VARIANTS,
                      help=f'comma-separated, from {", ".join([*JAX_VARIANTS, *TORCH_VARIANTS])}')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=6, help='round-robin passes over the variants')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per variant per round')
  parser.add_argument('--json', default='', help='write the figures here')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.batch)
    return
  variants = args.variants.split(',')
  unknown = [v for v in variants if v not in JAX_VARIANTS and v not in TORCH_VARIANTS]
  if unknown:
    parser.error(f'--variants: {unknown[0]!r} is not allowed; use {", ".join([*JAX_VARIANTS, *TORCH_VARIANTS])}')
  summary = compare(variants, args.batch, args.rounds, args.steps)
  print('\n| variant | first step s | step ms | images/s | / best torch |\n|---|---:|---:|---:|---:|')
  for v, res in summary['variants'].items():
    ratio = res.get('over_best_torch')
    print(f'| {v} | {res["setup"]["first_step_s"]:.1f} | {1e3 * res["median_step_s"]:.0f} | '
          f'{res["images_per_s"]:.1f} | {"" if ratio is None else f"{ratio:.2f}"} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=2)


if __name__ == '__main__':
  main()

r"""The accelerator benchmark: every figure distill_jax's speed claims rest on, in one command.

  bash benchmarks/accelerator.sh --out /tmp/bench            # a GPU or TPU machine, ~8 min
  WHEELS=/path/to/wheels bash benchmarks/accelerator.sh ...   # first install wheels from there
  python benchmarks/accelerator.py --dry --out /tmp/bench     # every part at toy size, CPU

Made for machines that reach no package index and give short runs: the checkout runs from
``PYTHONPATH`` (no install), each part is its own process with its own time limit, the
whole run stays inside ``--budget`` seconds (480 by default), and ``accelerator.json`` is
rewritten after every part, so a part that fails or runs out of time is reported as missing
(with why) and the rest still count. A dry run checks that every part runs, two at a
time, and its figures mean nothing. Parts (``--only`` picks some):

  env          device, backend and versions
  kd_at        KD + AT train step, WRN-16-2 <- WRN-40-2, batch 128, float32: images/s,
               compile seconds, peak device memory (benchmarks/train_step.py)
  kd_at_bf16   the same step computing in bfloat16
  torch        the same step in PyTorch (eager, channels-last, torch.compile, AMP bf16)
               interleaved with the JAX step in one run, when torch is importable
               (benchmarks/versus_torch.py)
  darts_fast   DARTS_V1-10 <- its uniformly grown 2x teacher, KD + AT step, impl='fast'
  darts_lax    the same with impl='lax' (library convolutions)
  fisher       one Fisher batch / one forward + backward (benchmarks/fisher.py)
  search       exact second-order / first-order DARTS search step (benchmarks/darts_search.py)
  wrn40        WRN-40-2 alone: projected minutes of 200 CIFAR-10 epochs (steady-state step
               x steps, data on device, one compilation, no evaluation)
  pipeline     the darts_fisher recipe's steps at its batch size (student alone, grown
               teacher alone, KD + AT student): projected hours of configs/darts_fisher.py's
               full recipe (every teacher timed as the uniform one)

Targets (README "GPU and TPU"): KD + AT step >= 1.2x the best PyTorch variant on the same
GPU; 200 epochs of WRN-40-2 <= 5 minutes on an H200-class GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CIFAR_TRAIN_IMAGES = 50_000

ENV_SCRIPT = r'''
import json, platform, sys
import jax, jaxlib, flax, optax, orbax.checkpoint
d = jax.devices()[0]
info = {'backend': jax.default_backend(), 'device': d.device_kind, 'device_count': jax.device_count(),
        'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
        'flax': flax.__version__, 'optax': optax.__version__,
        'orbax_checkpoint': orbax.checkpoint.__version__}
try:
  import torch
  info['torch'] = torch.__version__
  info['torch_cuda'] = torch.cuda.is_available()
except ImportError:
  info['torch'] = None
json.dump(info, open(sys.argv[1], 'w'))
'''


def parts(dry: bool) -> dict[str, list[str]]:
  """Each part's command (without ``--json``); toy sizes when ``dry``."""
  py = sys.executable
  step = [py, os.path.join(HERE, 'train_step.py')]
  size = ['--toy', '--batch=8', '--repeats=2'] if dry else ['--batch=128', '--repeats=20']
  recipe = ['--toy', '--batch=8', '--repeats=2'] if dry else ['--batch=64', '--repeats=20']
  torch_variants = 'jax,torch_eager' if dry else (
      'jax,jax_bf16,torch_eager,torch_channels_last,torch_compile,torch_amp_bf16')
  return {
      'env': [py, '-c', ENV_SCRIPT],
      'kd_at': [*step, '--pairs=wrn', '--dtype=float32', *size],
      'kd_at_bf16': [*step, '--pairs=wrn', '--dtype=bfloat16', '--modes=kd_at', *size],
      'torch': [py, os.path.join(HERE, 'versus_torch.py'), f'--variants={torch_variants}',
                '--batch=8' if dry else '--batch=128', '--rounds=2' if dry else '--rounds=5'],
      'darts_fast': [*step, '--pairs=darts', '--impl=fast', *size],
      'darts_lax': [*step, '--pairs=darts', '--impl=lax', '--modes=kd_at', *size],
      'fisher': [py, os.path.join(HERE, 'fisher.py'),
                 *(['--model=wrn', '--image_size=8', '--batch=8', '--repeats=2'] if dry
                   else ['--batch=64', '--repeats=10'])],
      'search': [py, os.path.join(HERE, 'darts_search.py'), '--only=first_order,second_order_exact',
                 *(['--layers=3', '--channels=4', '--batch=8', '--repeats=2'] if dry
                   else ['--layers=8', '--channels=16', '--batch=64', '--image=32',
                         '--image-channels=3', '--impl=auto', '--repeats=5'])],
      'wrn40': [*step, '--pairs=wrn40', *size],
      'pipeline': [*step, '--pairs=darts,darts_teacher', *recipe],
  }


# Seconds a part may take at most (the budget left caps it further).
LIMITS = {'env': 60, 'kd_at': 90, 'kd_at_bf16': 90, 'torch': 150, 'darts_fast': 120,
          'darts_lax': 120, 'fisher': 90, 'search': 150, 'wrn40': 90, 'pipeline': 150}


def run_part(name: str, cmd: list[str], limit: float, env: dict) -> dict:
  """Runs one part in its own process; its JSON, or ``{'missing': why}``."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    full = [*cmd, out] if name == 'env' else [*cmd, f'--json={out}']
    t0 = time.monotonic()
    try:
      proc = subprocess.run(full, env=env, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
      return {'missing': f'timed out after {limit:.0f} s'}
    seconds = time.monotonic() - t0
    if proc.returncode != 0 or not os.path.exists(out):
      last = (proc.stderr.strip().splitlines() or ['no output'])[-1]
      return {'missing': f'exit {proc.returncode}: {last[:300]}', 'seconds': seconds}
    with open(out) as f:
      return {**json.load(f), 'seconds': seconds}


def recipe_projection(pipeline: dict, config_path: str, dry: bool) -> dict:
  """Hours of the darts_fisher recipe from the steps timed at its batch size."""
  spec = importlib.util.spec_from_file_location('darts_fisher_config', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  pairs = {p['pair']: p for p in pipeline['pairs']}
  steps = c.run.num_epochs * math.ceil(CIFAR_TRAIN_IMAGES / c.run.batch_size)
  teachers = len(c.teachers)
  per_seed = steps * (pairs['darts']['student_step_s']
                      + teachers * (pairs['darts_teacher']['student_step_s']
                                    + pairs['darts']['kd_at_step_s']))
  compiles = (pairs['darts']['student_compile_s'] + pairs['darts']['kd_at_compile_s']
              + pairs['darts_teacher']['student_compile_s'])
  return {'seeds': len(c.seeds), 'teachers': teachers, 'epochs': c.run.num_epochs,
          'batch': c.run.batch_size, 'timed_batch': pairs['darts']['batch'], 'toy': dry,
          'hours': (len(c.seeds) * (per_seed + (1 + 2 * teachers) * compiles)) / 3600}


def headline(results: dict) -> dict:
  """The figures of README's table, from whichever parts finished."""
  def pair(part, name='wrn'):
    found = [p for p in results.get(part, {}).get('pairs', []) if p['pair'] == name]
    return found[0] if found else {}
  h = {}
  for part in ('kd_at', 'kd_at_bf16'):
    p = pair(part)
    if p:
      h[f'{part}_images_per_s'] = p['kd_at_images_per_s']
      h[f'{part}_compile_s'] = p['kd_at_compile_s']
      if 'peak_device_bytes' in p:
        h[f'{part}_peak_gib'] = p['peak_device_bytes'] / 2**30
  torch = results.get('torch', {})
  if torch.get('best_torch'):
    jax_best = max((v for v in torch['variants'] if v.startswith('jax')),
                   key=lambda v: torch['variants'][v]['images_per_s'])
    h['kd_at_over_best_torch'] = torch['variants'][jax_best]['over_best_torch']
    h['best_torch_variant'] = torch['best_torch']
    h['best_torch_images_per_s'] = torch['variants'][torch['best_torch']]['images_per_s']
  for impl in ('fast', 'lax'):
    p = pair(f'darts_{impl}', 'darts')
    if p:
      h[f'darts_kd_at_{impl}_images_per_s'] = p['kd_at_images_per_s']
      h[f'darts_kd_at_{impl}_compile_s'] = p['kd_at_compile_s']
  if 'fisher_over_fwd_bwd' in results.get('fisher', {}):
    h['fisher_over_fwd_bwd'] = results['fisher']['fisher_over_fwd_bwd']
  if 'second_over_first_order' in results.get('search', {}):
    h['second_over_first_order'] = results['search']['second_over_first_order']
  if pair('wrn40', 'wrn40'):
    h['wrn40_200_epochs_minutes'] = pair('wrn40', 'wrn40')['recipe_200_epochs_minutes']
  if 'projection' in results.get('pipeline', {}):
    h['darts_fisher_recipe_hours'] = results['pipeline']['projection']['hours']
  return h


def table(summary: dict) -> str:
  lines = ['| figure | value |', '|---|---:|']
  for key, value in {**summary['env'], **summary['headline']}.items():
    lines.append(f'| {key} | {value:.3f} |' if isinstance(value, float) else f'| {key} | {value} |')
  for name, why in summary['missing'].items():
    lines.append(f'| {name} | missing: {why} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder for accelerator.json and accelerator.md')
  parser.add_argument('--dry', action='store_true', help='every part at toy size (a CPU check)')
  parser.add_argument('--budget', type=float, default=480.0, help='seconds for the whole run')
  parser.add_argument('--only', default='', help='comma-separated parts (default: all)')
  args = parser.parse_args()
  commands = parts(args.dry)
  names = args.only.split(',') if args.only else list(commands)
  unknown = [n for n in names if n not in commands]
  if unknown:
    parser.error(f'--only: {unknown[0]!r} is not a part; use {", ".join(commands)}')
  os.makedirs(args.out, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO, *filter(None, [os.environ.get('PYTHONPATH')])]), PYTHONUNBUFFERED='1')
  if args.dry:
    env.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  deadline = time.monotonic() + args.budget
  results, missing = {}, {}
  summary = {'dry': args.dry, 'budget_s': args.budget, 'env': {}, 'headline': {},
             'missing': missing, 'parts': results}
  lock = threading.Lock()

  def one(name: str) -> None:
    left = deadline - time.monotonic() - 5
    if name == 'torch' and importlib.util.find_spec('torch') is None:
      result = {'missing': 'torch is not installed'}
    elif left < 10:
      result = {'missing': 'no time left in the budget'}
    else:
      print(f'[{name}] up to {min(LIMITS[name], left):.0f} s', flush=True)
      result = run_part(name, commands[name], min(LIMITS[name], left), env)
      if name == 'pipeline' and 'missing' not in result:
        try:
          result['projection'] = recipe_projection(
              result, os.path.join(REPO, 'configs', 'darts_fisher.py'), args.dry)
        except Exception as e:  # pylint: disable=broad-except
          result = {'missing': f'projection failed: {type(e).__name__}: {e}'}
    with lock:
      (missing if 'missing' in result else results)[name] = (
          result['missing'] if 'missing' in result else result)
      summary['env'] = {k: v for k, v in results.get('env', {}).items() if k != 'seconds'}
      summary['headline'] = headline(results)
      with open(os.path.join(args.out, 'accelerator.json'), 'w') as f:
        json.dump(summary, f, indent=2)

  # Timed parts run one at a time; a dry run only checks that each part runs, two at once.
  with concurrent.futures.ThreadPoolExecutor(2 if args.dry else 1) as pool:
    list(pool.map(one, names))
  text = table(summary)
  with open(os.path.join(args.out, 'accelerator.md'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  main()

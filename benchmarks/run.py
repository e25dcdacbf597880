r"""All benchmarks in one command: a table on stdout and one JSON file.

  python benchmarks/run.py --json /tmp/bench.json
  python benchmarks/run.py --json /tmp/bench.json --quick     # smaller, for a 2-core CPU

Runs, each in its own process on whatever devices JAX sees:
  train_step.py    images/s of the jitted train step: WRN-16-2 alone and from WRN-40-2
                   (KD + AT), DARTS_V1 10 cells alone and from a 2x-wide teacher; batch 128;
                   WRN-40-2 alone and the time of its 200-epoch CIFAR-10 recipe
  fisher.py        one Fisher batch / one plain forward + backward (DARTS_V1 10 cells)
  darts_search.py  first- and second-order search steps / a supernet forward + backward
  versus_torch.py  only when PyTorch is installed (``pip install torch==2.13.0``): the KD + AT
                   step in JAX (one device; one device per core) and in plain PyTorch (eager,
                   channels-last, torch.compile), interleaved in one run

The JSON holds each benchmark's own output and the headline ratios
``kd_at_step_images_per_s``, ``fisher_over_fwd_bwd``, ``second_over_first_order`` and, with
PyTorch, ``kd_at_step_over_best_torch`` (the faster JAX variant over the fastest PyTorch one;
every variant's ratio is in ``details.versus_torch``).
Targets: Fisher <= 0.6x a forward + backward; exact second order <= 3x first order;
KD + AT step >= 1.0x the best PyTorch variant.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script: str, args: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    cmd = [sys.executable, os.path.join(HERE, script), *args, f'--json={out}']
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(out) as f:
      return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', required=True, help='write all figures here')
  parser.add_argument('--quick', action='store_true', help='smaller batches and fewer repeats')
  args = parser.parse_args()
  repeats = '3' if args.quick else '10'
  results = {
      'train_step': run('train_step.py', [f'--repeats={repeats}'] + (['--batch=64'] if args.quick else [])),
      'fisher': run('fisher.py', [f'--repeats={repeats}'] + (['--batch=32'] if args.quick else [])),
      'darts_search': run('darts_search.py', [f'--repeats={repeats}']),
  }
  if importlib.util.find_spec('torch') is not None:
    results['versus_torch'] = run('versus_torch.py', ['--rounds=3' if args.quick else '--rounds=6'])
  pairs = {p['pair']: p for p in results['train_step']['pairs']}
  headline = {
      'kd_at_step_images_per_s': pairs['wrn']['kd_at_images_per_s'],
      'student_step_images_per_s': pairs['wrn']['student_images_per_s'],
      'darts_kd_at_step_images_per_s': pairs.get('darts', {}).get('kd_at_images_per_s'),
      'wrn_40_2_200_epochs_minutes': pairs.get('wrn40', {}).get('recipe_200_epochs_minutes'),
      'fisher_over_fwd_bwd': results['fisher']['fisher_over_fwd_bwd'],
      'second_over_first_order': results['darts_search'].get('second_over_first_order'),
      'fd_over_first_order': results['darts_search'].get('fd_over_first_order'),
      'backend': results['train_step']['backend'], 'device': results['train_step']['device'],
  }
  if 'versus_torch' in results:
    variants = results['versus_torch']['variants']
    best_jax = max((v for v in variants if v.startswith('jax')), key=lambda v: variants[v]['images_per_s'])
    headline.update(kd_at_step_over_best_torch=variants[best_jax]['over_best_torch'],
                    kd_at_best_jax_variant=best_jax,
                    kd_at_best_torch_variant=results['versus_torch']['best_torch'])
  print('\n| figure | value |\n|---|---:|')
  for key, value in headline.items():
    print(f'| {key} | {value:.3f} |' if isinstance(value, float) else f'| {key} | {value} |')
  with open(args.json, 'w') as f:
    json.dump({**headline, 'details': results}, f, indent=2)


if __name__ == '__main__':
  main()

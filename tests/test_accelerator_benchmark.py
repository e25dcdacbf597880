"""benchmarks/accelerator.sh: the dry run finishes every part, and a part that fails or
outlasts its limit is reported missing while the others still count."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import CACHE_DIR, REPO


def load_benchmark():
  spec = importlib.util.spec_from_file_location(
      'accelerator', os.path.join(REPO, 'benchmarks', 'accelerator.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.e2e
@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path):
  out = str(tmp_path / 'bench')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE_DIR, PYTHON=sys.executable)
  proc = subprocess.run(['bash', 'benchmarks/accelerator.sh', '--dry', f'--out={out}'], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.load(open(os.path.join(out, 'accelerator.json')))
  has_torch = importlib.util.find_spec('torch') is not None
  assert summary['missing'] == ({} if has_torch else {'torch': 'torch is not installed'})
  assert summary['env']['backend'] == 'cpu' and summary['env']['jax']
  h = summary['headline']
  for key in ('kd_at_images_per_s', 'kd_at_bf16_images_per_s', 'darts_kd_at_fast_images_per_s',
              'darts_kd_at_lax_images_per_s', 'fisher_over_fwd_bwd', 'second_over_first_order',
              'wrn40_200_epochs_minutes', 'darts_fisher_recipe_hours', 'kd_at_compile_s'):
    assert h[key] > 0, key
  darts = {p['impl']: p for part in ('darts_fast', 'darts_lax') for p in summary['parts'][part]['pairs']}
  assert set(darts) == {'fast', 'lax'}
  projection = summary['parts']['pipeline']['projection']
  assert (projection['seeds'], projection['teachers'], projection['epochs']) == (3, 3, 200)
  table = open(os.path.join(out, 'accelerator.md')).read()
  assert '| kd_at_images_per_s |' in table and '| device |' in table


def test_a_failed_or_slow_part_is_missing_not_fatal():
  bench = load_benchmark()
  env = dict(os.environ)
  slow = bench.run_part('slow', [sys.executable, '-c', 'import time; time.sleep(30)'], 1, env)
  assert slow == {'missing': 'timed out after 1 s'}
  failed = bench.run_part('failed', [sys.executable, '-c', 'raise SystemExit("no GPU here")'], 30, env)
  assert failed['missing'] == 'exit 1: no GPU here'
  # The headline is built from whatever finished.
  assert bench.headline({'fisher': {'fisher_over_fwd_bwd': 0.5}}) == {'fisher_over_fwd_bwd': 0.5}


def test_unknown_part_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, 'benchmarks/accelerator.py', '--only=kd_at,fp8',
                         f'--out={tmp_path}'], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2 and "--only: 'fp8' is not a part" in proc.stderr
  assert not os.listdir(tmp_path)

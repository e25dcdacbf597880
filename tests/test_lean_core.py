"""The core without TensorFlow: every module imports and a short training runs.

A subprocess makes ``tensorflow`` and ``tensorflow_datasets`` unimportable (as on an
accelerator machine that has neither, or a ``pip install distill_jax`` without the
``cifar`` extra), imports every distill_jax module, trains a WRN-10-1 on digits through
the job interface, and asks for CIFAR, which must be one line naming the extra.
"""

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import distill_jax
from conftest import CACHE_DIR, REPO

BLOCKED = ('tensorflow', 'tensorflow_datasets')

SCRIPT = r'''
import importlib, importlib.machinery, json, sys

class Hide(importlib.machinery.PathFinder):
  """The path finder, blind to BLOCKED: they look uninstalled (find_spec gives None)."""
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      return None
    return super().find_spec(name, path, target)

sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
for name in MODULES:
  importlib.import_module(name)

sys.path.insert(0, 'tests')
from conftest import tiny_train_config
from distill_jax import jobs, validation
results = jobs.run(tiny_train_config(num_epochs=1), WORKDIR)
cifar = tiny_train_config()
cifar.data.name = 'cifar10'
try:
  jobs.run(cifar, WORKDIR + '_cifar')
  message = None
except validation.ConfigError as e:
  message = str(e)
print(json.dumps({'top1': results['test_top1_error'], 'cifar': message,
                  'loaded': sorted({m.split('.')[0] for m in sys.modules} & set(BLOCKED))}))
'''


def all_modules():
  return sorted(m.name for m in pkgutil.walk_packages(distill_jax.__path__, 'distill_jax.'))


@pytest.mark.optimized
@pytest.mark.e2e
def test_core_imports_and_trains_without_tensorflow(tmp_path):
  workdir = str(tmp_path / 'run')
  script = (f'BLOCKED = {BLOCKED!r}\nMODULES = {all_modules()!r}\nWORKDIR = {workdir!r}\n'
            + SCRIPT)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['loaded'] == []
  assert out['top1'] < 0.9  # it learned something in one epoch (chance is 0.9)
  assert out['cifar'] == ("config.data.name='cifar10' is invalid: it is read through "
                          "tensorflow-datasets, which is not installed: "
                          "pip install 'distill_jax[cifar]'")
  assert not os.path.exists(workdir + '_cifar')
  # TensorBoard events and the JSONL metrics were written without TensorFlow.
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert rows and all('step' in r for r in rows)


def test_module_list_is_the_package():
  modules = all_modules()
  assert 'distill_jax.trainers.loop' in modules and 'distill_jax.experiments.darts_fisher' in modules
  assert 'distill_jax.grow.transfer' in modules and 'distill_jax.main' in modules


def test_losses_import_pulls_in_no_tensorflow_orbax_clu_or_flax():
  # The losses, the distillation zoo included, are pure JAX: a process that imports only
  # distill_jax.losses loads none of the training stack.
  heavy = ('tensorflow', 'tensorflow_datasets', 'orbax', 'clu', 'flax', 'ml_collections')
  code = ('import json, sys, distill_jax.losses; '
          f'print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []

"""The trainer end to end on digits: learning, sharding, kill-and-resume, NaNs, bad configs."""

import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import CACHE_DIR, REPO, tiny_train_config
from distill_jax import jobs
from distill_jax import models
from distill_jax import validation
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import train as train_lib

# Execution-bound: trains for tens of steps (conftest.py)
pytestmark = pytest.mark.optimized


def restore_params(workdir):
  with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(workdir)) as manager:
    restored = manager.restore(manager.latest_step())
  return restored['params'], restored['batch_stats'], int(restored['step'])


def run_main(args, **kwargs):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen([sys.executable, '-m', 'distill_jax.main', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def overrides(config):
  """``--config.a.b=v`` flags that turn configs/train.py:demo into ``config``."""
  flat = loop.flatten(config.to_dict())
  return [f'--config.{k}={v}' for k, v in flat.items()
          if k not in ('optimizer.milestones',) and v != '']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One uninterrupted tiny run shared by several tests."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  config = tiny_train_config()
  results = train_lib.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_short_run_learns_digits_and_writes_results(trained):
  config, workdir, results = trained
  # Chance is 90% error; two epochs of a WRN-10-1 get far below it.
  assert results['test_top1_error'] < 0.25
  assert 0.0 <= results['test_top5_error'] <= results['test_top1_error']
  on_disk = json.load(open(os.path.join(workdir, 'results.json')))
  assert on_disk['test_top1_error'] == results['test_top1_error']
  expected_params = models.count_params(models.param_shapes(
      models.create_model(**config.model), (1, 8, 8, 1))['params'])
  assert on_disk['num_params'] == expected_params
  assert on_disk['config']['model']['name'] == 'wrn' and 'jax' in on_disk['versions']
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_rows = [r for r in rows if 'train_loss' in r]
  assert {'train_grad_norm', 'train_param_norm', 'train_learning_rate',
          'train_top1_error', 'train_top5_error'} <= set(train_rows[0])
  assert train_rows[-1]['train_loss'] < train_rows[0]['train_loss']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  # keep_checkpoints=3 of 20, 40, 60, 80, 88.
  assert sorted(int(s) for s in os.listdir(ckpt_lib.checkpoint_dir(workdir))) == [60, 80, 88]


def test_evaluate_scores_the_latest_checkpoint(trained):
  config, workdir, results = trained
  scores = train_lib.evaluate(config, workdir)
  assert scores['step'] == 88
  assert scores['test_top1_error'] == pytest.approx(results['test_top1_error'], abs=1e-9)


def test_finished_workdir_trains_nothing_new(trained):
  config, workdir, results = trained
  params_before, _, _ = restore_params(workdir)
  results_file = os.path.join(workdir, 'results.json')
  mtime = os.stat(results_file).st_mtime_ns
  again = train_lib.train_and_evaluate(config, workdir)
  # The same config on a finished workdir: its results, not recomputed or rewritten.
  assert again['wall_time_s'] == results['wall_time_s']
  assert again['test_top1_error'] == results['test_top1_error']
  assert os.stat(results_file).st_mtime_ns == mtime
  params_after, _, step = restore_params(workdir)
  assert step == 88
  jax.tree.map(np.testing.assert_array_equal, params_before, params_after)


@pytest.mark.e2e
def test_sigkill_and_restart_ends_exactly_like_uninterrupted(trained, tmp_path):
  config, uninterrupted, results = trained
  workdir = str(tmp_path / 'killed')
  args = ['--config=configs/train.py:demo', f'--workdir={workdir}', *overrides(config)]
  proc = run_main(args)
  first = os.path.join(ckpt_lib.checkpoint_dir(workdir), '20')
  deadline = time.time() + 240
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  killed_at = ckpt_lib.latest_step(workdir)
  assert killed_at is not None and killed_at < 88

  # The resumed run from the command line, as a user reads it.
  proc = run_main(args)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  resumed = loop.read_json(os.path.join(workdir, loop.RESULTS_FILE))
  assert out.strip().splitlines()[-1] == (
      f'train: test top-1 error {100 * resumed["test_top1_error"]:.2f} %, top-5 '
      f'{100 * resumed["test_top5_error"]:.2f} % after 2 epochs (final epoch); results in '
      f'{workdir}/results.json')
  assert f'Resumed from {ckpt_lib.checkpoint_dir(workdir)} at step {killed_at}' in err
  assert 'step 88/88 (100%)' in err and 'left: train_ce=' in err  # progress in plain words
  # Quiet: no warnings of the libraries, no loss terms the method does not use.
  for noise in ('Metadata file does not exist', 'Unable to initialize backend', 'Warning',
                'train_kd', 'train_at', 'Traceback'):
    assert noise not in err, noise
  assert resumed['resumed_from_step'] == killed_at
  assert resumed['command'] == shlex.join(['python', '-m', 'distill_jax.main', *args])
  assert resumed['test_top1_error'] == results['test_top1_error']
  assert resumed['test_loss'] == results['test_loss']
  a, a_stats, _ = restore_params(uninterrupted)
  b, b_stats, _ = restore_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, (a, a_stats), (b, b_stats))


def test_eight_devices_match_one(tmp_path):
  results, params = {}, {}
  for n in (1, 8):
    config = tiny_train_config(num_devices=n, num_epochs=1, batch_size=64, eval_batch_size=120,
                               checkpoint_every_steps=0)
    workdir = str(tmp_path / f'devices{n}')
    results[n] = train_lib.train_and_evaluate(config, workdir)
    params[n] = restore_params(workdir)[:2]
  assert results[8]['num_devices'] == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4),
               params[1], params[8])
  assert results[8]['test_top1_error'] == pytest.approx(results[1]['test_top1_error'], abs=2 / 360)


def test_non_finite_loss_stops_with_step_range_and_no_bad_checkpoint(tmp_path):
  config = tiny_train_config(checkpoint_every_steps=2, log_every_steps=2)
  config.optimizer.learning_rate = 300.0  # diverges after a few steps
  config.optimizer.schedule = 'constant'
  workdir = str(tmp_path / 'nan')
  with pytest.raises(loop.NonFiniteLossError, match=r'at step \d+ \(steps \d+-\d+ checked'):
    train_lib.train_and_evaluate(config, workdir)
  assert not any('tmp' in name for name in os.listdir(ckpt_lib.checkpoint_dir(workdir)))
  with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(workdir)) as manager:
    assert manager.all_steps()
    for step in manager.all_steps():
      state = manager.restore(step)
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


@pytest.mark.parametrize('field, value, message', [
    ('optimizer.learning_rate', 0.0, 'config.optimizer.learning_rate=0.0 is invalid: must be > 0'),
    ('optimizer.learning_rate', -0.1, 'must be > 0'),
    ('batch_size', 0, 'config.batch_size=0 is invalid: must be > 0'),
    ('optimizer.weight_decay', -1e-4, 'config.optimizer.weight_decay=-0.0001 is invalid: must be >= 0'),
    ('optimizer.schedule', 'linear', 'allowed: constant, cosine, multistep'),
    ('model.name', 'resnet', "config.model.name='resnet' is not a known network; known: darts, densenet_bc, wrn"),
    ('model.depth', 15, 'model.depth=15'),
    ('data.name', 'no_such_dataset', 'allowed: cifar10, cifar100, digits'),
    ('model.num_classes', 100, "dataset 'digits' has 10 classes"),
    ('data.validation_fraction', 1.0, 'must be in [0, 1)'),
])
def test_bad_values_fail_with_one_line(field, value, message):
  config = tiny_train_config(**{field: value})
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_train_config(config)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_unknown_model_field_is_named():
  config = tiny_train_config()
  config.model.widen = 3
  with pytest.raises(validation.ConfigError, match='widen'):
    validation.validate_train_config(config)


def test_batch_that_does_not_divide_over_devices(tmp_path):
  config = tiny_train_config(num_devices=8, batch_size=36)
  with pytest.raises(validation.ConfigError, match='batch_size=36 .* multiple of 8'):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(ckpt_lib.checkpoint_dir(str(tmp_path)))


def test_main_exits_with_one_line_before_compute(tmp_path):
  bad_value = run_main(['--config=configs/train.py:demo', f'--workdir={tmp_path}/a',
                        '--config.optimizer.learning_rate=-1'])
  unknown_key = run_main(['--config=configs/train.py:demo', f'--workdir={tmp_path}/b',
                          '--config.optimizer.learning_rat=0.1'])
  _, err = bad_value.communicate(timeout=120)
  assert bad_value.returncode != 0
  assert err.strip().splitlines()[-1] == (
      'error: config.optimizer.learning_rate=-1.0 is invalid: must be > 0')
  _, err = unknown_key.communicate(timeout=120)
  assert unknown_key.returncode != 0 and 'learning_rat' in err
  assert not os.path.exists(tmp_path / 'a' / 'checkpoints')


def test_cpu_devices_splits_the_cpu_and_rejects_bad_values():
  # conftest's XLA_FLAGS ask for 8 devices; --cpu_devices=3 (jax_num_cpu_devices) wins.
  code = ('from distill_jax import jobs; jobs.setup_jax(cpu_devices=3); import jax; '
          'print(jax.device_count(), jax.default_backend())')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.stdout.split() == ['3', 'cpu']
  with pytest.raises(jobs.validation.ConfigError, match=r'^cpu_devices=-2 is not allowed'):
    jobs.setup_jax(cpu_devices=-2)


def test_results_record_start_command_and_commit(trained):
  _, _, results = trained
  started = datetime.datetime.fromisoformat(results['started_at'])
  assert started.tzinfo is not None
  assert abs((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()) < 3600
  assert results['command'].startswith('python ')
  if shutil.which('git') and os.path.isdir(os.path.join(REPO, '.git')):
    head = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert results['git_commit'] in (head, head + '-dirty')

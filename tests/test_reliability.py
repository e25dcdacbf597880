"""What a workdir survives: another config, damaged checkpoints, divergence, an unfinished
teacher, a second process, unusable paths, SIGTERM/SIGINT, a dead shard.

Each case starts from a copy of one finished tiny run (or of a run stopped half-way)
and checks that nothing is lost or mixed and that the error, if any, is one line.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_train_config
from distill_jax import validation
from distill_jax.experiments import runs
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import teacher as teacher_lib
from distill_jax.trainers import train as train_lib
from distill_jax.trainers import workdir as workdir_lib
from test_train import overrides, run_main, trained  # noqa: F401  (the finished run)


# Restoring damaged files leaves orbax read coroutines unfinished; pytest reports them.
pytestmark = [pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
              # Execution-bound: most tests train for tens of steps (conftest.py).
              pytest.mark.optimized]

LAST = 88  # 2 epochs of 44 steps; checkpoints every 20 steps, the last 3 kept


def copy_of(trained, tmp_path, name='run'):
  config, workdir, results = trained
  dest = str(tmp_path / name)
  shutil.copytree(workdir, dest)
  return config.copy_and_resolve_references(), dest, results


def snapshot(workdir):
  """Every file under ``workdir`` with its size and modification time."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), workdir)] = (st.st_size, st.st_mtime_ns)
  return out


def one_line(e):
  text = str(e.value)
  assert '\n' not in text, text
  return text


def forbid_compute(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('computed before refusing')
  monkeypatch.setattr(train_lib, 'build_run', refuse)


# ---------------------------------------------------------------------------------------
# Another config in the same workdir.


@pytest.mark.parametrize('field,value', [
    ('optimizer.learning_rate', 0.01), ('seed', 3), ('batch_size', 16), ('num_epochs', 3),
    ('data.validation_fraction', 0.1), ('model.depth', 16), ('model.widen_factor', 2)])
def test_another_config_is_refused_before_compute(trained, tmp_path, monkeypatch, field, value):
  config, workdir, _ = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  forbid_compute(monkeypatch)
  changed = tiny_train_config(**{field: value})
  with pytest.raises(validation.ConfigError) as e:
    train_lib.train_and_evaluate(changed, workdir)
  assert field in one_line(e) and f'allow_resume_changes={field}' in str(e.value)
  with pytest.raises(validation.ConfigError, match=field):
    train_lib.evaluate(changed, workdir)
  assert snapshot(workdir) == before


def test_an_unfinished_run_refuses_another_config_too(trained, tmp_path, monkeypatch):
  config, workdir, _ = copy_of(trained, tmp_path)
  os.remove(os.path.join(workdir, loop.RESULTS_FILE))
  forbid_compute(monkeypatch)
  with pytest.raises(validation.ConfigError, match='optimizer.learning_rate'):
    train_lib.train_and_evaluate(tiny_train_config(**{'optimizer.learning_rate': 0.2}), workdir)


def test_finished_run_with_bookkeeping_changes_does_nothing(trained, tmp_path, monkeypatch):
  config, workdir, results = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  forbid_compute(monkeypatch)
  again = train_lib.train_and_evaluate(
      tiny_train_config(log_every_steps=7, keep_checkpoints=5, num_devices=2), workdir)
  assert again == json.loads(json.dumps(results))
  assert snapshot(workdir) == before


def test_allowed_num_epochs_extends_a_finished_run(trained, tmp_path):
  config, workdir, results = copy_of(trained, tmp_path)
  longer = tiny_train_config(num_epochs=3, allow_resume_changes='num_epochs')
  extended = train_lib.train_and_evaluate(longer, workdir)
  assert extended['resumed_from_step'] == LAST and extended['steps'] == 3 * 44
  recorded = loop.read_json(os.path.join(workdir, workdir_lib.CONFIG_FILE))
  assert recorded['config']['num_epochs'] == 3
  assert recorded['changes'][-1]['fields']['num_epochs'] == [2, 3]
  # The same extended config again: nothing to do.
  assert train_lib.train_and_evaluate(longer, workdir)['wall_time_s'] == extended['wall_time_s']


def test_allow_resume_changes_names_real_fields():
  with pytest.raises(validation.ConfigError, match="'optimiser' is not a field"):
    train_lib.validate(tiny_train_config(allow_resume_changes='num_epochs,optimiser'))


def test_config_json_records_config_and_code(trained):
  config, workdir, _ = trained
  recorded = loop.read_json(os.path.join(workdir, workdir_lib.CONFIG_FILE))
  assert recorded['config'] == workdir_lib.effective(config)
  assert set(recorded['code']) == {'distill_jax', 'git_commit'} and recorded['started']


# ---------------------------------------------------------------------------------------
# Damaged checkpoints.


def data_files(workdir, step):
  root = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step))
  files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if os.sep + 'd' + os.sep
           in os.path.join(r, f)]
  assert files, root
  return sorted(files, key=os.path.getsize)


def flip(path):
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    for i in range(len(data) // 2, len(data) // 2 + 16):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 3)


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'delete'])
def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(trained, tmp_path, damage,
                                                                  caplog):
  config, workdir, results = copy_of(trained, tmp_path)
  os.remove(os.path.join(workdir, loop.RESULTS_FILE))  # killed just after its last save
  for path in data_files(workdir, LAST)[-1:]:
    {'flip': flip, 'truncate': truncate, 'delete': os.remove}[damage](path)
  # Evaluation skips it without moving anything.
  assert train_lib.evaluate(config, workdir)['step'] == 80
  assert os.path.isdir(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(LAST)))
  resumed = train_lib.train_and_evaluate(config, workdir)
  assert resumed['resumed_from_step'] == 80
  assert resumed['test_top1_error'] == results['test_top1_error']
  assert resumed['test_loss'] == results['test_loss']
  assert os.listdir(os.path.join(workdir, ckpt_lib.REJECTED_DIR)) == [str(LAST)]
  assert any('Skipped checkpoint 88' in r.getMessage() for r in caplog.records)


def test_every_checkpoint_damaged_is_one_line_and_moves_nothing(trained, tmp_path):
  config, workdir, _ = copy_of(trained, tmp_path)
  os.remove(os.path.join(workdir, loop.RESULTS_FILE))
  for step in (60, 80, LAST):
    flip(data_files(workdir, step)[-1])
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    train_lib.train_and_evaluate(config, workdir)
  assert 'step 88' in one_line(e) and 'new --workdir' in str(e.value)
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(workdir))) == ['60', '80', '88']


def test_checksums_follow_the_kept_checkpoints(trained):
  _, workdir, _ = trained
  kept = sorted(int(s) for s in os.listdir(ckpt_lib.checkpoint_dir(workdir)))
  recorded = sorted(int(f[:-5]) for f in os.listdir(os.path.join(workdir, ckpt_lib.CHECKSUM_DIR)))
  assert kept == [60, 80, LAST] and recorded == kept


# ---------------------------------------------------------------------------------------
# Divergence.


def test_divergence_saves_no_bad_state_and_a_lower_rate_recovers(tmp_path):
  workdir = str(tmp_path / 'nan')
  config = tiny_train_config(**{'optimizer.learning_rate': 1e6, 'checkpoint_every_steps': 1,
                                'keep_checkpoints': 50})
  with pytest.raises(loop.NonFiniteLossError) as e:
    train_lib.train_and_evaluate(config, workdir)
  assert 'allow_resume_changes=optimizer.learning_rate' in one_line(e)
  assert f'moved to {ckpt_lib.REJECTED_DIR}/' in str(e.value)
  with ckpt_lib.make_manager(workdir) as manager:
    for step in manager.all_steps():
      state = ckpt_lib.restore_local(ckpt_lib.item_path(workdir, step))
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params'])), step
  fixed = tiny_train_config(allow_resume_changes='optimizer.learning_rate')
  fixed.optimizer.learning_rate = 1e-3
  results = train_lib.train_and_evaluate(fixed, workdir)
  assert np.isfinite(results['test_loss']) and results['resumed_from_step'] in (None, 0)


# ---------------------------------------------------------------------------------------
# Teachers.


def test_a_teacher_must_have_finished(trained, tmp_path):
  config, workdir, _ = copy_of(trained, tmp_path)
  os.remove(os.path.join(workdir, loop.RESULTS_FILE))
  with pytest.raises(teacher_lib.TeacherError) as e:
    teacher_lib.load_teacher(config.model, workdir, (1, 8, 8, 1))
  assert 'unfinished' in one_line(e) and 'teacher_allow_unfinished' in str(e.value)
  teacher = teacher_lib.load_teacher(config.model, workdir, (1, 8, 8, 1), allow_unfinished=True)
  assert teacher.source.endswith(f'{LAST}/default')


def test_a_damaged_teacher_checkpoint_is_refused(trained, tmp_path):
  config, workdir, _ = copy_of(trained, tmp_path)
  flip(data_files(workdir, LAST)[-1])
  with pytest.raises(teacher_lib.TeacherError) as e:
    teacher_lib.load_teacher(config.model, workdir, (1, 8, 8, 1))
  assert 'damaged' in one_line(e) or 'cannot be restored' in str(e.value)
  assert str(e.value).startswith('teacher checkpoint ')
  # The same loader reads a pipeline's trained student and an initialisation stage's
  # weights: its errors name what the checkpoint is.
  with pytest.raises(teacher_lib.TeacherError) as e:
    teacher_lib.load_teacher(config.model, workdir, (1, 8, 8, 1), role='initialisation stage')
  assert str(e.value).startswith('initialisation stage checkpoint ')
  os.remove(os.path.join(workdir, loop.RESULTS_FILE))
  with pytest.raises(teacher_lib.TeacherError, match=r'^the student run in .* has not finished'):
    teacher_lib.load_teacher(config.model, workdir, (1, 8, 8, 1), role='student')


# ---------------------------------------------------------------------------------------
# One process at a time.


def write_lock(workdir, **owner):
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getppid(), 'started': 'earlier',
               **owner}, f)


def test_a_live_lock_refuses_a_second_process(trained, tmp_path, monkeypatch):
  config, workdir, _ = copy_of(trained, tmp_path)
  os.remove(os.path.join(workdir, loop.RESULTS_FILE))
  write_lock(workdir)  # the parent process: alive
  forbid_compute(monkeypatch)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train_lib.train_and_evaluate(config, workdir)
  assert f'process {os.getppid()}' in one_line(e) and workdir_lib.LOCK_FILE in str(e.value)
  write_lock(workdir, host='another-host', pid=1)
  with pytest.raises(workdir_lib.WorkdirError, match='another-host'):
    train_lib.train_and_evaluate(config, workdir)


def test_a_stale_lock_is_taken_over(trained, tmp_path):
  config, workdir, results = copy_of(trained, tmp_path)
  dead = subprocess.Popen(['true'])
  dead.wait()
  write_lock(workdir, pid=dead.pid)
  again = train_lib.train_and_evaluate(config, workdir)  # finished: nothing to do
  assert again['wall_time_s'] == results['wall_time_s']
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


# ---------------------------------------------------------------------------------------
# Paths that cannot be used.


def test_unusable_workdirs_are_one_line_before_compute(tmp_path, monkeypatch):
  forbid_compute(monkeypatch)
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  cases = {'': 'empty', str(a_file): 'is a file', str(a_file / 'sub'): 'not writable',
           '/proc/distill_jax_test': 'not writable'}
  for path, message in cases.items():
    with pytest.raises(workdir_lib.WorkdirError) as e:
      train_lib.train_and_evaluate(tiny_train_config(), path)
    assert message in one_line(e), path
    with pytest.raises(workdir_lib.WorkdirError):
      train_lib.evaluate(tiny_train_config(), path)


# ---------------------------------------------------------------------------------------
# Signals.


def signal_at(monkeypatch, step, signum):
  """Makes the next run send itself ``signum`` during its training step ``step``."""
  build = train_lib.build_run

  def build_and_wrap(*args, **kwargs):
    run = build(*args, **kwargs)
    inner = run.train_step

    def train_step(state, batch, teacher):
      if int(jax.device_get(state.step)) == step - 1:
        os.kill(os.getpid(), signum)
      return inner(state, batch, teacher)

    run.train_step = train_step
    return run

  monkeypatch.setattr(train_lib, 'build_run', build_and_wrap)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_in_flight_and_resumes_exactly(trained, tmp_path, monkeypatch,
                                                               signum):
  config, _, results = trained
  workdir = str(tmp_path / 'signalled')
  previous = signal.getsignal(signum)
  signal_at(monkeypatch, 25, signum)
  with pytest.raises(loop.Stopped) as e:
    train_lib.train_and_evaluate(config, workdir)
  assert e.value.exit_code == 128 + signum and 'at step 25' in one_line(e)
  assert signal.getsignal(signum) is previous  # the loop's handler is gone again
  assert ckpt_lib.latest_step(workdir) == 25
  steps = [r['step'] for r in map(json.loads, open(os.path.join(workdir, loop.METRICS_FILE)))]
  assert steps[-1] == 25
  monkeypatch.undo()
  resumed = train_lib.train_and_evaluate(config, workdir)
  assert resumed['resumed_from_step'] == 25
  assert resumed['test_top1_error'] == results['test_top1_error']
  assert resumed['test_loss'] == results['test_loss']


def test_time_based_checkpoints(tmp_path):
  workdir = str(tmp_path / 'timed')
  config = tiny_train_config(checkpoint_every_seconds=1e-9, checkpoint_every_steps=0,
                             keep_checkpoints=100, num_epochs=1)
  train_lib.train_and_evaluate(config, workdir)
  with ckpt_lib.make_manager(workdir) as manager:
    assert manager.all_steps() == list(range(1, 45))


def test_a_resume_writes_no_metrics_row_twice(trained, tmp_path):
  config, workdir, results = copy_of(trained, tmp_path)
  os.remove(os.path.join(workdir, loop.RESULTS_FILE))
  shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(LAST)))  # killed after 80
  resumed = train_lib.train_and_evaluate(config, workdir)
  assert resumed['resumed_from_step'] == 80
  rows = [json.loads(line) for line in open(os.path.join(workdir, loop.METRICS_FILE))]
  keys = [(r['step'], 'train_loss' in r) for r in rows]
  assert len(keys) == len(set(keys)) and keys[-1][0] == LAST
  # TensorBoard: the resumed run's event file opens with a session START at step 81,
  # TensorBoard's signal to drop the killed run's events from that step on.
  files = sorted(f for f in os.listdir(workdir) if f.startswith('events.out.tfevents'))
  assert len(files) == 2
  events = read_events(os.path.join(workdir, files[1]))
  starts = [e.step for e in events if e.HasField('session_log')
            and e.session_log.status == e.session_log.START]
  assert starts == [81]
  assert min(e.step for e in events if e.HasField('summary')) > 80


def read_events(path):
  """The Event protos of a TensorBoard event file (TFRecord framing: length, CRC, data, CRC)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events, data = [], open(path, 'rb').read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[offset + 12:offset + 12 + length])
    events.append(event)
    offset += 12 + length + 4
  return events


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_from_outside_exits_with_one_line_and_resumes(trained, tmp_path):
  config, _, results = trained
  workdir = str(tmp_path / 'term')
  args = ['--config=configs/train.py:demo', f'--workdir={workdir}', *overrides(config),
          '--config.checkpoint_every_steps=1000']
  proc = run_main(args)
  metrics = os.path.join(workdir, loop.METRICS_FILE)
  deadline = time.time() + 240
  while not os.path.exists(metrics) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: stopped by SIGTERM at step') and 'Traceback' not in stderr
  assert 'persistent compilation cache' not in stderr  # the bounded cache works
  step = ckpt_lib.latest_step(workdir)
  assert step is not None and f'step {step}:' in last
  resumed = train_lib.train_and_evaluate(config, workdir)
  assert resumed['resumed_from_step'] == step
  assert resumed['test_top1_error'] == results['test_top1_error']


# ---------------------------------------------------------------------------------------
# Experiments.


def test_a_shard_waiting_for_a_dead_shard_times_out(tmp_path):
  task = runs.Task(name='pair', path=str(tmp_path / 'pair'), compute=lambda: None,
                   needs=(str(tmp_path / 'teacher'),))
  start = time.time()
  with pytest.raises(runs.WaitTimeout) as e:
    runs.run_tasks([task], shard=0, num_shards=2, wait_seconds=0.05, wait_timeout_s=0.2)
  assert 'shard_wait_timeout_s' in one_line(e) and time.time() - start < 5


def test_an_experiment_refuses_another_run_recipe_but_takes_more_seeds(tmp_path, monkeypatch):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from distill_jax.experiments import grid  # pylint: disable=g-import-not-at-top
  config = load_config('teacher_student', 'demo')
  workdir = str(tmp_path)
  first = grid.tasks(config, workdir)[0]
  os.makedirs(first.path)
  workdir_lib.record_config(first.path, first.config)  # one run has started
  runs.check_experiment(config, workdir, grid.tasks(config, workdir), record=True)
  more_seeds = load_config('teacher_student', 'demo')
  more_seeds.seeds = (0, 1, 2)
  runs.check_experiment(more_seeds, workdir, grid.tasks(more_seeds, workdir), record=False)
  faster = load_config('teacher_student', 'demo')
  faster.run.optimizer.learning_rate = 0.5
  monkeypatch.setattr(runs, 'run_tasks', lambda *a, **k: pytest.fail('ran a task'))
  with pytest.raises(validation.ConfigError) as e:
    grid.run(faster, workdir)
  assert 'run.optimizer.learning_rate' in one_line(e)
  faster.allow_resume_changes = 'run.optimizer.learning_rate'
  assert all(t.config.allow_resume_changes == 'optimizer.learning_rate'
             for t in grid.tasks(faster, workdir))


@pytest.mark.optimized(False)  # a DARTS supernet's compile dominates
def test_grown_weights_without_grown_json_are_grown_again(tmp_path, monkeypatch):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from distill_jax import models  # pylint: disable=g-import-not-at-top
  from distill_jax.experiments import darts_fisher  # pylint: disable=g-import-not-at-top
  config = load_config('darts_fisher', 'demo')
  config.growth.teacher_init = 'grown'
  pipeline = darts_fisher.Pipeline(config, str(tmp_path))
  student = models.create_model(**pipeline.student_model)
  variables = models.init_variables(student, jax.random.key(0), (1, 8, 8, 1))
  monkeypatch.setattr(pipeline, 'student_variables', lambda seed: variables)
  leftover = pipeline.grown_variables_path('uniform', 0)
  os.makedirs(leftover)
  open(os.path.join(leftover, 'partial'), 'w').close()  # killed before grown.json
  model = pipeline.build_teacher('uniform', 0)
  assert os.path.exists(pipeline.grown_path('uniform', 0))
  assert not os.path.exists(os.path.join(leftover, 'partial'))
  assert pipeline.teacher_initial_variables('uniform', 0) is not None and model['name'] == 'darts'


# ---------------------------------------------------------------------------------------
# Disk full, launch scripts, the compilation cache.


@pytest.mark.e2e
@pytest.mark.slow
def test_a_full_disk_is_one_line(tmp_path):
  """Files may not grow past 200 kB (as on a full disk): the first checkpoint fails."""
  config = tiny_train_config()
  workdir = str(tmp_path / 'full')
  env = dict(os.environ, DISTILL_JAX_COMPILATION_CACHE='off',
             JAX_PLATFORMS='cpu')
  command = [sys.executable, '-m', 'distill_jax.main', '--config=configs/train.py:demo',
             f'--workdir={workdir}', *overrides(config)]
  # SIGXFSZ ignored (as exec keeps it), files limited to 200 blocks of 1 kB.
  proc = subprocess.run(['bash', '-c', 'trap "" XFSZ; ulimit -f 200; exec "$@"', 'bash', *command],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1, proc.stderr[-3000:]
  # No traceback of ours. Orbax's background writes may race with its own event loop once the
  # first write fails and print 'Event loop is closed' from tensorstore's callbacks (their noise,
  # seen on some runs); any other traceback fails the test.
  assert not re.search(r'File "[^"]*distill_jax', proc.stderr), proc.stderr[-3000:]
  for block in proc.stderr.split('Traceback (most recent call last):\n')[1:]:
    lines = block.splitlines() + ['']
    raised = next(line for line in lines if not line.startswith(' '))  # after the frames
    assert raised == 'RuntimeError: Event loop is closed', block[:1000]
  assert last.startswith('error: ') and 'checkpoint' in last and workdir in last, last
  assert ckpt_lib.latest_step(workdir) is None  # nothing half-written looks complete


def test_tpu_pod_script_quotes_every_argument(tmp_path):
  fake = tmp_path / 'gcloud'
  fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do case "$a" in --command=*) '
                  'printf "%s" "${a#--command=}";; esac; done\n')
  fake.chmod(0o755)
  workdir = str(tmp_path / 'a b;touch pwned')
  out = subprocess.run(
      ['bash', os.path.join(REPO, 'launch', 'tpu_pod.sh'), 'tpu', 'zone', 'configs/train.py',
       workdir, '--config.seed=1'], env=dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}'),
      capture_output=True, text=True, check=True).stdout
  remote_args = out.split('distill_jax.main', 1)[1]
  words = subprocess.run(['bash', '-c', f'printf "%s\\n" {remote_args}'], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
  assert words == ['--config=configs/train.py', f'--workdir={workdir}', '--config.seed=1']
  assert not (tmp_path / 'pwned').exists()


def test_compilation_cache_can_be_moved_or_disabled(monkeypatch, tmp_path):
  from distill_jax import jobs  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('DISTILL_JAX_COMPILATION_CACHE', 'off')
  assert jobs.compilation_cache_dir() is None
  monkeypatch.setenv('DISTILL_JAX_COMPILATION_CACHE', str(tmp_path / 'xla'))
  assert jobs.compilation_cache_dir() == str(tmp_path / 'xla')
  monkeypatch.delenv('DISTILL_JAX_COMPILATION_CACHE')
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  assert jobs.compilation_cache_dir() == os.path.expanduser('~/.cache/distill_jax/xla')


def test_bounded_cache_writes_beside_entries_of_an_unbounded_one(tmp_path):
  """JAX's bounded cache fails every write when an entry lacks its access time (as those an
  unbounded cache wrote do); the job gives them one before using the folder."""
  from jax._src import lru_cache  # pylint: disable=g-import-not-at-top  (the cache JAX uses)
  from distill_jax import jobs  # pylint: disable=g-import-not-at-top
  lru_cache.LRUCache(str(tmp_path), max_size=-1).put('old', b'x' * 10)  # unbounded: no atime
  bounded = lru_cache.LRUCache(str(tmp_path), max_size=jobs.CACHE_MAX_BYTES)
  with pytest.raises(FileNotFoundError):
    bounded.put('new', b'y' * 10)
  assert jobs.add_missing_access_times(str(tmp_path)) == 1
  assert jobs.add_missing_access_times(str(tmp_path)) == 0
  bounded.put('new', b'y' * 10)
  assert bounded.get('new') == b'y' * 10 and bounded.get('old') == b'x' * 10

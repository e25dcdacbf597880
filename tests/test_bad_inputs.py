"""Every bad input is one line naming the field, its value and what is allowed, before
any compute: on the command line (``error: ...``, no traceback) and in ``validate``.

Nothing here trains or initialises parameters (``models.init_variables`` is patched to
fail); the command lines run as concurrent subprocesses started once for the module.
"""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from conftest import CACHE_DIR, REPO, load_config, tiny_train_config
from distill_jax import genotypes
from distill_jax import jobs
from distill_jax import main as main_lib
from distill_jax import models
from distill_jax import options as options_lib
from distill_jax import validation
from distill_jax.config_lib import set_fields
from distill_jax.experiments import darts_fisher
from distill_jax.trainers import search
from distill_jax.trainers import train as train_lib

TRAIN = os.path.join(REPO, 'configs', 'train.py')


@pytest.fixture(autouse=True)
def no_initialisation(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('validation initialised parameters')
  monkeypatch.setattr(models, 'init_variables', refuse)


def override(config, field, value):
  """Sets a dotted field to a value of any type (ConfigDict fields keep their type)."""
  *parents, leaf = field.split('.')
  target = config
  for part in parents:
    target = target[part]
  with target.unlocked():
    if leaf in target:
      del target[leaf]
    target[leaf] = value
  return config


def assert_one_line(error, *parts):
  message = str(error.value)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, message


# ------------------------------------------------------------------------ command line

# id -> (arguments after the module, what the last stderr line contains). Each runs in
# its own directory (the empty workdir case must not write there).
CLI_CASES = {
    'unknown_key': (['--config=' + TRAIN + ':demo', '--config.no_such_key=1'],
                    ['--config.no_such_key=1', "no field 'no_such_key'", 'fields: ']),
    'unknown_nested_key': (['--config=' + TRAIN + ':demo', '--config.optimizer.lr=0.1'],
                           ["no field 'optimizer.lr'", 'closest: optimizer.learning_rate']),
    'missing_config_file': (['--config=' + os.path.join(REPO, 'configs', 'nope.py')],
                            ['configs/nope.py', 'no such config file']),
    'config_syntax_error': (['--config={tmp}/broken.py'],
                            ['broken.py', 'SyntaxError', 'line 2']),
    'variant_typo': (['--config=' + TRAIN + ':demoo'],
                     ["unknown variant 'demoo'", 'allowed: demo, densenet']),
    'empty_workdir': (['--config=' + TRAIN + ':demo', '--workdir='],
                      ["--workdir='' is invalid"]),
    'bad_mode': (['--config=' + TRAIN + ':demo', '--mode=bogus'],
                 ['--mode=bogus is invalid', 'train|evaluate|report']),
    'too_many_devices': (['--config=' + TRAIN + ':demo', '--config.num_devices=64'],
                         ['config.num_devices=64 is invalid: only', 'at most']),
}


@pytest.fixture(scope='module')
def cli_results(tmp_path_factory):
  """Starts every CLI case at once; ``{id: (returncode, stderr, run directory)}``."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_COMPILATION_CACHE_DIR=CACHE_DIR)
  procs = {}
  for case, (args, _) in CLI_CASES.items():
    tmp = tmp_path_factory.mktemp(case)
    with open(tmp / 'broken.py', 'w') as f:
      f.write('def get_config():\n  return (\n')
    args = [a.format(tmp=tmp) for a in args]
    if not any(a.startswith('--workdir') for a in args):
      args.append(f'--workdir={tmp}/workdir')
    procs[case] = (tmp, subprocess.Popen(
        [sys.executable, '-m', 'distill_jax.main', *args], cwd=tmp, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = {}
  for case, (tmp, proc) in procs.items():
    _, err = proc.communicate(timeout=120)
    results[case] = (proc.returncode, err, tmp)
  return results


@pytest.mark.parametrize('case', sorted(CLI_CASES))
def test_command_line_errors_are_one_line(case, cli_results):
  returncode, err, tmp = cli_results[case]
  assert returncode != 0 and 'Traceback' not in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: '), err
  for part in CLI_CASES[case][1]:
    assert part in last, last
  assert sorted(os.listdir(tmp)) == ['broken.py']  # no workdir, nothing trained here


@pytest.mark.parametrize('message, parts', [
    ("flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'",
     ['--config.batch_size=abc is invalid', 'must be an int like its default 64']),
    ('flag --mode=bogus: value should be one of <train|evaluate|report>',
     ['--mode=bogus is invalid: value should be one of']),
    ('flag --workdir=None: Flag --workdir must have a value other than None.',
     ['--workdir is required']),
])
def test_flag_value_errors_name_the_flag(message, parts):
  line = main_lib._flag_error_line(flags.IllegalFlagValueError(message),
                                   load_config('train', 'demo'))
  assert '\n' not in line and all(p in line for p in parts), line


@pytest.mark.parametrize('key, closest', [
    ('optimizer.lr', 'optimizer.learning_rate'), ('learning_rate', 'optimizer.learning_rate'),
    ('optimizer.learning_rat', 'optimizer.learning_rate'), ('data.cutot', 'data.cutout'),
    ('optimzer.momentum', 'optimizer.momentum'), ('no_such_key', None),
])
def test_closest_config_key(key, closest):
  from distill_jax import config_lib  # pylint: disable=g-import-not-at-top
  leaves = sorted(config_lib.leaf_paths(load_config('train', 'demo')))
  assert main_lib.closest_field(key, leaves) == closest


def test_config_of_another_job():
  config = override(tiny_train_config(), 'job', 'darts_search')
  with pytest.raises(validation.ConfigError) as e:
    main_lib._validate(config)
  assert_one_line(e, "config.job='darts_search' is invalid for this config", "no field 'order'")


def test_bad_shard_and_unknown_job():
  with pytest.raises(ValueError, match=r"^--shard='abc' is invalid: use i/n"):
    options_lib.parse_shard('abc')
  with pytest.raises(validation.ConfigError) as e:
    jobs.validate(override(tiny_train_config(), 'job', 'bogus'))
  assert_one_line(e, "config.job='bogus' is invalid", 'allowed: train, distill')


# ------------------------------------------------------------------------ training config

@pytest.mark.parametrize('field, value, parts', [
    ('num_devices', 64, ['config.num_devices=64 is invalid: only 8 cpu devices', 'at most 8']),
    ('seed', -1, ['config.seed=-1 is invalid', 'non-negative integer']),
    ('seed', '0', ["config.seed='0' is invalid", 'non-negative integer']),
    ('seed', 1.0, ['config.seed=1.0 is invalid']),
    ('optimizer.learning_rate', math.inf, ['config.optimizer.learning_rate=inf', 'finite number > 0']),
    ('optimizer.learning_rate', math.nan, ['config.optimizer.learning_rate=nan', 'finite']),
    ('optimizer.weight_decay', math.inf, ['config.optimizer.weight_decay=inf', 'finite number >= 0']),
    ('optimizer.momentum', math.inf, ['config.optimizer.momentum=inf', 'finite number in [0, 1)']),
    ('optimizer.momentum', 1.0, ['config.optimizer.momentum=1.0', 'in [0, 1)']),
    ('optimizer.final_learning_rate', 1.0, ['config.optimizer.final_learning_rate=1.0',
                                            'optimizer.learning_rate=0.05']),
    ('optimizer.milestones', ('a',), ["config.optimizer.milestones=('a',)", 'increasing integers']),
    ('aux_weight', math.inf, ['config.aux_weight=inf']),
    ('data.cutout', 9, ['config.data.cutout=9 is invalid', 'digits images are 8x8']),
    ('data.crop_padding', 9, ['config.data.crop_padding=9 is invalid', 'digits images are 8x8']),
    ('data.crop_padding', 1.5, ['config.data.crop_padding=1.5', 'an integer >= 0']),
    ('data.validation_fraction', 'x', ["config.data.validation_fraction='x'", 'number in [0, 1)']),
    ('data.flip', 'yes', ["config.data.flip='yes'", 'True or False']),
    ('eval_every_steps', -5, ['config.eval_every_steps=-5 is invalid: must be >= 0']),
    ('keep_checkpoints', 0, ['config.keep_checkpoints=0 is invalid: must be > 0']),
    ('batch_size', 'abc', ["config.batch_size='abc' is invalid: must be an integer > 0"]),
    ('batch_size', 1.5, ['config.batch_size=1.5 is invalid: must be an integer > 0']),
    ('batch_size', 36, ['config.batch_size=36 is invalid', 'multiple of 8']),
    ('num_epochs', True, ['config.num_epochs=True is invalid']),
    ('model.widen_factor', 1.5, ['config.model.widen_factor=1.5 is invalid: must be an integer']),
    ('model.widen_factor', '2', ["config.model.widen_factor='2' is invalid"]),
    ('model.depth', 12, ['config.model.depth=12 is invalid', 'WRN depth must be 6n+4']),
    ('model.dropout_rate', 1.0, ['config.model.dropout_rate=1.0 is invalid', '[0, 1)']),
    ('model.num_classes', 0, ['config.model.num_classes=0 is invalid']),
])
def test_bad_training_values(field, value, parts):
  config = override(tiny_train_config(num_devices=0), field, value)
  with pytest.raises(validation.ConfigError) as e:
    jobs.validate(config)
  assert_one_line(e, *parts)


@pytest.mark.parametrize('model, parts', [
    ({'depth': 15, 'growth_rate': 6}, ['config.model.depth=15', 'DenseNet-BC depth must be 6n+4']),
    ({'depth': 16, 'growth_rate': 0}, ['config.model.growth_rate=0', 'integer >= 1']),
    ({'depth': 10, 'growth_rate': 1, 'compression': 0.2},
     ['config.model.compression=0.2', 'transition 0 would keep 0 channels']),
    ({'depth': 16, 'growth_rate': 6, 'compression': 0.0}, ['config.model.compression=0.0', '(0, 1]']),
])
def test_bad_densenet_sizes(model, parts):
  config = tiny_train_config()
  config.model = ml_collections.ConfigDict({'name': 'densenet_bc', 'num_classes': 10, **model})
  with pytest.raises(validation.ConfigError) as e:
    jobs.validate(config)
  assert_one_line(e, *parts)


@pytest.mark.parametrize('field, value, parts', [
    ('distill.temperature', math.inf, ['config.distill.temperature=inf', 'finite number > 0']),
    ('distill.alpha', math.nan, ['config.distill.alpha=nan', 'finite number in [0, 1]']),
    ('distill.beta', math.inf, ['config.distill.beta=inf']),
    ('distill.method', 'kdd', ["config.distill.method='kdd' is invalid", 'closest: kd']),
    ('distill.teacher_model.depth', 15, ['config.distill.teacher_model.depth=15 is invalid']),
])
def test_bad_distillation_values(field, value, parts):
  config = override(load_config('distill', 'demo'), field, value)
  with pytest.raises(validation.ConfigError) as e:
    jobs.validate(config)
  assert_one_line(e, *parts)


# ------------------------------------------------------------------------ DARTS genotypes

GOOD = genotypes.genotype_to_json(genotypes.DARTS_V1)
GENOTYPE_FILES = {
    'truncated': json.dumps(GOOD)[:60],
    'short': json.dumps({**GOOD, 'normal': GOOD['normal'][:5]}),
    'unknown_op': json.dumps({**GOOD, 'reduce': [['conv_9x9', 0]] + GOOD['reduce'][1:]}),
    'not_a_mapping': json.dumps([1, 2]),
}


@pytest.mark.parametrize('genotype, parts', [
    ('DARTS_V3', ["config.model.genotype='DARTS_V3'", 'allowed: DARTS, DARTS_V1, DARTS_V2',
                  'closest: DARTS_V']),
    ('missing', ['config.model.genotype=', 'missing.json', 'the file does not exist']),
    ('truncated', ['truncated.json', 'not valid JSON (truncated?)', 'line 1']),
    ('short', ['short.json', 'genotype.normal has 5 (op, input) pairs', 'exactly 8']),
    ('unknown_op', ['unknown_op.json', "op='conv_9x9' is not a DARTS operation",
                    'allowed: none, max_pool_3x3']),
    ('not_a_mapping', ['not_a_mapping.json', 'must be a mapping']),
])
def test_bad_genotypes(genotype, parts, tmp_path):
  if genotype in GENOTYPE_FILES or genotype == 'missing':
    path = tmp_path / f'{genotype}.json'
    if genotype != 'missing':
      path.write_text(GENOTYPE_FILES[genotype])
    genotype = str(path)
  config = set_fields(load_config('darts_eval', 'demo'), {'model.genotype': genotype})
  with pytest.raises(validation.ConfigError) as e:
    jobs.validate(config)
  assert_one_line(e, *parts)


@pytest.mark.parametrize('field, value, parts', [
    ('model.layers', 0, ['config.model.layers=0 is invalid: must be an integer >= 3']),
    ('model.init_channels', 0, ['config.model.init_channels=0 is invalid: must be an integer >= 1']),
    ('model.stem_multiplier', 0, ['config.model.stem_multiplier=0 is invalid']),
    ('model.impl', 'fastest', ["config.model.impl='fastest' is invalid"]),
    ('model.cell_channels', (8, 8), ['config.model.cell_channels has 2 entries', 'layers=5']),
])
def test_bad_darts_sizes(field, value, parts):
  config = override(load_config('darts_eval', 'demo'), field, value)
  with pytest.raises(validation.ConfigError) as e:
    jobs.validate(config)
  assert_one_line(e, *parts)


# ------------------------------------------------------------------------ experiments

PIPELINE = {'seeds': (0,)}


@pytest.mark.parametrize('fields, parts', [
    ({'growth.target_param_ratio': 1.0},
     ['config.growth.target_param_ratio=1.0 is invalid: must be > 1']),
    ({'growth.target_param_ratio': math.inf}, ['config.growth.target_param_ratio=inf', 'finite']),
    ({'growth.depth_layers': 5}, ['config.growth.depth_layers=5 is invalid', 'run.model.layers=5']),
    ({'figure.point': 3}, ['config.figure.point=3 is invalid', '3 attention points: use 0..2']),
    ({'figure.num_images': 361}, ['config.figure.num_images=361 is invalid', 'at most 256',
                                  'test split has 360']),
    ({'run.distill.method': 'atx'}, ["config.run.distill.method='atx'", 'closest: at']),
    ({'seeds': (0, -1)}, ['config.seeds=(0, -1) is invalid', 'seed -1']),
    ({'seeds': ('a',)}, ["config.seeds=('a',) is invalid"]),
    ({'seeds': (1, 1)}, ['config.seeds=(1, 1) is invalid: the seeds must be distinct']),
    ({'teachers': ('depth', 'depth')}, ["config.teachers=('depth', 'depth')", 'at most once']),
    ({'run.model.layers': 0}, ['config.run.model.layers=0 is invalid']),
])
def test_bad_pipeline_values_before_any_run(fields, parts, tmp_path, monkeypatch):
  def no_run(*args, **kwargs):
    raise AssertionError('a run started before the config was validated')
  monkeypatch.setattr(train_lib, 'run', no_run)
  monkeypatch.setattr(train_lib, 'train_and_evaluate', no_run)
  config = load_config('darts_fisher', 'demo')
  for field, value in {**PIPELINE, **fields}.items():
    override(config, field, value)
  with pytest.raises(validation.ConfigError) as e:
    jobs.run(config, str(tmp_path / 'pipeline'))
  assert_one_line(e, *parts)
  assert not os.listdir(tmp_path)


def test_depth_layers_checked_only_with_a_depth_teacher():
  config = set_fields(load_config('darts_fisher', 'demo'),
                      {'teachers': ('uniform',), 'growth.depth_layers': 3, **PIPELINE})
  darts_fisher.validate(config)
  assert darts_fisher._num_attention_points(config.run) == 3


@pytest.mark.parametrize('fields, parts', [
    ({'seeds': (-1,)}, ['config.seeds=(-1,) is invalid']),
    ({'run.distill.method': 'kd-at'}, ["config.run.distill.method='kd-at'", 'closest: kd_at']),
    ({'darts_drop_path_prob': math.nan}, ['config.darts_drop_path_prob=nan']),
    ({'students': ('wrn_16_2', 'wrn_16_2')}, ["config.students=('wrn_16_2', 'wrn_16_2')"]),
    ({'demo_networks': 'yes'}, ["config.demo_networks='yes'", 'True or False']),
])
def test_bad_grid_values(fields, parts):
  config = load_config('teacher_student', 'demo')
  for field, value in fields.items():
    override(config, field, value)
  with pytest.raises(validation.ConfigError) as e:
    jobs.validate(config)
  assert_one_line(e, *parts)


@pytest.mark.parametrize('field, value, parts', [
    ('seed', -1, ['config.seed=-1 is invalid']),
    ('num_devices', 64, ['config.num_devices=64 is invalid: only 8']),
    ('data.cutout', 9, ['config.data.cutout=9 is invalid', '8x8']),
    ('arch.learning_rate', math.inf, ['config.arch.learning_rate=inf', 'finite number > 0']),
    ('optimizer.momentum', math.nan, ['config.optimizer.momentum=nan']),
])
def test_bad_search_values(field, value, parts):
  config = override(load_config('darts_search', 'demo'), field, value)
  with pytest.raises(validation.ConfigError) as e:
    search.validate(config)
  assert_one_line(e, *parts)

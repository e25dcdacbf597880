"""bfloat16 compute with float32 parameters agrees with float32 training."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_train_config
from distill_jax import models
from distill_jax import validation
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import train as train_lib


@pytest.mark.optimized
def test_bfloat16_training_matches_float32(tmp_path):
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_train_config(compute_dtype=dtype, num_epochs=2, checkpoint_every_steps=0)
    results[dtype] = train_lib.train_and_evaluate(config, str(tmp_path / dtype))
  # Stated tolerance: within 3 points of test error and 15% of the final training loss.
  assert abs(results['bfloat16']['test_top1_error'] - results['float32']['test_top1_error']) < 0.03
  losses = {}
  for dtype in results:
    rows = [json.loads(l) for l in open(os.path.join(tmp_path, dtype, 'metrics.jsonl'))]
    losses[dtype] = [r['train_loss'] for r in rows if 'train_loss' in r][-1]
  assert losses['bfloat16'] == pytest.approx(losses['float32'], rel=0.15)
  with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(str(tmp_path / 'bfloat16'))) as manager:
    state = manager.restore(manager.latest_step())
  dtypes = {x.dtype for x in jax.tree.leaves((state['params'], state['opt_state']))
            if np.issubdtype(x.dtype, np.floating)}
  assert dtypes == {np.dtype('float32')}  # parameters and momentum stay float32


def test_bfloat16_model_computes_in_bfloat16_and_returns_float32_logits():
  model = models.create_model('wrn', depth=10, widen_factor=1, dtype=models.compute_dtype('bfloat16'))
  variables = models.init_variables(model, jax.random.key(0), (1, 8, 8, 1))
  logits, points = model.apply(variables, jnp.ones((2, 8, 8, 1)), train=False)
  assert logits.dtype == jnp.float32 and points[0].dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(variables['params'])} == {jnp.dtype('float32')}


def test_unknown_compute_dtype_is_one_line():
  with pytest.raises(validation.ConfigError, match="config.compute_dtype='float16' is invalid: allowed: float32, bfloat16"):
    validation.validate_train_config(tiny_train_config(compute_dtype='float16'))

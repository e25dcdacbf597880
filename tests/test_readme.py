"""The README says only what is true: its Python snippets run as written, and every
command it gives names a config file that exists and fields that config has."""

import os
import re
import shlex

import pytest

from conftest import REPO
from distill_jax import main as main_lib

README = open(os.path.join(REPO, 'README.md')).read()
SNIPPETS = re.findall(r'```python\n(.*?)```', README, flags=re.S)


def _commands(module: str = 'distill_jax.main') -> list[list[str]]:
  """The ``python -m MODULE`` commands of the README's bash blocks, as words."""
  out = []
  for block in re.findall(r'```bash\n(.*?)```', README, flags=re.S):
    text = block.replace('\\\n', ' ')
    for line in text.splitlines():
      line = line.split(' #', 1)[0]
      for part in re.split(r'&&|;|\|', line):
        if module in part:
          words = shlex.split(part)
          out.append(words[words.index(module) + 1:])
  return out


COMMANDS = _commands()


def test_the_readme_has_snippets_and_commands():
  assert len(SNIPPETS) >= 3 and len(COMMANDS) >= 10


# Growing a network compiles one Fisher estimate per growth step (~30 s on 2 cores).
@pytest.mark.parametrize('index', [
    pytest.param(i, marks=pytest.mark.slow) if 'grow.grow(' in snippet else i
    for i, snippet in enumerate(SNIPPETS)])
def test_python_snippet_runs(index):
  exec(compile(SNIPPETS[index], f'README.md python block {index}', 'exec'), {})  # pylint: disable=exec-used


@pytest.mark.parametrize('words', COMMANDS, ids=[' '.join(w)[:60] for w in COMMANDS])
def test_command_names_a_config_and_its_fields(words, monkeypatch):
  monkeypatch.chdir(REPO)
  values = [w.split('=', 1)[1] for w in words if w.startswith('--config=')]
  if not values:  # `for i in ...; do ... --config=...` lines keep the flag in another word
    pytest.skip('no --config flag in this part')
  (value,) = values
  config = main_lib._load_config(value)  # pylint: disable=protected-access  (one line on failure)
  main_lib._check_overrides(config, words)  # pylint: disable=protected-access
  for word in words:
    if word.startswith('--') and not word.startswith(('--config', '--noconfig')):
      assert word.split('=', 1)[0].lstrip('-') in ('workdir', 'mode', 'shard', 'cpu_devices'), word


@pytest.mark.parametrize('words', _commands('distill_jax.convert'))
def test_convert_command_parses_and_names_a_network(words):
  from distill_jax import config_lib, convert  # pylint: disable=import-outside-toplevel
  args = convert._parser().parse_args(words)  # pylint: disable=protected-access  (exits on a bad flag)
  assert args.model in config_lib.NETWORKS
  assert convert.model_config_from_flag(args.model)['name'] in ('wrn', 'densenet_bc', 'darts')

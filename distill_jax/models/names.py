"""The string contracts between the networks and their readers, in one place.

Trainers, Fisher estimation and growth address parts of a network's variables and
collections by name; they import these names instead of spelling the strings, so a
rename here (and in the layers that use them) breaks a test, not a run.
"""

INTERMEDIATES = 'intermediates'    # the collection networks sow values into
PERTURBATIONS = 'perturbations'    # the collection of zero perturbations (activation gradients)
AUX_LOGITS = 'aux_logits'          # DARTS auxiliary head logits, sown into INTERMEDIATES
OUTPUT = 'output'                  # the marked output of a block or cell


def cell_name(i: int) -> str:
  """The submodule name of DARTS cell ``i`` (``'cell3'``)."""
  return f'cell{i}'


def cell_output(i: int) -> str:
  """The Fisher point of DARTS cell ``i``'s output (``'cell3/output'``)."""
  return f'{cell_name(i)}/{OUTPUT}'

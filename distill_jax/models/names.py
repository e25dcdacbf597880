"""The string contracts between the networks and their readers, in one place.

Trainers, Fisher estimation and growth address parts of a network's variables and
collections by name; they import these names instead of spelling the strings, so a
rename here (and in the layers that use them) breaks a test, not a run.
"""

INTERMEDIATES = 'intermediates'    # the collection networks sow values into
PERTURBATIONS = 'perturbations'    # the collection of zero perturbations (activation gradients)
AUX_LOGITS = 'aux_logits'          # DARTS auxiliary head logits, sown into INTERMEDIATES
EMBEDDING = 'embedding'            # the pooled features the classifier reads, sown likewise
OUTPUT = 'output'                  # the marked output of a block or cell
AUX_HEAD = 'aux_head'              # the DARTS auxiliary head's submodule (its parameters)
CLASSIFIER = 'classifier'          # every network's final linear layer
OUT_SUFFIX = '_out'                # WRN / DenseNet-BC mark block outputs as '<block>_out'


def cell_name(i: int) -> str:
  """The submodule name of DARTS cell ``i`` (``'cell3'``)."""
  return f'cell{i}'


def cell_output(i: int) -> str:
  """The Fisher point of DARTS cell ``i``'s output (``'cell3/output'``)."""
  return f'{cell_name(i)}/{OUTPUT}'


def wrn_block_name(group: int, block: int) -> str:
  """The submodule name of WRN block ``block`` of group ``group`` (``'group1_block0'``)."""
  return f'group{group}_block{block}'


def wrn_block_output(group: int, block: int) -> str:
  """The marked output (Fisher point) of a WRN block (``'group1_block0_out'``)."""
  return f'{wrn_block_name(group, block)}{OUT_SUFFIX}'


def densenet_block_name(i: int) -> str:
  """The submodule name of DenseNet-BC dense block ``i`` (``'block1'``)."""
  return f'block{i}'


def densenet_block_output(i: int) -> str:
  """The marked output of DenseNet-BC dense block ``i`` (``'block1_out'``)."""
  return f'{densenet_block_name(i)}{OUT_SUFFIX}'


def densenet_transition_name(i: int) -> str:
  """The submodule name of DenseNet-BC transition ``i`` (``'transition0'``)."""
  return f'transition{i}'


def densenet_transition_output(i: int) -> str:
  """The marked output of DenseNet-BC transition ``i`` (``'transition0_out'``)."""
  return f'{densenet_transition_name(i)}{OUT_SUFFIX}'

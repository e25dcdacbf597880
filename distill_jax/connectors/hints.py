"""FitNets' and VID's regressors of the student's maps, and VID's loss on their outputs."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.connectors._layers import BN_EPSILON, BN_MOMENTUM, Dtype, check_map
from distill_jax.connectors._layers import torch_bias_init, torch_kernel_init
from distill_jax.losses._checks import _as_float
from distill_jax.losses.features import _adaptive_avg_pool

# VIDLoss's defaults (distiller_zoo/VID.py): the initial variance and its floor.
VID_INIT_PRED_VAR = 5.0
VID_EPS = 1e-5


class ConvRegressor(nn.Module):
  r"""FitNets' hint regressor: the student's map to the teacher's size and width.

  As RepDistiller's ``ConvReg``, a convolution chosen by the heights of the student's
  map (:math:`H_s, W_s`, read from the input) and of the teacher's
  (:math:`H_t, W_t` = ``teacher_size``):

  * :math:`H_s = 2 H_t`: a 3x3 convolution of stride 2, padding 1;
  * :math:`2 H_s = H_t`: a 4x4 transposed convolution of stride 2 (PyTorch's padding 1,
    so the output is twice the input);
  * :math:`H_s \ge H_t`: an unpadded convolution with kernel
    :math:`(1 + H_s - H_t, 1 + W_s - W_t)` (1x1 for equal sizes);

  then batch norm over ``teacher_channels`` and, with ``use_relu`` (the release's
  default), a ReLU. Convolutions have biases, as PyTorch's default. The regressed map
  goes to :func:`distill_jax.losses.fitnet_loss` with the teacher's hint map; the
  release trains the regressor with the student (it is in ``train_student.py``'s
  trainable list).

  Notes on the release:

  * It chooses the branch on heights only (its maps are square); here the widths must
    then give the teacher's width too, or a ValueError is raised at trace time.
  * A student smaller than the teacher by another factor than 2 is refused (the
    release's ``raise NotImplemented(...)`` raises a TypeError there).
  * The transposed convolution's kernel is laid out as PyTorch's (``transpose_kernel``),
    shape ``(4, 4, teacher_channels, C_s)``, and PyTorch computes its init's fan-in
    from the output channels (``16 * teacher_channels``); both carried over.
  * Flax's batch norm updates its running variance with the biased batch variance,
    PyTorch with the unbiased one; training-mode outputs are the same.

  Attributes:
    teacher_channels: channels of the teacher's hint map.
    teacher_size: ``(H_t, W_t)`` of the teacher's hint map.
    use_relu: apply the final ReLU (the release's ``use_relu=True``).
    dtype: compute dtype (``None``: promoted from inputs and float32 parameters).
  """

  teacher_channels: int
  teacher_size: tuple[int, int]
  use_relu: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Regresses ``x`` (``(N, H_s, W_s, C_s)``) to ``(N, H_t, W_t, teacher_channels)``.

    ``train=True`` normalises with batch statistics and updates the running ones
    (apply with ``mutable=['batch_stats']``).
    """
    x = jnp.asarray(x)
    check_map(x, 'x', 'ConvRegressor')
    s_h, s_w, c_in = x.shape[1], x.shape[2], x.shape[3]
    t_h, t_w = (int(v) for v in self.teacher_size)
    c_out = self.teacher_channels
    common = dict(dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=torch_kernel_init, name='conv')
    if s_h == 2 * t_h:
      out_size = ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
      layer = nn.Conv(c_out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                      bias_init=torch_bias_init(9 * c_in), **common)
    elif 2 * s_h == t_h:
      # PyTorch's padding p of a transposed convolution pads its dilated input by
      # k - 1 - p = 2 on each side.
      out_size = (2 * s_h, 2 * s_w)
      layer = nn.ConvTranspose(c_out, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                               transpose_kernel=True,
                               bias_init=torch_bias_init(16 * c_out), **common)
    elif s_h >= t_h and s_w >= t_w:
      kernel = (1 + s_h - t_h, 1 + s_w - t_w)
      out_size = (t_h, t_w)
      layer = nn.Conv(c_out, kernel, padding='VALID',
                      bias_init=torch_bias_init(kernel[0] * kernel[1] * c_in), **common)
    else:
      raise ValueError(
          f'ConvRegressor: no regressor for a student map of size {(s_h, s_w)} and a '
          f'teacher map of size {(t_h, t_w)}; the student must be twice, half or at '
          'least the size of the teacher (RepDistiller ConvReg).')
    if out_size != (t_h, t_w):
      raise ValueError(
          f'ConvRegressor: a student map of size {(s_h, s_w)} regresses to '
          f'{out_size}, not to the teacher size {(t_h, t_w)}; the widths must follow '
          'the heights (the release chooses by height).')
    y = layer(x)
    y = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                     name='bn')(y)
    return nn.relu(y) if self.use_relu else y

class VIDRegressor(nn.Module):
  r"""VID's regressor of one distillation point, with its per-channel variance.

  The mean :math:`\mu(s)` of the Gaussian that models the teacher's map given the
  student's is three 1x1 convolutions without bias, ReLU between them:
  ``C_s -> mid -> mid -> teacher_channels``, with ``mid = teacher_channels`` as the
  release's ``train_student.py`` builds it (``VIDLoss(s, t, t)``). The variance is
  per teacher channel, :math:`\sigma^2_c = \operatorname{softplus}(\alpha_c) + \epsilon`,
  with the parameter ``log_scale`` :math:`\alpha` initialised to
  :math:`\log(e^{v_0 - \epsilon} - 1)` so that :math:`\sigma^2_c = v_0` at init
  (``init_pred_var`` :math:`v_0 = 5`, :math:`\epsilon = 10^{-5}`).

  Spatial sizes, as the release: when the student's map is taller than
  ``teacher_size``, it is adaptively average-pooled to the square
  :math:`(H_t, H_t)` *before* the regressor; when the teacher's is taller,
  :func:`vid_loss` pools the teacher's map to the student's height. (The release looks
  at heights only; its maps are square.) Without ``teacher_size`` the student's map is
  never pooled.

  The release trains the regressors and ``log_scale`` with the student, at the points
  ``feat[1:-1]`` of both networks (the stage outputs without the stem and the pooled
  embedding).

  Attributes:
    teacher_channels: channels of the teacher's map at this point.
    teacher_size: ``(H_t, W_t)`` of the teacher's map, to pool a taller student map;
      ``None`` never pools.
    mid_channels: width of the hidden 1x1 convolutions (``None``:
      ``teacher_channels``).
    init_pred_var: the variance at init, :math:`v_0`.
    eps: the variance floor :math:`\epsilon` (give :func:`vid_loss` the same).
    dtype: compute dtype (``None``: promoted from inputs and float32 parameters).
  """

  teacher_channels: int
  teacher_size: tuple[int, int] | None = None
  mid_channels: int | None = None
  init_pred_var: float = VID_INIT_PRED_VAR
  eps: float = VID_EPS
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, student_feat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(pred_mean, log_scale)``: the predicted teacher map ``(N, H, W, C_t)``, and the
    ``(C_t,)`` parameter :math:`\\alpha` to give :func:`vid_loss`."""
    x = jnp.asarray(student_feat)
    check_map(x, 'student_feat', 'VIDRegressor')
    if self.teacher_size is not None:
      t_h = int(self.teacher_size[0])
      if x.shape[1] > t_h:
        x = _adaptive_avg_pool(x, t_h, t_h)
    mid = self.mid_channels or self.teacher_channels
    widths = (mid, mid, self.teacher_channels)
    for i, width in enumerate(widths):
      if i:
        x = nn.relu(x)
      x = nn.Conv(width, (1, 1), use_bias=False, kernel_init=torch_kernel_init,
                  dtype=self.dtype, param_dtype=jnp.float32, name=f'conv{i}')(x)
    alpha0 = math.log(math.expm1(self.init_pred_var - self.eps))
    log_scale = self.param('log_scale', nn.initializers.constant(alpha0),
                           (self.teacher_channels,), jnp.float32)
    return x, log_scale

def vid_loss(
    pred_mean: jax.typing.ArrayLike,
    log_scale: jax.typing.ArrayLike,
    teacher_feat: jax.typing.ArrayLike,
    *,
    eps: float = VID_EPS,
) -> jax.Array:
  r"""VID's loss: the mean Gaussian negative log-likelihood of the teacher's map.

  With the regressed mean :math:`\mu` and :math:`\sigma^2_c =
  \operatorname{softplus}(\alpha_c) + \epsilon` (:class:`VIDRegressor`'s outputs) and
  the teacher's map :math:`t`,

  .. math::
    L_{VID} = \frac{1}{N H W C} \sum_{n,h,w,c} \frac{1}{2} \Big(
      \frac{(\mu_{nhwc} - t_{nhwc})^2}{\sigma^2_c} + \log \sigma^2_c \Big),

  the release's mean over all elements, without the constant
  :math:`\frac{1}{2}\log 2\pi`. A teacher map taller than ``pred_mean`` is first
  adaptively average-pooled to the square of the student's height, as the release
  does; the student's side is pooled by :class:`VIDRegressor`, before the regressor,
  so a ``pred_mean`` taller than the teacher is refused here. The release writes
  softplus as ``log(1 + exp(a))`` (which overflows for large ``a``); the stable
  ``jax.nn.softplus`` has the same value. The paper's per-point weights
  :math:`\lambda` are left to the caller (the release sums the points' terms). The
  teacher gets no gradient; ``log_scale`` does.

  References: Ahn et al., `Variational information distillation for knowledge
  transfer <https://arxiv.org/abs/1904.05835>`_, CVPR 2019; release: RepDistiller
  ``distiller_zoo/VID.py`` (``VIDLoss.forward``).

  Args:
    pred_mean: the regressed student map, ``(N, H, W, C)``.
    log_scale: the ``(C,)`` variance parameter :math:`\alpha`.
    teacher_feat: the teacher's map, ``(N, H', W', C)`` with ``H' >= H``.
    eps: the variance floor :math:`\epsilon` (the regressor's).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on maps that are not 4-D, differing batch sizes or channels, a
      ``log_scale`` that is not ``(C,)``, or sizes that still differ after pooling.
  """
  mu = _as_float(pred_mean)
  alpha = _as_float(log_scale)
  t = jax.lax.stop_gradient(_as_float(teacher_feat))
  check_map(mu, 'pred_mean', 'vid_loss')
  check_map(t, 'teacher_feat', 'vid_loss')
  if mu.shape[0] != t.shape[0] or mu.shape[-1] != t.shape[-1]:
    raise ValueError(
        f'vid_loss: pred_mean {mu.shape} and teacher_feat {t.shape} must have the same '
        'batch size and channels.')
  if alpha.shape != (mu.shape[-1],):
    raise ValueError(
        f'vid_loss: log_scale must have shape ({mu.shape[-1]},), got {alpha.shape}.')
  if t.shape[1] > mu.shape[1]:
    t = _adaptive_avg_pool(t, mu.shape[1], mu.shape[1])
  if t.shape[1:3] != mu.shape[1:3]:
    raise ValueError(
        f'vid_loss: pred_mean {mu.shape} and teacher_feat {t.shape} differ in size '
        'after pooling a taller teacher map to the square of the student height; a '
        'taller student map is pooled by VIDRegressor(teacher_size=...).')
  var = jax.nn.softplus(alpha) + eps
  nll = 0.5 * (jnp.square(mu - t) / var + jnp.log(var))
  return jnp.mean(nll)

"""ResNet backbones in NHWC, split into the shared trunk and one `layer4` stage.

DMUE shares the stem and layer1..layer3 (the *trunk*) and keeps C+1 copies of layer4 (the
*branches*), so the two halves are separate modules. Module and parameter names follow the
PyTorch reference (conv1, bn1, layer1_0/conv1, ..., downsample_conv, downsample_bn) so that the
converter in `dmue_jax.convert_torch` is a renaming.

BatchNorm follows PyTorch exactly (biased variance to normalise, unbiased variance in the
running average, momentum 0.1, eps 1e-5) because the reference's running statistics are part of
what we reproduce. It can also normalise a stack of equal-sized *segments* separately, each with
its own statistics, updating the running averages segment after segment: one call then does what
the reference does with several calls on different sample subsets.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmue_jax.models import layers

Dtype = Any

# Blocks per stage and block type for each backbone name.
SPECS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet18_narrow': ('basic', (2, 2, 2, 2)),
    # One block per stage, for the tests' seconds-long runs (as flax's imagenet `_ResNet1`).
    'resnet10_narrow': ('basic', (1, 1, 1, 1)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet50_ibn': ('bottleneck_ibn', (3, 4, 6, 3)),
}
NARROW_WIDTH = 16


def is_narrow(backbone: str) -> bool:
  """The '_narrow' backbones have a fixed width (NARROW_WIDTH); config.model.width is unused."""
  return backbone.endswith('_narrow')


def backbone_width(backbone: str, width: int = 64) -> int:
  """The first stage's channels: NARROW_WIDTH for the '_narrow' backbones, else `width`."""
  return NARROW_WIDTH if is_narrow(backbone) else width


def feature_dim(backbone: str, width: int = 64) -> int:
  """D, the pooled feature size: 8*width (basic blocks) or 32*width (bottlenecks)."""
  kind, _ = SPECS[backbone]
  return 8 * backbone_width(backbone, width) * (1 if kind == 'basic' else 4)


def segment_count(x: jax.Array) -> int:
  """Number of values per feature in one segment x [n, ..., F]: n * spatial size."""
  count = 1
  for d in x.shape[:-1]:
    count *= d
  return count


class BatchNorm(nn.Module):
  """PyTorch-semantics BatchNorm over the last axis, optionally per stacked segment.

  Attributes:
    momentum: PyTorch momentum: running = (1 - momentum) * running + momentum * batch.
    epsilon: added to the variance.
    use_scale_bias: affine parameters `scale` (init 1) and `bias` (init 0).
  Call args:
    x: [N, ..., F], or [S, N, ..., F] with `stacked`.
    train: normalise with batch statistics and update the running ones.
    stacked: x[s] is segment s, normalised with its own statistics; the running averages are
      updated segment after segment, s = 0 first. The segments are normalised under vmap, not
      sliced out of one batch: the gradient of a slice is a pad, and XLA:CPU fused the sum of
      the padded neck gradients into every layer4 backward fusion that read it.
  With `axis_name` (inside shard_map) the batch is the union of every device's share on that
  mesh axis: statistics and the running averages' count are the global batch's.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  kernels: layers.Kernels = layers.XLA
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool, stacked: bool = False):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if not train:
      return self._normalize(x, ra_mean.value, ra_var.value, scale, bias)

    batch_norm = lambda a: self.kernels.batch_norm(a, scale, bias, self.epsilon, self.axis_name)
    x32 = x.astype(jnp.float32)
    if stacked:
      y, means, variances = jax.vmap(batch_norm)(x32)
      count = segment_count(x[0])
    else:
      y, mean, var = batch_norm(x32)
      means, variances, count = mean[None], var[None], segment_count(x)
    if self.axis_name is not None:
      count *= jax.lax.axis_size(self.axis_name)
    if not self.is_initializing():
      new_mean, new_var = ra_mean.value, ra_var.value
      correction = count / jnp.maximum(jnp.asarray(count, jnp.float32) - 1, 1)
      for mean, var in zip(means, variances):
        new_mean = (1 - self.momentum) * new_mean + self.momentum * mean
        new_var = (1 - self.momentum) * new_var + self.momentum * (var * correction)
      ra_mean.value, ra_var.value = new_mean, new_var
    return y.astype(self.dtype)

  def _normalize(self, x, mean, var, scale, bias):
    y = layers.normalize(x.astype(jnp.float32), mean, var, scale, bias, self.epsilon)
    return y.astype(self.dtype)


class InstanceNorm(nn.Module):
  """PyTorch InstanceNorm2d(affine=True, no running statistics) over H, W per sample."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class IBN(nn.Module):
  """IBN-a: the first half of the channels instance-normalised, the rest batch-normalised."""
  dtype: Dtype = jnp.float32
  kernels: layers.Kernels = layers.XLA
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train):
    half = x.shape[-1] // 2
    a = InstanceNorm(dtype=self.dtype, name='IN')(x[..., :half])
    b = BatchNorm(dtype=self.dtype, kernels=self.kernels, axis_name=self.axis_name,
                  name='BN')(x[..., half:], train=train)
    return jnp.concatenate([a, b], axis=-1)


def _conv(features, kernel, stride, dtype, kernels, name):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                 conv_general_dilated=kernels.conv, name=name)


class Block(nn.Module):
  """A residual block: 'basic' (2 convs), 'bottleneck' (3 convs, x4) or 'bottleneck_ibn'."""
  features: int
  kind: str
  stride: int = 1
  downsample: bool = False
  ibn: bool = False
  dtype: Dtype = jnp.float32
  kernels: layers.Kernels = layers.XLA
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train):
    norm = functools.partial(BatchNorm, dtype=self.dtype, kernels=self.kernels,
                             axis_name=self.axis_name)
    bn = lambda name: (lambda y: norm(name=name)(y, train=train))
    conv = lambda f, k, s, name: _conv(f, k, s, self.dtype, self.kernels, name)
    relu = nn.relu
    if train:
      # Every ReLU output is the input of a convolution whose kernel gradient reads it
      # transposed; `kernels.materialize` may write it once rather than let it be recomputed
      # there (dmue_jax/kernels/materialize.py). Its anchor is one entry of conv1's kernel
      # (created before any ReLU): a parameter, so no device waits for another's data to read it.
      materialize = self.kernels.materialize
      anchor = lambda: self.variables['params']['conv1']['kernel'].reshape(-1)[0]
      relu = lambda y: materialize(nn.relu(y), anchor())
    residual = x
    if self.kind == 'basic':
      y = conv(self.features, 3, self.stride, 'conv1')(x)
      y = relu(bn('bn1')(y))
      y = bn('bn2')(conv(self.features, 3, 1, 'conv2')(y))
      out_features = self.features
    else:
      y = conv(self.features, 1, 1, 'conv1')(x)
      if self.ibn:
        y = IBN(dtype=self.dtype, kernels=self.kernels, axis_name=self.axis_name,
                name='bn1')(y, train=train)
      else:
        y = bn('bn1')(y)
      y = relu(y)
      y = relu(bn('bn2')(conv(self.features, 3, self.stride, 'conv2')(y)))
      out_features = self.features * 4
      y = bn('bn3')(conv(out_features, 1, 1, 'conv3')(y))
    if self.downsample:
      residual = bn('downsample_bn')(conv(out_features, 1, self.stride, 'downsample_conv')(x))
    return relu(y + residual)


def _stage_blocks(kind, width, index, num_blocks, in_features, stride, dtype, kernels,
                  axis_name):
  """The blocks of stage `index` (0..3) as (name, Block) pairs."""
  features = width * (2 ** index)
  expansion = 1 if kind == 'basic' else 4
  # IBN-a puts instance norm in every stage but the last (planes 512 in the reference).
  ibn = kind == 'bottleneck_ibn' and index < 3
  block_kind = 'basic' if kind == 'basic' else 'bottleneck'
  blocks = []
  for b in range(num_blocks):
    s = stride if b == 0 else 1
    down = b == 0 and (s != 1 or in_features != features * expansion)
    blocks.append((f'layer{index + 1}_{b}',
                   Block(features, block_kind, s, down, ibn, dtype, kernels, axis_name,
                         name=f'layer{index + 1}_{b}')))
  return blocks


class Trunk(nn.Module):
  """Stem + layer1..layer3: [N, H, W, 3] -> [N, H/16, W/16, 4*width*expansion].

  stem='reference' is the authors' ResNet-18 stem (README quirk Q1): conv7x7/2 -> BN -> *no ReLU* ->
  2x2 max-pool stride 2; 'standard' is conv7x7/2 -> BN -> ReLU -> 3x3/2 max-pool (pad 1).
  """
  backbone: str = 'resnet18'
  width: int = 64
  stem: str = 'reference'
  dtype: Dtype = jnp.float32
  kernels: layers.Kernels = layers.XLA
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    kind, blocks = SPECS[self.backbone]
    width = backbone_width(self.backbone, self.width)
    x = x.astype(self.dtype)
    x = _conv(width, 7, 2, self.dtype, self.kernels, 'conv1')(x)
    x = BatchNorm(dtype=self.dtype, kernels=self.kernels, axis_name=self.axis_name,
                  name='bn1')(x, train=train)
    if self.stem == 'reference':
      x = self.kernels.max_pool_2x2(x)
    else:
      x = nn.relu(x)
      x = self.kernels.max_pool_3x3(x)
    in_features = width
    expansion = 1 if kind == 'basic' else 4
    for index in range(3):
      for _, block in _stage_blocks(kind, width, index, blocks[index], in_features,
                                    1 if index == 0 else 2, self.dtype, self.kernels,
                                    self.axis_name):
        x = block(x, train=train)
        in_features = width * (2 ** index) * expansion
    return x


class Stage4(nn.Module):
  """One copy of layer4: [N, h, w, Fin] -> [N, h', w', D]."""
  backbone: str = 'resnet18'
  width: int = 64
  last_stride: int = 2
  dtype: Dtype = jnp.float32
  kernels: layers.Kernels = layers.XLA
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    kind, blocks = SPECS[self.backbone]
    width = backbone_width(self.backbone, self.width)
    for _, block in _stage_blocks(kind, width, 3, blocks[3], x.shape[-1], self.last_stride,
                                  self.dtype, self.kernels, self.axis_name):
      x = block(x, train=train)
    return x


def pool(x: jax.Array, method: str = 'gap', p: float = 3.0, eps: float = 1e-6) -> jax.Array:
  """Global pooling [N, h, w, D] -> [N, D] in float32: average, or GeM with fixed p."""
  x = x.astype(jnp.float32)
  if method == 'gem':
    return jnp.mean(jnp.power(jnp.maximum(x, eps), p), axis=(1, 2)) ** (1.0 / p)
  return jnp.mean(x, axis=(1, 2))


class PlainResNet(nn.Module):
  """The plain backbone classifier (trunk + one layer4 + pool + linear), for baselines/bench."""
  num_classes: int
  backbone: str = 'resnet18'
  width: int = 64
  stem: str = 'reference'
  last_stride: int = 2
  dtype: Dtype = jnp.float32
  kernels: layers.Kernels = layers.XLA

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = Trunk(self.backbone, self.width, self.stem, self.dtype, self.kernels,
              name='trunk')(x, train=train)
    h = Stage4(self.backbone, self.width, self.last_stride, self.dtype, self.kernels,
               name='layer4')(h, train=train)
    feats = pool(h)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='fc')(feats)
    return logits, {'features': feats}

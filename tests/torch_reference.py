"""A small PyTorch re-creation of the authors' DMUE model and training loss (a test helper).

Written from reading the reference (FaceX-Zoo `addition_module/DMUE`: models/make_model.py,
models/resnet_multibranch.py, models/resnet_ibn_multibranch.py, train.py, losses/, utils/ramp.py)
so that the tests have an executable stand-in for it:
  * `DMUENet` has the reference's module names, so `state_dict()` has the official key layout
    (base.conv1.weight, base.layer4_<i>.*, classifiers.<i>.weight, bottleneck.*, project_w.*);
  * `DMUENet.forward(x, label, 'sp_confidence')` and `dmue_loss` follow the reference training
    step operation by operation: batch order kept, boolean-mask subsets, the BatchNorm calls in
    the reference order (aux passes, target, latent passes; the neck likewise).
Differences from the reference, none of which changes a number:
  * `width` is a parameter (64 = the reference) so that tests can use narrow nets; IBN is used
    in stages 1-3 (the reference tests planes != 512, the same thing at width 64);
  * the 'normal' (evaluation) phase runs the target branch only (the reference also runs the
    auxiliary branches on label subsets and throws the result away);
  * no .cuda() calls; GeM keeps p fixed (the reference's default, freeze_p=True).
Shapes are PyTorch's: images [B, 3, H, W], labels [B] int64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Block type, blocks per stage, IBN-a, default stem for each backbone name (the reference
# builds resnet18/resnet50 with its no-ReLU 2x2-pool stem, ResNet-50-IBN-a with the usual one).
ARCH = {
    'resnet18': ('basic', (2, 2, 2, 2), False, 'reference'),
    'resnet18_narrow': ('basic', (2, 2, 2, 2), False, 'reference'),
    'resnet34': ('basic', (3, 4, 6, 3), False, 'reference'),
    'resnet50': ('bottleneck', (3, 4, 6, 3), False, 'reference'),
    'resnet50_ibn': ('bottleneck', (3, 4, 6, 3), True, 'standard'),
}


def feature_dim(backbone: str, width: int) -> int:
  return 8 * width * (1 if ARCH[backbone][0] == 'basic' else 4)


class IBN(nn.Module):
  """IBN-a normalisation: InstanceNorm on the first half of the channels, BatchNorm on the rest."""

  def __init__(self, planes: int):
    super().__init__()
    self.half = planes // 2
    self.IN = nn.InstanceNorm2d(self.half, affine=True)  # pylint: disable=invalid-name
    self.BN = nn.BatchNorm2d(planes - self.half)  # pylint: disable=invalid-name

  def forward(self, x):
    first, rest = x[:, :self.half], x[:, self.half:]
    return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, ibn=False):
    del ibn  # basic blocks never use IBN
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(out + residual)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, ibn=False):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = IBN(planes) if ibn else nn.BatchNorm2d(planes)
    # The reference strides in the 3x3 convolution.
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(out + residual)


def _make_stage(block, inplanes, planes, blocks, stride, ibn):
  """nn.Sequential of `blocks` blocks; a 1x1 conv + BN shortcut when the shape changes."""
  downsample = None
  if stride != 1 or inplanes != planes * block.expansion:
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * block.expansion))
  layers = [block(inplanes, planes, stride, downsample, ibn)]
  for _ in range(1, blocks):
    layers.append(block(planes * block.expansion, planes, 1, None, ibn))
  return nn.Sequential(*layers)


class MultiBranchResNet(nn.Module):
  """The reference `base`: stem + layer1..layer3 shared, `layer4_<i>` for i = 0..C.

  forward(x, label, phase) -> dict with
    final   [B, D, h, w]            layer4_C on the whole batch
    aux     C maps [B_c', D, h, w]  layer4_c on the samples with label != c (batch order)
    latent  C maps [B_c, D, h, w]   layer4_c on the samples with label == c
    targets C int tensors            labels of `aux` remapped to skip c
    inds, inds_latent                the index tensors of those subsets
  In the 'normal' phase only `final` is computed.
  """

  def __init__(self, backbone, num_classes, width=64, last_stride=2, stem=None):
    super().__init__()
    kind, layers, ibn, default_stem = ARCH[backbone]
    block = BasicBlock if kind == 'basic' else Bottleneck
    self.num_classes = num_classes
    self.stem = stem or default_stem
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    if self.stem == 'reference':
      # No ReLU before the pool, and a 2x2 pool (README quirk Q1).
      self.maxpool = nn.MaxPool2d(kernel_size=2)
    else:
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inplanes = width
    for index in range(3):
      planes = width * 2 ** index
      setattr(self, f'layer{index + 1}',
              _make_stage(block, inplanes, planes, layers[index], 1 if index == 0 else 2, ibn))
      inplanes = planes * block.expansion
    # Every copy of layer4 starts from the same input width; none uses IBN.
    for branch in range(num_classes + 1):
      setattr(self, f'layer4_{branch}',
              _make_stage(block, inplanes, width * 8, layers[3], last_stride, False))

  def branch(self, index):
    return getattr(self, f'layer4_{index}')

  def forward(self, x, label=None, phase='sp_confidence'):
    x = self.bn1(self.conv1(x))
    if self.stem != 'reference':
      x = F.relu(x)
    x = self.maxpool(x)
    x = self.layer3(self.layer2(self.layer1(x)))
    c = self.num_classes
    if phase == 'normal':
      return {'final': self.branch(c)(x)}
    aux, targets, inds = [], [], []
    for cls in range(c):
      ind = (label != cls).nonzero()[:, 0]
      t = label[ind]
      inds.append(ind)
      targets.append(torch.where(t < cls, t, t - 1))
      aux.append(self.branch(cls)(x[ind]))
    final = self.branch(c)(x)
    latent, inds_latent = [], []
    for cls in range(c):
      ind = (label == cls).nonzero()[:, 0]
      inds_latent.append(ind)
      latent.append(self.branch(cls)(x[ind]))
    return {'final': final, 'aux': aux, 'latent': latent, 'targets': targets, 'inds': inds,
            'inds_latent': inds_latent}


class GeM(nn.Module):
  def __init__(self, p=3.0, eps=1e-6):
    super().__init__()
    self.p, self.eps = p, eps

  def forward(self, x):
    return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)


class DMUENet(nn.Module):
  """The reference `Backbone` of make_model.py: base, pooling, dropout, shared BN-neck, heads
  (`classifiers.<c>`: D -> C-1 for c < C, D -> C for c = C), and the PUE MLP `project_w`."""

  def __init__(self, backbone='resnet18', num_classes=7, width=64, last_stride=2, stem=None,
               pooling='gap', bnneck=True, dropout=0.5):
    super().__init__()
    self.num_classes = num_classes
    dim = feature_dim(backbone, width)
    self.base = MultiBranchResNet(backbone, num_classes, width, last_stride, stem)
    self.gap = GeM() if pooling == 'gem' else nn.AdaptiveAvgPool2d(1)
    heads = []
    for index in range(num_classes + 1):
      out = num_classes if index == num_classes else num_classes - 1
      head = nn.Linear(dim, out, bias=False)
      nn.init.normal_(head.weight, std=0.001)
      heads.append(head)
    self.classifiers = nn.ModuleList(heads)
    self.dropout = nn.Dropout(p=dropout)
    self.project_w = nn.Sequential(nn.Linear(2 * num_classes, num_classes), nn.PReLU(),
                                   nn.Linear(num_classes, 1))
    self.neck = bnneck
    if bnneck:
      self.bottleneck = nn.BatchNorm1d(dim)
      self.bottleneck.bias.requires_grad_(False)

  def _pool(self, x):
    return self.gap(x).flatten(1)

  def _neck(self, x):
    return self.bottleneck(x) if self.neck else x

  def forward(self, x, label=None, phase='sp_confidence'):
    """Returns the 'normal' phase's logits [B, C], or the training outputs as a dict:

    logits [B, C] target head (before the score), scaled_logits [B, C] = score * logits,
    score [B, 1], aux_logits / latent_logits / targets: lists over c, g_aux / g_main: lists of
    row-normalised Gram matrices over the label != c subsets.
    """
    c = self.num_classes
    maps = self.base(x, label, phase)
    if phase == 'normal':
      z = self._neck(self.dropout(self._pool(maps['final'])))
      return self.classifiers[c](z)
    # Auxiliary passes: pool -> dropout -> neck -> head c.
    aux_logits = [self.classifiers[i](self._neck(self.dropout(self._pool(m))))
                  for i, m in enumerate(maps['aux'])]
    z = self._pool(maps['final'])
    # The similarities use the target features before dropout.
    cos = (z @ z.t()) / (z.norm(dim=1, keepdim=True) @ z.norm(dim=1, keepdim=True).t())
    feats = self._neck(self.dropout(z))
    # Latent-distribution passes: no dropout.
    latent_feats = [self._neck(self._pool(m)) for m in maps['latent']]

    # SP: Grams of the auxiliary *logits* against the target *features* (README quirk Q3).
    g_aux = [F.normalize(a @ a.t(), p=2, dim=1) for a in aux_logits]
    g_full = feats @ feats.t()
    g_main = [F.normalize(g_full[ind][:, ind], p=2, dim=1) for ind in maps['inds']]

    latent_logits = [self.classifiers[i](f) for i, f in enumerate(latent_feats)]
    logits = self.classifiers[c](feats)

    one_hot = torch.zeros(label.shape[0], c).scatter_(1, label[:, None], 1.0)
    class_means = torch.cat([cos[:, ind].mean(dim=1, keepdim=True)
                             for ind in maps['inds_latent']], dim=1)
    lo = class_means.min(dim=1, keepdim=True)[0]
    hi = class_means.max(dim=1, keepdim=True)[0]
    stats = torch.cat([(class_means - lo) / (hi - lo), one_hot], dim=1)
    score = torch.sigmoid(self.project_w(stats))
    return {'logits': logits, 'scaled_logits': logits * score, 'score': score,
            'aux_logits': aux_logits, 'targets': maps['targets'],
            'latent_logits': latent_logits, 'g_aux': g_aux, 'g_main': g_main}

  def eval_dropout(self):
    """Training mode everywhere except dropout: the `rng=None` semantics of dmue_jax."""
    self.train()
    self.dropout.eval()
    return self


def ramp_up(epoch, alpha, lamda=1.0):
  return lamda if epoch > alpha else lamda * math.exp(-5.0 * (1.0 - epoch / alpha) ** 2)


def ramp_down(epoch, alpha, lamda=1.0):
  return lamda if epoch < alpha else lamda * math.exp(-((1.0 - alpha / epoch) ** 2))


def soft_labels(latent_logits, label, num_classes, temperature):
  """[B, C]: for each sample, its class branch's sharpened distribution with a 0 at its label."""
  out = torch.zeros(label.shape[0], num_classes)
  for cls in range(num_classes):
    p = torch.softmax(latent_logits[cls], dim=1) ** (1.0 / temperature)
    p = (p / p.sum(dim=1, keepdim=True)).detach()
    full = torch.zeros(p.shape[0], num_classes)
    full[:, :cls], full[:, cls + 1:] = p[:, :cls], p[:, cls:]
    out[(label == cls).nonzero()[:, 0]] = full
  return out


def dmue_loss(out, label, *, num_classes, epoch, ramp_a, temperature=1.2, w=0.5, gamma=1000.0):
  """The reference train.py loss assembly. Returns {total, ce, soft, sp, aux} tensors."""
  softlabel = soft_labels(out['latent_logits'], label, num_classes, temperature)
  probs = torch.softmax(out['logits'], dim=1)
  mask = torch.ones_like(probs).scatter_(1, label[:, None], 0.0)
  soft = torch.mean((probs * mask - softlabel) ** 2)
  aux = sum(F.cross_entropy(a, t) for a, t in zip(out['aux_logits'], out['targets']))
  aux = aux / num_classes  # num_branches - 1
  ce = F.cross_entropy(out['scaled_logits'], label)
  sp = sum(F.mse_loss(ga, gm) for ga, gm in zip(out['g_aux'], out['g_main'])) / num_classes
  up, down = ramp_up(epoch, ramp_a), ramp_down(epoch, ramp_a)
  total = up * ce + up * (w * soft + gamma * sp) + down * aux
  return {'total': total, 'ce': ce, 'soft': soft, 'sp': sp, 'aux': aux}


# ------------------------------------------------------------------ other official layouts
def target_only_state_dict(state_dict, num_classes):
  """What the reference convert_weights.py writes: the target branch and head only."""
  c = num_classes
  out = {}
  for key, value in state_dict.items():
    key = key.removeprefix('module.')
    if key.startswith('project_w.'):
      continue
    if key.startswith('base.layer4_'):
      branch, rest = key[len('base.layer4_'):].split('.', 1)
      if int(branch) == c:
        out['base.layer4.' + rest] = value
      continue
    if key.startswith('classifiers.'):
      index, rest = key[len('classifiers.'):].split('.', 1)
      if int(index) == c:
        out['classifiers.0.' + rest] = value
      continue
    out[key] = value
  return out


def single_backbone_state_dict(state_dict, branch):
  """The plain one-layer4 ResNet keys (conv1.weight, layer4.0..., no 'base.') of one branch."""
  out = {}
  for key, value in state_dict.items():
    if not key.startswith('base.'):
      continue
    key = key[len('base.'):]
    if key.startswith('layer4_'):
      index, rest = key[len('layer4_'):].split('.', 1)
      if int(index) != branch:
        continue
      key = 'layer4.' + rest
    out[key] = value
  return out


def msceleb_checkpoint(backbone_state, feature_dim_, num_ids=10):
  """The layout of the official MS-Celeb-1M pretraining snapshot (pretrain/train_mv_softmax.py):
  {'state_dict': feat_net.* + loss_layer.weight, 'epoch', 'batch_id'}."""
  state = {'feat_net.' + k: v for k, v in backbone_state.items()}
  state['loss_layer.weight'] = torch.randn(feature_dim_, num_ids)
  return {'state_dict': state, 'epoch': 17, 'batch_id': 3}


def torchvision_state_dict(backbone_state, feature_dim_, num_classes=10):
  """A torchvision-style ImageNet classifier state dict: backbone keys + fc.weight/fc.bias."""
  state = dict(backbone_state)
  state['fc.weight'] = torch.randn(num_classes, feature_dim_)
  state['fc.bias'] = torch.randn(num_classes)
  return state


def randomize_(model, seed=0, head_std=0.1):
  """Gives every parameter and running statistic distinct random values, so that a test can
  tell any two apart, and heads a scale at which the losses are not trivially uniform."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        n = module.num_features
        module.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
        module.bias.copy_(0.1 * torch.randn(n, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
        module.running_var.copy_(1.0 + 0.5 * torch.rand(n, generator=gen))
        module.num_batches_tracked.fill_(3)
      elif isinstance(module, nn.InstanceNorm2d):
        n = module.num_features
        module.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
        module.bias.copy_(0.1 * torch.randn(n, generator=gen))
      elif isinstance(module, nn.Linear) and name.startswith('classifiers'):
        module.weight.copy_(head_std * torch.randn(module.weight.shape, generator=gen))
      elif isinstance(module, nn.PReLU):
        module.weight.fill_(0.1 + 0.3 * torch.rand((), generator=gen).item())
  return model

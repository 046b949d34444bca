"""Official PyTorch checkpoints -> Flax, and our model against the reference's numbers.

`torch_reference.DMUENet` (our re-creation of the authors' model) provides checkpoints in the
official key layouts and the reference numbers: the same weights must give the same losses,
the same BatchNorm running statistics after a training forward, and the same inference logits.
Kept small (narrow ResNet-18, 48 px) so the module runs in about a minute on two CPU cores.
"""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=g-import-not-at-top,wrong-import-position
import torch_reference as ref
from configs import rafdb
from dmue_jax import convert_torch
from dmue_jax import train
from dmue_jax.models import dmue as dmue_model

SIZE = 48
RTOL, ATOL = 1e-4, 1e-5


def make_config(num_classes, backbone='resnet18_narrow', width=64, branch_mode='loop',
                kernels='auto'):
  config = rafdb.get_config()
  config.model.kernels = kernels
  config.model.backbone = backbone
  config.model.width = width
  config.model.num_classes = num_classes
  config.model.branch_mode = branch_mode
  config.model.stem = ref.ARCH[backbone][3]
  config.input.image_size = SIZE
  return config


def reference_model(config, seed=0):
  m = config.model
  torch.manual_seed(seed)
  net = ref.DMUENet(m.backbone, m.num_classes, width=16 if m.backbone == 'resnet18_narrow'
                    else m.width, stem=m.stem)
  return ref.randomize_(net, seed=seed)


def shuffled_batch(num_classes, k, seed=0):
  """Images [B, 3, H, W] float32 and labels [B] with each class k times, in random order."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), k))
  images = rng.normal(size=(num_classes * k, 3, SIZE, SIZE)).astype(np.float32)
  return images, labels


def nhwc(images):
  return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def state_numpy(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def assert_close(actual, expected, what):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL,
                             err_msg=what)


def save(obj, path):
  torch.save(obj, path)
  return str(path)


# ------------------------------------------------------------------ layout (a)
@pytest.mark.parametrize('prefix', ['', 'module.'])
@pytest.mark.slow
def test_multibranch_snapshot_loads_completely(tmp_path, prefix):
  config = make_config(3)
  net = reference_model(config)
  path = save({prefix + k: v for k, v in net.state_dict().items()}, tmp_path / 'snap.pth')

  variables = convert_torch.load_official_checkpoint(path, config)

  shapes = jax.eval_shape(lambda r: train.make_model(config).init(r, SIZE), jax.random.key(0))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, shapes)
  # Every tensor came back to its own key: nothing lost, nothing misplaced.
  back = convert_torch.to_torch_state_dict(variables, config)
  expected = state_numpy(net)
  assert set(back) == set(expected)
  for key, value in expected.items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.slow
def test_round_trip_loads_into_the_reference_model():
  config = make_config(3)
  net = reference_model(config, seed=1)
  variables = convert_torch.convert_state_dict(net.state_dict(), config)
  other = ref.DMUENet('resnet18_narrow', 3, width=16)
  other.load_state_dict(convert_torch.to_torch_state_dict(variables, config, as_tensors=True))
  for key, value in net.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------ errors
@pytest.fixture(name='snapshot')
def _snapshot():
  config = make_config(3)
  return config, dict(reference_model(config).state_dict())


def test_misshaped_key_is_named_with_both_shapes(snapshot):
  config, state = snapshot
  state['base.layer2.0.conv1.weight'] = torch.zeros(32, 16, 3, 1)
  with pytest.raises(convert_torch.CheckpointError,
                     match=r'base\.layer2\.0\.conv1\.weight expected \[32, 16, 3, 3\], '
                           r'found \[32, 16, 3, 1\]'):
    convert_torch.convert_state_dict(state, config)


def test_missing_and_unexpected_keys_are_named(snapshot):
  config, state = snapshot
  del state['base.layer4_2.1.bn2.running_var']
  state['base.layer9.weight'] = torch.zeros(3)
  with pytest.raises(convert_torch.CheckpointError) as info:
    convert_torch.convert_state_dict(state, config)
  message = str(info.value)
  assert 'Missing keys (1): base.layer4_2.1.bn2.running_var' in message
  assert 'Unexpected keys (1): base.layer9.weight' in message


def test_wrong_number_of_classes_says_so():
  state = reference_model(make_config(4)).state_dict()
  with pytest.raises(convert_torch.CheckpointError) as info:
    convert_torch.convert_state_dict(state, make_config(3))
  message = str(info.value)
  assert 'trained for 4 classes but config.model.num_classes=3' in message
  assert 'classifiers.0.weight expected [2, 128], found [3, 128]' in message
  assert 'base.layer4_4.0.conv1.weight' in message   # the extra branch


def test_wrong_backbone_is_described(snapshot):
  _, state = snapshot
  with pytest.raises(convert_torch.CheckpointError, match='looks like resnet18_narrow'):
    convert_torch.convert_state_dict(state, make_config(3, backbone='resnet34', width=16))


def test_checkpoint_without_bn_neck_needs_bnneck_false():
  # The reference's setting for ResNet-50-IBN (config.py: bnneck False): no bottleneck.* keys.
  state = ref.DMUENet('resnet18_narrow', 3, width=16, bnneck=False).state_dict()
  config = make_config(3)
  with pytest.raises(convert_torch.CheckpointError, match='bnneck=False'):
    convert_torch.convert_state_dict(state, config)
  config.model.bnneck = False
  variables = convert_torch.convert_state_dict(state, config)
  np.testing.assert_array_equal(variables['params']['neck']['bn']['scale'], 1.0)
  assert not any(k.startswith('bottleneck.')
                 for k in convert_torch.to_torch_state_dict(variables, config))


@pytest.mark.parametrize('content', ['text', 'tensor', 'missing'])
def test_unreadable_files_raise_checkpoint_error(tmp_path, content):
  path = tmp_path / 'weights.pth'
  if content == 'text':
    path.write_text('not a checkpoint')
  elif content == 'tensor':
    torch.save(torch.zeros(3), path)
  with pytest.raises(convert_torch.CheckpointError, match=str(path)):
    convert_torch.load_official_checkpoint(str(path), make_config(3))


def test_torch_is_optional():
  # A None entry in sys.modules makes `import torch` fail as if it were not installed.
  code = ('import sys; sys.modules["torch"] = None\n'
          'from dmue_jax import convert_torch, train\n'
          'try:\n'
          '  convert_torch.load_official_checkpoint("x.pth", None)\n'
          'except convert_torch.CheckpointError as e:\n'
          '  print(e)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
  assert 'pip install torch' in out.stdout


# ------------------------------------------------------------------ the reference's numbers
def _our_terms_and_stats(config, variables, images, labels, epochs, via_loss_terms):
  """Our loss terms at each epoch (rng=None) and the batch stats after the forward pass."""
  model = train.make_model(config)
  c = config.model.num_classes

  @jax.jit
  def run(v, x, epoch):
    grouped, _ = train.group_by_class(x, labels, c)
    terms, extra = train.dmue_terms(model, config.dmue, v['params'], v['batch_stats'],
                                    grouped, epoch, None)
    if via_loss_terms:
      # The public entry point: group_by_class, then the same dmue_terms.
      terms = train.loss_terms(v, x, labels, epoch=epoch, config=config)
    return terms, extra['new_stats']

  results = [run(variables, nhwc(images), float(e)) for e in epochs]
  return [r[0] for r in results], results[0][1]


# 'vmap' branches compile in half the time of 'loop'; train_test checks that both agree.
# Both kernel sets: XLA's (what a GPU or TPU runs) and the CPU kernels.
@pytest.mark.parametrize('num_classes,k,epochs,via_loss_terms,kernels', [
    (7, 2, (3, 10), False, 'cpu'),
    (8, 3, (0, 12), True, 'cpu'),
    (7, 2, (3, 10), False, 'xla'),
])
@pytest.mark.slow
def test_losses_and_running_stats_match_reference(num_classes, k, epochs, via_loss_terms,
                                                  kernels):
  config = make_config(num_classes, branch_mode='vmap', kernels=kernels)
  alpha = config.dmue.ramp_a
  assert epochs[0] < alpha <= epochs[1]   # one epoch before ramp_a, one at or after it
  net = reference_model(config, seed=num_classes)
  variables = convert_torch.convert_state_dict(net.state_dict(), config)
  images, labels = shuffled_batch(num_classes, k, seed=num_classes)

  # BatchNorm in training mode, dropout off: what dmue_jax computes with rng=None.
  net.eval_dropout()
  out = net(torch.from_numpy(images), torch.from_numpy(labels), 'sp_confidence')
  ours, new_stats = _our_terms_and_stats(config, variables, images, labels, epochs,
                                         via_loss_terms)
  for epoch, terms in zip(epochs, ours):
    d = config.dmue
    expected = ref.dmue_loss(out, torch.from_numpy(labels), num_classes=num_classes,
                             epoch=epoch, ramp_a=alpha, temperature=d.T, w=d.w, gamma=d.gamma)
    for name in ('total', 'ce', 'soft', 'sp', 'aux'):
      assert_close(terms[name], expected[name].item(), f'{name} at epoch {epoch}')

  # Running statistics of the trunk, every branch and the neck after the one forward pass.
  after = convert_torch.to_torch_state_dict(
      {'params': variables['params'], 'batch_stats': new_stats}, config)
  torch_after = state_numpy(net)
  keys = [k for k in torch_after if k.endswith(('running_mean', 'running_var'))]
  assert any(k.startswith('bottleneck.') for k in keys)
  assert any(k.startswith(f'base.layer4_{num_classes - 1}.') for k in keys)
  for key in keys:
    assert_close(after[key], torch_after[key], key)


@pytest.mark.slow
def test_inference_matches_reference_and_target_only_weights(tmp_path):
  config = make_config(3)
  net = reference_model(config, seed=3)
  variables = convert_torch.convert_state_dict(net.state_dict(), config)
  images, labels = shuffled_batch(3, 2, seed=3)
  net.eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(images), torch.from_numpy(labels), 'normal').numpy()

  path = save(ref.target_only_state_dict(net.state_dict(), 3), tmp_path / 'target.pth')
  inference = convert_torch.load_official_inference(path, config)
  # The target-only file holds exactly the snapshot's inference model ...
  jax.tree.map(np.testing.assert_array_equal, inference,
               dmue_model.inference_variables(variables))
  # ... which computes the reference's evaluation logits.
  assert_close(train.predict_logits(inference, nhwc(images), config), expected, 'logits')

  # The same file in the training layout: its layer4 in every branch, its head as the target
  # head, the rest freshly initialised.
  training = convert_torch.load_official_checkpoint(path, config)
  jax.tree.map(np.testing.assert_array_equal, dmue_model.inference_variables(training),
               inference)
  for leaf in jax.tree.leaves(training['params']['branches']):
    assert all(np.array_equal(leaf[b], leaf[-1]) for b in range(4))
  assert training['params']['aux_heads']['kernel'].shape == (3, 128, 2)


# ------------------------------------------------------------------ layouts (c) and (d)
@pytest.mark.parametrize('layout', ['msceleb', 'torchvision'])
def test_pretrained_backbone_goes_into_every_branch(tmp_path, layout):
  config = make_config(3)
  net = reference_model(config, seed=5)
  backbone = ref.single_backbone_state_dict(net.state_dict(), branch=1)
  if layout == 'msceleb':
    obj = ref.msceleb_checkpoint(backbone, 128)
  else:
    obj = ref.torchvision_state_dict(backbone, 128)
  path = save(obj, tmp_path / 'pretrained.pth')

  variables = convert_torch.load_official_checkpoint(path, config, seed=0)

  back = convert_torch.to_torch_state_dict(variables, config)
  source = state_numpy(net)
  for key, value in back.items():
    if key.startswith('base.layer4_'):
      # Every branch holds the pretrained layer4 (here: the snapshot's branch 1).
      src = 'base.layer4_1.' + key.split('.', 2)[2]
    elif key.startswith('base.'):
      src = key
    else:
      continue
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(value, source[src], err_msg=key)
  # Heads, neck and PUE come from the model's initialisation with the seed.
  p, s = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(p['neck']['bn']['scale'], 1.0)
  np.testing.assert_array_equal(s['neck']['bn']['var'], 1.0)
  assert 0.0005 < float(np.std(p['aux_heads']['kernel'])) < 0.002
  assert float(p['pue']['alpha']) == 0.25
  again = convert_torch.load_official_checkpoint(path, config, seed=0)
  other = convert_torch.load_official_checkpoint(path, config, seed=1)
  np.testing.assert_array_equal(again['params']['head']['kernel'], p['head']['kernel'])
  assert not np.array_equal(other['params']['head']['kernel'], p['head']['kernel'])


@pytest.mark.parametrize('dmue_enabled', [True, False])
@pytest.mark.slow
def test_init_from_starts_training_from_the_file(tmp_path, dmue_enabled):
  """config.model.init_from: the run's initial variables are the converted file's, cut to the
  target branch for the plain cross-entropy baseline."""
  config = make_config(3)
  net = reference_model(config, seed=7)
  backbone = ref.single_backbone_state_dict(net.state_dict(), branch=0)
  path = save(ref.torchvision_state_dict(backbone, 128), tmp_path / 'imagenet.pth')
  config.model.init_from = str(path)
  config.dmue.enabled = dmue_enabled
  variables = train.initial_variables(config, jax.random.key(0))
  loaded = convert_torch.load_official_checkpoint(str(path), config)
  if not dmue_enabled:
    loaded = dmue_model.inference_variables(loaded)
    assert 'aux_heads' not in variables['params'] and 'branch' in variables['params']
  same = jax.tree.map(np.array_equal, variables, loaded)
  assert all(jax.tree.leaves(same))
  conv1 = net.state_dict()['base.conv1.weight'].numpy()   # [O, I, kh, kw] -> [kh, kw, I, O]
  np.testing.assert_array_equal(variables['params']['trunk']['conv1']['kernel'],
                                conv1.transpose(2, 3, 1, 0))
  random = train.initial_variables(make_config(3), jax.random.key(0))
  assert not np.array_equal(random['params']['trunk']['conv1']['kernel'],
                            variables['params']['trunk']['conv1']['kernel'])


# ------------------------------------------------------------------ other backbones
@pytest.mark.parametrize('backbone', ['resnet18', 'resnet34', 'resnet50', 'resnet50_ibn'])
@pytest.mark.slow
def test_other_backbones_round_trip(backbone):
  config = make_config(3, backbone=backbone, width=8)
  net = reference_model(config, seed=2)
  variables = convert_torch.convert_state_dict(net.state_dict(), config)
  back = convert_torch.to_torch_state_dict(variables, config)
  for key, value in state_numpy(net).items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  if backbone == 'resnet50_ibn':
    # Bottlenecks, IBN and the standard stem also compute the same function.
    images, labels = shuffled_batch(3, 2, seed=2)
    net.eval()
    with torch.no_grad():
      expected = net(torch.from_numpy(images), torch.from_numpy(labels), 'normal').numpy()
    assert_close(train.predict_logits(variables, nhwc(images), config), expected, backbone)

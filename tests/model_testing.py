"""Small configs and batches for the model and train-step tests."""

import jax.numpy as jnp
import numpy as np

from configs import rafdb

SIZE = 32


def tiny_config(num_classes=7, **model):
  config = rafdb.get_config()
  config.model.num_classes = num_classes
  config.model.backbone = 'resnet10_narrow'  # one block per stage: compiles in half the time
  config.input.image_size = SIZE
  if model.get('kernels') == 'xla':
    # XLA's layers as a GPU or TPU runs them ('auto' pairs them with vmap branches there).
    model.setdefault('branch_mode', 'vmap')
  for k, v in model.items():
    config.model[k] = v
  return config


def grouped_batch(num_classes, k, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_classes, k, SIZE, SIZE, 3)).astype(np.float32)
  labels = np.repeat(np.arange(num_classes), k).reshape(num_classes, k).astype(np.int32)
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}

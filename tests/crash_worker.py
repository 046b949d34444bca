"""The e2e test's tiny run in a process that SIGKILLs itself right after step N is logged: a real
crash at a deterministic point, for the exact-resume test. The training loop knows nothing of
it; the kill is a hook the test passes in.

  python tests/crash_worker.py WORKDIR TFDS_CACHE N
"""

import os
import signal
import sys

from dmue_jax import main

import e2e_test  # pylint: disable=wrong-import-order (this directory, for the test's config)


def kill_after(step: int):
  def hook(done: int) -> None:
    if done == step:
      os.kill(os.getpid(), signal.SIGKILL)
  return hook


if __name__ == '__main__':
  workdir, cache, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
  main.train_and_analyze(e2e_test.tiny_config(cache), workdir, hooks=[kill_after(step)])

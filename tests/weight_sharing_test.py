"""Tests for weight sharing: 1-D k-means by hand, codebooks, fine-tuning, storage."""

import os
import tempfile

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import evoprune as ep
from evoprune import storage
from evoprune import weight_sharing as ws


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
    return nn.Dense(3)(x)


class WeightSharingTest(absltest.TestCase):

  def test_kmeans_by_hand(self):
    # Linear init [1, 5, 9]; midpoints 3 and 7 split {1, 1.2}, {5, 5.4}, {9}; the means
    # 1.1, 5.2, 9 are a fixed point. The invalid 0.0 takes no part in the means.
    values = jnp.array([1.0, 1.2, 5.0, 5.4, 9.0, 0.0])
    valid = jnp.array([True, True, True, True, True, False])
    centroids, labels = ws.kmeans_1d(values, valid, 3, iterations=5)
    np.testing.assert_allclose(centroids, [1.1, 5.2, 9.0], rtol=1e-6)
    np.testing.assert_array_equal(labels[:5], [0, 0, 1, 1, 2])

  def test_empty_cluster_keeps_its_centroid(self):
    # Init [0, 5, 10]: nothing lies near 5, so that centroid stays.
    centroids, _ = ws.kmeans_1d(jnp.array([0.0, 0.1, 10.0]), jnp.ones(3, bool), 3, 3)
    np.testing.assert_allclose(centroids, [0.05, 5.0, 10.0], rtol=1e-6)

  def test_share_keeps_zeros_and_limits_distinct_values(self):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(20, 10)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.6] = 0.0
    params = {"Dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.ones(10)}}
    shared = ws.share(params, bits=3)
    self.assertEqual(set(shared["Dense_0"]), {"kernel", "kernel_codebook", "bias"})
    indices = np.asarray(shared["Dense_0"]["kernel"])
    codebook = np.asarray(shared["Dense_0"]["kernel_codebook"])
    self.assertEqual(indices.dtype, np.uint8)
    self.assertEqual(codebook.shape, (8,))
    self.assertEqual(codebook[0], 0.0)
    np.testing.assert_array_equal(indices == 0, kernel == 0)  # sparsity survives exactly
    back = np.asarray(ws.reconstruct(shared)["Dense_0"]["kernel"])
    self.assertLessEqual(len(np.unique(back)), 8)
    nonzero = kernel != 0
    # Each nonzero weight takes its nearest centroid, and Lloyd's steps beat the linear init.
    nearest = codebook[1:][np.abs(kernel[nonzero][:, None] - codebook[1:]).argmin(1)]
    np.testing.assert_array_equal(back[nonzero], nearest)
    grid = np.linspace(kernel[nonzero].min(), kernel[nonzero].max(), 7)
    linear = grid[np.abs(kernel[nonzero][:, None] - grid).argmin(1)]
    self.assertLess(np.mean((back[nonzero] - kernel[nonzero]) ** 2),
                    np.mean((linear - kernel[nonzero]) ** 2))
    np.testing.assert_array_equal(ws.reconstruct(shared)["Dense_0"]["bias"], np.ones(10))

  def test_finetune_lowers_loss_and_keeps_structure(self):
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    params = ep.masks.apply(params, jax.tree.map(
        lambda p: (jnp.abs(p) > 0.2) if p.ndim >= 2 else None, params))
    shared = ws.share(params, bits=2)
    tuned, losses = ws.finetune(model, shared, np.asarray(x), np.asarray(y), epochs=15,
                                batch_size=16, learning_rate=0.05)
    self.assertLess(losses[-1], losses[0])
    for layer in ("Dense_0", "Dense_1"):
      np.testing.assert_array_equal(tuned[layer]["kernel"], shared[layer]["kernel"])
      self.assertEqual(float(tuned[layer]["kernel_codebook"][0]), 0.0)
      self.assertFalse(np.array_equal(tuned[layer]["kernel_codebook"],
                                      shared[layer]["kernel_codebook"]))
      np.testing.assert_array_equal(tuned[layer]["bias"], shared[layer]["bias"])

  def test_storage_packs_indices_and_counts_codebooks(self):
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(40, 50)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.5] = 0.0
    shared = ws.share({"d": {"kernel": jnp.asarray(kernel)}}, bits=4)
    path = os.path.join(tempfile.mkdtemp(), "shared.npz")
    storage.save(path, shared, sparse="bitmask")
    leaves = {leaf["path"]: leaf for leaf in storage.inspect(path)}
    self.assertEqual(leaves["d/kernel"]["values"]["bits"], 4)  # 15 nonzero indices: 4 bits
    nonzero = int((kernel != 0).sum())
    self.assertEqual(leaves["d/kernel"]["parts"]["values"].nbytes, (nonzero * 4 + 7) // 8)
    self.assertEqual(leaves["d/kernel_codebook"]["parts"]["values"].nbytes, 16 * 4)
    loaded, _ = storage.load(path)
    np.testing.assert_array_equal(ws.reconstruct(loaded)["d"]["kernel"],
                                  ws.reconstruct(shared)["d"]["kernel"])

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "bits"):
      ws.share({"d": {"kernel": jnp.ones((2, 2))}}, bits=9)
    with self.assertRaisesRegex(ValueError, "no nonzero"):
      ws.share({"d": {"kernel": jnp.zeros((2, 2))}}, bits=2)


if __name__ == "__main__":
  absltest.main()

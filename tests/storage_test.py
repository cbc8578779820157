"""Tests for one-file storage: encodings by hand, exact round trips, sizes, errors."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import numpy as np

import evoprune as ep
from evoprune import storage


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(8, (3, 3), padding="VALID")(x))
    return nn.Dense(64)(x.reshape((x.shape[0], -1)))


def _parts(path, index=0):
  return storage.inspect(path)[index]["parts"]


class StorageTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()

  def path(self, name="model.npz"):
    return os.path.join(self.dir, name)

  def test_bitmask_by_hand(self):
    storage.save(self.path(), {"w": np.array([[0, 1.5], [0, 0]], np.float32)},
                 sparse="bitmask")
    parts = _parts(self.path())
    np.testing.assert_array_equal(parts["bitmask"], [0b01000000])
    np.testing.assert_array_equal(parts["values"], [1.5])

  def test_csr_by_hand(self):
    storage.save(self.path(), {"w": np.array([[0, 2], [3, 0], [0, 0]], np.float32)},
                 sparse="csr")
    parts = _parts(self.path())
    np.testing.assert_array_equal(parts["indptr"], [0, 1, 2, 2])
    np.testing.assert_array_equal(parts["indices"], [1, 0])
    np.testing.assert_array_equal(parts["values"], [2, 3])
    self.assertEqual(parts["indices"].dtype, np.uint8)  # 2 columns fit a byte

  def test_four_bit_codes_take_half_a_byte(self):
    codes = np.tile(np.arange(-7, 8, dtype=np.int8), 10).reshape(15, 10)  # 150 codes
    nbytes = storage.save(self.path(), {"k": codes})
    leaf = storage.inspect(self.path())[0]
    self.assertEqual(leaf["parts"]["values"].nbytes, 75)
    self.assertEqual(leaf["values"]["bits"], 4)
    self.assertLess(nbytes, storage.size({"k": codes.astype(np.int16)}) - 75)
    loaded, _ = storage.load(self.path())
    np.testing.assert_array_equal(loaded["k"], codes)
    self.assertEqual(loaded["k"].dtype, np.int8)

  @parameterized.named_parameters(("none", "none"), ("bitmask", "bitmask"), ("csr", "csr"),
                                  ("auto", "auto"))
  def test_round_trip_is_exact(self, sparse):
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(6, 5, 3)).astype(np.float32)
    weights[rng.random(weights.shape) < 0.7] = 0
    tree = {
        "a": {"kernel": weights, "bias": rng.normal(size=3).astype(np.float32)},
        "b": {"codes": rng.integers(-127, 128, size=(4, 4)).astype(np.int8),
              "index": rng.integers(0, 16, size=(5, 2)).astype(np.uint8),
              "flag": np.array([True, False]), "count": np.array(7, np.int32)},
    }
    nbytes = storage.save(self.path(), tree, sparse=sparse, metadata={"note": [1, "x"]})
    self.assertEqual(nbytes, os.path.getsize(self.path()))
    self.assertEqual(nbytes, storage.size(tree, sparse=sparse, metadata={"note": [1, "x"]}))
    loaded, metadata = storage.load(self.path())
    self.assertEqual(metadata, {"note": [1, "x"]})
    self.assertEqual(jax.tree.structure(loaded), jax.tree.structure(tree))
    for original, back in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded)):
      self.assertEqual(back.dtype, original.dtype)
      np.testing.assert_array_equal(back, original)

  def test_auto_picks_the_smallest(self):
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(64, 64)).astype(np.float32) + 10.0  # no zeros
    half = dense * (rng.random(dense.shape) < 0.1)  # 90% zeros: bitmask
    rare = dense * (rng.random(dense.shape) < 0.01)  # 99% zeros: CSR
    storage.save(self.path(), {"a": dense, "b": half, "c": rare}, sparse="auto")
    self.assertEqual([leaf["encoding"] for leaf in storage.inspect(self.path())],
                     ["dense", "bitmask", "csr"])
    for name in ("none", "bitmask", "csr"):
      self.assertLessEqual(storage.size({"a": dense, "b": half, "c": rare}, sparse="auto"),
                           storage.size({"a": dense, "b": half, "c": rare}, sparse=name))

  def test_sparse_int8_model_predicts_identically_after_loading(self):
    model = _Tiny()
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
    params = ep.models.init(model, jax.random.key(1), x)["params"]
    masks = ep.masks.topk(ep.importance.magnitude(params), 0.8)
    masks = jax.tree.map(lambda m, p: m if p.ndim >= 2 else None, masks, params)
    qmodel, qparams = ep.quantization.ptq(model, ep.masks.apply(params, masks), x)
    before = qmodel.apply({"params": qparams}, x)
    dense_size = storage.save(self.path("fp32.npz"), params)
    size = storage.save(self.path(), qparams, sparse="auto")
    self.assertLess(size, dense_size / 4)
    loaded, _ = storage.load(self.path())
    np.testing.assert_array_equal(qmodel.apply({"params": loaded}, x), before)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "sparse"):
      storage.save(self.path(), {"w": np.zeros(2)}, sparse="coo")
    with self.assertRaisesRegex(ValueError, "without '/'"):
      storage.save(self.path(), {"a/b": np.zeros(2)})
    with self.assertRaisesRegex(ValueError, "dtype"):
      storage.save(self.path(), {"w": np.array(["text"])})
    with self.assertRaisesRegex(ValueError, "JSON"):
      storage.save(self.path(), {"w": np.zeros(2)}, metadata={"f": object()})
    np.savez(self.path("plain.npz"), w=np.zeros(2))
    with self.assertRaisesRegex(ValueError, "no evoprune metadata"):
      storage.load(self.path("plain.npz"))

  def test_newer_version_is_refused(self):
    storage.save(self.path(), {"w": np.zeros(2, np.float32)})
    with np.load(self.path(), allow_pickle=False) as archive:
      members = {name: archive[name] for name in archive.files}
    self.assertEqual(set(members), {"data", "metadata"})  # plain uint8 arrays only
    header = json.loads(members["metadata"].tobytes())
    header["version"] = storage.VERSION + 1
    members["metadata"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(self.path("newer.npz"), **members)
    with self.assertRaisesRegex(ValueError, "upgrade"):
      storage.load(self.path("newer.npz"))


if __name__ == "__main__":
  absltest.main()

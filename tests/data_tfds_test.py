"""Tests for `tfds:` datasets: a tiny real TFDS builder prepared and read without TensorFlow.

The builder yields PIL images: TFDS 4.9 encodes *numpy* image arrays with
`tf.image.encode_png` (`image_feature._ENCODE_FN`), which needs TensorFlow, whereas PIL images
are saved to PNG with PIL. Everything else (array_record writing, shuffling, `data_source`
reading and PNG decoding) runs without TensorFlow.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

import evoprune as ep

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 40, 12, 3
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_image(index: int) -> np.ndarray:
  """A 6x6 RGB image that encodes its own index (pixel [0, 0, 0]) for checking."""
  image = np.full((6, 6, 3), (index * 7) % 256, np.uint8)
  image[..., 1] = 255 - image[..., 1]
  image[0, 0, 0] = index
  image[5, 5, 2] = 200
  return image


class EvopruneTinyShapes(tfds.core.GeneratorBasedBuilder):
  """A 52-image, 3-class dataset, generated in memory."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(6, 6, 3)),
            "kind": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("picture", "kind"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(NUM_TRAIN, NUM_TRAIN + NUM_TEST)}

  def _generate_examples(self, begin: int, end: int):
    for i in range(begin, end):
      yield i, {"picture": Image.fromarray(make_image(i)), "kind": i % NUM_CLASSES}


def recovered_indices(ds: ep.data.Dataset, split: ep.data.Split) -> np.ndarray:
  """Undoes the normalisation and reads back each image's index pixel."""
  pixels = (split.x[:, 0, 0, 0] * ds.std[0] + ds.mean[0]) * 255
  return np.round(pixels).astype(int)


class TfdsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    EvopruneTinyShapes(data_dir=cls.data_dir, file_format="array_record").download_and_prepare()
    cls.ds = ep.data.load("tfds:evoprune_tiny_shapes", data_dir=cls.data_dir, val_size=10,
                          seed=1)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir)
    super().tearDownClass()

  def test_prepared_as_array_record_without_tensorflow(self):
    files = os.listdir(pathlib.Path(self.data_dir) / "evoprune_tiny_shapes" / "1.0.0")
    self.assertTrue(any(".array_record-" in f for f in files), files)
    self.assertNotIn("tensorflow", sys.modules)

  def test_maps_to_dataset(self):
    ds = self.ds
    self.assertEqual(ds.name, "tfds:evoprune_tiny_shapes")
    self.assertEqual((ds.num_classes, ds.input_shape), (3, (6, 6, 3)))
    self.assertEqual(ds.train.x.shape, (30, 6, 6, 3))
    self.assertEqual(ds.val.x.shape, (10, 6, 6, 3))
    self.assertEqual(ds.test.x.shape, (12, 6, 6, 3))
    self.assertEqual((ds.train.x.dtype, ds.train.y.dtype), (np.float32, np.int32))
    # Indices 0..39 have classes 0, 1, 2, 0, ...: 14, 13, 13; the test split 4 each.
    np.testing.assert_array_equal(np.bincount(ds.train.y, minlength=3) +
                                  np.bincount(ds.val.y, minlength=3), [14, 13, 13])
    np.testing.assert_array_equal(np.bincount(ds.test.y), [4, 4, 4])

  def test_pixels_and_labels_survive(self):
    ds = self.ds
    train, val = recovered_indices(ds, ds.train), recovered_indices(ds, ds.val)
    self.assertEqual(sorted([*train, *val]), list(range(NUM_TRAIN)))  # val carved from train
    np.testing.assert_array_equal(recovered_indices(ds, ds.test) % 3, ds.test.y)
    np.testing.assert_array_equal(train % 3, ds.train.y)
    first = int(np.argmin(train))  # image 0: rebuild every pixel, not just the index
    restored = (ds.train.x[first] * np.array(ds.std) + np.array(ds.mean)) * 255
    np.testing.assert_allclose(restored, make_image(0), atol=1e-3)
    mean = ds.train.x.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean, [0.0, 0.0, 0.0], atol=1e-5)

  def test_val_follows_seed(self):
    other = ep.data.load("tfds:evoprune_tiny_shapes", data_dir=self.data_dir, val_size=10,
                         seed=2)
    self.assertNotEqual(sorted(recovered_indices(other, other.val)),
                        sorted(recovered_indices(self.ds, self.ds.val)))

  def test_fresh_process_reads_without_the_builder_class(self):
    # A user prepares once and loads later: the class is then unknown, and TFDS reads the
    # prepared metadata instead. TensorFlow must stay unimported there too.
    script = textwrap.dedent(f"""
        import sys
        import evoprune as ep
        ds = ep.data.load("tfds:evoprune_tiny_shapes", data_dir={self.data_dir!r}, val_size=0)
        print(ds.train.x.shape, ds.test.x.shape, "tensorflow" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, check=False, timeout=120)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    self.assertEqual(result.stdout.strip().splitlines()[-1], "(40, 6, 6, 3) (12, 6, 6, 3) False")

  def test_not_prepared_says_how_to_prepare(self):
    empty = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, empty)
    with self.assertRaises(ep.data.TfdsNotPreparedError) as cm:
      ep.data.load("tfds:evoprune_tiny_shapes", data_dir=empty)
    message = str(cm.exception)
    self.assertIsInstance(cm.exception, FileNotFoundError)
    self.assertIn(f"tfds build evoprune_tiny_shapes --data_dir={empty}", message)
    self.assertIn("download_and_prepare()", message)
    self.assertEqual(os.listdir(empty), [])  # nothing was downloaded or generated

  def test_unknown_tfds_name(self):
    with self.assertRaisesRegex(ValueError, "tfds:no_such_dataset_xyz"):
      ep.data.load("tfds:no_such_dataset_xyz", data_dir=self.data_dir)
    with self.assertRaisesRegex(ValueError, "needs a dataset name"):
      ep.data.load("tfds:")


if __name__ == "__main__":
  absltest.main()

"""TFDS datasets by name (`tfds:NAME`), read from prepared data without TensorFlow.

`tfds.data_source` gives random access to data prepared in the `array_record` (or
`parquet`) file format and decodes examples with numpy/PIL, so TensorFlow is never imported.
It cannot *prepare* data, and TFDS's own builders mostly need TensorFlow to do so (e.g. to
PNG-encode numpy images), so when the data is missing we say how to prepare it instead of
letting `data_source` try to download (its default).

An image classification dataset maps to the same `Dataset` as the raw loaders: the image
feature (the first of the builder's `supervised_keys`, else "image") and the `ClassLabel`
feature (second supervised key, else "label"); validation is carved from "train", the test
split is "test" (or "validation" when there is no test split).
"""

import os

import numpy as np

from evoprune.data import pipeline


class TfdsNotPreparedError(FileNotFoundError):
  """The TFDS dataset has not been prepared in `data_dir`."""


_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
_READ_CHUNK = 1024  # examples per data-source read: amortises per-call overhead


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("'tfds:' datasets need tensorflow-datasets: pip install "
                      "tensorflow-datasets (TensorFlow itself is not needed)") from e
  return tfds


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  py_dir = f", data_dir={data_dir!r}" if data_dir else ""
  return (f"Prepare it once with `tfds build {name}{where} --file_format=array_record` or, in "
          f"Python, `tfds.builder({name!r}{py_dir}, file_format='array_record')"
          f".download_and_prepare()`. Most TFDS builders need TensorFlow to prepare data "
          f"(pip install tensorflow); reading it back here does not.")


def _feature_keys(info) -> tuple[str, str]:
  keys = info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return "image", "label"


def _read_split(source, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """All examples of a data source as (images [N, H, W, C], labels [N])."""
  images, labels = [], []
  for begin in range(0, len(source), _READ_CHUNK):
    for example in source.__getitems__(list(range(begin, min(begin + _READ_CHUNK,
                                                             len(source))))):
      images.append(example[image_key])
      labels.append(example[label_key])
  x = np.stack(images)
  return (x[..., None] if x.ndim == 3 else x), np.asarray(labels)


def load_tfds(name: str, *, data_dir: str | os.PathLike | None, val_size: int | float,
              seed: int) -> pipeline.Dataset:
  """Loads a prepared TFDS image classification dataset.

  Args:
    name: TFDS name, optionally with config/version ("mnist", "cifar10:3.0.2").
    data_dir: the TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
    val_size: validation examples carved from "train" (count or fraction).
    seed: fixes the validation split.

  Returns:
    The Dataset (named "tfds:NAME"), x float32 NHWC normalised, y int32.

  Raises:
    ValueError: unknown dataset, or not an image classification dataset.
    TfdsNotPreparedError: the data is not prepared in `data_dir` (says how to prepare it).
  """
  tfds = _import_tfds()
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(f"tfds:{name} is neither a registered TFDS dataset nor prepared in "
                     f"data_dir={data_dir!r}; check the name (tfds.list_builders())") from e
  if not builder.is_prepared():
    raise TfdsNotPreparedError(f"tfds:{name} is not prepared in {builder.data_dir}. "
                               f"{_prepare_hint(name, data_dir)}")
  info = builder.info
  file_format = getattr(info.file_format, "value", info.file_format)
  if file_format not in _RANDOM_ACCESS_FORMATS:
    raise TfdsNotPreparedError(
        f"tfds:{name} is prepared in {builder.data_dir} as {file_format}, which "
        f"tfds.data_source cannot read without TensorFlow (it needs "
        f"{' or '.join(_RANDOM_ACCESS_FORMATS)}). Prepare it into another data_dir: "
        f"{_prepare_hint(name, data_dir)}")
  image_key, label_key = _feature_keys(info)
  features = info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f"tfds:{name} has features {sorted(features.keys())}; an image "
                     f"classification dataset needs {image_key!r} and {label_key!r}")
  shape = tuple(features[image_key].shape)
  num_classes = getattr(features[label_key], "num_classes", None)
  if len(shape) not in (2, 3) or None in shape or num_classes is None:
    raise ValueError(f"tfds:{name}: feature {image_key!r} has shape {shape} and "
                     f"{label_key!r} is {type(features[label_key]).__name__}; evoprune needs "
                     f"fixed-size images [H, W(, C)] and a ClassLabel")
  splits = set(info.splits.keys())
  test_split = "test" if "test" in splits else "validation"
  if "train" not in splits or test_split not in splits:
    raise ValueError(f"tfds:{name} has splits {sorted(splits)}; evoprune needs 'train' and "
                     f"'test' (or 'validation')")
  read = {}
  for split in ("train", test_split):
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    read[split] = _read_split(source, image_key, label_key)
  dtype = np.dtype(features[image_key].np_dtype)
  scale = 1.0 / np.iinfo(dtype).max if dtype.kind in "ui" else 1.0
  return pipeline.image_dataset(f"tfds:{name}", read["train"], read[test_split],
                                num_classes=int(num_classes), val_size=val_size, seed=seed,
                                scale=scale)

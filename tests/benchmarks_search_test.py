"""Smoke test of benchmarks/search.py: tiny sizes, the JSON shape, the automatic choice."""

import json
import pathlib
import tempfile

from absl.testing import absltest

from benchmarks import search as bench


class SearchBenchmarkTest(absltest.TestCase):

  def test_smoke_run_writes_the_documented_json(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "search.json"
      results = bench.main(["--smoke", "--out", str(out)])
      self.assertEqual(json.loads(out.read_text()), results)
    self.assertEqual(set(results), set(bench.SMOKE))
    for model, rows in results.items():
      self.assertEqual(list(rows), ["P4"], msg=model)
      row = rows["P4"]
      self.assertIn(row["auto"], row)
      for name in ("vmap", "map:1", "map:8", "loop", "loop:shared"):
        self.assertGreater(row[name], 0.0, msg=f"{model} {name}")


if __name__ == "__main__":
  absltest.main()

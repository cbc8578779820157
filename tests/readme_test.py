"""The README's commands work as written: runnable blocks run, CI blocks are what CI runs."""

import os
import pathlib
import re
import subprocess
import sys

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(tag: str) -> list[str]:
  return re.findall(rf"^```{re.escape(tag)}\n(.*?)^```$", README, flags=re.S | re.M)


class ReadmeTest(absltest.TestCase):

  def test_runnable_python_blocks(self):
    code = blocks("python runnable")
    self.assertNotEmpty(code)
    for block in code:
      proc = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
      self.assertEqual(proc.returncode, 0, f"README block failed:\n{block}\n{proc.stderr}")

  def test_ci_runs_the_readme_commands(self):
    commands = [line for b in blocks("bash ci") for line in b.splitlines() if line.strip()]
    self.assertLen(commands, 2)
    self.assertIn("experiments.main --config=experiments/configs/default.py", commands[0])
    self.assertIn("pytest", commands[1])
    self.assertIn("bash ci", (REPO / ".ci" / "run").read_text())

  def test_configs_in_readme_exist(self):
    for name in re.findall(r"experiments/configs/([a-z0-9_]+)\.py", README):
      self.assertTrue((REPO / "experiments" / "configs" / f"{name}.py").exists(), name)


if __name__ == "__main__":
  absltest.main()

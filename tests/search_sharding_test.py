"""The population axis sharded over 4 forced CPU devices gives the unsharded fitness.

XLA reads `--xla_force_host_platform_device_count` once, when jax initialises its backend,
so the check runs in a fresh subprocess with the flag set before jax is imported.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import evoprune as ep

    S = ep.search
    assert len(jax.devices()) == 4, jax.devices()

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(10)(x)))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype(np.float32)
    model = Net()
    params = model.init(jax.random.key(0), x[:1])["params"]
    y = np.asarray(jnp.argmax(model.apply({"params": params}, x), -1))
    scores = jax.tree.map(lambda m, p: None if m is None else jnp.abs(p),
                          ep.masks.init(params), params, is_leaf=lambda v: v is None)
    fitness_fn, context = S.make_fitness(lambda p, xb: model.apply({"params": p}, xb),
                                         params, scores, x, y, metric="loss")
    budget = S.sparsity_budget(0.7, scores)
    # 6 candidates on 4 devices: the population is padded to 8 and the padding dropped.
    population = jax.vmap(budget.project)(jax.random.normal(jax.random.key(1), (6, 2)))
    for strategy in ("vmap", "map"):
      single = S.make_evaluator(fitness_fn, context, 6, 2, strategy=strategy)
      sharded = S.make_evaluator(fitness_fn, context, 6, 2, strategy=strategy,
                                 devices=jax.devices())
      assert sharded.num_devices == 4
      a = np.asarray(jax.jit(single.evaluate)(population, context))
      b = np.asarray(jax.jit(sharded.evaluate)(population, context))
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # A whole search: the same history on 4 devices as on one.
    runs = [S.evolve(jax.random.key(2), S.ga(8, budget), fitness_fn, context, generations=3,
                     evaluation="vmap", devices=d).history for d in (None, jax.devices())]
    np.testing.assert_allclose(runs[0]["best_fitness"], runs[1]["best_fitness"], rtol=1e-6)
    np.testing.assert_allclose(runs[0]["best_vector"], runs[1]["best_vector"], atol=1e-6)
    print("SHARDED_OK")
""")


class ShardingTest(absltest.TestCase):

  def test_sharded_population_matches_one_device(self):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, msg=proc.stdout + proc.stderr)
    self.assertIn("SHARDED_OK", proc.stdout)


if __name__ == "__main__":
  absltest.main()

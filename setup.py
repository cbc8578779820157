"""evoprune: evolutionary pruning and model compression in JAX/Flax."""

import setuptools

setuptools.setup(
    name="evoprune",
    version="0.1.0",
    description=(
        "Evolutionary pruning and model compression for JAX/Flax: importance that "
        "evolves during training, searched per-layer sparsity, real compression."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["evoprune", "evoprune.*", "experiments", "experiments.*", "benchmarks"]),
    # The C++ kernels' source, compiled on first use (evoprune.ops.direct).
    package_data={"evoprune.ops": ["direct.cc"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "chex>=0.1.88",
        "absl-py",
        "numpy",
        "ml_collections",
        "orbax-checkpoint",
        # Reads prepared TFDS data without TensorFlow; it imports importlib_resources
        # without declaring it.
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",
        "scikit-learn",  # only for the embedded `digits` dataset
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "nbformat", "nbclient", "ipykernel"],
        "notebooks": ["jupyter", "nbformat", "nbclient", "ipykernel"],
    },
)

"""Install the PerturbDiff library, its data converters and its Triton kernels.

The kernels/ folder installs as ``perturbdiff_kernels`` (a PyPI package named ``kernels`` exists).
Install torch first and pinned (see README): an unpinned torch pulled in by deepspeed drags in
several GB of CUDA packages on a CPU machine.
"""

from setuptools import setup

setup(
    name="perturbdiff",
    version="0.1.0",
    description="Set-level diffusion over single-cell populations (PerturbDiff), at scale",
    python_requires=">=3.10",
    packages=["perturbdiff", "perturbdiff.data", "perturbdiff.ops", "perturbdiff.models", "perturbdiff.diffusion",
              "perturbdiff.train", "perturbdiff.eval", "data_sharding", "perturbdiff_kernels"],
    package_dir={"perturbdiff_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.26,<2.4",  # triton 3.6's CPU interpreter breaks with numpy 2.4
        "zarr>=3.1",
        "pyarrow>=15",
        "anndata>=0.10",
        "h5py>=3.9",
        "pandas>=2.0",
        "scipy>=1.11",
        "omegaconf>=2.3",
        "webdataset>=0.2.90",
        "psutil>=5.9",
        "tensorboard>=2.15",
        "safetensors>=0.4",
    ],
    extras_require={
        "gpu": ["triton==3.6.0", "deepspeed>=0.15"],
        "dev": ["pytest>=8", "triton==3.6.0", "deepspeed>=0.15", "ruff==0.17.6"],  # ruff pinned: ruff.toml's rules
        # cell-eval 0.6.6 (the paper's pin) for the metric parity test; it needs these exact pdex and
        # polars versions (newer pdex removed a function it imports)
        "eval": ["cell-eval==0.6.6", "pdex==0.1.26", "polars==1.35.2", "threadpoolctl>=3"],
    },
    entry_points={"console_scripts": ["perturbdiff=perturbdiff.cli:main"]},
)

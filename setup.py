"""vse_fast: VSE-infinity (GPO pooling + VSE++ loss) with fused Triton kernels.

`kernels/` (the Triton kernels) installs as `vse_fast.kernels`, never as a top-level
`kernels` package: that name belongs to the Hugging Face `kernels` distribution.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Triton has wheels for Linux only; elsewhere (and without it) the CUDA tensors take the torch paths.
TRITON = "triton>=3.0; platform_system == 'Linux'"

setup(
    name="vse_fast",
    version="0.1.0",
    description="Fast, exact VSE-infinity: GPO and hardest-negative contrastive loss in Triton",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # every package listed (tests/test_packaging.py compares this list with the source tree)
    packages=["vse_fast", "vse_fast.ops", "vse_fast.modules", "vse_fast.kernels"],
    package_dir={"vse_fast": "vse_fast", "vse_fast.kernels": "kernels"},
    # torch 2.5: torch.serialization.safe_globals (checkpoint loading without unpickling)
    install_requires=["torch>=2.5", "numpy", "transformers>=4.30"],
    extras_require={
        "triton": [TRITON],
        "test": ["pytest", "pytest-benchmark", TRITON],
    },
)

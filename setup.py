"""vse_fast: VSE-infinity (GPO pooling + VSE++ loss) with fused Triton kernels.

`kernels/` (the Triton kernels) installs as `vse_fast.kernels`, never as a top-level
`kernels` package: that name belongs to the Hugging Face `kernels` distribution.
"""
from setuptools import setup

setup(
    name="vse_fast",
    version="0.1.0",
    description="Fast, exact VSE-infinity: GPO and hardest-negative contrastive loss in Triton",
    python_requires=">=3.9",
    packages=["vse_fast", "vse_fast.ops", "vse_fast.modules", "vse_fast.kernels"],
    package_dir={"vse_fast": "vse_fast", "vse_fast.kernels": "kernels"},
    install_requires=["torch>=2.1", "numpy", "transformers>=4.30"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0"],
    },
)

"""vse_fast: VSE-infinity (GPO pooling + VSE++ loss) with fused Triton kernels.

`kernels/` (the Triton kernels) installs as `vse_fast.kernels`, never as a top-level
`kernels` package: that name belongs to the Hugging Face `kernels` distribution.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Triton has wheels for Linux only; elsewhere (and without it) the CUDA tensors take the torch paths.
# 3.4: the oldest release the kernels are checked on (vse_fast.kernels.MIN_TRITON; an older one found at
# run time is also refused, with the torch paths for "auto").
TRITON = "triton>=3.4; platform_system == 'Linux'"

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
    # The oldest releases the test suite passed on (README "Set-up"). torch 2.5's safe_globals refuses
    # (function, name) pairs, so no checkpoint loaded; 2.8 is the torch of Triton 3.4. transformers
    # 4.41-4.44 refuse BERT's 3-D mask under SDPA (vse_fast.model._bert_attention_mask).
    install_requires=["torch>=2.8", "numpy", "transformers>=4.45"],
    extras_require={
        "triton": [TRITON],
        "test": ["pytest", "pytest-benchmark", TRITON],
    },
)

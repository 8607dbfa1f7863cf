"""vse_fast: VSE-infinity with fused Triton kernels.

Drop-in replacements for the published VSE-infinity modules::

    from vse_fast import GPO, ContrastiveLoss
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPO": "vse_fast.modules.gpo",
    "MaxPool": "vse_fast.modules.gpo",
    "AvgPool": "vse_fast.modules.gpo",
    "KMaxPool": "vse_fast.modules.gpo",
    "ContrastiveLoss": "vse_fast.modules.loss",
    "gpo_pool": "vse_fast.ops.gpo_pool",
    "contrastive_loss": "vse_fast.ops.contrastive",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy: `import vse_fast` stays cheap and does not import triton or transformers.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vse_fast' has no attribute {name!r}")

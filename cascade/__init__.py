"""cascade: cascaded fine-tuning of a Flare7K Uformer (Song & Bae), as plain PyTorch.

Nothing in this package imports Ray; `sweep.py` is the only Ray-aware layer.
"""

__version__ = "0.1.0"

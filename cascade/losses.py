"""Losses of the cascaded fine-tuning paper (Song & Bae). Filled in by the losses issue."""

# Default triplet margin alpha; the losses issue justifies and may retune it. Other modules read it
# from here so there is one source of truth.
DEFAULT_MARGIN = 0.1
DEFAULT_DELTA = 1e-3

"""Versions of what flaresweep generates, readable without torch (identities, `status`).

The procedural default's pixels and base network depend on these besides the config fields; a
trial's training identity (orchestrator.identity) includes them, so bumping one retrains what it
changes. The modules that own them (cascade.data.synthetic, cascade.pretrain, cascade.data.testset,
cascade.demo_encoder) keep their own constants; tests/test_versions.py keeps the two equal.
"""

from __future__ import annotations

PROCEDURAL = {
    "generator": "cascade.data.synthetic/3",  # synthetic.GENERATOR: the procedural pixels
    "base_version": 3,  # pretrain.BASE_VERSION: how the procedural base is trained
    "base_seed": 1000,  # pretrain.BASE_SEED: the base's data stream
    "test_seed": 2000,  # testset.TEST_SEED: the procedural test set
}
DEMO_ENCODER = {
    "name": "flare_seg",  # demo_encoder.NAME: the embedded demo's trained encoder f
    "version": 1,  # demo_encoder.VERSION: its network and training (its weights are built, not read)
}

"""cascade.versions mirrors the version constants of the modules that own them (torch-free)."""

from __future__ import annotations

from cascade import demo_encoder, pretrain
from cascade.data import synthetic, testset
from cascade.versions import DEMO_ENCODER, PROCEDURAL


def test_procedural_versions_equal_the_owning_modules():
    assert PROCEDURAL == {"generator": synthetic.GENERATOR, "base_version": pretrain.BASE_VERSION,
                          "base_seed": pretrain.BASE_SEED, "test_seed": testset.TEST_SEED}
    assert DEMO_ENCODER == {"name": demo_encoder.NAME, "version": demo_encoder.VERSION}

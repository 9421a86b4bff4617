"""cascade.versions mirrors the version constants of the modules that own them (torch-free)."""

from __future__ import annotations

from cascade import pretrain
from cascade.data import synthetic, testset
from cascade.versions import PROCEDURAL


def test_procedural_versions_equal_the_owning_modules():
    assert PROCEDURAL == {"generator": synthetic.GENERATOR, "base_version": pretrain.BASE_VERSION,
                          "base_seed": pretrain.BASE_SEED, "test_seed": testset.TEST_SEED}

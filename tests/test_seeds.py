"""cascade.seeds: the sha256-derived seeds keep the values they had before the module existed
(the data and the dropout masks of every trial depend on them)."""

from __future__ import annotations

import hashlib

import pytest

from cascade.data.synthetic import sample_seed
from cascade.seeds import derive_seed
from cascade.train import step_seed

# Computed with the code before cascade.seeds existed:
#   synthetic.sample_seed(seed, index, epoch): sha256(f"flaresweep:{seed}:{epoch}:{index}"), & (2**63 - 1)
#   train.step_seed(seed, step, rank):  sha256(f"flaresweep-step:{seed}:{step}:{rank}"), >> 1
SAMPLE_SEEDS = {(0, 0, 0): 3980738455493932726, (1000, 5, 2): 85137306696642104,
                (2, -1, 0): 2973866741197796297, (7, 3, 1): 9790322197353963}
STEP_SEEDS = {(0, 0, 0): 5573157331909099811, (3, 7, 1): 5267592103515702249,
              (-1, 12345, 3): 9094142808079310098}


@pytest.mark.parametrize(("args", "expected"), SAMPLE_SEEDS.items())
def test_sample_seeds_are_unchanged(args: tuple[int, int, int], expected: int) -> None:
    seed, index, epoch = args
    assert sample_seed(seed, index, epoch) == expected
    assert derive_seed("flaresweep", seed, epoch, index) == expected


@pytest.mark.parametrize(("args", "expected"), STEP_SEEDS.items())
def test_step_seeds_are_unchanged(args: tuple[int, int, int], expected: int) -> None:
    assert step_seed(*args) == expected
    assert derive_seed("flaresweep-step", *args, shift=1) == expected


def test_derive_seed_is_63_bits_of_the_sha256_of_the_joined_key() -> None:
    head = int.from_bytes(hashlib.sha256(b"ns:1:a:2.5").digest()[:8], "little")
    assert derive_seed("ns", 1, "a", 2.5) == head & (2**63 - 1)
    assert derive_seed("ns", 1, "a", 2.5, shift=1) == head >> 1
    seeds = {derive_seed("ns", i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed("ns", 1, 2) != derive_seed("ns", 12) != derive_seed("other", 1, 2)

"""Shared test fixtures."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded; on a busy machine extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs for one test module, whose trial processes import tests/ modules by
    name (the fake trainers of test_sweep)."""
    ray = pytest.importorskip("ray")
    import sweep

    # start_local_ray sets RAY_AUTH_MODE and RAY_AUTH_TOKEN (the local Ray's own token) in this
    # process; the processes later tests start must not inherit them.
    saved = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}
    sweep.start_local_ray(num_cpus=2, log_to_driver=False,
                          runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    yield ray
    ray.shutdown()
    for name in [k for k in os.environ if k.startswith("RAY_AUTH")]:
        del os.environ[name]
    os.environ.update(saved)

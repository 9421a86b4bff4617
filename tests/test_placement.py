"""Where a trial runs (issue 19): `device: auto` is the GPUs Ray gave it (cascade.device), CUDA
ranks need a whole GPU each and a trial must fit a node (orchestrator.preflight). No Ray here:
tests/test_sweep_cluster.py checks the same through a real local Ray."""

from __future__ import annotations

import pytest

from cascade.config import TrialConfig
from cascade.device import assigned_device, visible_devices
from cascade.errors import UserError
from orchestrator.preflight import check_fit, check_placement, workers_for_gpus

DDP2 = TrialConfig(backend="ddp", workers=2, device="auto")


def test_auto_is_the_assigned_gpus_and_the_cpu_without_any():
    assert assigned_device("auto", ["3"]) == "cuda"
    assert assigned_device("auto", []) == "cpu"  # even on a machine with GPUs: none is ours
    assert assigned_device("cpu", ["0"]) == "cpu"
    assert assigned_device("cuda", ["1", "2"]) == "cuda"
    with pytest.raises(UserError, match=r"^device 'cuda', but the scheduler gave this trial no GPU"):
        assigned_device("cuda", [])
    assert visible_devices(["2", "5"]) == {"CUDA_VISIBLE_DEVICES": "2,5"}
    assert visible_devices([]) == {"CUDA_VISIBLE_DEVICES": ""}  # no GPU at all, not "all of them"


@pytest.mark.parametrize("gpu", [0.5, 1.0, 1.5])
def test_cuda_ranks_need_a_whole_gpu_each(gpu):
    with pytest.raises(UserError, match=r"^s.yaml: workers=2 \(ddp on CUDA\) needs 2 whole GPUs "
                                        rf"per trial, one per rank, but a trial gets {gpu:g}; pass "
                                        r"--gpus-per-trial 2"):
        check_placement(DDP2, gpu, where="s.yaml")


def test_gpus_beyond_the_ranks_would_idle():
    with pytest.raises(UserError, match=r"a trial gets 2 GPUs but runs 1 rank\(s\), leaving 1 idle; "
                                        r"set workers: 2 with backend: ddp"):
        check_placement(TrialConfig(device="auto"), 2.0)
    with pytest.raises(UserError, match="a trial gets 4 GPUs but runs 2 rank"):
        check_placement(DDP2, 4.0)


def test_placements_that_are_fine():
    check_placement(DDP2, 2.0)  # one GPU per rank
    check_placement(DDP2, 0.0)  # auto without GPUs: gloo ranks on the CPU
    check_placement(TrialConfig(device="auto"), 0.5)  # one process may share a GPU
    check_placement(TrialConfig(backend="ddp", workers=2, device="cpu"), 0.0)


def test_gpus_per_trial_sets_the_ranks_unless_the_space_does():
    assert workers_for_gpus(2, set()) == {"workers": 2, "backend": "ddp"}
    assert workers_for_gpus(4.0, {"backend"}) == {"workers": 4}  # the space's backend (horovod)
    assert workers_for_gpus(2, {"workers"}) == {}  # the space says otherwise
    assert workers_for_gpus(1, set()) == {} and workers_for_gpus(0.5, set()) == {}
    assert workers_for_gpus(None, set()) == {}


def test_a_trial_that_fits_no_node_is_one_line_with_the_flags_that_lower_it():
    with pytest.raises(UserError) as err:
        check_fit({"CPU": 4.0, "GPU": 1.0}, [{"CPU": 2.0, "memory": 1e9}])
    assert str(err.value) == (
        "a trial needs 4 CPU, 1 GPU, which no node of the Ray cluster offers (1 node(s), at most "
        "2 CPU, 0 GPU); every trial would wait forever. Lower the request (--cpus-per-trial 2, "
        "--gpus-per-trial 0), use bigger nodes, or pass --wait-for-resources if such nodes are coming")
    with pytest.raises(UserError, match=r"drop --trial-resource big_mem"):
        check_fit({"CPU": 1.0, "big_mem": 1.0}, [{"CPU": 8.0}])
    with pytest.raises(UserError, match=r"\(nor a node type its autoscaler can add\)"):
        check_fit({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 8.0}], [{"CPU": 4.0, "GPU": 0.0}])


def test_a_trial_fits_one_node_not_the_sum_of_two():
    # 2 + 2 CPUs on two nodes do not make a 4-CPU trial: Ray places a trial on one node.
    with pytest.raises(UserError, match="a trial needs 4 CPU"):
        check_fit({"CPU": 4.0, "GPU": 0.0}, [{"CPU": 2.0}, {"CPU": 2.0}])
    check_fit({"CPU": 2.0, "GPU": 0.0}, [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}])
    check_fit({"CPU": 1.0, "GPU": 1.0, "w": 1.0}, [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0, "w": 2.0}])


def test_an_autoscaler_that_can_add_a_fitting_node_lets_trials_queue():
    check_fit({"CPU": 8.0, "GPU": 1.0}, [{"CPU": 2.0}], [{"CPU": 16.0, "GPU": 8.0}])

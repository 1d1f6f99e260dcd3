"""Searches on a real Ray cluster (started here, loopback only): the same choices and scores as
in this process, with one worker or two, and when a worker dies mid-search."""
import os
import sys

import pytest
import ray
import torch

import graphopt
from graphopt.analysis.calibration import calibrate
from graphopt.analysis.super_weights import ablation_perplexities, find_super_weights
from graphopt.executors import Workload, get_executor
from graphopt.executors.ray import RayExecutor
from graphopt.passes import ConstantFolding, DeadCodeElimination
from graphopt.passes.head_pruning import AttentionHeadPruning, ablation_group_scores, find_attentions
from graphopt.passes.layer_skipping import LayerSkipping, rank_removals


@pytest.fixture(scope="module")
def cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers need not import tests/
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def searched(llama):
    inputs = llama.example_inputs(seq_len=16)
    gm = graphopt.compile(llama.model, inputs, progress=False).captured.graph_module
    batches = [llama.example_inputs(seq_len=16, seed=s) for s in (1, 2, 3)]
    return gm, batches


@pytest.mark.parametrize("workers", [1, 2])
def test_searches_on_ray_equal_the_local_ones(cluster, searched, workers):
    gm, batches = searched
    executor = RayExecutor(workers=workers)
    for method in ("finercut", "finercut-oneshot", "bi"):
        local = rank_removals(gm, batches, method, 3, progress=False)
        remote = rank_removals(gm, batches, method, 3, progress=False, executor=executor)
        assert [s.names for s in remote] == [s.names for s in local], method
        assert [s.js for s in remote] == pytest.approx([s.js for s in local], rel=1e-5, abs=1e-9)
        assert [s.metric for s in remote] == pytest.approx([s.metric for s in local], rel=1e-5, abs=1e-9)
    attentions = find_attentions(gm)
    local = ablation_group_scores(gm, attentions, batches, progress=False)
    remote = ablation_group_scores(gm, attentions, batches, progress=False, executor=executor)
    assert torch.tensor(remote).numpy() == pytest.approx(torch.tensor(local).numpy(), rel=1e-5, abs=1e-9)


def test_compile_with_ray_makes_the_same_choices(cluster, llama):
    inputs = llama.example_inputs(seq_len=16)
    batches = [llama.example_inputs(seq_len=16, seed=s) for s in (1, 2, 3)]

    def compiled(executor):
        passes = [ConstantFolding(), LayerSkipping(sublayers=2, progress=False),
                  AttentionHeadPruning(ratio=0.5, progress=False), DeadCodeElimination()]
        return graphopt.compile(llama.model, inputs, passes=passes, calibration=batches, executor=executor,
                                progress=False)
    local, remote = compiled(None), compiled("ray")
    assert [r.changes for r in remote.records] == [r.changes for r in local.records]
    assert torch.equal(remote(*inputs)[0], local(*inputs)[0])


class DiesOnce(Workload):
    """Its worker process exits the first time it meets candidate 3 (a marker file says so)."""

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self):
        return 100

    def evaluate(self, state, candidate):
        if candidate == 3 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return state + candidate * candidate


def test_a_worker_that_dies_is_replaced_and_its_candidate_retried(cluster, tmp_path):
    marker = str(tmp_path / "died")
    with get_executor("ray", workers=2).session(DiesOnce(marker)) as session:
        assert session.map(range(8)) == [100 + c * c for c in range(8)]
    assert os.path.exists(marker)


def test_calibration_shared_out_to_workers_merges_to_the_local_statistics(cluster, searched):
    gm, batches = searched
    batches = batches + batches[:2]                      # 5 batches: shares of 2 and 3
    local = calibrate(gm, batches, progress=False, hessians=True, samples=16)
    remote = calibrate(gm, batches, progress=False, hessians=True, samples=16, executor=RayExecutor(workers=2))
    assert remote.batches == local.batches == 5
    for name, record in local.linears.items():
        other = remote.linears[name]
        assert torch.equal(other.input_absmax, record.input_absmax) and other.tokens == record.tokens
        assert (other.peak, other.peak_batch, other.peak_token, other.peak_channel) == \
            (record.peak, record.peak_batch, record.peak_token, record.peak_channel)
        assert torch.allclose(other.input_sq_sum, record.input_sq_sum, rtol=1e-6)
        assert torch.allclose(other.hessian, record.hessian, rtol=1e-5, atol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(other.abs_samples, record.abs_samples))
    for name, record in local.residuals.items():
        assert remote.residuals[name].cos_sum == pytest.approx(record.cos_sum, rel=1e-6)


def test_super_weight_ablation_on_ray_equals_the_local_one(cluster, searched):
    gm, batches = searched
    windows = [b[0] for b in batches]
    report = find_super_weights(gm, batches[0], spike_ratio=2.0)
    assert report.super_weights
    local = ablation_perplexities(gm, windows, report.super_weights, progress=False)
    remote = ablation_perplexities(gm, windows, report.super_weights, RayExecutor(workers=2), progress=False)
    assert remote == pytest.approx(local, rel=1e-6)

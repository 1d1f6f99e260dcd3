from ..conftest import load_example


def test_channel_pruning_example_runs_every_export(capsys):
    results = load_example("channel_pruning.py").main(["--model", "all", "--ratio", "0.3"])
    assert set(results) == {"resnet", "densenet", "densenet16", "llama"}
    assert len(results["llama"].pop("heads")[1]) == 3      # every attention lost half its key/value groups
    for name, exports in results.items():
        constrained = exports["constrained"][1]
        assert constrained.consumers_gather == constrained.consumers_slice == 0
        naive, reordered = exports["unconstrained"][1], exports["unconstrained+reorder"][1]
        assert reordered.consumers_gather <= naive.consumers_gather
    grouped = results["densenet16"]["16-groups+reorder"][1]
    assert grouped.consumers_concat >= 5 and grouped.consumers_gather + grouped.consumers_slice <= 1   # the classifier's
    assert results["densenet16"]["16-groups"][1].consumers_gather >= 3
    out = capsys.readouterr().out
    assert "segment" in out and "consumers reading all / a slice / a gather / concatenation parts" in out
    assert "needed: reduced over channels" in out       # llama's residual stream: RMSNorm reduces over it

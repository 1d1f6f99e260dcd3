import pytest

from ..conftest import load_example

EXAMPLE = load_example("channel_pruning.py")


@pytest.mark.parametrize("model", EXAMPLE.MODELS)
def test_channel_pruning_example_runs_every_export(model, capsys):
    results = EXAMPLE.main(["--model", model, "--ratio", "0.3"])
    assert set(results) == {model}
    exports = results[model]
    if model == "llama":
        assert len(exports.pop("heads")[1]) == 3      # every attention lost half its key/value groups
    constrained = exports["constrained"][1]
    assert constrained.consumers_gather == constrained.consumers_slice == 0
    naive, reordered = exports["unconstrained"][1], exports["unconstrained+reorder"][1]
    assert reordered.consumers_gather <= naive.consumers_gather
    if model == "densenet16":
        grouped = exports["16-groups+reorder"][1]
        assert grouped.consumers_concat >= 5
        assert grouped.consumers_gather + grouped.consumers_slice <= 1     # the classifier's
        assert exports["16-groups"][1].consumers_gather >= 3
    out = capsys.readouterr().out
    assert "segment" in out and "consumers reading all / a slice / a gather / concatenation parts" in out
    if model == "llama":
        assert "needed: reduced over channels" in out       # the residual stream: RMSNorm reduces over it

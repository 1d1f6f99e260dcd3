from ..conftest import load_example


def test_moe_example_prunes_quantizes_and_generates(capsys):
    result = load_example("moe.py").main(["--model", "mixtral", "--keep", "0.5", "--seq-len", "16"])
    assert [len(kept) for kept in result["kept"].values()] == [2, 2, 2]
    assert len(result["tokens"]) == 12
    out = capsys.readouterr().out
    assert "routings per expert" in out and "expert_pruning" in out and "greedy tokens after" in out

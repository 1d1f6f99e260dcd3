import ray

from ..conftest import load_example


def test_scale_example_makes_the_same_choices_on_ray_and_streams_a_checkpoint(capsys):
    running = ray.is_initialized()          # another test's cluster in this worker: leave it up
    try:
        results = load_example("scale.py").main(["--hidden", "256", "--layers", "2"])
    finally:
        if not running:
            ray.shutdown()
    assert results["search"]["local"] == results["search"]["ray"]
    assert any(change.startswith("removed") for change in results["search"]["ray"])
    stream = results["stream"]
    assert stream["quantized"] < stream["weights"] / 3          # int4 layers, an int8 embedding
    assert "same choices and scores: True" in capsys.readouterr().out

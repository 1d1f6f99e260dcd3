from ..conftest import load_example


def test_decode_step_example_generates_what_hugging_face_generates(capsys):
    results = load_example("decode_step.py").main(["--model", "llama", "--prompt-tokens", "8", "--new-tokens", "5",
                                                   "--threshold", "2.0"])
    tokens, ms, same = results["plain step"]
    assert same == 1.0 and tokens.shape == (1, 5) and ms > 0
    assert results["adaptive step (cos > 2.0)"][2] == 1.0      # a threshold above 1 never skips
    out = capsys.readouterr().out
    assert "FFNs under an If" in out and "ms/token" in out

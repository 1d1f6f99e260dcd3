"""save()/load(): round trip, a torch-free runtime, and clear errors on damaged artifacts."""
import json
import os

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import ArtifactError, BackendError, InputSpecError

from .conftest import run_artifact_without_torch, small_inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    bundle = graphopt.models.load("resnet")
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, progress=False)
    path = cm.save(str(tmp_path_factory.mktemp("art") / "resnet"))
    return cm, inputs, path


def test_round_trip_gives_the_same_outputs(saved):
    cm, inputs, path = saved
    rt = graphopt.load(path)
    torch.testing.assert_close(rt(*inputs), cm(*inputs), rtol=0, atol=0)
    assert isinstance(rt(inputs[0].numpy()), np.ndarray)
    manifest = rt.manifest
    assert manifest["backend"] == "onnxruntime"
    assert [p["name"] for p in manifest["passes"]] == ["constant_folding", "dead_code_elimination"]
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data"}
    assert manifest["versions"]["torch"].startswith("2.13.0")
    with pytest.raises(InputSpecError, match="expected shape"):
        rt(np.zeros((1, 3, 8, 8), np.float32))


def test_load_runs_where_torch_cannot_be_imported(saved):
    cm, inputs, path = saved
    np.testing.assert_array_equal(run_artifact_without_torch(path, inputs), cm(*inputs).numpy())


def _copy(path, tmp_path):
    import shutil
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_truncated_weights_are_detected(saved, tmp_path):
    target = _copy(saved[2], tmp_path)
    data = target / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"model.onnx.data is truncated or altered \(100 bytes"):
        graphopt.load(str(target))


def test_corrupted_bytes_are_detected(saved, tmp_path):
    target = _copy(saved[2], tmp_path)
    data = bytearray((target / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx is corrupted"):
        graphopt.load(str(target))


def test_missing_or_broken_manifest(saved, tmp_path):
    target = _copy(saved[2], tmp_path)
    (target / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        graphopt.load(str(target))
    os.remove(target / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        graphopt.load(str(target))
    with pytest.raises(ArtifactError, match="no such directory"):
        graphopt.load(str(tmp_path / "nowhere"))


def test_missing_file_and_future_format(saved, tmp_path):
    target = _copy(saved[2], tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    os.remove(target / "model.onnx.data")
    with pytest.raises(ArtifactError, match="model.onnx.data is missing"):
        graphopt.load(str(target))
    manifest["format_version"] = 99
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        graphopt.load(str(target))


def test_failed_save_leaves_nothing_half_written(tmp_path):
    cm = graphopt.compile(torch.nn.Linear(3, 3), (torch.randn(1, 3),), backend="torch", progress=False)
    with pytest.raises(BackendError, match="torch backend is the in-process reference"):
        cm.save(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_save_replaces_an_existing_artifact(saved, tmp_path):
    cm, inputs, _ = saved
    target = str(tmp_path / "again")
    cm.save(target)
    cm.save(target)
    assert sorted(os.listdir(tmp_path)) == ["again"]
    graphopt.load(target)


class _InjectedFault(OSError):
    pass


def _two_linear_models():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    first, second = (graphopt.compile(torch.nn.Linear(4, 3), (x,), progress=False) for _ in range(2))
    return x, first, second


@pytest.mark.parametrize("atomic_swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_save_failing_at_any_file_operation_leaves_an_artifact(tmp_path, monkeypatch, atomic_swap):
    """Fail the k-th write, fsync, rename or swap of an overwriting save, for every k: the
    path must then load as the old artifact or the new one, never as nothing or a mixture."""
    import builtins

    import graphopt.artifact as artifact
    x, old, new = _two_linear_models()
    expected = {"old": old(x).detach().numpy(), "new": new(x).detach().numpy()}
    target = str(tmp_path / "model")
    real = {"open": builtins.open, "rename": os.rename, "fsync": os.fsync,
            "exchange": artifact._exchange if atomic_swap else (lambda a, b: False)}
    faults_hit = 0
    for k in range(1, 200):
        old.save(target)
        calls = [0]

        def counted(name):
            def call(*args, **kwargs):
                if name != "open" or any(c in (args[1] if len(args) > 1 else kwargs.get("mode", "r")) for c in "wax"):
                    calls[0] += 1
                    if calls[0] == k:
                        raise _InjectedFault(f"injected fault in {name} (operation {k})")
                return real[name](*args, **kwargs)
            return call

        monkeypatch.setattr(builtins, "open", counted("open"))
        monkeypatch.setattr(os, "rename", counted("rename"))
        monkeypatch.setattr(os, "fsync", counted("fsync"))
        monkeypatch.setattr(artifact, "_exchange", counted("exchange"))
        try:
            new.save(target)
            failed = False
        except _InjectedFault:
            failed = True
        finally:
            monkeypatch.undo()
        got = np.asarray(graphopt.load(target)(x.numpy()))
        which = [name for name, value in expected.items() if np.array_equal(got, value)]
        assert len(which) == 1 and (failed or which == ["new"]), (k, which)
        assert sorted(os.listdir(tmp_path)) == ["model"], os.listdir(tmp_path)
        if not failed:
            break
        faults_hit += 1
    assert faults_hit >= 5          # writes, fsyncs and the swap were all reached


def test_a_save_killed_midway_leaves_an_artifact(tmp_path):
    """kill -9 a process that saves over the same path in a loop, at several moments: the
    path loads every time."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time
    target = str(tmp_path / "model")
    script = textwrap.dedent(f"""
        import sys, torch, graphopt
        x = torch.randn(2, 4)
        models = [graphopt.compile(torch.nn.Linear(4, 3), (x,), progress=False) for _ in range(2)]
        models[0].save({target!r})
        print("ready", flush=True)
        i = 0
        while True:
            models[i % 2].save({target!r})
            i += 1
    """)
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071, 0.113):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = graphopt.load(target)
        assert loaded(np.zeros((2, 4), np.float32)).shape == (2, 3)

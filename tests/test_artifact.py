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

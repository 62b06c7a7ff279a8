"""Model discovery (by graph signature, not file name), our ONNX signature reader against the ``onnx``
package, onnxruntime session options, and ArcFace's input normalisation and embedding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lib_adapters.errors import FormatError, MissingFileError
from lib_adapters.face.arcface import ArcFaceRecognizer, l2_normalise, normalisation_from_nodes
from lib_adapters.face.discovery import (FaceModelRole, available_packs, classify_graph, face_models_root,
                                         find_face_models)
from lib_adapters.face.onnx_info import read_graph_info
from lib_adapters.face.runtime import CPU, CUDA, FaceDevice, SessionOptions, create_session, providers_for
from onnx_graphs import arcface_by_hand, arcface_graph, other_graph, random_heads, scrfd_graph

W = np.random.default_rng(7).normal(0, 0.1, (3 * 14 * 14, 512)).astype(np.float32)


def _dims(value_info):
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
                 for d in value_info.type.tensor_type.shape.dim)


def _onnx_view(path):
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    return ([(i.name, _dims(i)) for i in graph.input if i.name not in inits],
            [(o.name, _dims(o)) for o in graph.output], [(n.name, n.op_type) for n in graph.node[:8]])


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """A buffalo_l-like folder whose files have unhelpful names: discovery must read the graphs."""
    models = tmp_path_factory.mktemp("models")
    folder = face_models_root(models) / "buffalo_l"
    other_graph(folder / "1k3d68.onnx", 192)
    arcface_graph(folder / "b_recognizer.onnx", W)
    scrfd_graph(folder / "a_detector.onnx", random_heads(0))
    other_graph(folder / "genderage.onnx", 96)
    return models


def test_our_reader_agrees_with_onnx_on_every_test_graph(pack, tmp_path):
    paths = sorted((face_models_root(pack) / "buffalo_l").glob("*.onnx"))
    paths.append(arcface_graph(tmp_path / "mx.onnx", W, mxnet_norm=True))
    for path in paths:
        info = read_graph_info(path)
        inputs, outputs, nodes = _onnx_view(path)
        assert [(i.name, i.shape) for i in info.inputs] == inputs, path.name
        assert [(o.name, o.shape) for o in info.outputs] == outputs, path.name
        assert [(n.name, n.op_type) for n in info.first_nodes] == nodes, path.name


def test_old_exports_list_weights_as_inputs_and_keep_float_data(tmp_path):
    """IR-3 style graphs list every initializer as an input too; weights may sit in float_data, not raw_data."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.arange(16, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["data", "w"], ["out"], name="mm")], "old",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], initializer=[weight])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph), str(path))
    info = read_graph_info(path)
    assert [i.name for i in info.inputs] == ["data"] and info.outputs[0].shape == (1, 4)


def test_damaged_and_foreign_files_are_format_errors(pack, tmp_path):
    good = (face_models_root(pack) / "buffalo_l" / "b_recognizer.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good[: len(good) // 2])
    text = tmp_path / "notes.onnx"
    text.write_bytes(b"this is not a model\n" * 10)
    for path in (cut, text):
        with pytest.raises(FormatError, match=path.name):
            read_graph_info(path)


def test_discovery_classifies_by_graph(pack):
    files = find_face_models(pack, "buffalo_l")
    assert files.detector.name == "a_detector.onnx" and files.recognizer.name == "b_recognizer.onnx"
    assert available_packs(pack) == ["buffalo_l"]
    folder = face_models_root(pack) / "buffalo_l"
    roles = {p.name: classify_graph(read_graph_info(p)) for p in folder.glob("*.onnx")}
    assert roles == {"a_detector.onnx": FaceModelRole.DETECTOR, "b_recognizer.onnx": FaceModelRole.RECOGNIZER,
                     "1k3d68.onnx": None, "genderage.onnx": None}


def test_missing_folder_or_file_says_which_file_goes_where(tmp_path, pack):
    with pytest.raises(MissingFileError) as missing_folder:
        find_face_models(tmp_path, "antelopev2")
    message = str(missing_folder.value)
    for part in ("scrfd_10g_bnkps.onnx", "glintr100.onnx", str(face_models_root(tmp_path) / "antelopev2"),
                 "github.com/deepinsight/insightface/releases", "non-commercial"):
        assert part in message
    only_rec = face_models_root(tmp_path) / "buffalo_l"
    arcface_graph(only_rec / "w600k_r50.onnx", W)
    with pytest.raises(MissingFileError, match="no face detector found") as missing_det:
        find_face_models(tmp_path)
    assert "det_10g.onnx" in str(missing_det.value)


def test_a_pack_unzipped_into_its_own_folder_is_found(tmp_path):
    nested = face_models_root(tmp_path) / "antelopev2" / "antelopev2"
    scrfd_graph(nested / "scrfd_10g_bnkps.onnx", random_heads(1))
    arcface_graph(nested / "glintr100.onnx", W)
    assert find_face_models(tmp_path, "antelopev2").folder == nested


def test_providers_cpu_by_default_cuda_only_when_asked_and_present():
    assert providers_for(FaceDevice.CPU, [CUDA, CPU]) == [CPU]
    assert providers_for(FaceDevice.CUDA, [CUDA, CPU]) == [CUDA, CPU]
    assert providers_for(FaceDevice.CUDA, [CPU]) == [CPU]


def test_sessions_use_the_cpu_and_the_thread_count(pack):
    session = create_session(find_face_models(pack).recognizer, SessionOptions(threads=1))
    assert session.get_providers() == [CPU]
    assert session.get_session_options().intra_op_num_threads == 1


def test_arcface_normalisation_is_read_from_the_first_nodes(tmp_path):
    plain = read_graph_info(arcface_graph(tmp_path / "a.onnx", W))
    mxnet = read_graph_info(arcface_graph(tmp_path / "b.onnx", W, mxnet_norm=True))
    assert (normalisation_from_nodes(plain.first_nodes).mean, normalisation_from_nodes(plain.first_nodes).std) == \
        (127.5, 127.5)
    assert (normalisation_from_nodes(mxnet.first_nodes).mean, normalisation_from_nodes(mxnet.first_nodes).std) == \
        (0.0, 1.0)


@pytest.mark.parametrize("mxnet_norm", [False, True])
def test_embedding_equals_the_hand_computation(tmp_path, mxnet_norm):
    path = arcface_graph(tmp_path / "rec.onnx", W, mxnet_norm=mxnet_norm)
    recognizer = ArcFaceRecognizer(create_session(path), read_graph_info(path))
    crops = [np.random.default_rng(s).integers(0, 256, (112, 112, 3), dtype=np.uint8) for s in range(2)]
    embeddings = recognizer.embed(crops)
    # the mxnet-style graph gets raw pixels and normalises inside, by (x - 127.5) / 128
    std = 128.0 if mxnet_norm else 127.5
    expected = np.stack([arcface_by_hand(c, W, 127.5, std) for c in crops])
    assert embeddings.shape == (2, 512) and np.abs(embeddings - expected).max() < 1e-4
    normed = l2_normalise(embeddings[0])
    assert abs(np.linalg.norm(normed) - 1) < 1e-6
    assert np.abs(normed - expected[0] / np.linalg.norm(expected[0])).max() < 1e-6


def test_a_zero_embedding_is_refused():
    with pytest.raises(FormatError, match="all-zero"):
        l2_normalise(np.zeros(512, np.float32))


def test_reader_seeks_past_big_weights(tmp_path, monkeypatch):
    """A 40 MB initializer before the inputs: the signature comes back without reading the weights."""
    big = numpy_helper.from_array(np.zeros((10_000_000,), np.float32), "big")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], initializer=[big])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph), str(path))
    reads: list[int] = []
    original = Path.open

    def counting_open(self, *args, **kwargs):
        handle = original(self, *args, **kwargs)
        read = handle.read
        handle.read = lambda n=-1: (lambda data: (reads.append(len(data)), data)[1])(read(n))  # type: ignore
        return handle

    monkeypatch.setattr(Path, "open", counting_open)
    info = read_graph_info(path)
    assert info.inputs[0].shape == ("b", 3) and info.outputs[0].name == "y"
    assert 0 < sum(reads) < 10_000

"""What an ONNX file's graph declares, read straight from its protobuf bytes.

Model discovery needs, for every ``.onnx`` file in a model folder, the graph's inputs and outputs
(names and shapes) to tell the detector from the recognizer, and ArcFace needs the names of the
first nodes to learn its input normalisation (as insightface's ``ArcFaceONNX`` does). Creating an
onnxruntime session per file for that would load every model of the pack (buffalo_l holds five,
~330 MB), and the ``onnx`` package is not a runtime dependency. So this module walks the protobuf
wire format itself: it reads only the few small fields it needs and seeks past everything else
(the weights), so a 170 MB file costs a few hundred small reads.

Wire format: every field is a varint key ``(number << 3) | wire_type`` followed by a varint (0),
8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5). Field numbers used here
(onnx.proto): ModelProto.graph = 7; GraphProto.node = 1, initializer = 5, input = 11, output = 12;
NodeProto.name = 3, op_type = 4; TensorProto.name = 8; ValueInfoProto.name = 1, type = 2;
TypeProto.tensor_type = 1; TypeProto.Tensor.shape = 2; TensorShapeProto.dim = 1;
Dimension.dim_value = 1, dim_param = 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from ..errors import FormatError

Dim = Union[int, str, None]  # a fixed size, a symbolic name, or unknown
_FIRST_NODES = 8  # insightface looks at the first 8 nodes for the normalisation ops


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op_type: str


@dataclass(frozen=True)
class GraphInfo:
    inputs: tuple[TensorInfo, ...]  # graph inputs that are not initializers (what a session feeds)
    outputs: tuple[TensorInfo, ...]
    first_nodes: tuple[NodeInfo, ...]  # the first few nodes in graph order


class _Truncated(Exception):
    pass


def _varint(stream: BinaryIO) -> int:
    shift, value = 0, 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise _Truncated
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 70:
            raise _Truncated


def _fields(stream: BinaryIO, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, wire type, payload length or value) for each field up to ``end``; the stream
    stands at the payload of length-delimited fields, and the caller may read or leave it: the
    next iteration seeks past whatever is left."""
    while stream.tell() < end:
        key = _varint(stream)
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, _varint(stream)
        elif wire == 1:
            stream.seek(8, 1)
        elif wire == 5:
            stream.seek(4, 1)
        elif wire == 2:
            length = _varint(stream)
            start = stream.tell()
            yield number, wire, length
            stream.seek(start + length)
        else:  # groups (3, 4) do not occur in ONNX files
            raise _Truncated


def _string(stream: BinaryIO, length: int) -> str:
    data = stream.read(length)
    if len(data) != length:
        raise _Truncated
    return data.decode("utf-8", errors="replace")


def _node(stream: BinaryIO, end: int) -> NodeInfo:
    name = op = ""
    for number, wire, length in _fields(stream, end):
        if wire == 2 and number == 3:
            name = _string(stream, length)
        elif wire == 2 and number == 4:
            op = _string(stream, length)
    return NodeInfo(name, op)


def _tensor_name(stream: BinaryIO, end: int) -> str:
    for number, wire, length in _fields(stream, end):
        if wire == 2 and number == 8:
            return _string(stream, length)
    return ""


def _dim(stream: BinaryIO, end: int) -> Dim:
    dim: Dim = None
    for number, wire, value in _fields(stream, end):
        if number == 1 and wire == 0:
            dim = value
        elif number == 2 and wire == 2:
            dim = _string(stream, value)
    return dim


def _shape(stream: BinaryIO, end: int) -> tuple[Dim, ...]:
    """TypeProto -> tensor_type -> shape -> dims (empty for non-tensor or shapeless values)."""
    dims: list[Dim] = []
    for number, wire, length in _fields(stream, end):
        if number != 1 or wire != 2:  # tensor_type
            continue
        tensor_end = stream.tell() + length
        for t_number, t_wire, t_length in _fields(stream, tensor_end):
            if t_number == 2 and t_wire == 2:  # shape
                shape_end = stream.tell() + t_length
                for s_number, s_wire, s_length in _fields(stream, shape_end):
                    if s_number == 1 and s_wire == 2:
                        dims.append(_dim(stream, stream.tell() + s_length))
    return tuple(dims)


def _value_info(stream: BinaryIO, end: int) -> TensorInfo:
    name, shape = "", ()
    for number, wire, length in _fields(stream, end):
        if number == 1 and wire == 2:
            name = _string(stream, length)
        elif number == 2 and wire == 2:
            shape = _shape(stream, stream.tell() + length)
    return TensorInfo(name, shape)


def _graph(stream: BinaryIO, end: int) -> GraphInfo:
    nodes: list[NodeInfo] = []
    initializers: set[str] = set()
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []
    for number, wire, length in _fields(stream, end):
        if wire != 2:
            continue
        field_end = stream.tell() + length
        if number == 1 and len(nodes) < _FIRST_NODES:
            nodes.append(_node(stream, field_end))
        elif number == 5:
            initializers.add(_tensor_name(stream, field_end))
        elif number == 11:
            inputs.append(_value_info(stream, field_end))
        elif number == 12:
            outputs.append(_value_info(stream, field_end))
    # Old exports (IR < 4, e.g. converted mxnet models) list every weight as a graph input too;
    # onnxruntime feeds only the others, and so do we.
    fed = tuple(i for i in inputs if i.name not in initializers)
    return GraphInfo(inputs=fed, outputs=tuple(outputs), first_nodes=tuple(nodes))


def read_graph_info(path: str | Path) -> GraphInfo:
    """Inputs, outputs and first nodes of an ONNX model file; ``FormatError`` if it is not one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            for number, wire, length in _fields(stream, size):
                if number == 7 and wire == 2:
                    if stream.tell() + length > size:
                        raise _Truncated
                    return _graph(stream, stream.tell() + length)
    except (_Truncated, OSError) as exc:
        raise FormatError(f"{path.name}: cannot read this ONNX file ({type(exc).__name__}). It is damaged or "
                          "incomplete, often an interrupted download: download it again.") from exc
    raise FormatError(f"{path.name}: this file holds no ONNX graph; it is not an ONNX model.")

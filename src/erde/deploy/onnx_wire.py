"""What the runtime must know of an ONNX file before ONNX Runtime loads it, read from the
protobuf wire format directly: the graph's inputs and outputs (names and shapes, as
`onnx_export.shapes` lists them) and whether any stored tensor points to external data.

The `onnx` package could tell the same, but it is not part of a runtime-only install (numpy,
onnxruntime, Pillow), and these few fields need no schema. Field numbers are onnx.proto's; a
message field given twice is merged as protobuf merges it (the payloads concatenated).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# onnx.proto field numbers
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_SPARSE_VALUES = 1
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_SHAPE, _SHAPE_DIM, _DIM_VALUE, _DIM_PARAM = 1, 2, 1, 1, 2


@dataclass(frozen=True)
class GraphFacts:
    inputs: list[dict]  # {"name": ..., "shape": [size or dimension name, ...]}
    outputs: list[dict]
    external_data: bool  # some tensor (subgraphs included) refers to a file outside the blob


def graph_facts(blob: bytes) -> GraphFacts:
    """The facts of a serialised ModelProto; ValueError if it is no valid protobuf."""
    graph = _merged(memoryview(blob), _MODEL_GRAPH)
    fields = list(_fields(graph))
    return GraphFacts(
        inputs=[_value_info(v) for f, v in fields if f == _GRAPH_INPUT],
        outputs=[_value_info(v) for f, v in fields if f == _GRAPH_OUTPUT],
        external_data=_external(fields),
    )


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _fields(buf: memoryview | int) -> Iterator[tuple[int, memoryview | int]]:
    """(field number, value) of each field: an int for a varint, the bytes otherwise."""
    if isinstance(buf, int):  # a damaged file's varint where a message belongs
        raise ValueError("a number where a message belongs")
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"wire type {wire} (groups are not used by ONNX)")
        if i > len(buf):
            raise ValueError("truncated field")
        yield number, value


def _messages(buf: memoryview, number: int) -> list[memoryview]:
    found = [v for f, v in _fields(buf) if f == number]
    if any(isinstance(v, int) for v in found):
        raise ValueError(f"field {number} is a number where a message belongs")
    return found


def _merged(buf: memoryview, number: int) -> memoryview:
    """A singular message field: every occurrence merged."""
    return memoryview(b"".join(bytes(v) for v in _messages(buf, number)))


def _value_info(buf: memoryview) -> dict:
    names = _messages(buf, _VALUE_NAME)
    name = bytes(names[-1]).decode("utf-8") if names else ""
    tensor = _merged(_merged(buf, _VALUE_TYPE), _TYPE_TENSOR)
    dims = _messages(_merged(tensor, _TENSOR_SHAPE), _SHAPE_DIM)
    return {"name": name, "shape": [_dim(d) for d in dims]}


def _dim(buf: memoryview) -> int | str:
    """`dim_param or dim_value`, the oneof's last value winning as in protobuf."""
    value, param = 0, ""
    for number, v in _fields(buf):
        if number == _DIM_VALUE and isinstance(v, int):
            value, param = v - (1 << 64) if v >= 1 << 63 else v, ""
        elif number == _DIM_PARAM and not isinstance(v, int):
            value, param = 0, bytes(v).decode("utf-8")
    return param or value


def _external(graph_fields: list[tuple[int, memoryview | int]]) -> bool:
    """Whether a tensor of the graph, its nodes' attributes or their subgraphs is external."""
    for number, value in graph_fields:
        if number == _GRAPH_INITIALIZER and _tensor_external(value):
            return True
        if number == _GRAPH_SPARSE and any(
            _tensor_external(t) for t in _messages(value, _SPARSE_VALUES)
        ):
            return True
        if number == _GRAPH_NODE:
            for attribute in _messages(value, _NODE_ATTRIBUTE):
                if _attribute_external(attribute):
                    return True
    return False


def _attribute_external(buf: memoryview) -> bool:
    for number, value in _fields(buf):
        if number in (_ATTR_TENSOR, _ATTR_TENSORS) and _tensor_external(value):
            return True
        if number in (_ATTR_GRAPH, _ATTR_GRAPHS) and _external(list(_fields(value))):
            return True
    return False


def _tensor_external(buf: memoryview | int) -> bool:
    if isinstance(buf, int):
        raise ValueError("a number where a tensor belongs")
    location = 0
    for number, value in _fields(buf):
        if number == _TENSOR_EXTERNAL_DATA:
            return True
        if number == _TENSOR_DATA_LOCATION:
            location = value
    return location == _EXTERNAL

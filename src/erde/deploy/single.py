"""One ONNX graph that stops at the first sure exit: the batch-1 form of an export.

Built from the exported pieces with the `onnx` helper API, so it holds exactly their operators and
weights (fp32 or quantized alike):

    piece 1 -> (features1, logits1, score1)
    If score1 < thresholds[0]:  then (logits1, exit 1)
                                else piece 2 -> ... If score2 < thresholds[1] ... else last piece

ONNX Runtime evaluates only the branch taken, so one session call runs each image exactly as far
as the pieces would, without returning to Python between exits. An `If` condition is one value,
so the graph takes one image (input shape 1 x C x H x W); larger batches are split between pieces
by the runtime instead. The thresholds are an input (`thresholds`, float32, one per deciding
exit), compared as `score < threshold` in float32, as the simulator does.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

THRESHOLDS = "thresholds"
LOGITS, EXIT = "logits", "exit"


def _renamed(graph: onnx.GraphProto, prefix: str) -> onnx.GraphProto:
    """A copy whose internal names carry `prefix`; the interface (inputs, outputs) keeps its own,
    so pieces meet by name and no two pieces' internal names clash in one graph."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    out = onnx.GraphProto()
    out.CopyFrom(graph)

    def name(n: str) -> str:
        return n if n == "" or n in keep else prefix + n

    for node in out.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ValueError("exported pieces are expected to hold no subgraphs")
        node.input[:] = [name(n) for n in node.input]
        node.output[:] = [name(n) for n in node.output]
        node.name = prefix + node.name
    for tensor in out.initializer:
        tensor.name = name(tensor.name)
    for value in out.value_info:
        value.name = name(value.name)
    return out


def _outputs(logits: str, exit_name: str, classes: int) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, classes]),
        helper.make_tensor_value_info(exit_name, TensorProto.INT64, [1]),
    ]


def _from(pieces: list[onnx.GraphProto], k: int, classes: int) -> tuple[list, list, str, str]:
    """Nodes and initializers that answer from exit k on (0-based), and their two outputs."""
    piece = _renamed(pieces[k], f"p{k + 1}/")
    nodes, inits = list(piece.node), list(piece.initializer)
    if k == len(pieces) - 1:  # the last piece: logits only, and it always answers
        logits = piece.output[0].name
        nodes += [
            helper.make_node("Identity", [logits], [f"logits_at{k}"]),
            helper.make_node("Constant", [], [f"exit_at{k}"], value_ints=[k + 1]),
        ]
        return nodes, inits, f"logits_at{k}", f"exit_at{k}"
    logits, score = piece.output[1].name, piece.output[2].name
    then = helper.make_graph(
        [
            helper.make_node("Identity", [logits], [f"then{k}/logits"]),
            helper.make_node("Constant", [], [f"then{k}/exit"], value_ints=[k + 1]),
        ],
        f"exit{k + 1}",
        [],
        _outputs(f"then{k}/logits", f"then{k}/exit", classes),
    )
    rest_nodes, rest_inits, rest_logits, rest_exit = _from(pieces, k + 1, classes)
    otherwise = helper.make_graph(
        rest_nodes,
        f"after_exit{k + 1}",
        [],
        _outputs(rest_logits, rest_exit, classes),
        initializer=rest_inits,
    )
    nodes += [
        helper.make_node("Constant", [], [f"index{k}"], value_int=k),
        helper.make_node("Gather", [THRESHOLDS, f"index{k}"], [f"cut{k}"]),
        helper.make_node("Less", [score, f"cut{k}"], [f"sure{k}"]),
        helper.make_node(
            "If",
            [f"sure{k}"],
            [f"logits_if{k}", f"exit_if{k}"],
            then_branch=then,
            else_branch=otherwise,
        ),
    ]
    return nodes, inits, f"logits_if{k}", f"exit_if{k}"


def single_graph(pieces: list[onnx.ModelProto]) -> onnx.ModelProto:
    """The pieces (as exported, in exit order) as one batch-1 graph with an `If` per exit:
    inputs `image` (1 x C x H x W) and `thresholds`; outputs `logits` (1 x K) and `exit` (1,
    numbered 1..n, as every report and `erde infer` number exits)."""
    graphs = [p.graph for p in pieces]
    classes = graphs[-1].output[0].type.tensor_type.shape.dim[1].dim_value
    nodes, inits, logits, exit_name = _from(graphs, 0, classes)
    image = onnx.ValueInfoProto()
    image.CopyFrom(graphs[0].input[0])
    image.type.tensor_type.shape.dim[0].Clear()
    image.type.tensor_type.shape.dim[0].dim_value = 1
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("Identity", [logits], [LOGITS]),
            helper.make_node("Identity", [exit_name], [EXIT]),
        ],
        "early_exit_batch1",
        [image, helper.make_tensor_value_info(THRESHOLDS, TensorProto.FLOAT, [len(graphs) - 1])],
        _outputs(LOGITS, EXIT, classes),
        initializer=inits,
    )
    opsets: dict[str, int] = {}
    for p in pieces:
        for o in p.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        producer_name="erde",
    )
    model.ir_version = max(p.ir_version for p in pieces)
    onnx.checker.check_model(model, full_check=True)
    return model

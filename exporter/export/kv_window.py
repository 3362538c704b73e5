"""Let the runtime show a sliding-window layer only the window of its KV buffer.

onnxruntime's CPU GroupQueryAttention applies `local_window_size` by zeroing the scores outside the window:
it still multiplies the query with every cached key and value. gemma-3-270m has 15 local layers of 18
with a 512-token window, so at 768 positions each of them does half again the work it needs.

This edit adds one graph input, `kv_window_offset` (int64 [1]; 0 = the whole buffer): the position at which the
local layers' past/present buffers start. The runtime binds those layers' buffers as views that begin
at that position (runtime/kvcache.py) and the graph tells their GQA nodes so:
- `seqlens_k` and `total_sequence_length` minus the offset: the kernel's positions within the view;
- `position_ids` = the absolute positions, so the rotary embedding inside GQA stays where it was.
The window mask then works within the view unchanged (it counts back from the query). With offset 0
the graph computes exactly what it computed before; global layers are not touched.

A view is one contiguous tensor only when batch × KV heads is 1 (gemma-3-270m and 1B: one KV head);
elsewhere the runtime feeds 0. Measured on the CPU kernel: outputs equal to the full buffer's
(max |diff| 0), 85 -> 69 µs per local layer at 640-800 positions. With `position_ids` the kernel reads the
whole local rotary table once: +8-10 MiB of (clean, file-backed) resident pages (docs/memory.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.bundle import KV_WINDOW_OFFSET

_SEQLENS, _TOTAL, _POSITION_IDS = 5, 6, 9  # GroupQueryAttention input slots


@dataclass
class WindowedLayers:
    """What the manifest records for the runtime: the layers that take the offset, and their window."""

    layers: list[int]
    window: int  # GQA's local_window_size


def add_kv_window_offset(model: onnx.ModelProto,
                         past_key: str = "past_key_values.{layer}.key") -> WindowedLayers | None:
    """Add the `kv_window_offset` input feeding every sliding-window GQA node; None when the graph has none."""
    local = [node for node in model.graph.node if node.op_type == "GroupQueryAttention" and _window(node) > 0]
    if not local or any(item.name == KV_WINDOW_OFFSET for item in model.graph.input):
        return None
    pattern = re.compile(re.escape(past_key).replace(r"\{layer\}", r"(\d+)") + "$")
    layers = []
    for node in local:
        found = pattern.match(node.input[3])
        if not found:  # the past is not a graph input of the usual name: leave the graph as it is
            return None
        layers.append(int(found.group(1)))
    model.graph.input.append(helper.make_tensor_value_info(KV_WINDOW_OFFSET, TensorProto.INT64, [1]))
    nodes, shifted = [], {}

    def const(name: str, value: np.ndarray) -> str:
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    offset = "kv_window/offset_i32"
    nodes.append(helper.make_node("Cast", [KV_WINDOW_OFFSET], [offset], name="kv_window/cast", to=TensorProto.INT32))
    scalar, scalar_shape = "kv_window/offset_scalar", const("kv_window/scalar_shape", np.zeros(0, np.int64))
    nodes.append(helper.make_node("Reshape", [offset, scalar_shape], [scalar], name="kv_window/scalar"))
    query = local[0].input[0]  # every layer's call has the same tokens: one position table for all
    for node in local:
        key = (node.input[_SEQLENS], node.input[_TOTAL])
        if key not in shifted:
            shifted[key] = _shifted_inputs(nodes, key, query, offset, scalar, scalar_shape, len(shifted), const)
        seqlens, total, positions = shifted[key]
        inputs = list(node.input) + [""] * max(0, _POSITION_IDS + 1 - len(node.input))
        inputs[_SEQLENS], inputs[_TOTAL] = seqlens, total
        if _rotary(node):  # the kernel would count rotary positions from the view's start
            inputs[_POSITION_IDS] = positions
        del node.input[:]
        node.input.extend(_trim(inputs))
    first = min(i for i, node in enumerate(model.graph.node) if node in local)
    for i, node in enumerate(nodes):
        model.graph.node.insert(first + i, node)
    return WindowedLayers(sorted(layers), max(_window(node) for node in local))


def _shifted_inputs(nodes: list, key: tuple[str, str], query: str, offset: str, scalar: str, scalar_shape: str,
                    index: int, const) -> tuple[str, str, str]:
    """GQA's seqlens_k and total_sequence_length within the view, and the call's absolute positions [batch, seq]:
    last - seq + 1 .. last, with last = seqlens_k (the position of the call's last token)."""
    seqlens_k, total = key
    tag = f"kv_window/{index}"

    def add(op: str, inputs: list[str], part: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{tag}/{part}"], name=f"{tag}/{part}", **attrs))
        return f"{tag}/{part}"

    one = const(f"{tag}/one", np.array(1, np.int64))
    seqlens = add("Sub", [seqlens_k, offset], "seqlens_k")
    shifted_total = add("Sub", [total, scalar], "total_sequence_length")
    seq = add("Shape", [query], "seq", start=1, end=2)  # [1]
    seq_end = add("Add", [add("Reshape", [seq, scalar_shape], "seq_scalar"), one], "seq_end")
    steps = add("Range", [one, seq_end, one], "steps")  # 1 .. seq
    last = add("Cast", [seqlens_k], "last", to=TensorProto.INT64)  # [batch]
    before = add("Reshape", [add("Sub", [last, seq], "before_first"), const(f"{tag}/column", np.array([-1, 1], np.int64))],
                 "before_first_column")  # [batch, 1]
    return seqlens, shifted_total, add("Add", [before, steps], "positions")


def _window(node: onnx.NodeProto) -> int:
    return next((attr.i for attr in node.attribute if attr.name == "local_window_size"), -1)


def _rotary(node: onnx.NodeProto) -> bool:
    return any(attr.name == "do_rotary" and attr.i for attr in node.attribute)


def _trim(inputs: list[str]) -> list[str]:
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs

"""Static INT8 (QDQ) quantization with Korean calibration, made accuracy-aware.

Built on onnxruntime.quantization (calibrators, QDQQuantizer); what is ours:
- calibration runs on a copy of the graph without the LM head (its [seq, vocab] logits are the
  biggest cost and tensor of a calibration run) and is fed prefills plus decode steps;
- the embedding and the LM head (tied or not) become one INT8 block-quantized tensor read by
  GatherBlockQuantized and MatMulNBits, so a tied matrix stays stored once;
- a sensitivity search on held-out calibration text: each group of activation Q/DQ pairs (one
  kind of MatMul input, or one layer) can be switched to float through a graph input, the KL vs
  FP32 of each switch is measured in one session, and the worst groups are kept in float until
  the accuracy target is met.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.quantize.calibration import CalibrationConfig, KVCacheReader, Sequence, build_sequences
from runtime.bundle import read_manifest
from runtime.errors import KoedgeError
from runtime.model import CausalLM
from runtime.session import SessionConfig

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
METHODS = ("minmax", "entropy", "percentile")


@dataclass
class Int8StaticConfig:
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    method: str = "minmax"  # minmax | entropy | percentile
    percentile: float = 99.999  # for method=percentile
    per_channel: bool = True  # weights: one scale per output channel
    weight_type: str = "uint8"  # uint8 | int8: onnxruntime's U8S8 kernels saturate on AVX2 without VNNI
    reduce_range: bool = False  # 7-bit weights
    symmetric_activations: bool = False
    op_types: tuple[str, ...] = ("MatMul",)  # what gets Q/DQ; elementwise ops stay float
    embedding_block_size: int = 128  # INT8 blocks of the embedding / LM head tensor
    # The LM head's MatMulNBits: 4 = int8 activations per block, MLAS's fast path; 0 dequantizes the
    # whole 8-bit head on every call (gemma-3-270m: ~1 s per token).
    head_accuracy_level: int = 4
    accuracy_aware: bool = True  # search which activation groups to keep in float
    target_ppl_increase: float = 0.02  # on the held-out calibration split
    target_same_top1: float = 0.90  # 0.95 is above what INT8 weights alone reach on gemma-3-270m
    max_float_groups: int = 8  # groups tried after the ranking
    min_kl_gain: float = 0.1  # keep a group float only if it cuts the held-out KL by this fraction
    judged_positions: int = 256  # held-out positions the LM head and KL are computed on
    smooth_alpha: float | None = 0.8  # SmoothQuant migration strength; None: off
    smooth_products: bool = True  # also migrate into products' factors (down_proj's input via up_proj)
    threads: int = 0

    def check(self) -> None:
        if self.method not in METHODS:
            raise KoedgeError(f"unknown calibration method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.embedding_block_size < 16 or self.embedding_block_size & (self.embedding_block_size - 1):
            raise KoedgeError(f"embedding block size must be a power of two >= 16, not {self.embedding_block_size}")
        if self.smooth_alpha is not None and not 0 < self.smooth_alpha < 1:
            raise KoedgeError(f"SmoothQuant alpha must be in (0, 1), not {self.smooth_alpha}")
        if not 0 < self.percentile <= 100:
            raise KoedgeError(f"percentile must be in (0, 100], not {self.percentile}")
        self.calibration.check()


# --- the graph without its LM head ---------------------------------------------------------------
@dataclass
class Head:
    """The LM head and the embedding it may share."""

    node: str
    hidden: str  # the LM head's input: the final norm's output
    logits: str
    weight: str  # initializer name
    transposed: bool  # weight is [vocab, hidden] (tied FusedMatMul transB=1) rather than [hidden, vocab]
    embedding: str | None  # the Gather's initializer ([vocab, hidden]); equal to weight when tied


def find_head(model: onnx.ModelProto, logits: str) -> Head:
    inits = {tensor.name: tensor for tensor in model.graph.initializer}
    node = next((n for n in model.graph.node if logits in n.output), None)
    if node is None or node.op_type not in ("MatMul", "FusedMatMul") or node.input[1] not in inits:
        raise KoedgeError(f"cannot find the LM head: '{logits}' is not made by a MatMul with a weight")
    trans_b = any(attr.name == "transB" and attr.i == 1 for attr in node.attribute)
    if any(attr.name == "transA" and attr.i for attr in node.attribute):
        raise KoedgeError("unsupported LM head: a MatMul with transA")
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2]
    embedding = gathers[0].input[0] if len(gathers) == 1 else None
    return Head(node.name, node.input[0], logits, node.input[1], trans_b, embedding)


@dataclass
class Work:
    """The calibration twin of the bundle: FP32 graph without the LM head, runnable by CausalLM."""

    folder: Path
    head: Head
    head_weight: np.ndarray | None  # an untied head's weight, memory-mapped
    smoothable: list[Smoothable]

    @property
    def model(self) -> Path:
        return self.folder / ONNX_FILE


def write_work_bundle(src: Path, work: Path, smooth: bool, progress, smooth_products: bool = True) -> Work:
    """The FP32 graph without the LM head, as a bundle CausalLM can run (its 'logits' = last hidden).

    With `smooth`, it also outputs the per-channel |max| of every activation SmoothQuant can migrate
    (norm outputs; with `smooth_products` also products such as down_proj's input).
    """
    manifest = read_manifest(src)
    model = onnx.load(str(src / manifest.onnx_file))
    head = find_head(model, manifest.io.logits)
    node = next(n for n in model.graph.node if n.name == head.node and head.logits in n.output)
    model.graph.node.remove(node)
    outputs = [o for o in model.graph.output if o.name != head.logits]
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(head.hidden, onnx.TensorProto.FLOAT, None), *outputs])
    head_weight = None
    if head.embedding != head.weight:  # untied: set the head's weight aside, calibration does not need it
        tensor = next(t for t in model.graph.initializer if t.name == head.weight)
        np.save(work / "head.npy", numpy_helper.to_array(tensor))
        model.graph.initializer.remove(tensor)
        head_weight = np.load(work / "head.npy", mmap_mode="r")
    smoothable = [item for item in find_smoothable(model) if item.axis == 0 or smooth_products] if smooth else []
    add_absmax_outputs(model, smoothable)
    _save(model, work / ONNX_FILE)
    del model
    manifest.io.logits = head.hidden
    (work / "koedge.json").write_text(manifest.to_json(), encoding="utf-8")
    shutil.copy(src / "tokenizer.json", work / "tokenizer.json")
    progress(f"graph without LM head written for calibration ({(work / DATA_FILE).stat().st_size / 1e6:,.0f} MB)")
    return Work(work, head, head_weight, smoothable)


# --- SmoothQuant-style scale migration ------------------------------------------------------------
@dataclass
class Smoothable:
    """An activation whose per-channel scale can move into weights exactly (SmoothQuant):
    X = Mul(a, source) where `source` is a norm's 1-D weight (axis 0) or the output of a MatMul
    whose weight columns can absorb it (axis 1, e.g. up_proj before down_proj); every reader of
    X is a MatMul whose weight rows absorb the inverse."""

    tensor: str
    source: str
    axis: int
    weights: list[str]
    channels: int


def find_smoothable(model: onnx.ModelProto) -> list[Smoothable]:
    graph = model.graph
    inits = {tensor.name: tensor for tensor in graph.initializer}
    uses: dict[str, int] = {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    producer = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            readers.setdefault(name, []).append(node)
        producer.update({name: node for name in node.output})
    found = []
    for tensor, nodes in readers.items():
        nodes = [n for n in nodes if n.op_type != "Shape"]
        made = producer.get(tensor)
        if not nodes or made is None or made.op_type != "Mul":
            continue
        if any(n.op_type != "MatMul" or n.input[0] != tensor or n.input[1] not in inits or uses[n.input[1]] != 1
               or len(inits[n.input[1]].dims) != 2 for n in nodes):
            continue
        channels = inits[nodes[0].input[1]].dims[0]
        for name in made.input:
            maker = producer.get(name)
            if name in inits and list(inits[name].dims) == [channels] and uses[name] == 1:
                found.append(Smoothable(tensor, name, 0, [n.input[1] for n in nodes], channels))
                break
            if (maker is not None and maker.op_type == "MatMul" and maker.input[1] in inits and uses[name] == 1
                    and uses[maker.input[1]] == 1 and inits[maker.input[1]].dims[-1] == channels):
                found.append(Smoothable(tensor, maker.input[1], 1, [n.input[1] for n in nodes], channels))
                break
    return found


def add_absmax_outputs(model: onnx.ModelProto, items: list[Smoothable]) -> None:
    graph = model.graph
    for index, item in enumerate(items):
        flat, absolute, out = f"koedge_flat_{index}", f"koedge_abs_{index}", f"koedge_absmax_{index}"
        graph.initializer.append(numpy_helper.from_array(np.array([-1, item.channels], np.int64), flat + "_shape"))
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), out + "_axes"))
        graph.node.extend([helper.make_node("Reshape", [item.tensor, flat + "_shape"], [flat], name=flat),
                           helper.make_node("Abs", [flat], [absolute], name=absolute),
                           helper.make_node("ReduceMax", [absolute, out + "_axes"], [out], name=out, keepdims=0)])
        graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [item.channels]))
    if items and next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 18:
        raise KoedgeError("SmoothQuant needs an opset >= 18 graph (ReduceMax with axes as input)")


def channel_absmax(runner: CausalLM, sequences: list[Sequence], count: int) -> list[np.ndarray]:
    """Per-channel |max| of each smoothable activation over the calibration prefills."""
    names = [f"koedge_absmax_{index}" for index in range(count)]
    maxima = None
    for sequence in sequences:
        ids = np.array([sequence.ids])
        outputs = runner.session.run(names, {**runner.feeds(ids, 0), **runner.empty_past()})
        maxima = outputs if maxima is None else [np.maximum(a, b) for a, b in zip(maxima, outputs)]
    return maxima or []


def smooth_work_model(work: Work, maxima: list[np.ndarray], alpha: float) -> dict:
    """Divide each activation channel by s = max|X|^alpha / max|W|^(1-alpha), multiply the weight
    rows by s (exact in float); drop the statistics outputs; save the work graph again."""
    model = onnx.load(str(work.model))
    graph = model.graph
    inits = {tensor.name: tensor for tensor in graph.initializer}
    spread_before, spread_after = [], []
    for item, activation in zip(work.smoothable, maxima):
        weights = [numpy_helper.to_array(inits[name]) for name in item.weights]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = np.power(np.maximum(activation, 1e-5), alpha) / np.power(np.maximum(weight_max, 1e-5), 1 - alpha)
        scale = np.clip(scale, 1e-3, 1e3).astype(np.float32)
        source = numpy_helper.to_array(inits[item.source])
        source = source / scale if item.axis == 0 else source / scale[None, :]
        inits[item.source].CopyFrom(numpy_helper.from_array(source.astype(np.float32), item.source))
        for name, weight in zip(item.weights, weights):
            inits[name].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), name))
        spread_before.append(float(activation.max() / max(np.median(activation), 1e-6)))
        smoothed = activation / scale
        spread_after.append(float(smoothed.max() / max(np.median(smoothed), 1e-6)))
    for node in [n for n in graph.node if n.name.startswith("koedge_")]:
        graph.node.remove(node)
    kept = [o for o in graph.output if not o.name.startswith("koedge_absmax_")]
    del graph.output[:]
    graph.output.extend(kept)
    for tensor in [t for t in graph.initializer if t.name.startswith("koedge_")]:
        graph.initializer.remove(tensor)
    _save(model, work.model)
    return {"alpha": alpha, "activations": len(work.smoothable),
            "max_over_median_before": round(float(np.median(spread_before)), 1) if spread_before else None,
            "max_over_median_after": round(float(np.median(spread_after)), 1) if spread_after else None}


# --- calibration ----------------------------------------------------------------------------------
class _OneFeed:
    """A reader over a single feed: onnxruntime's calibrators hold every output of one collect_data
    call in memory, so feeding them one input at a time bounds their memory to one run."""

    def __init__(self, feed: dict):
        self.feed = feed

    def get_next(self):
        feed, self.feed = self.feed, None
        return feed


def calibrate(model_path: Path, reader: KVCacheReader, config: Int8StaticConfig, progress):
    """Activation ranges of every tensor the quantizer will touch (inputs of config.op_types)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from tqdm import tqdm

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    options = {"symmetric": config.symmetric_activations}
    if config.method == "percentile":
        options["percentile"] = config.percentile
    augmented = model_path.with_name("augmented.onnx")
    calibrator = create_calibrator(model_path, list(config.op_types), augmented_model_path=str(augmented),
                                   calibrate_method=method, use_external_data_format=True, extra_options=options)
    calibrator.model = None  # the loaded graph (weights included) is not needed once augmented
    # onnxruntime's calibrator session disables every optimization; an optimized one computes the
    # same tensors (fusions keep tensors other nodes read) in about half the time.
    calibrator.infer_session = _session(augmented, config.threads)
    progress(f"calibrating ({config.method}) on {len(reader)} feeds: prefills and decode steps")
    for feed in tqdm(iter(reader.get_next, None), total=len(reader), desc="calibrate", unit="feed", leave=False):
        calibrator.collect_data(_OneFeed(feed))
    ranges = calibrator.compute_data()
    del calibrator
    for path in model_path.parent.glob("augmented.onnx*"):  # a full copy of the weights on disk
        path.unlink()
    return ranges


# --- QDQ ------------------------------------------------------------------------------------------
def quantize_qdq(model_path: Path, ranges, config: Int8StaticConfig) -> onnx.ModelProto:
    """onnxruntime's QDQ quantizer over config.op_types: per-channel INT8 weights, UINT8 activations.

    Only MatMuls with a weight are quantized: the attention products and the rotary MatMul have
    none, and their inputs (softmax probabilities in [0, 1], inverse frequencies down to 1e-6,
    positions) are exactly what a per-tensor UINT8 scale destroys.
    MatMul outputs get no Q/DQ: onnxruntime then fuses DQ->MatMul into MatMulIntegerToFloat,
    whose float output loses nothing before the float ops (norms, softmax, adds) that follow.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    model = load_model_with_shape_infer(model_path)
    inits = {tensor.name for tensor in model.graph.initializer}
    nodes = [node.name for node in model.graph.node if node.op_type in config.op_types and node.input[1] in inits]
    options = {"OpTypesToExcludeOutputQuantization": list(config.op_types),
               "ActivationSymmetric": config.symmetric_activations, "WeightSymmetric": True}
    weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[config.weight_type]
    quantizer = QDQQuantizer(model, config.per_channel, config.reduce_range, weight_type, QuantType.QUInt8, ranges,
                             nodes, [], list(config.op_types), options)
    return quantizer.quantize_model()


# --- embedding and LM head: one INT8 tensor ---------------------------------------------------------
def _block_size(hidden: int, wanted: int) -> int:
    size = wanted
    while size >= 16 and hidden % size:
        size //= 2
    if size < 16:
        raise KoedgeError(f"hidden size {hidden} has no power-of-two block >= 16 for INT8 embedding blocks")
    return size


def quantize_rows(matrix: np.ndarray, block_size: int, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 blocks along each row, stored as uint8 around 128 (the zero point both
    GatherBlockQuantized and MatMulNBits assume when none is given). Chunked: the full-size float
    temporaries of a 262k x 640 matrix would be 670 MB each."""
    rows, hidden = matrix.shape
    blocks = hidden // block_size
    packed = np.empty((rows, blocks, block_size), np.uint8)
    scales = np.empty((rows, blocks), np.float32)
    for start in range(0, rows, chunk):
        part = np.asarray(matrix[start:start + chunk], np.float32).reshape(-1, blocks, block_size)
        scale = np.abs(part).max(axis=2) / 127.0
        scale[scale == 0] = 1.0
        packed[start:start + chunk] = (np.clip(np.rint(part / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        scales[start:start + chunk] = scale
    return packed, scales


def _int8_tensor(model: onnx.ModelProto, name: str, matrix: np.ndarray, block_size: int) -> int:
    """Add `name` (uint8 [rows, blocks, block]) and `name`_scales ([rows, blocks]); returns the block size."""
    size = _block_size(matrix.shape[1], block_size)
    packed, scales = quantize_rows(matrix, size)
    model.graph.initializer.extend([numpy_helper.from_array(packed, name),
                                    numpy_helper.from_array(scales, name + "_scales")])
    return size


def _gather_int8(model: onnx.ModelProto, gather: onnx.NodeProto, name: str, size: int) -> None:
    """Gather(E, ids) -> Reshape(GatherBlockQuantized(E_int8, ids), [0, 0, -1])."""
    graph = model.graph
    scales = next(t for t in graph.initializer if t.name == name + "_scales")
    rows, blocks = scales.dims
    scales_3d = numpy_helper.from_array(numpy_helper.to_array(scales).reshape(rows, blocks, 1), name + "_gather_scales")
    shape = numpy_helper.from_array(np.array([0, 0, -1], np.int64), name + "_gather_shape")
    graph.initializer.extend([scales_3d, shape])
    blocks_out = gather.output[0] + "_blocks"
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(index, helper.make_node("Reshape", [blocks_out, shape.name], list(gather.output),
                                              name=gather.name + "_reshape"))
    graph.node.insert(index, helper.make_node(
        "GatherBlockQuantized", [name, gather.input[1], scales_3d.name], [blocks_out], name=gather.name,
        domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=size, bits=8))


def attach_int8_head(model: onnx.ModelProto, head: Head, head_weight: np.ndarray | None, block_size: int,
                     accuracy_level: int = 4) -> dict:
    """LM head -> MatMulNBits (8 bits) and embedding Gather -> GatherBlockQuantized (8 bits).

    A tied pair reads one uint8 tensor (only the small scales exist twice: the two ops want
    them in different ranks). The head's input gets no per-tensor Q/DQ: a single UINT8 scale before a
    262k-way softmax costs much; with accuracy_level 4 MatMulNBits quantizes it per block of K instead.
    """
    graph = model.graph
    inits = {tensor.name: tensor for tensor in graph.initializer}
    tied = head.embedding is not None and head.embedding == head.weight
    matrix = numpy_helper.to_array(inits[head.weight]) if tied else head_weight
    if not head.transposed:
        matrix = np.ascontiguousarray(np.asarray(matrix).T)  # MatMulNBits wants [N=vocab, K=hidden]
    vocab, hidden = matrix.shape
    name = head.weight + "_int8"
    size = _int8_tensor(model, name, matrix, block_size)
    del matrix
    graph.node.append(helper.make_node("MatMulNBits", [head.hidden, name, name + "_scales"], [head.logits],
                                       name=head.node or "lm_head", domain="com.microsoft", K=hidden, N=vocab,
                                       bits=8, block_size=size,
                                       **({"accuracy_level": accuracy_level} if accuracy_level else {})))
    if head.embedding is not None:
        gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == head.embedding)
        if not tied:
            name = head.embedding + "_int8"
            _int8_tensor(model, name, numpy_helper.to_array(inits[head.embedding]), block_size)
        _gather_int8(model, gather, name, size)
        graph.initializer.remove(inits[head.embedding])
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"lm_head": f"MatMulNBits 8-bit, accuracy_level {accuracy_level}",
            "embedding": "GatherBlockQuantized 8-bit" if head.embedding else "none found",
            "tied_embedding_shared": tied, "block_size": size}


# --- activation groups and the float switches -----------------------------------------------------
@dataclass
class Activation:
    """One activation Q/DQ pair: the float tensor, and where it sits."""

    tensor: str
    dequantized: str
    kind: str  # what reads it, e.g. "q_proj+k_proj+v_proj" or "down_proj"
    layer: int | None


def _short_kind(node_name: str) -> str:
    rest = re.split(r"layers\.\d+/", node_name)[-1].strip("/")
    parts = rest.split("/")
    if len(parts) >= 2 and parts[-1].startswith(("MatMul", "Gemm", "Conv")):
        return parts[-2]
    return rest


def activation_pairs(model: onnx.ModelProto) -> list[Activation]:
    inits = {tensor.name for tensor in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        dq = next(n for n in readers[node.output[0]] if n.op_type == "DequantizeLinear")
        consumers = [n for n in readers.get(dq.output[0], []) if n.op_type not in ("Shape", "Size")]
        kinds = list(dict.fromkeys(_short_kind(n.name) for n in consumers))
        layers = {int(m.group(1)) for n in consumers if (m := re.search(r"layers\.(\d+)/", n.name))}
        pairs.append(Activation(node.input[0], dq.output[0], "+".join(kinds), layers.pop() if len(layers) == 1 else None))
    return pairs


def keep_float(model: onnx.ModelProto, tensors: set[str]) -> None:
    """Remove the Q/DQ pairs of these activations: their readers take the float tensor again."""
    graph = model.graph
    drop, rename = [], {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in tensors:
            drop.append(node)
    quantized = {node.output[0]: node.input[0] for node in drop}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized:
            drop.append(node)
            rename[node.output[0]] = quantized[node.input[0]]
    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def switched_copy(model: onnx.ModelProto, pairs: list[Activation], head: Head) -> onnx.ModelProto:
    """A copy where graph input `koedge_float_i` (bool) routes activation i around its Q/DQ pair,
    so one session measures any mix of float and INT8 activations; `koedge_positions` picks the
    sequence positions the LM head runs on."""
    switched = onnx.ModelProto()
    switched.CopyFrom(model)
    graph = switched.graph
    graph.input.append(helper.make_tensor_value_info("koedge_positions", onnx.TensorProto.INT64, ["positions"]))
    picked = head.hidden + "_picked"
    head_node = next(node for node in graph.node if head.logits in node.output)
    head_node.input[0] = picked
    graph.node.insert(list(graph.node).index(head_node),
                      helper.make_node("Gather", [head.hidden, "koedge_positions"], [picked], axis=1))
    by_output = {pair.dequantized: index for index, pair in enumerate(pairs)}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        index = by_output.get(node.output[0]) if node.op_type == "DequantizeLinear" else None
        if index is not None:
            pair = pairs[index]
            graph.input.append(helper.make_tensor_value_info(f"koedge_float_{index}", onnx.TensorProto.BOOL, []))
            nodes.append(helper.make_node("Where", [f"koedge_float_{index}", pair.tensor, pair.dequantized],
                                          [pair.dequantized + "_mixed"], name=f"koedge_switch_{index}"))
    for node in nodes:
        if not node.name.startswith("koedge_switch_"):
            for position, name in enumerate(node.input):
                if name in by_output:
                    node.input[position] = name + "_mixed"
    del graph.node[:]
    graph.node.extend(nodes)
    return switched


# --- judging a mix on held-out text -----------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class Reference:
    """FP32 next-token log-probabilities at sampled held-out positions (float16, vocab-wide)."""

    sequences: list[list[int]]
    positions: list[np.ndarray]  # per sequence: positions whose next token is judged
    logprobs: list[np.ndarray]
    nll: list[float]  # per sequence, over its judged positions

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.positions)

    def first(self, count: int) -> "Reference":
        return Reference(self.sequences[:count], self.positions[:count], self.logprobs[:count], self.nll[:count])


def judged_positions(sequences: list[Sequence], budget: int) -> list[np.ndarray]:
    """About `budget` positions spread evenly over the sequences: the LM head and a 262k-way
    softmax per position dominate the cost of judging, the transformer body does not."""
    total = sum(len(s.ids) - 1 for s in sequences)
    out = []
    for sequence in sequences:
        last = len(sequence.ids) - 2
        count = max(1, round(budget * (last + 1) / total)) if budget < total else last + 1
        out.append(np.unique(np.linspace(0, last, count).round().astype(np.int64)))
    return out


def holdout_reference(src: Path, sequences: list[Sequence], budget: int, threads: int) -> Reference:
    model = CausalLM(src, SessionConfig(threads=threads))
    positions = judged_positions(sequences, budget)
    logprobs, nll = [], []
    for sequence, chosen in zip(sequences, positions):
        ids = sequence.ids
        scores = log_softmax(model.step(np.array([ids]), model.empty_past()).logits[0, chosen])
        nll.append(-float(scores[np.arange(len(chosen)), np.asarray(ids)[chosen + 1]].sum()))
        logprobs.append(scores.astype(np.float16))
    return Reference([s.ids for s in sequences], positions, logprobs, nll)


def compare(reference: Reference, logits: list[np.ndarray]) -> dict:
    """Perplexity increase, mean KL(FP32 || quantized) and same-top-1 over the judged positions."""
    nll, kl_sum, same = 0.0, 0.0, 0
    for ids, chosen, ref, out in zip(reference.sequences, reference.positions, reference.logprobs, logits):
        scores = log_softmax(out)
        ref32 = ref.astype(np.float32)
        nll -= float(scores[np.arange(len(chosen)), np.asarray(ids)[chosen + 1]].sum())
        kl_sum += float((np.exp(ref32) * (ref32 - scores)).sum())
        same += int((ref32.argmax(-1) == scores.argmax(-1)).sum())
    n = reference.tokens
    return {"ppl_increase": round(float(np.exp((nll - sum(reference.nll)) / n) - 1), 5),
            "kl_mean": round(kl_sum / n, 5), "same_top1": round(same / n, 4)}


def meets(result: dict, config: Int8StaticConfig) -> bool:
    return result["ppl_increase"] <= config.target_ppl_increase and result["same_top1"] >= config.target_same_top1


class _Feeds:
    """CausalLM's feed building without its session: the judge runs its own graph."""

    def __init__(self, manifest):
        self.manifest = manifest

    feeds = CausalLM.feeds
    keeps_last_logits = CausalLM.keeps_last_logits
    empty_past = CausalLM.empty_past
    kv_names = CausalLM.kv_names
    kv_dtype = CausalLM.kv_dtype
    num_layers = CausalLM.num_layers


class MixJudge:
    """Runs the switched graph on the held-out sequences for any set of activations kept in float."""

    def __init__(self, path: Path, pairs: list[Activation], reference: Reference, manifest, threads: int):
        self.session = _session(path, threads)
        self.pairs, self.reference, self.runner = pairs, reference, _Feeds(manifest)
        self.logits_name = manifest.io.logits
        self.runs = 0

    def __call__(self, floating: set[str], quick: bool = False) -> dict:
        """Held-out accuracy with these activations float; `quick` judges half the sequences
        (enough to rank groups, whose effects differ by far more than its noise)."""
        switches = {f"koedge_float_{i}": np.array(pair.tensor in floating) for i, pair in enumerate(self.pairs)}
        reference = self.reference.first(max(1, len(self.reference.sequences) // 2)) if quick else self.reference
        outputs = []
        for ids, chosen in zip(reference.sequences, reference.positions):
            feeds = {**self.runner.feeds(np.array([ids]), 0), **self.runner.empty_past(), **switches,
                     "koedge_positions": chosen}
            outputs.append(self.session.run([self.logits_name], feeds)[0][0])
        self.runs += 1
        return compare(reference, outputs)


def search_float(judge: MixJudge, pairs: list[Activation], config: Int8StaticConfig, progress) -> tuple[set[str], dict]:
    """Keep in float the activation groups whose float version helps most, until the target is met.

    Groups are one kind of MatMul input across layers, or one layer's inputs. Each group's
    sensitivity is the held-out KL when only it stays float (on half the held-out text); groups are
    then tried in that order on all of it, and kept float only when they cut the KL by min_kl_gain.
    """
    groups: dict[str, set[str]] = {}
    for pair in pairs:
        groups.setdefault(f"kind {pair.kind}", set()).add(pair.tensor)
        if pair.layer is not None:
            groups.setdefault(f"layer {pair.layer}", set()).add(pair.tensor)
    all_int8 = judge(set())
    progress(f"all activations INT8: held-out PPL {all_int8['ppl_increase']:+.1%}, KL {all_int8['kl_mean']:.3f}, "
             f"same top-1 {all_int8['same_top1']:.1%}")
    report = {"all_int8": all_int8, "sensitivity": {}, "steps": [], "met": meets(all_int8, config)}
    if report["met"]:
        return set(), report
    report["all_float"] = judge({pair.tensor for pair in pairs})
    ceiling = report["all_float"]
    progress(f"all activations float (weights INT8): held-out PPL {ceiling['ppl_increase']:+.1%}, "
             f"KL {ceiling['kl_mean']:.3f}, same top-1 {ceiling['same_top1']:.1%}"
             + ("" if meets(ceiling, config) else " (the target is out of reach: weights alone miss it)"))
    from tqdm import tqdm

    report["quick_all_int8"] = judge(set(), quick=True)  # the baseline the quick group scores compare to
    for name in tqdm(groups, desc="sensitivity", unit="group", leave=False):
        report["sensitivity"][name] = result = judge(groups[name], quick=True)
        progress(f"  {name} float alone: held-out KL {result['kl_mean']:.3f}, PPL {result['ppl_increase']:+.1%}")
    ranked = sorted(groups, key=lambda name: report["sensitivity"][name]["kl_mean"])
    floating: set[str] = set()
    current = all_int8
    for name in ranked:
        if len(report["steps"]) >= config.max_float_groups:
            break
        if groups[name] <= floating:
            continue
        result = judge(floating | groups[name])
        gain = (current["kl_mean"] - result["kl_mean"]) / max(current["kl_mean"], 1e-9)
        kept = gain >= config.min_kl_gain
        report["steps"].append({"float": name, **result, "kl_gain": round(gain, 3), "kept": kept})
        progress(f"{'+' if kept else '-'} {name} float: held-out PPL {result['ppl_increase']:+.1%}, "
                 f"KL {result['kl_mean']:.3f} ({-gain:+.0%}), same top-1 {result['same_top1']:.1%}"
                 + ("" if kept else ": too little gained, stays INT8"))
        if not kept:
            continue
        floating |= groups[name]
        current = result
        if meets(result, config):
            report["met"] = True
            break
    report["final"] = current
    return floating, report


# --- the pass -------------------------------------------------------------------------------------
def quantize_int8_static(src_folder: Path, dst_folder: Path, config: Int8StaticConfig,
                         progress: Callable[[str], None]) -> dict:
    """Write dst_folder/model.onnx (+ model.onnx.data): static INT8 QDQ of the FP32 bundle in src_folder.

    The caller copies the tokenizer and writes the manifest; the returned dict says what was kept
    in float and why, with the held-out accuracy of each step, calibration facts and timings.
    """
    config.check()
    src_folder, dst_folder = Path(src_folder), Path(dst_folder)
    manifest = read_manifest(src_folder)
    started, cpu_started, times = time.perf_counter(), time.process_time(), {}

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - started - sum(times.values()), 1)

    dst_folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".koedge-int8-", dir=dst_folder) as tmp:
        work = write_work_bundle(src_folder, Path(tmp), config.smooth_alpha is not None, progress,
                                 config.smooth_products)
        session_config = SessionConfig(threads=config.threads)
        runner = CausalLM(work.folder, session_config)
        calibration, holdout = build_sequences(runner, config.calibration)
        smoothing = {}
        if work.smoothable:
            progress(f"SmoothQuant (alpha {config.smooth_alpha}): migrating {len(work.smoothable)} activations' "
                     "channel scales into weights")
            maxima = channel_absmax(runner, calibration, len(work.smoothable))
            del runner
            smoothing = smooth_work_model(work, maxima, config.smooth_alpha)
            runner = CausalLM(work.folder, session_config)
        reader = KVCacheReader(runner, calibration)
        feeds = len(reader)
        lap("prepare")
        ranges = calibrate(work.model, reader, config, progress)
        del reader, runner
        lap("calibrate")
        model = quantize_qdq(work.model, ranges, config)
        head = work.head
        head_report = attach_int8_head(model, head, work.head_weight, config.embedding_block_size,
                                       config.head_accuracy_level)
        _restore_outputs(model, src_folder / manifest.onnx_file)
        pairs = activation_pairs(model)
        progress(f"QDQ graph: {len(pairs)} activation tensors, LM head and embedding INT8 weight-only")
        lap("quantize")
        floating, search = set(), {}
        if config.accuracy_aware and holdout:
            progress(f"measuring sensitivity on {len(holdout)} held-out sequences")
            reference = holdout_reference(src_folder, holdout, config.judged_positions, config.threads)
            switched = work.folder / "switched.onnx"
            _save(switched_copy(model, pairs, head), switched)
            judge = MixJudge(switched, pairs, reference, manifest, config.threads)
            floating, search = search_float(judge, pairs, config, progress)
            search["runs"] = judge.runs
            del judge, reference
        keep_float(model, floating)
        lap("search")
        _save(model, dst_folder / ONNX_FILE)
        lap("save")
    kept = sorted({f"{pair.kind} (layer {pair.layer})" for pair in pairs if pair.tensor in floating})
    return {
        "method": config.method, "calibration": {**asdict(config.calibration), "sequences": len(calibration),
                                                  "feeds": feeds, "holdout_sequences": len(holdout),
                                                  "tokens": sum(len(s.ids) for s in calibration)},
        "activations_int8": len(pairs) - len(floating), "activations_float": len(floating),
        "kept_float": kept, "kept_float_why": [step for step in search.get("steps", []) if step["kept"]],
        "heldout": search.get("final", search.get("all_int8")), "search": search, "head": head_report,
        "smooth_quant": smoothing,
        "seconds": times, "total_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),  # all threads; wall time depends on load
    }


def _session(path: Path, threads: int):
    """The runtime's low-memory session, without spin-waiting threads: the quantizer runs on
    shared build machines where spinning only steals cores from the work."""
    import onnxruntime as ort

    from runtime.session import session_options

    options = session_options(SessionConfig(threads=threads))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _restore_outputs(model: onnx.ModelProto, src_onnx: Path) -> None:
    original = onnx.load(str(src_onnx), load_external_data=False).graph.output
    del model.graph.output[:]
    model.graph.output.extend(original)


def _save(model: onnx.ModelProto, path: Path) -> None:
    data = path.with_name(path.name + ".data")
    if data.exists():  # onnx appends to an existing external data file
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)

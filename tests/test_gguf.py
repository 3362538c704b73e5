"""GGUF-exact export: every GGUF block type through its ONNX form equals gguf's own dequantization, a tiny
GGUF model's exact bundle matches its dequantized FP32 export, rows are found by value (permuted, pruned),
bad files and double quantization give one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from onnx import TensorProto, helper

from exporter.quantize.gguf import Edit, GgufConfig, RowIndex, planes
from exporter.quantize.gguf_blocks import SUPPORTED, decode, read_quantized
from exporter.quantize.int4 import GraphWriter
from runtime.errors import KoedgeError
from runtime.model import CausalLM

TYPES = list(SUPPORTED)
# byte offsets of the fp16 header fields (d, and dmin / m where the type has one), and a scale that keeps
# weights near 0.05 for the type's code range
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208]}
SCALE = {"Q4_0": 6e-3, "Q4_1": 4e-3, "Q5_0": 3e-3, "Q5_1": 2e-3, "Q8_0": 5e-4, "Q4_K": 1e-4, "Q5_K": 5e-5,
         "Q6_K": 3e-5}


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGUF bytes [rows, bytes per row]: random codes and packed scales, sane fp16 header fields."""
    per_block, size = SUPPORTED[qtype][:2]
    raw = rng.integers(0, 256, (rows * cols // per_block, size), dtype=np.uint8)
    for start in FP16_FIELDS[qtype]:
        values = (rng.normal(size=len(raw)) * SCALE[qtype]).astype(np.float16)
        raw[:, start:start + 2] = np.frombuffer(values.tobytes(), np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def run_graph(nodes, initializers, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    def info(name, array):
        kind = TensorProto.INT64 if array.dtype == np.int64 else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, kind, list(array.shape))

    graph = helper.make_graph(nodes, "g", [info(k, v) for k, v in inputs.items()],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], inputs)[0]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_each_type_through_onnx_equals_gguf_dequantization(qtype, accuracy_level):
    rng = np.random.default_rng(TYPES.index(qtype))
    rows, cols = 48, 512
    raw = random_blocks(qtype, rows, cols, rng)
    reference = dequantize(raw, getattr(GGMLQuantizationType, qtype))
    codes = decode(raw, getattr(GGMLQuantizationType, qtype))
    np.testing.assert_array_equal(codes.dequantize(), reference)

    writer = GraphWriter(onnx.ModelProto(), GgufConfig(gguf="x", accuracy_level=accuracy_level))
    edit = Edit(writer, accuracy_level)
    parts = planes(codes, accuracy_level)
    assert len(parts) == (2 if codes.bits == 8 and accuracy_level == 0 else 1)
    names = edit.add_planes("w", parts)
    mins = None if codes.mins is None else codes.mins
    nodes = edit.matmul("mm", "x", "y", parts, names, rows, None if mins is None else mins.T.copy(), codes.block)
    nodes += edit.gather("table", "ids", "e", parts, names, mins, codes.block)
    identity = np.eye(cols, dtype=np.float32)[None]  # X = I: the MatMul returns the weight itself
    ids = np.arange(rows, dtype=np.int64)[None]
    weight = run_graph([n for n in nodes if "table" not in n.name], writer.initializers, {"x": identity}, "y")[0]
    table = run_graph([n for n in nodes if "table" in n.name], writer.initializers, {"ids": ids}, "e")[0]
    scale = np.abs(reference).max()
    np.testing.assert_allclose(table, reference, rtol=0, atol=2e-7 * scale)  # float path: fp32 rounding
    if accuracy_level == 0:
        np.testing.assert_allclose(weight.T, reference, rtol=0, atol=2e-7 * scale)
    else:  # int8 activations: the identity's blocks quantize exactly, the weights' sums within int8 rounding
        assert np.abs(weight.T - reference).max() < 1e-2 * scale


def test_rows_are_found_by_value_permuted_and_pruned(tmp_path):
    """A pruned vocabulary keeps a subset of the table's rows, transformers permutes Llama's q/k rows."""
    rng = np.random.default_rng(1)
    raw = random_blocks("Q8_0", 64, 256, rng)
    other = random_blocks("Q4_K", 64, 256, rng)
    path = write_gguf(tmp_path / "t.gguf", {"token_embd.weight": ("Q8_0", raw), "blk.0.attn_q.weight": ("Q4_K", other)})
    index = RowIndex(path, progress=lambda message: None)
    rows = rng.permutation(64)[:40]
    for name, (qtype, data) in {"token_embd.weight": ("Q8_0", raw), "blk.0.attn_q.weight": ("Q4_K", other)}.items():
        values = dequantize(data, getattr(GGMLQuantizationType, qtype))[rows]
        found, codes = index.match(values)
        assert found == name and np.array_equal(codes.dequantize(), values)
    changed = dequantize(raw, GGMLQuantizationType.Q8_0)[:8].copy()
    changed[3, 5] += 1e-3
    assert index.match(changed) is None


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    writer = GGUFWriter(str(path), "llama")
    for name, (qtype, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=getattr(GGMLQuantizationType, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf_model(arch: str, folder: Path) -> tuple[Path, Path]:
    """A tiny random checkpoint whose 2-D weights are the dequantization of GGUF blocks of every type, and that
    GGUF file (tensors only). Llama's q rows are stored permuted in the GGUF, as llama.cpp does."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, len(tokenizer))
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    rng = np.random.default_rng(0)
    tensors, cycle = {}, 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2:
                if "norm" in name and arch == "gemma3_text":
                    param.normal_(0, 0.5)
                continue
            rows, cols = param.shape
            fitting = [t for t in TYPES if cols % SUPPORTED[t][0] == 0]
            qtype = fitting[cycle % len(fitting)]
            cycle += 1
            raw = random_blocks(qtype, rows, cols, rng)
            values = dequantize(raw, getattr(GGMLQuantizationType, qtype))
            stored = raw[::-1].copy() if "q_proj" in name else raw  # rows in another order in the file
            tensors[name] = (qtype, stored)
            param.copy_(torch.from_numpy(values))
    checkpoint = folder / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint, write_gguf(folder / "tiny.gguf", tensors)


@pytest.fixture(scope="module", params=["gemma3_text", "llama"])
def tiny_gguf(request, tmp_path_factory):
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    folder = tmp_path_factory.mktemp(f"gguf-{request.param}")
    checkpoint, gguf = tiny_gguf_model(request.param, folder)
    resolved = resolve_model(str(checkpoint))
    export_model(resolved, folder / "fp32", ExportConfig(dtype="fp32"), progress=lambda message: None)
    return folder / "fp32", gguf


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x.astype(np.float64) - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_tiny_gguf_model_exact_matches_its_dequantized_export(tiny_gguf, tmp_path, accuracy_level):
    from exporter.export.parity import compare_bundles
    from exporter.quantize.bundle import quantize_bundle

    fp32, gguf = tiny_gguf
    result = quantize_bundle(fp32, tmp_path / "exact", GgufConfig(gguf=str(gguf), accuracy_level=accuracy_level),
                             progress=lambda message: None, evaluate=False)
    results = result.report["results"]
    assert results["matmuls_float"] == [] and results["gguf_tensors_unused"] == [] and results["table_exact"]
    assert len(results["types"]) >= 6  # the tiny model's weights cycle through the block types
    model = onnx.load(str(tmp_path / "exact" / "model.onnx"), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "FusedMatMul" not in ops
    assert not any(t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) >= 64 and
                   t.dims[0] * t.dims[1] >= 256 * 64 and not t.name.startswith("gguf_block_sum")
                   and not t.name.endswith(("_scales", "_mins", "_row_mins")) for t in model.graph.initializer)
    parity = compare_bundles(fp32, tmp_path / "exact")
    if accuracy_level == 0:  # float activations: the same weights, only the summation order differs
        assert parity["same_greedy"] and parity["same_top1"] == 1.0
        assert parity["kl"] < 1e-6 and parity["max_abs_diff"] < 1e-3, parity
    else:  # int8 activations (a random model's near-ties may flip)
        assert parity["kl"] < 1e-3 and parity["same_top1"] > 0.9, parity
    size = sum(t.raw.nbytes for t in read_quantized(gguf))
    weights = results["weight_bytes_after"]
    assert weights < (1.1 if accuracy_level == 0 else 1.9) * size * 2  # 5-8-bit codes held in 8 bits


def test_a_gguf_exact_bundle_is_not_quantized_again(tiny_gguf, tmp_path):
    from exporter.build.engine import BuildState, run_quantize
    from exporter.export.sources import ResolvedModel
    from exporter.quantize.bundle import quantize_bundle
    from exporter.quantize.int4 import Int4Config
    from exporter.recipes import PassSpec

    fp32, gguf = tiny_gguf
    exact = quantize_bundle(fp32, tmp_path / "exact", GgufConfig(gguf=str(gguf)), progress=lambda message: None,
                            evaluate=False).folder
    with pytest.raises(KoedgeError, match="GGUF-exact"):
        quantize_bundle(exact, tmp_path / "again", Int4Config(algo="rtn"), progress=lambda message: None,
                        evaluate=False)
    state = BuildState(model=ResolvedModel("tiny", fp32, "local"), key="k", checkpoint=fp32, bundle=exact)
    results = run_quantize(state, PassSpec("quantize-int4", {"algo": "rtn"}), tmp_path / "q", lambda message: None)
    assert "GGUF-exact" in results["skipped"] and not (tmp_path / "q").exists()


def test_bad_gguf_files_give_one_clear_error(tmp_path, tiny_gguf):
    from exporter.export.sources import resolve_model
    from exporter.quantize.bundle import quantize_bundle

    _, gguf = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    for bad in (truncated, junk):
        with pytest.raises(KoedgeError, match="GGUF|gguf"):
            read_quantized(bad)
    with pytest.raises(KoedgeError, match="junk.gguf"):
        resolve_model(str(junk))
    with pytest.raises(KoedgeError, match="was the bundle exported from this GGUF"):
        other = write_gguf(tmp_path / "other.gguf", {"x": ("Q8_0", random_blocks("Q8_0", 4, 64,
                                                                                  np.random.default_rng(5)))})
        quantize_bundle(tiny_gguf[0], tmp_path / "q", GgufConfig(gguf=str(other)), progress=lambda message: None,
                        evaluate=False)
    assert not (tmp_path / "q").exists()


def test_export_dtype_gguf_needs_a_gguf_source(tiny_checkpoints, tmp_path):
    from exporter.export.convert import ExportConfig, export_model
    from exporter.export.sources import resolve_model

    with pytest.raises(KoedgeError, match="needs a GGUF source"):
        export_model(resolve_model(str(tiny_checkpoints["llama"])), tmp_path / "b", ExportConfig(dtype="gguf"),
                     progress=lambda message: None)
    assert not (tmp_path / "b").exists()


def test_manifest_records_the_pass(tiny_gguf, tmp_path):
    from exporter.quantize.bundle import quantize_bundle

    fp32, gguf = tiny_gguf
    folder = quantize_bundle(fp32, tmp_path / "exact", GgufConfig(gguf=str(gguf)), progress=lambda message: None,
                             evaluate=False).folder
    manifest = json.loads((folder / "koedge.json").read_text())
    names = [record["name"] for record in manifest["passes"]]
    assert names[-2:] == ["export", "gguf-exact"] and manifest["quantized_weights"]
    record = CausalLM(folder).manifest.passes[-1]
    assert record.results["tensors_exact"] > 0


def test_budget_counts_the_tied_gguf_table_twice(tiny_gguf, tmp_path):
    """The Gather reads the table from the file while the LM head reads onnxruntime's packed copy."""
    from exporter.quantize.bundle import quantize_bundle
    from runtime.bundle import read_manifest
    from runtime.memory import tied_quantized_embedding_bytes

    fp32, gguf = tiny_gguf
    folder = quantize_bundle(fp32, tmp_path / "exact", GgufConfig(gguf=str(gguf)), progress=lambda message: None,
                             evaluate=False).folder
    manifest = read_manifest(folder)
    results = manifest.passes[-1].results
    tied = results["tied_shared"]
    assert tied or manifest.model.architecture != "gemma3_text"  # gemma's table is tied: the case that matters
    assert tied_quantized_embedding_bytes(manifest) == (results["tied_table_bytes"] if tied else 0)
    if tied:
        info = manifest.model
        assert info.vocab_size * info.hidden_size / 2 <= results["tied_table_bytes"] <= info.vocab_size * info.hidden_size * 2


@pytest.mark.slow
def test_gemma_gguf_exact_matches_its_fp32_export(gemma_checkpoint, gemma_bundle, tmp_path):
    """gemma-3-270m's Q4_K_M: every quantized tensor carried over; with float activations the logits are the
    FP32 export's (KL <= 1e-3, greedy tokens identical), and the bundle is a third of the FP32 one."""
    from exporter.export.parity import compare_bundles
    from exporter.quantize.bundle import bundle_bytes, quantize_bundle

    assert gemma_checkpoint.gguf is not None
    config = GgufConfig(gguf=str(gemma_checkpoint.gguf), accuracy_level=0)
    result = quantize_bundle(gemma_bundle, tmp_path / "exact", config, progress=lambda message: None, evaluate=False)
    results = result.report["results"]
    assert results["types"] == {"Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9} and results["tied_shared"]
    assert results["matmuls_float"] == [] and results["gguf_tensors_unused"] == []
    parity = compare_bundles(gemma_bundle, result.folder)
    assert parity["kl"] <= 1e-3 and parity["same_greedy"] and parity["same_top1"] >= 0.99, parity
    assert bundle_bytes(result.folder) < 0.4 * bundle_bytes(gemma_bundle)


def test_a_recipe_on_a_gguf_source_exports_exact_and_does_not_requantize(tiny_gguf, tmp_path, monkeypatch):
    """export with the default dtype (auto) gives the GGUF-exact bundle and keeps the FP32 export as the
    reference; the recipe's quantize pass is skipped, with its reason in the results."""
    import exporter.build.engine as engine
    from exporter.export.sources import ResolvedModel
    from exporter.recipes import parse_recipe
    from runtime.bundle import read_manifest

    fp32, gguf = tiny_gguf
    checkpoint = fp32.parent / "checkpoint"
    monkeypatch.setenv("KOEDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine, "resolve_model", lambda name, progress=None: ResolvedModel(
        "tiny-gguf", checkpoint, "gguf", revision="sha256:test", gguf=gguf))
    recipe = parse_recipe('[[passes]]\npass = "export"\n\n[[passes]]\npass = "quantize-int4"\nalgo = "rtn"\n', "t")
    outcomes = engine.run_recipe("tiny-gguf", recipe, tmp_path / "out", progress=lambda message: None)
    export, quantize = outcomes
    assert "GGUF-exact" in quantize.results["skipped"]
    assert [record.name for record in read_manifest(tmp_path / "out").passes][-2:] == ["export", "gguf-exact"]
    reference = Path(export.results["reference"])
    assert read_manifest(reference).passes[-1].name == "export" and reference.name.endswith("-export-fp32")

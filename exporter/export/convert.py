"""The export pass: Hugging Face causal LM -> ONNX with KV cache (through Optimum) -> koedge bundle.

After Optimum writes the graph we store a tied embedding once, save weights as external data
(memory-mappable on the phone), run onnx.checker, load it in onnxruntime, and check logits
against torch for a prefill and decode steps — also past Gemma 3's sliding window.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from runtime.bundle import (KV_WINDOW_OFFSET, LOGITS_TO_KEEP, IOContract, Manifest, ModelInfo, PassRecord, SpecialTokens,
                            TensorSpec, staged_folder, write_manifest)
from runtime.chat import derive_chat_format
from runtime.generate import END_OF_TURN
from runtime.errors import KoedgeError
from exporter.export.architectures import TASK, check_exportable, register_koedge_architectures
from exporter.export.sources import ResolvedModel

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "token_map.json")
ATTENTION = ("fused", "unfused")
CHECKPOINT_PASSES = "koedge-passes.json"  # passes applied to the checkpoint before export (pruning)


DTYPES = ("auto", "gguf", "fp32", "fp16")


MIN_CONTEXT = 1024  # the parity check's long prompt goes past gemma 3's 512-token window


@dataclass
class ExportConfig:
    # auto: gguf for a GGUF source, else fp32. gguf: the FP32 export with every weight the GGUF quantized put
    # back in its own blocks (exporter/quantize/gguf.py); fp32 stays the float reference.
    dtype: str = "auto"
    opset: int | None = None  # None: Optimum's default for the architecture
    parity_decode_steps: int = 8
    parity_tolerance: float | None = None  # max |logit diff|; None: 1e-2 for fp32, 0.5 for fp16
    parity_long_prompt: bool = True  # a prompt past the sliding window, when the model has one
    share_tied_embedding: bool = True
    logits_to_keep_input: bool = True  # optional input: LM head on the last position only (generation)
    attention: str = "fused"  # fused: GroupQueryAttention, KV written in place | unfused: Optimum's graph
    kv_buffer_length: int | None = None  # fused: positions the runtime allocates the KV buffer for at once
    kv_dtype: str = "float32"  # fused only: float16 halves the KV cache (attention then runs in float16)
    gguf_accuracy_level: int = 4  # gguf: 4 int8 activations (fastest decode), 0 float activations (exact)
    # Positions the bundle supports (manifest max_positions; None: the model's own). The fused graph's rotary
    # tables hold every position: gemma-3-270m's 32,768 would add 67 MB on disk, 8,192 add 17 MB.
    max_context: int | None = 8192

    def tolerance(self) -> float:
        if self.parity_tolerance is not None:
            return self.parity_tolerance
        # a float16 KV cache moves gemma-3-270m's logits by up to 0.29 past its 512 window (FP32 bundles: 4e-4)
        return 1e-2 if self.dtype != "fp16" and self.kv_dtype == "float32" else 0.5

    def weights(self, resolved: ResolvedModel) -> str:
        """The dtype this export writes for `resolved`: auto picks gguf when the source is a GGUF."""
        if self.dtype not in DTYPES:
            raise KoedgeError(f"unknown dtype '{self.dtype}' ({', '.join(DTYPES)})")
        if self.dtype == "gguf" and resolved.gguf is None:
            raise KoedgeError(f"--dtype gguf needs a GGUF source; {resolved.name} is a {resolved.source} checkpoint")
        if self.dtype == "auto":
            return "gguf" if resolved.gguf is not None else "fp32"
        return self.dtype


@dataclass
class ExportResult:
    folder: Path
    seconds: float
    bundle_bytes: int
    parity: dict = field(default_factory=dict)


def load_torch_model(resolved: ResolvedModel, dtype: str = "fp32"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=resolved.trust_remote_code)
    except ValueError as err:
        raise KoedgeError(f"cannot read the config of {resolved.name}: {str(err).splitlines()[0]}") from err
    check_exportable(config.model_type)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    if getattr(config, "koedge_layer_shapes", None):  # structured pruning left layers of different sizes
        from exporter.prune.structured import load_pruned

        return load_pruned(resolved.path, config, torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype,
                                                 trust_remote_code=resolved.trust_remote_code)
    return model.eval()


def _tensor_specs(values) -> list[TensorSpec]:
    from onnx import helper

    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape = [dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim]
        specs.append(TensorSpec(value.name, dtype, shape))
    return specs


def _model_info(resolved: ResolvedModel, model, past_key: TensorSpec, max_context: int | None = None) -> ModelInfo:
    config = model.config
    heads = config.num_attention_heads
    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None)
    if layer_types and "sliding_attention" not in layer_types:
        sliding = None
    return ModelInfo(
        name=resolved.name, source=resolved.source, revision=resolved.revision,
        architecture=config.model_type, num_layers=config.num_hidden_layers,
        num_attention_heads=heads, num_kv_heads=int(past_key.shape[1]), head_dim=int(past_key.shape[3]),
        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        max_positions=min(getattr(config, "max_position_embeddings", 2048), max_context or 1 << 62),
        parameters=sum(p.numel() for p in model.parameters()),
        sliding_window=sliding, layer_types=list(layer_types) if layer_types and sliding else None,
        notes=list(resolved.notes),
    )


def checkpoint_passes(path: Path) -> list[PassRecord]:
    """Passes already applied to the checkpoint (pruning), so the bundle's history starts with them."""
    record = path / CHECKPOINT_PASSES
    return [PassRecord(**item) for item in json.loads(record.read_text())] if record.is_file() else []


def _special_tokens(model, tokenizer) -> SpecialTokens:
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    bos = getattr(generation, "bos_token_id", None) if generation else None
    bos = bos if bos is not None else tokenizer.bos_token_id
    add_bos = getattr(tokenizer, "add_bos_token", True)
    chat_format = None
    if isinstance(tokenizer.chat_template, str):
        found = derive_chat_format(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
        if found:  # with the ids a reply stops at, as `koedge run --chat` stops (runtime.generate.END_OF_TURN)
            vocab = tokenizer.get_vocab()
            chat_format = {**found.to_dict(), "end_of_turn_ids": sorted({vocab[t] for t in END_OF_TURN if t in vocab})}
    return SpecialTokens(bos_token_id=bos if add_bos is not False else None, eos_token_ids=eos_ids,
                         pad_token_id=tokenizer.pad_token_id, chat_template=bool(tokenizer.chat_template),
                         chat_format=chat_format)


def _optimum_export(model, workdir: Path, config: ExportConfig) -> Path:
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    register_koedge_architectures()
    with warnings.catch_warnings():  # tracing chatter that says nothing to a user
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index")
        with contextlib.ExitStack() as graph_rewrite:
            if config.attention == "fused":  # the unfused graph stays Optimum's own, for comparison
                from exporter.export.fused_attention import fused_attention
                from exporter.export.fused_ops import fused_activations

                graph_rewrite.enter_context(fused_attention(model, half_kv=config.kv_dtype == "float16",
                                                                 max_positions=config.max_context))
                graph_rewrite.enter_context(fused_activations(model))
            onnx_export_from_model(model, workdir, task=TASK, opset=config.opset, do_validation=False)
    path = workdir / ONNX_FILE
    if not path.is_file():
        raise KoedgeError(f"Optimum wrote no {ONNX_FILE} (found: {[p.name for p in workdir.iterdir()]})")
    return path


def _finish_graph(source: Path, folder: Path, config: ExportConfig, progress) -> dict:
    """Share the tied embedding, save with external data, and run onnx.checker."""
    import onnx

    from exporter.export.graph_edits import (add_logits_to_keep, fold_reshape_shapes, kv_in_float16, name_present_dims,
                                             rotary_table_bytes, share_tied_embedding)
    from exporter.export.kv_window import add_kv_window_offset

    model = onnx.load(str(source))
    name_present_dims(model)
    reshapes = fold_reshape_shapes(model) if config.attention == "fused" else 0
    if config.kv_dtype == "float16" and not kv_in_float16(model):
        raise KoedgeError("float16 KV cache: found no KV casts to move out of the graph")
    tied = share_tied_embedding(model) if config.share_tied_embedding else None
    if tied:
        progress(f"tied embedding shared with the LM head ({tied.bytes_saved / 1e6:.0f} MB saved)")
    last_only = config.logits_to_keep_input and add_logits_to_keep(model)
    windowed = add_kv_window_offset(model) if config.attention == "fused" else None
    tables = rotary_table_bytes(model)
    onnx.save_model(model, str(folder / ONNX_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    del model
    (folder / DATA_FILE).chmod(0o644)
    onnx.checker.check_model(str(folder / ONNX_FILE))
    return {"tied_embedding_shared": bool(tied), "tied_bytes_saved": tied.bytes_saved if tied else 0,
            "logits_to_keep_input": bool(last_only), "reshape_shapes_folded": reshapes,
            "rotary_table_bytes": tables, "kv_window_layers": windowed.layers if windowed else [],
            "kv_window": windowed.window if windowed else None}


def export_model(resolved: ResolvedModel, out: str | Path, config: ExportConfig | None = None,
                 overwrite: bool = False, progress: Callable[[str], None] = print,
                 reference: Path | None = None) -> ExportResult:
    """Export `resolved` into a new bundle at `out` (atomically).

    A GGUF-exact export (dtype gguf, or auto for a GGUF source) writes the FP32 export first, to `reference`
    when given (kept: the float reference for evaluation), else to a temporary folder beside `out`.
    """
    config = config or ExportConfig()
    dtype = config.weights(resolved)
    if config.max_context is not None and config.max_context < MIN_CONTEXT:
        raise KoedgeError(f"--max-context {config.max_context} is below {MIN_CONTEXT} positions")
    if dtype == "gguf":
        return _export_gguf(resolved, Path(out), config, overwrite, progress, reference)
    return _export_float(resolved, out, replace(config, dtype=dtype), overwrite, progress)


def _export_gguf(resolved: ResolvedModel, out: Path, config: ExportConfig, overwrite: bool,
                 progress: Callable[[str], None], reference: Path | None) -> ExportResult:
    from exporter.export.parity import compare_bundles
    from exporter.quantize.bundle import quantize_bundle
    from exporter.quantize.gguf import GgufConfig

    if out.exists() and not overwrite:
        raise KoedgeError(f"{out} already exists (use --overwrite to replace it)")
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-fp32-", dir=out.parent) as tmp:
        float_out = reference or Path(tmp) / "fp32"
        float_result = _export_float(resolved, float_out, replace(config, dtype="fp32"), True, progress)
        progress(f"carrying the quantized tensors of {resolved.gguf.name} into the graph")
        gguf = GgufConfig(gguf=str(resolved.gguf), accuracy_level=config.gguf_accuracy_level)
        quantize_bundle(float_out, out, gguf, overwrite=overwrite, progress=progress, evaluate=False)
        parity = {**float_result.parity, "gguf_vs_fp32": compare_bundles(float_out, out)}
    bundle_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportResult(out, time.perf_counter() - started, bundle_bytes, parity)


def _export_float(resolved: ResolvedModel, out: str | Path, config: ExportConfig, overwrite: bool,
                  progress: Callable[[str], None]) -> ExportResult:
    import onnx
    from transformers import AutoTokenizer

    from exporter.export.parity import check_parity
    from runtime.model import CausalLM

    if config.attention not in ATTENTION:
        raise KoedgeError(f"unknown attention '{config.attention}' ({' or '.join(ATTENTION)})")
    if config.kv_dtype not in ("float32", "float16") or (config.kv_dtype == "float16" and config.attention != "fused"):
        raise KoedgeError(f"KV dtype '{config.kv_dtype}' is not supported (float32, or float16 with fused attention)")
    started = time.perf_counter()
    with staged_folder(out, overwrite=overwrite) as folder:
        progress(f"loading {resolved.name} ({config.dtype})")
        model = load_torch_model(resolved, config.dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=resolved.trust_remote_code)
        progress(f"exporting {model.config.model_type} to ONNX with Optimum ({TASK})")
        with tempfile.TemporaryDirectory(prefix="koedge-optimum-", dir=folder.parent) as workdir:
            graph_results = _finish_graph(_optimum_export(model, Path(workdir), config), folder, config, progress)
        tokenizer.save_pretrained(folder)
        for name in CHECKPOINT_FILES:
            if (resolved.path / name).is_file():
                shutil.copy(resolved.path / name, folder / name)
        graph = onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph
        io = IOContract(inputs=_tensor_specs(graph.input), outputs=_tensor_specs(graph.output))
        io.uses_position_ids = "position_ids" in io.input_names()
        io.logits_to_keep = LOGITS_TO_KEEP if LOGITS_TO_KEEP in io.input_names() else None
        past_key = next(spec for spec in io.inputs if spec.name == io.past_key.format(layer=0))
        io.kv_dtype = past_key.dtype
        io.kv_shared_buffer = config.attention == "fused"  # GQA appends into the past buffer
        io.kv_buffer_length = config.kv_buffer_length if io.kv_shared_buffer else None
        if graph_results["kv_window_layers"]:
            io.kv_window_offset, io.kv_window_layers = KV_WINDOW_OFFSET, graph_results["kv_window_layers"]
            io.kv_window = graph_results["kv_window"]
        manifest = Manifest(model=_model_info(resolved, model, past_key, config.max_context), tokens=_special_tokens(model, tokenizer),
                            io=io, onnx_file=ONNX_FILE, passes=checkpoint_passes(resolved.path))
        write_manifest(folder, manifest)
        progress("checking logits against torch (prefill + decode with KV cache)")
        runner = CausalLM(folder)
        parity = check_parity(model, runner, config)
        del runner
        failed = [case for case in parity["cases"] if case["max_abs_diff"] > config.tolerance()]
        if failed:
            worst = max(failed, key=lambda case: case["max_abs_diff"])
            raise KoedgeError(f"parity check failed: {worst['name']} max |logit diff| "
                              f"{worst['max_abs_diff']:.3g} > {config.tolerance():g}")
        seconds = time.perf_counter() - started
        manifest.passes.append(PassRecord("export", asdict(config), round(seconds, 1),
                                          {**graph_results, "parity": parity}))
        write_manifest(folder, manifest)
        bundle_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return ExportResult(Path(out), seconds, bundle_bytes, parity)


def describe_export(result: ExportResult) -> str:
    lines = [f"bundle {result.folder}  {result.bundle_bytes / 1e6:,.0f} MB  in {result.seconds:.0f} s"]
    for case in result.parity["cases"]:
        lines.append(f"  parity {case['name']:<32} tokens {case['tokens']:>4}  max |diff| {case['max_abs_diff']:.2e}"
                     f"  same argmax {case['same_argmax']}")
    if gguf := result.parity.get("gguf_vs_fp32"):
        lines.append(f"  GGUF-exact vs its FP32 export: max |log-prob diff| {gguf['max_abs_diff']:.2e}, KL {gguf['kl']:.2e}, "
                     f"greedy tokens identical {gguf['same_greedy']}")
    return "\n".join(lines)


def read_checkpoint_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())

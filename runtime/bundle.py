"""The bundle: one folder a phone app loads, described by `koedge.json`.

The manifest is the contract between the exporter and every runner: model shape, special tokens,
the exact ONNX I/O names and KV layout, the passes applied, and each file's size and sha256.
Runners read it and never guess from file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from runtime.errors import KoedgeError

MANIFEST = "koedge.json"
FORMAT = "koedge-bundle"
FORMAT_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: int64, float32, float16
    shape: list[str | int]


LOGITS_TO_KEEP = "logits_to_keep"  # the exporter's optional input (exporter/export/graph_edits.py)
KV_WINDOW_OFFSET = "kv_window_offset"  # the exporter's input for sliding-window views (exporter/export/kv_window.py)


@dataclass
class IOContract:
    """How to drive the graph: inputs, outputs, and how the KV cache is named and laid out."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"
    kv_layout: str = "batch, kv_heads, sequence, head_dim"
    kv_dtype: str = "float32"
    logits: str = "logits"
    uses_position_ids: bool = False
    logits_to_keep: str | None = None  # optional int64 [1] input: 1 = LM head on the last position only
    # past and present may be one preallocated buffer (GroupQueryAttention graphs): see runtime/kvcache.py
    kv_shared_buffer: bool = False
    # positions to allocate that buffer for at the first step (the context a recipe sets); None: what the
    # first call needs (at least 256), doubling when a run outgrows it; never more than max_positions
    kv_buffer_length: int | None = None
    # int64 [1] input: where the sliding-window layers' KV views start (0: the whole buffer). The layers it
    # applies to and their window (GQA local_window_size); runtime/kvcache.py binds those views.
    kv_window_offset: str | None = None
    kv_window_layers: list[int] | None = None
    kv_window: int | None = None

    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]


@dataclass
class ModelInfo:
    name: str
    source: str
    revision: str | None
    architecture: str  # transformers model_type, e.g. gemma3_text
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    parameters: int
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class SpecialTokens:
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    chat_template: bool = False
    # the template's turns as plain text (runtime/chat.py ChatFormat) plus "end_of_turn_ids", for runners
    # without Jinja (the phone app); None when the bundle has no template or its turns are not fixed text
    chat_format: dict | None = None


@dataclass
class PassRecord:
    name: str
    config: dict[str, Any]
    seconds: float
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class FileRecord:
    bytes: int
    sha256: str


@dataclass
class Manifest:
    model: ModelInfo
    tokens: SpecialTokens
    io: IOContract
    onnx_file: str
    passes: list[PassRecord] = field(default_factory=list)
    files: dict[str, FileRecord] = field(default_factory=dict)
    # Weights stored quantized (MatMulNBits, QDQ...): the runtime pre-packs those, which costs memory
    # for float weights but makes quantized kernels fast (docs/memory.md).
    quantized_weights: bool = False
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        io = dict(data["io"])
        io["inputs"] = [TensorSpec(**spec) for spec in io["inputs"]]
        io["outputs"] = [TensorSpec(**spec) for spec in io["outputs"]]
        return cls(
            model=ModelInfo(**data["model"]),
            tokens=SpecialTokens(**data["tokens"]),
            io=IOContract(**io),
            onnx_file=data["onnx_file"],
            passes=[PassRecord(**record) for record in data.get("passes", [])],
            files={name: FileRecord(**record) for name, record in data.get("files", {}).items()},
            quantized_weights=data.get("quantized_weights", False),
            format=data.get("format", FORMAT),
            format_version=data.get("format_version", FORMAT_VERSION),
        )

    def weight_bytes(self) -> int:
        """Bytes of the ONNX files (graph + external data): what must be resident to run."""
        return sum(record.bytes for name, record in self.files.items()
                   if name.endswith((".onnx", ".onnx.data", ".onnx_data", ".data")))

    @property
    def is_shape_twin(self) -> bool:
        return any("shape twin" in note for note in self.model.notes)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> Manifest:
    """The bundle's manifest, or one clear error if the folder is not a koedge bundle."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise KoedgeError(f"{folder} is not a folder")
    if not path.is_file():
        raise KoedgeError(f"{folder} is not a koedge bundle (no {MANIFEST})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise KoedgeError(f"{path} is not a koedge manifest (format={data.get('format')!r})")
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise KoedgeError(f"{path} is corrupt: {err}") from err
    if not (Path(folder) / manifest.onnx_file).is_file():
        raise KoedgeError(f"bundle {folder} lacks its model file {manifest.onnx_file}")
    return manifest


def record_files(folder: Path, manifest: Manifest) -> None:
    """Fill the manifest's file table (size, sha256) from what is in the folder."""
    manifest.files = {
        str(path.relative_to(folder)): FileRecord(path.stat().st_size, sha256_of(path))
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST
    }


def write_manifest(folder: Path, manifest: Manifest) -> None:
    record_files(folder, manifest)
    (folder / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")


def verify_files(folder: str | Path, manifest: Manifest) -> list[str]:
    """Names of files whose size or hash differs from the manifest (empty when the bundle is intact)."""
    bad = []
    for name, record in manifest.files.items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != record.bytes or sha256_of(path) != record.sha256:
            bad.append(name)
    return bad


@contextlib.contextmanager
def staged_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    An interrupted or failed write leaves no half bundle; an existing `out` is refused unless
    `overwrite`, and replaced only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise KoedgeError(f"{out} exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        tmp.chmod(0o755)
    except OSError as err:
        raise KoedgeError(f"cannot write to {parent}: {err.strerror}") from err
    try:
        yield tmp
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as err:
        if err.errno == 28:
            raise KoedgeError(f"disk full while writing {out}; nothing was written") from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_token_map(folder: str | Path, manifest: Manifest) -> list[int] | None:
    """New id -> original id of a vocabulary-pruned bundle, or None when the vocabulary is the original.

    `koedge prune` writes the map as a JSON file named in the prune pass's results
    (`passes[name == "prune"].results["vocab"]["token_map"]`, normally `token_map.json`).
    """
    for record in manifest.passes:
        name = (record.results.get("vocab") or {}).get("token_map") if record.name == "prune" else None
        if name:
            path = Path(folder) / name
            if not path.is_file():
                raise KoedgeError(f"bundle {folder} lacks its token map {name}")
            data = json.loads(path.read_text(encoding="utf-8"))
            return [int(i) for i in data["new_to_original"]]
    return None

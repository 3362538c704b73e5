"""`koedge validate`: load -> prefill -> decode in a child process under an enforced memory cap.

The cap is enforced, not observed: the child runs in its own memory cgroup with the cap as its hard
limit when this machine lets us create one (cgroup v1 `memory.limit_in_bytes`, or cgroup v2
`memory.max`), else under an address-space limit (RLIMIT_AS, cap + measured headroom) plus a
watchdog that kills it as soon as its resident set passes the cap. Either way the parent also
polls the child's VmRSS/VmHWM and kills it above the cap. Why this order: docs/memory.md.

The child is this module run as `python -m runtime.validate child ...`; it prints one JSON line per
stage so a killed child still tells how far it got.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.bundle import read_manifest
from runtime.errors import KoedgeError
from runtime.memory import MIB, Budget, predict_budget, proc_status

# RLIMIT_AS counts address space, not resident memory: the mapped weight file, 8 MiB stacks and
# 64 MiB glibc malloc arenas per thread are reserved but mostly never touched. Measured on gemma-3-270m
# FP32 with 2 threads (docs/memory.md): VmPeak - VmHWM = about 0.7 GiB; 1.5 GiB leaves margin for
# more threads. The watchdog, not this limit, is what holds the resident set to the cap.
RLIMIT_HEADROOM = 1536 * MIB
POLL_SECONDS = 0.02
KOREAN_TEXT = (
    "대한민국은 동아시아의 한반도 남부에 있는 민주공화국이다. 수도는 서울이며, 한강이 도시를 가로지른다. "
    "훈민정음은 1443년 세종대왕이 창제하였고 오늘날 한글로 불린다. 한국어는 교착어로서 조사와 어미가 발달하였다. "
    "휴대폰에서 돌아가는 작은 언어 모델은 메모리와 배터리를 아껴야 하므로, 가중치를 줄이고 캐시를 아껴 쓴다. "
)


@dataclass
class ValidateConfig:
    mem_cap: int
    prompt_tokens: int = 512
    new_tokens: int = 256
    threads: int = 0
    timeout: float = 900.0
    mechanism: str = "auto"  # auto | cgroup | rlimit
    prefill_chunk: int | str | None = "auto"  # see runtime.memory.prefill_chunk_for
    watchdog: bool = True  # off only to show that the kernel limit alone holds (tests)


@dataclass
class ValidateReport:
    bundle: str
    cap_bytes: int
    mechanism: str
    passed: bool
    verdict: str  # one line: why it passed or failed
    budget: dict
    peak_rss_bytes: int | None = None  # VmHWM of the child (weights mapped from disk included)
    base_rss_bytes: int | None = None  # the child before loading: Python, numpy, onnxruntime, tokenizers
    cgroup_peak_bytes: int | None = None  # the cgroup's own peak (page cache included)
    load_seconds: float | None = None
    ttft_seconds: float | None = None
    decode_tokens_per_second: float | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    stages: list[dict] = field(default_factory=list)
    exit_code: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)


# --- enforcement -------------------------------------------------------------------------------

@dataclass
class Enforcer:
    """How the cap is held: a cgroup folder we created (and remove), or an rlimit for the child."""

    kind: str  # cgroup-v1 | cgroup-v2 | rlimit
    cap: int
    path: Path | None = None

    def child_args(self) -> list[str]:
        if self.path is not None:
            return ["--cgroup", str(self.path)]
        return ["--rlimit-as", str(self.cap + RLIMIT_HEADROOM)]

    def describe(self) -> str:
        if self.kind == "cgroup-v1":
            return f"cgroup v1 memory.limit_in_bytes ({self.path})"
        if self.kind == "cgroup-v2":
            return f"cgroup v2 memory.max ({self.path})"
        return f"RLIMIT_AS cap+{RLIMIT_HEADROOM // MIB} MiB + VmRSS watchdog"

    def stats(self) -> dict[str, int]:
        """The cgroup's peak usage, limit hits and OOM kills (empty for rlimit)."""
        if self.path is None:
            return {}
        files = {"cgroup-v1": {"peak": "memory.max_usage_in_bytes", "failcnt": "memory.failcnt"},
                 "cgroup-v2": {"peak": "memory.peak"}}[self.kind]
        stats = {key: int(_read(self.path / name) or 0) for key, name in files.items() if _read(self.path / name)}
        events = _read(self.path / ("memory.oom_control" if self.kind == "cgroup-v1" else "memory.events")) or ""
        for line in events.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                stats["oom_kill"] = int(value)
        return stats

    def cleanup(self) -> None:
        if self.path is not None:
            for _ in range(50):  # the dead child leaves the cgroup a moment after it is reaped
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.05)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs() -> list[tuple[str, Path]]:
    """(kind, folder) of this process's memory cgroups, v1 first, from /proc/self/cgroup and mountinfo."""
    mounts: dict[str, Path] = {}
    for line in (_read(Path("/proc/self/mountinfo")) or "").splitlines():
        left, _, right = line.partition(" - ")
        fields, kinds = left.split(), right.split()
        if len(kinds) >= 3 and fields[3] == "/":
            if kinds[0] == "cgroup" and "memory" in kinds[2].split(","):
                mounts["v1"] = Path(fields[4])
            elif kinds[0] == "cgroup2":
                mounts["v2"] = Path(fields[4])
    found = []
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and "v1" in mounts:
            found.append(("cgroup-v1", mounts["v1"] / path.lstrip("/")))
        elif number == "0" and "v2" in mounts:
            found.append(("cgroup-v2", mounts["v2"] / path.lstrip("/")))
    return sorted(found, key=lambda item: item[0])


def _make_cgroup(kind: str, parent: Path, cap: int) -> Path | None:
    """A child cgroup of ours with the cap as hard limit and no swap; None if we may not."""
    if kind == "cgroup-v2" and "memory" not in (_read(parent / "cgroup.subtree_control") or "").split():
        return None  # the memory controller is not delegated to our children
    path = parent / f"koedge-validate-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    try:
        path.mkdir()
    except OSError:
        return None
    try:
        if kind == "cgroup-v1":
            (path / "memory.limit_in_bytes").write_text(str(cap))
            if (path / "memory.memsw.limit_in_bytes").exists():
                (path / "memory.memsw.limit_in_bytes").write_text(str(cap))
            if int(_read(path / "memory.limit_in_bytes") or 0) > cap:
                raise OSError("limit not taken")
        else:
            (path / "memory.max").write_text(str(cap))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
    except OSError:
        try:
            path.rmdir()
        except OSError:
            pass
        return None
    return path


def choose_enforcer(cap: int, mechanism: str = "auto") -> Enforcer:
    if mechanism not in ("auto", "cgroup", "rlimit"):
        raise KoedgeError(f"unknown cap mechanism '{mechanism}' (auto, cgroup, rlimit)")
    if mechanism in ("auto", "cgroup"):
        for kind, parent in _own_cgroup_dirs():
            if path := _make_cgroup(kind, parent, cap):
                return Enforcer(kind, cap, path)
        if mechanism == "cgroup":
            raise KoedgeError("no writable memory cgroup here (need cgroup v1 memory or a delegated cgroup v2); "
                              "use --mechanism rlimit")
    return Enforcer("rlimit", cap)


# --- parent ------------------------------------------------------------------------------------

def validate(folder: str | Path, config: ValidateConfig) -> ValidateReport:
    """Run the bundle under the cap in a child; the report says PASS or FAIL and why."""
    manifest = read_manifest(folder)
    if config.prompt_tokens < 1 or config.new_tokens < 1:
        raise KoedgeError("--prompt-tokens and --new-tokens must be at least 1")
    if config.prompt_tokens + config.new_tokens > manifest.model.max_positions:
        raise KoedgeError(f"{config.prompt_tokens} + {config.new_tokens} tokens exceed the model's context of "
                          f"{manifest.model.max_positions}")
    budget = predict_budget(manifest, config.prompt_tokens, config.new_tokens, config.prefill_chunk)
    if config.mem_cap < budget.weights:
        raise KoedgeError(f"the cap {config.mem_cap / MIB:,.0f} MiB is below the model's weights "
                          f"({budget.weights / MIB:,.0f} MiB): it cannot run under it")
    enforcer = choose_enforcer(config.mem_cap, config.mechanism)
    report = ValidateReport(bundle=str(folder), cap_bytes=config.mem_cap, mechanism=enforcer.describe(),
                            passed=False, verdict="", budget=_budget_dict(budget),
                            prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens)
    try:
        _run_child(folder, config, enforcer, report)
    finally:
        enforcer.cleanup()
    return report


def _budget_dict(budget: Budget) -> dict:
    return {"weights": budget.weights, "kv_cache": budget.kv_cache, "activations": budget.activations,
            "prepacked": budget.prepacked, "runtime": budget.runtime, "total": budget.total}


def _run_child(folder: str | Path, config: ValidateConfig, enforcer: Enforcer, report: ValidateReport) -> None:
    command = [sys.executable, "-m", "runtime.validate", "child", str(folder),
               "--prompt-tokens", str(config.prompt_tokens), "--new-tokens", str(config.new_tokens),
               "--threads", str(config.threads), *enforcer.child_args()]
    command += ["--prefill-chunk", str(config.prefill_chunk or 0)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=_collect, args=(child.stdout, lines), daemon=True),
               threading.Thread(target=_collect, args=(child.stderr, errors), daemon=True)]
    for reader in readers:
        reader.start()
    killed_for, watched_peak, rusage_peak = None, 0, None
    try:
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                rusage_peak = usage.ru_maxrss * 1024
                break
            reading = proc_status(child.pid)
            watched_peak = max(watched_peak, reading.get("VmHWM", 0))
            if killed_for is None and config.watchdog and reading.get("VmRSS", 0) > config.mem_cap:
                killed_for = f"resident memory {reading['VmRSS'] / MIB:,.0f} MiB passed the cap (watchdog)"
                child.send_signal(signal.SIGKILL)
            elif killed_for is None and time.monotonic() - started > config.timeout:
                killed_for = f"no result after {config.timeout:.0f} s (killed)"
                child.send_signal(signal.SIGKILL)
            time.sleep(POLL_SECONDS)
    finally:
        if child.returncode is None:  # interrupted: never leave the child running
            child.kill()
            child.wait()
    for reader in readers:
        reader.join(timeout=5)
    _fill_report(report, config, enforcer, lines, errors, child.returncode, killed_for, watched_peak, rusage_peak)


def _collect(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))


def _fill_report(report: ValidateReport, config: ValidateConfig, enforcer: Enforcer, lines: list[str],
                 errors: list[str], code: int, killed_for: str | None, watched_peak: int,
                 rusage_peak: int | None) -> None:
    stages = []
    for line in lines:
        try:
            stages.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    report.stages, report.exit_code = stages, code
    by_stage = {stage["stage"]: stage for stage in stages}
    done = by_stage.get("done")
    report.load_seconds = by_stage.get("loaded", {}).get("load_seconds")
    report.base_rss_bytes = by_stage.get("start", {}).get("vm_rss")
    report.ttft_seconds = (done or by_stage.get("first_token", {})).get("ttft_seconds")
    report.decode_tokens_per_second = done.get("decode_tokens_per_second") if done else None
    # The child's own VmHWM when it finished; else the highest one the watchdog saw.
    report.peak_rss_bytes = done["vm_hwm"] if done else (watched_peak or rusage_peak)
    stats = enforcer.stats()
    report.cgroup_peak_bytes = stats.get("peak")
    cap = config.mem_cap
    last = stages[-1]["stage"] if stages else "start"
    if killed_for:
        report.verdict = f"FAIL: {killed_for} during {_stage_after(last)}"
    elif stats.get("oom_kill") or (code == -signal.SIGKILL and enforcer.path is not None):
        report.verdict = (f"FAIL: killed by the kernel at the {cap / MIB:,.0f} MiB cgroup limit "
                          f"during {_stage_after(last)}")
    elif code != 0 or not done:
        detail = next((line for line in reversed(errors) if line.strip()), f"exit code {code}")
        if enforcer.kind == "rlimit" and ("alloc" in detail.lower() or "memory" in detail.lower()):
            detail = f"allocation refused under the address-space limit ({detail[:200]})"
        report.verdict = f"FAIL: the child failed during {_stage_after(last)}: {detail[:300]}"
    elif report.peak_rss_bytes and report.peak_rss_bytes > cap:
        report.verdict = f"FAIL: peak resident memory {report.peak_rss_bytes / MIB:,.0f} MiB is over the cap"
    else:
        report.passed = True
        share = 100 * (report.peak_rss_bytes or 0) / cap
        report.verdict = (f"PASS: peak {report.peak_rss_bytes / MIB:,.0f} MiB is {share:.0f}% "
                          f"of the {cap / MIB:,.0f} MiB cap")
        if stats.get("failcnt"):
            report.verdict += f" (the cgroup reached its limit {stats['failcnt']} times; page cache was reclaimed)"


def _stage_after(last: str) -> str:
    return {"start": "loading", "loaded": "prefill", "first_token": "decoding", "done": "shutdown"}.get(last, last)


def describe(report: ValidateReport) -> str:
    budget = report.budget

    def mib(value) -> str:
        return "-" if value is None else f"{value / MIB:,.0f} MiB"

    def sec(value, unit="s") -> str:
        return "-" if value is None else (f"{value * 1000:,.0f} ms" if unit == "ms" else f"{value:.2f} s")

    speed = "-" if report.decode_tokens_per_second is None else f"{report.decode_tokens_per_second:.1f} tok/s"
    rows = [
        f"koedge validate {report.bundle}",
        f"  cap          {mib(report.cap_bytes)} via {report.mechanism}",
        f"  peak RSS     {mib(report.peak_rss_bytes):>12}   predicted {mib(budget['total'])} = weights "
        f"{mib(budget['weights'])} + KV {mib(budget['kv_cache'])} + activations {mib(budget['activations'])}"
        f" + pre-packed {mib(budget.get('prepacked', 0))} + runtime {mib(budget.get('runtime', 0))}",
        f"  load         {sec(report.load_seconds):>12}",
        f"  TTFT         {sec(report.ttft_seconds, 'ms'):>12}   ({report.prompt_tokens} prompt tokens)",
        f"  decode       {speed:>12}"
        f"   ({report.new_tokens} new tokens)",
    ]
    if report.base_rss_bytes:
        rows.append(f"  runtime base {mib(report.base_rss_bytes):>12}   "
                    "(Python + onnxruntime + tokenizers, before loading)")
    if report.cgroup_peak_bytes:
        rows.append(f"  cgroup peak  {mib(report.cgroup_peak_bytes):>12}   (page cache included)")
    rows.append(report.verdict)
    return "\n".join(rows)


# --- child -------------------------------------------------------------------------------------

def prompt_ids(lm, count: int) -> list[int]:
    """Exactly `count` token ids of Korean text (BOS first when the model uses one)."""
    text = KOREAN_TEXT
    while len(lm.encode(text)) < count:
        text += KOREAN_TEXT
    return lm.encode(text)[:count]


def _emit(stage: str, **values) -> None:
    status = proc_status()
    print(json.dumps({"stage": stage, "vm_hwm": status.get("VmHWM"), "vm_rss": status.get("VmRSS"),
                      "vm_peak": status.get("VmPeak"), **values}), flush=True)


def child_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m runtime.validate child")
    parser.add_argument("bundle")
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cgroup", default=None)
    parser.add_argument("--rlimit-as", type=int, default=None)
    parser.add_argument("--prefill-chunk", default="auto")
    args = parser.parse_args(argv)
    if args.cgroup:  # join before onnxruntime is even imported, so all of it is charged there
        Path(args.cgroup, "cgroup.procs").write_text(str(os.getpid()))
    if args.rlimit_as:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (args.rlimit_as, args.rlimit_as))
    from runtime.generate import Generator, SamplingConfig, load
    from runtime.session import SessionConfig

    _emit("start")
    lm = load(args.bundle, SessionConfig(threads=args.threads), open_session=False)
    ids = prompt_ids(lm, args.prompt_tokens)
    lm.release_encoder()  # as `koedge run`: the encoder goes before the weights come in
    lm.open_session()
    _emit("loaded", load_seconds=lm.load_seconds)
    chunk = args.prefill_chunk if args.prefill_chunk == "auto" else int(args.prefill_chunk)
    generator = Generator(lm, prefill_chunk=chunk)
    first = []

    def on_text(_: str) -> None:
        if not first:
            first.append(True)
            _emit("first_token")

    result = generator.generate(ids, SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False), on_text)
    _emit("done", ttft_seconds=result.ttft_seconds, decode_tokens_per_second=result.decode_tokens_per_second,
          tokens=len(result.tokens), kv_bytes=result.kv_bytes)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    print("usage: python -m runtime.validate child BUNDLE ... (use `koedge validate`)", file=sys.stderr)
    sys.exit(2)

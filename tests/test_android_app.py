"""The phone demo's Activity under Robolectric 4.17 (android-demo/app, MainActivityTest), driven with a real bundle.

This test builds what the JVM test needs — a tiny koedge bundle and the Python runtime's text for the app's
default prompt and settings — and runs `mvn test` on the app module with them; the Activity must show that
exact text, refuse the bundle when the phone reports too little memory, and name a truncated bundle.
Robolectric's API 35 framework jar comes through Maven (offline mode: nothing is downloaded at test time).
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

from test_android_engine import DEMO, TIMEOUT, engine_jar  # noqa: F401

APP_PROMPT = "대한민국의 수도는"  # MainActivity's default prompt; DemoController: 128 tokens, penalty 1.2


def test_activity_loads_generates_and_refuses_under_robolectric(tiny_bundles, engine_jar, tmp_path):
    from runtime.generate import Generator, SamplingConfig, load

    bundle = tiny_bundles["gemma3_text"]
    shutil.copytree(bundle, tmp_path / "tiny")
    lm = load(bundle)
    result = Generator(lm).generate(lm.encode(APP_PROMPT), SamplingConfig(max_new_tokens=128, repetition_penalty=1.2))
    assert result.text
    (tmp_path / "expected.txt").write_text(result.text, encoding="utf-8")
    run = subprocess.run(["mvn", "-q", "-B", "-pl", "app", "-am", "test", f"-Dkoedge.test.bundles={tmp_path}"],
                         cwd=DEMO, capture_output=True, text=True, timeout=TIMEOUT)
    report = DEMO / "app" / "target" / "surefire-reports" / "TEST-org.koedge.demo.MainActivityTest.xml"
    details = run.stdout[-4000:] + run.stderr[-2000:]
    if report.is_file():
        details += report.read_text(encoding="utf-8")[-4000:]
    assert run.returncode == 0, details
    suite = ET.parse(report).getroot()
    counts = {key: int(suite.get(key)) for key in ("tests", "skipped", "failures", "errors")}
    assert counts == {"tests": 3, "skipped": 0, "failures": 0, "errors": 0}, counts

"""The careless user's adversarial pass (benchmarks/adversarial/run.py) ends with 0 tracebacks and 0 data lost.

It runs ~370 commands of the real CLI against real files (about 12 minutes on 2 busy cores), so it is opt-in:
``LORA_MED_ADVERSARIAL=1 pytest tests/test_adversarial.py``; ``LORA_MED_ADVERSARIAL_K=resume`` runs only the
cases whose command or name holds that text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LORA_MED_ADVERSARIAL") != "1", reason="slow: set LORA_MED_ADVERSARIAL=1")
def test_adversarial_pass_has_no_traceback_and_loses_no_data(tmp_path):
    subset = os.environ.get("LORA_MED_ADVERSARIAL_K", "")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "adversarial" / "run.py"),
            "--results-dir",
            str(tmp_path),
            "-k",
            subset,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert (tmp_path / "results.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    s = report["summary"]
    failed = [
        f"#{r['id']} {r['command']} / {r['case']}: {'; '.join(r['why'])}" for r in report["results"] if not r["passed"]
    ]
    assert s["tracebacks"] == 0 and s["data_lost"] == 0, "\n".join(failed)
    assert s["passed"] == s["cases"], "\n".join(failed)
    assert subset or s["cases"] >= 100

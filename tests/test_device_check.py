"""benchmarks/device_check.sh, the one prepared call that measures every GPU row, runs end to end
in its CPU dry-run mode (smoke sizes): every step exits 0 and writes its rows as JSON, in the
order of importance, and the fresh-rollout rows compare the same sample."""
from __future__ import annotations

import json
import subprocess

from conftest import REPO


def test_the_device_check_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    status = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in status] == ["flops", "decoding", "sampler", "fresh", "cuda"], status
    assert all(s[1] == "0" for s in status), (status, {s[0]: (out / f"{s[0]}.log").read_text()[-2000:] for s in status})
    for name in ("flops", "decoding", "sampler", "fresh"):
        rows = json.loads((out / f"{name}.json").read_text())["rows"]
        assert rows and {r["benchmark"] for r in rows} == {name}, (name, rows)
    fresh = json.loads((out / "fresh.json").read_text())["rows"]
    assert all(r["same_sample"] for r in fresh)
    assert all(r["verification"]["generated_tokens"] <= r["regeneration"]["generated_tokens"] for r in fresh)
    assert "torch" in (out / "machine.txt").read_text()

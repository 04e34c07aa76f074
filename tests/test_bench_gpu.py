"""python -m bench.gpu --dry-run: the GPU session's one command starts, and runs every part, on a CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    what = [r["what"] for r in rows]
    for part in ("xformers vs SDPA", "roofline", "ours, eager", "ours, compiled", "Mixtral layers, MoeLayer",
                 "Mixtral layers, grouped, eager", "Mixtral layers, grouped, compiled", "tests, --device cpu"):
        assert any(w.startswith(part) for w in what), (part, what)
    assert not [r for r in rows if r["result"].startswith(("failed", "not run"))], rows
    assert [r["batch"] for r in rows if r["what"] == "ours, eager"] == [1, 8]
    assert next(r["ok"] for r in rows if r["what"] == "Mixtral layers: grouped vs MoeLayer logits") == "ok"
    tests = next(r["result"] for r in rows if r["what"].startswith("tests"))
    assert " passed" in tests and "failed" not in tests, tests
    assert "# gpu-dry-run on" in proc.stdout  # the table, printed

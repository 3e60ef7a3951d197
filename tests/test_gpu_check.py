"""scripts/gpu_check.sh: the prepared GPU check. On CPU only its --dry-run and its closing table run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    steps = [line.split("]")[0].strip(" [") for line in r.stdout.splitlines() if line.startswith("  [")]
    assert [s for s in steps if s != "build-lib"] == ["gpu-tests", "bench-kernels", "generate-7b", "summary"]
    assert "tests/test_gpu_kernels.py" in r.stdout and "scripts/bench_kernels.py" in r.stdout
    assert "gpu_generate_check.py --batch 1 8" in r.stdout
    budget = sum(int(line.split("timeout ")[1].split()[0]) for line in r.stdout.splitlines() if "timeout " in line)
    assert budget <= 8 * 60 - 30, budget  # the steps' time limits fit the 8 minutes
    assert not out.exists()
    for script in ("bench_kernels.py", "gpu_generate_check.py", "gpu_check_summary.py"):
        assert (ROOT / "scripts" / script).is_file()


def test_bad_option_is_one_line_and_exit_2():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--fast" in r.stderr


def test_summary_table_marks_goals(tmp_path):
    (tmp_path / "steps.tsv").write_text("gpu-tests\t0\t95\nbench-kernels\t1\t40\n")
    bench = {"results": [
        dict(op="swa_gqa_decode", impl="triton-jit", batch=1, window=4096, efficiency=0.9),
        dict(op="swa_gqa_decode", impl="libmtx_kernels", batch=8, window=4096, efficiency=0.5),
        dict(op="moe_gemm", model="mixtral-8x7b", tokens=256, peak_fraction=0.75),
        dict(op="moe_gemm", model="mixtral-8x7b", tokens=4096, peak_fraction=0.6)]}
    (tmp_path / "bench_kernels.json").write_text(json.dumps(bench))
    gen = {"results": [dict(batch=1, mtx_tok_s=40.0, hf_sdpa_tok_s=30.0, identical_greedy_tokens=True)]}
    (tmp_path / "generate.json").write_text(json.dumps(gen))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py"), str(tmp_path)],
                       capture_output=True, text=True, check=True)
    lines = {ln.split("  ")[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    assert "exit 1" in lines["bench-kernels"] and "ok" in lines["gpu-tests"]
    assert "90% of bw" in lines["attn decode triton-jit B1 W4096"] and "goal met" in lines["attn decode triton-jit B1 W4096"]
    assert "goal 85%" in lines["attn decode libmtx_kernels B8 W4096"]
    assert "goal met" in lines["moe gemm mixtral-8x7b N256"] and "goal 70%" in lines["moe gemm mixtral-8x7b N4096"]
    assert "greedy identical" in lines["generate 7B bf16 B1"]


def test_generation_check_runs_its_comparison_on_cpu(tmp_path):
    """The generation step's own code path, on a tiny random bfloat16 Mistral on CPU (mtx's reference ops,
    not the kernels): prompt 20 + 12 new tokens past the window 16, greedy tokens equal transformers'."""
    out = tmp_path / "generate.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_generate_check.py"), "--shape", "tiny",
                        "--device", "cpu", "--layers", "2", "--new-tokens", "12", "--prompt-len", "20",
                        "--batch", "1", "3", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mtx_kernels"] is False and [row["batch"] for row in res["results"]] == [1, 3]
    for row in res["results"]:
        assert row["identical_greedy_tokens"], row
        assert row["mtx_tok_s"] > 0 and row["hf_sdpa_tok_s"] > 0

"""tools/gpu_check.py --cpu: the reduced form of the GPU check runs and prints every line."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_form():
    env = {**os.environ, "MASTER_PORT": "29561", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--cpu"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    for name in ("device", "te-parity", "fp8-step", "attention", "checkpoint"):
        assert name in lines, out.stdout
    assert "serves it" in lines["attention"] and "tokens/s" in lines["train-0k"]

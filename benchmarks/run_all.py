"""Run every benchmark in sequence (`make bench`); each prints a Markdown table with its ratio to a reference
measured in the same run. bench_detectors.py needs pytorch-ood 0.4.0 in a separate environment (see its
docstring) and is skipped when that package is missing."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_train.py", "bench_eval.py", "bench_acet.py", "bench_acet_train.py", "bench_data_path.py",
              "bench_gan.py", "bench_certify.py", "bench_ibp.py",
              "bench_detectors.py"]  # bench_gpu.py needs a CUDA GPU: run it on its own


def main() -> None:
    for name in BENCHMARKS:
        if name == "bench_detectors.py" and importlib.util.find_spec("pytorch_ood") is None:
            print(f"== {name}: skipped (pytorch-ood is not installed in this environment)")
            continue
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent, check=True)


if __name__ == "__main__":
    main()

"""benchmarks/bench_gpu.py runs (tiny, on CPU) through every configuration it measures on a GPU, so it cannot rot."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_gpu  # noqa: E402


def test_bench_gpu_tiny_runs_every_configuration_on_cpu(capsys):
    result = bench_gpu.main(bench_gpu.get_args_parser().parse_args(["--tiny"]))
    rates = result["images_per_s"]
    assert set(rates) == {"bare fp32", "train.py fp32", "train.py bf16", "train.py bf16 + channels-last"}
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())
    # ACET k=2 makes 2 attack passes, a scoring pass and a training pass on twice the batch: it costs more
    assert result["acet_ratio"] > 1.5 and result["acet_target"] == 1.1 * 3
    assert result["eval_images_per_s"] > 0 and result["peak_memory_gib"] is None
    table = capsys.readouterr().out
    assert "| bare fp32 loop |" in table and "ACET k=2 / plain" in table and "TINY" in table

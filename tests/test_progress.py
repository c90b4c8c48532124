"""Progress bars: drawn on a terminal, never in a redirected log (the per-epoch lines stay); --progress forces them."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import progress

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train.py", "--dataset", "digits", "--method", "plain", "--epochs", "2", "--max-batches", "5",
         "--device", "cpu"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wanted_follows_the_flag_then_the_terminal():
    assert progress.wanted(None, _Terminal()) is True
    assert progress.wanted(None, io.StringIO()) is False
    assert progress.wanted(True, io.StringIO()) is True and progress.wanted(False, _Terminal()) is False


def _train_with_stderr_in_a_file(tmp_path: Path, *extra: str) -> tuple[str, str]:
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        result = subprocess.run([sys.executable, *TRAIN, "--runs-root", str(tmp_path / "runs"), *extra], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=stderr, timeout=120,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    # bytes, decoded without newline translation: text mode would turn every '\r' into '\n'
    assert result.returncode == 0, log.read_bytes().decode()
    return result.stdout.decode(), log.read_bytes().decode()


def test_redirected_training_log_has_no_bar_fragments(tmp_path):
    stdout, stderr = _train_with_stderr_in_a_file(tmp_path)
    assert "\r" not in stderr and "\r" not in stdout and "it/s" not in stderr
    assert sum(line.startswith("epoch ") for line in stdout.splitlines()) == 2, stdout  # the per-epoch lines stay


def test_progress_flag_forces_bars_where_stderr_is_not_a_terminal(tmp_path, capsys):
    import train

    argv = [*TRAIN[1:], "--runs-root", str(tmp_path / "runs")]
    train.main(train.get_args_parser().parse_args([*argv, "--name", "quiet"]))
    assert "\r" not in capsys.readouterr().err  # capsys's stderr is no terminal: no bars by default
    train.main(train.get_args_parser().parse_args([*argv, "--name", "forced", "--progress"]))
    assert capsys.readouterr().err.count("\r") >= 2  # at least one bar per epoch


@pytest.mark.parametrize("module", ["utils.training", "utils.scoring", "utils.studies.ccu", "utils.studies.alpha",
                                    "utils.studies.audit", "utils.studies.gauc"])
def test_every_bar_goes_through_the_helper(module):
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert "tqdm" not in source and "bar(" in source

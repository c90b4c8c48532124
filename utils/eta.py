"""Time left in a multi-stage job (reproduce.py), counted only from stages whose cost has been measured.

A stage has a kind ("train acet", "gen_gmm", "evaluate.py", ...): the stages of one kind cost about the same
(the seeds of one method under one budget), while kinds differ by orders of magnitude (one epoch of ACET with
its attack against one of plain training; a quarter-width GOOD network against DDU's ResNet). So a kind's
cost is the mean of its measured stages, and nothing else: a stage whose kind was never measured is not
guessed from the others (a guess from the first, cheap stages printed "ETA 4m24s" for a 40-minute job).
Until every remaining kind has been timed, the estimate is shown as a lower bound naming what it leaves out.
Measurements come from the stages run now and from finished runs of the same runs root (their log.jsonl
records each epoch's seconds).
"""
from __future__ import annotations

import json
from pathlib import Path

MAX_NAMED = 4  # untimed kinds named in the ETA text


def duration(seconds: float) -> str:
    """5m03s, 1h07m."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class Eta:
    """Seconds per stage kind, measured; the remaining time of a list of stage kinds."""

    def __init__(self) -> None:
        self.timed: dict[str, list[float]] = {}

    def record(self, kind: str, seconds: float) -> None:
        self.timed.setdefault(kind, []).append(float(seconds))

    def cost(self, kind: str) -> float | None:
        """Mean measured seconds of a stage of this kind, None when none was measured."""
        times = self.timed.get(kind)
        return sum(times) / len(times) if times else None

    def estimate(self, kinds: list[str]) -> tuple[float, list[str]]:
        """(seconds of the remaining stages whose kind was timed, the kinds not timed yet in first-seen order)."""
        costs = [(kind, self.cost(kind)) for kind in kinds]
        untimed = list(dict.fromkeys(kind for kind, cost in costs if cost is None))
        return sum(cost for _, cost in costs if cost is not None), untimed

    def describe(self, kinds: list[str]) -> str:
        """'ETA 12m03s' when every remaining stage's kind was timed; else 'ETA unknown', with the lower bound of
        the timed part and the kinds that are not, so the line never shows a guess as an estimate."""
        seconds, untimed = self.estimate(kinds)
        if not untimed:
            return f"ETA {duration(seconds)}"
        named = ", ".join(untimed[:MAX_NAMED]) + (f" and {len(untimed) - MAX_NAMED} more" if len(untimed) > MAX_NAMED
                                                  else "")
        bound = f"more than {duration(seconds)}; " if seconds else ""
        return f"ETA unknown ({bound}not timed yet: {named})"

    def record_finished_runs(self, dataset_dir: Path, kind_of: dict[str, str]) -> None:
        """Time the kinds of finished runs already in `dataset_dir` (same budget, same dataset) from their log.jsonl:
        `kind_of` maps a run folder name to its stage kind; runs not in it are left alone."""
        for name, kind in kind_of.items():
            seconds = _logged_seconds(dataset_dir / name / "log.jsonl")
            if seconds:
                self.record(kind, seconds)


def _logged_seconds(log: Path) -> float:
    """Sum of the epochs' "seconds" in a run's log.jsonl (0 when there is none or it is unreadable)."""
    try:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return 0.0
    return float(sum(row.get("seconds", 0) for row in rows if isinstance(row, dict)
                     and isinstance(row.get("seconds", 0), (int, float))))

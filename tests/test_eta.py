"""reproduce.py's ETA (utils.eta): counted from measured stage kinds only, never guessed from cheaper stages."""
import json

import reproduce
from utils.eta import Eta, duration

# synthetic timings of the small MNIST CCU Table 2 (seconds per stage kind): one cheap plain epoch first, then
# kinds that cost ten times as much; the old estimate scaled the first stage by fixed cost weights
KINDS = ["train plain", "train plain", "train acet", "gen_gmm", "train ccu", "evaluate.py"]
SECONDS = {"train plain": 60.0, "train acet": 900.0, "gen_gmm": 120.0, "train ccu": 400.0, "evaluate.py": 600.0}


def test_no_number_until_every_remaining_kind_was_timed():
    eta = Eta()
    assert eta.describe(KINDS) == "ETA unknown (not timed yet: train plain, train acet, gen_gmm, train ccu and 1 more)"
    eta.record("train plain", 60.0)  # after the first stage: a lower bound and what it leaves out, no guess
    assert eta.describe(KINDS[1:]) == "ETA unknown (more than 1m00s; not timed yet: train acet, gen_gmm, train ccu, " \
                                      "evaluate.py)"
    for kind in KINDS[1:]:
        eta.record(kind, SECONDS[kind])
    assert eta.describe(KINDS[1:]) == f"ETA {duration(60 + 900 + 120 + 400 + 600)}" == "ETA 34m40s"


def test_a_kind_costs_the_mean_of_its_measured_stages():
    eta = Eta()
    for seconds in (50.0, 70.0):
        eta.record("train plain", seconds)
    eta.record("train acet", 900.0)
    assert eta.cost("train plain") == 60.0 and eta.cost("train ccu") is None
    assert eta.estimate(["train plain"] * 3 + ["train acet", "train ccu"]) == (1080.0, ["train ccu"])
    assert eta.describe([]) == "ETA 0m00s"


def test_finished_runs_time_their_kind_from_their_logs(tmp_path):
    for run, epochs in (("plain-s0", [30.5, 29.5]), ("acet-s0", [400.0])):
        (tmp_path / run).mkdir()
        (tmp_path / run / "log.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "seconds": s}) + "\n"
                                                          for i, s in enumerate(epochs)))
    (tmp_path / "ceda-s0").mkdir()
    (tmp_path / "ceda-s0" / "log.jsonl").write_text("{torn")
    eta = Eta()
    eta.record_finished_runs(tmp_path, {"plain-s0": "train plain", "acet-s0": "train acet", "ceda-s0": "train ceda",
                                        "oe-s0": "train oe"})
    assert eta.timed == {"train plain": [60.0], "train acet": [400.0]}


def test_run_steps_prints_the_estimate_of_measured_kinds(capsys, monkeypatch):
    clock = iter([0.0, 0.0, 0.0, 100.0, 100.0, 100.0, 200.0, 200.0, 200.0, 700.0, 700.0])
    monkeypatch.setattr(reproduce.time, "perf_counter", lambda: next(clock))
    steps = [reproduce.Step(f"train plain-s{i}", "train plain", lambda: None) for i in range(2)] + \
        [reproduce.Step("evaluate.py", "evaluate.py", lambda: None)]
    reproduce.run_steps(steps, "t")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("ETA unknown (not timed yet: train plain, evaluate.py)")
    assert lines[1].endswith("elapsed 1m40s | ETA unknown (more than 1m40s; not timed yet: evaluate.py)")
    assert lines[2].endswith("elapsed 3m20s | ETA unknown (not timed yet: evaluate.py)")
    assert "all 3 stages done in 11m40s" in lines[3]

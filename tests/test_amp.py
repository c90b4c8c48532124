"""--amp, --channels-last, --compile: bf16 training matches fp32, certificates and densities stay full precision,
compile falls back with one line."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import models
import train
from utils import amp
from utils.methods.ccu import clamp_out_variances
import test_ccu


@pytest.fixture(autouse=True)
def _attack_precision_reset():
    yield
    amp.set_attack_amp("off")  # evaluate.py / gen_attack_stats.py set it process-wide


def run_train(argv):
    return train.main(train.get_args_parser().parse_args(argv))


def last_test_acc(run_dir) -> float:
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])["test_acc"]


def test_bf16_autocast_trains_digits_to_the_fp32_accuracy(tmp_path):
    common = ["--dataset", "digits", "--epochs", "2", "--runs-root", str(tmp_path), "--no-progress"]
    fp32 = last_test_acc(run_train([*common, "--name", "fp32", "--amp", "off"]))
    bf16_dir = run_train([*common, "--name", "bf16", "--amp", "bf16"])
    assert json.loads((bf16_dir / "config.json").read_text())["amp"] == "bf16"
    assert fp32 > 0.85
    assert abs(last_test_acc(bf16_dir) - fp32) <= 0.01


def test_channels_last_step_equals_contiguous_step(tmp_path):
    # SGD, not Adam: Adam's first steps are +-lr wherever a gradient is ~0, whatever its rounding
    common = ["--dataset", "digits", "--epochs", "1", "--max-batches", "3", "--runs-root", str(tmp_path),
              "--no-progress", "--optimizer", "sgd", "--lr", "0.1"]
    plain = torch.load(run_train([*common, "--name", "a"]) / "model.pt", weights_only=True)["model"]
    nhwc = torch.load(run_train([*common, "--name", "b", "--channels-last"]) / "model.pt", weights_only=True)["model"]
    for key in plain:
        assert torch.allclose(plain[key], nhwc[key], atol=1e-5), key


CERTIFICATE_TESTS = [
    lambda: test_ccu.test_batched_radius_equals_brentq(False),
    lambda: test_ccu.test_batched_radius_equals_brentq(True),
    test_ccu.test_certificate_holds_under_attack_and_is_maximal,
    test_ccu.test_radius_zero_and_cap,
]


@pytest.mark.parametrize("index", range(len(CERTIFICATE_TESTS)))
def test_certificate_tests_pass_under_bf16_autocast(index):
    """The CCU certificate tests, with the whole test (attack, model calls, radii) inside bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        CERTIFICATE_TESTS[index]()


def test_ccu_densities_and_output_stay_float32_under_autocast():
    model = test_ccu.make_ccu(seed=0)
    clamp_out_variances(model)
    x = torch.rand(64, *test_ccu.SHAPE, generator=torch.Generator().manual_seed(3))
    expected = model(x, return_densities=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, return_densities=True)
    for name, want, have in zip(("log_probs", "log_p_in", "log_p_out"), expected, got):
        assert have.dtype == torch.float32, name
        # the base net runs in bf16, so log-probs move a little; the densities are computed exactly as in fp32
        tolerance = 0.05 if name == "log_probs" else 1e-5
        assert torch.allclose(have, want, rtol=1e-6, atol=tolerance), (name, (have - want).abs().max())


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        run_train(["--dataset", "digits", "--amp", "fp16", "--device", "cpu", "--runs-root", str(tmp_path)])
    assert not any(tmp_path.rglob("config.json"))


def test_default_amp_is_off_on_cpu():
    assert amp.default_amp("cpu") == "off"


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no compiler here\nsecond line")


@pytest.fixture
def dynamo_errors_raise():
    import torch._dynamo

    with torch._dynamo.config.patch(suppress_errors=False):  # try_compile sets it on success
        yield


def test_compile_falls_back_with_one_line(capsys, dynamo_errors_raise):
    torch.manual_seed(0)
    model = models.MODELS["lenet"](num_classes=10, in_channels=1, input_size=8)
    keys = list(model.state_dict())
    x = torch.rand(4, 1, 8, 8)
    expected = model(x)
    assert amp.try_compile(model, x, backend=failing_backend) is False
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("--compile: torch.compile failed") and "no compiler here" in lines[0]
    assert torch.equal(model(x), expected) and list(model.state_dict()) == keys
    assert all(p.grad is None for p in model.parameters())


def test_compile_keeps_state_dict_keys_and_outputs(dynamo_errors_raise):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3))
    keys = list(model.state_dict())
    x = torch.rand(4, 1, 8, 8)
    buffers = [b.clone() for b in model.buffers()]
    expected = model.eval()(x)
    model.train()
    assert amp.try_compile(model, x, backend="eager") is True
    assert list(model.state_dict()) == keys  # run folders stay loadable without torch.compile
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # the trial pass left no trace
    assert torch.allclose(model.eval()(x), expected, atol=1e-6)


def test_evaluate_amp_attacks_in_bf16_but_scores_in_float32(tmp_path):
    import evaluate
    import numpy as np

    run_dir = run_train(["--dataset", "digits", "--epochs", "1", "--max-batches", "8", "--runs-root",
                         str(tmp_path / "runs"), "--no-progress"])
    confidences = {}
    for name, flags in (("off", ["--amp", "off"]), ("bf16", ["--amp", "bf16"]),
                        ("bf16-scores", ["--amp", "bf16", "--amp-scores"])):
        results = tmp_path / name
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--dataset", "digits", "--runs", str(run_dir), "--results-root", str(results), "--ood", "uniform",
             "--n-ood", "200", "--adv-sets", "adv_noise", "--n-adv", "40", "--attack-steps", "3", *flags,
             "--no-progress", "--no-print"]))
        cache = np.load(next((results / "scores" / "digits").glob("*.npz")))
        confidences[name] = {key: cache[key] for key in ("in", "uniform", "adv_noise")}
    for key in ("in", "uniform"):  # the metrics' scores: float32 unless --amp-scores
        assert np.array_equal(confidences["off"][key], confidences["bf16"][key]), key
        assert not np.array_equal(confidences["off"][key], confidences["bf16-scores"][key]), key
        assert np.abs(confidences["off"][key] - confidences["bf16-scores"][key]).max() < 0.05, key
    # the attack ran in bf16: different adversarial noise, scored in float32, as confident as fp32's up to noise
    assert not np.array_equal(confidences["off"]["adv_noise"], confidences["bf16"]["adv_noise"])
    assert abs(confidences["off"]["adv_noise"].mean() - confidences["bf16"]["adv_noise"].mean()) < 0.05

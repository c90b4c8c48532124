"""Recipe and evaluation fidelity to the seed papers: the defaults each run trains with, and how evaluation
scores ensembles and the CCU attack table (docs/methods.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import model_params
import models
from utils import checkpoints, methods
import train
from model_paths import run_flags

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def resolved(*argv: str):
    return train.resolve(train.get_args_parser().parse_args(list(argv)))


# --------------------------------------------------------------------------------------------------- recipes

def test_recipes_carry_their_input_normalisation():
    assert resolved("--dataset", "CIFAR10", "--recipe", "ddu").normalize == CIFAR10_STATS
    assert resolved("--dataset", "SVHN", "--recipe", "ddu").normalize == CIFAR10_STATS   # DDU: CIFAR-10's, always
    assert resolved("--dataset", "DirtyMNIST").normalize == ((0.1307,), (0.3081,))
    odin = resolved("--dataset", "CIFAR100", "--recipe", "odin-densenet").normalize
    assert odin[0] == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert odin[1] == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    for argv in (("--dataset", "MNIST"), ("--dataset", "CIFAR10"), ("--dataset", "CIFAR10", "--recipe", "acet")):
        assert resolved(*argv).normalize is None    # CCU and ACET train on raw pixels
    with pytest.raises(ValueError, match="1-channel"):
        resolved("--dataset", "digits", "--normalize", "cifar10")


def test_trained_model_carries_the_normalisation_and_old_runs_still_load(tmp_path):
    run_dir = train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--normalize", "mnist", "--epochs", "1", "--max-batches", "2",
         "--runs-root", str(tmp_path), "--no-progress"]))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["normalize"] == [[0.1307], [0.3081]]
    model = methods.load_run(run_dir)
    assert model.normalize.mean.tolist() == pytest.approx([0.1307]) and model.normalize.std.tolist() == \
        pytest.approx([0.3081])
    x = torch.rand(4, 1, 8, 8)
    plain = models.build_model({**config, "normalize": None})
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")})
    torch.testing.assert_close(model(x), plain.eval()((x - 0.1307) / 0.3081))
    # a run written before the key existed: no "normalize" in its config, no buffers in its weights
    old_dir = tmp_path / "digits" / "old-s0"
    old_config = {k: v for k, v in config.items() if k != "normalize"}
    checkpoints.save_checkpoint(old_dir / "model.pt", {"model": plain.state_dict(), "config": old_config, "epoch": 1})
    torch.testing.assert_close(methods.load_run(old_dir)(x), plain(x))


@pytest.mark.parametrize("dataset", ["MNIST", "CIFAR10"])
@pytest.mark.parametrize("method", ["ceda", "acet"])
def test_ceda_and_acet_train_with_the_originals_weight_decay(dataset, method):
    # 5e-4 * sum ||W||^2 in the loss has gradient 1e-3 * W: coupled weight decay 1e-3
    opts = resolved("--dataset", dataset, "--method", method)
    assert opts.weight_decay == 1e-3
    assert resolved("--dataset", dataset, "--method", "plain").weight_decay == 5e-4
    assert resolved("--dataset", dataset, "--method", method, "--weight-decay", "0").weight_decay == 0.0


def test_acet_recipe_keeps_lenet_on_mnist_and_resnet20_on_cifar():
    mnist = resolved("--dataset", "MNIST", "--recipe", "acet", "--method", "acet")
    assert (mnist.arch, mnist.optimizer, mnist.lr, mnist.weight_decay, mnist.augment) == \
        ("lenet", "adam", 1e-3, 1e-3, "acet")
    cifar = resolved("--dataset", "CIFAR10", "--recipe", "acet", "--method", "plain")
    assert (cifar.arch, cifar.optimizer, cifar.lr, cifar.weight_decay) == ("resnet_small", "sgd", 0.1, 1e-3)
    assert cifar.milestones == [0.5, 0.75, 0.9]


def test_ccu_schedule_lowers_the_lr_before_its_one_indexed_epochs_50_75_90():
    opts = resolved("--dataset", "MNIST")
    _, _, optimizer, scheduler = train.build(opts, torch.device("cpu"))
    lrs = []
    for _ in range(100):            # lrs[e] is the lr epoch e (0-indexed) trains with
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()            # no gradients: only keeps the scheduler's call order
        scheduler.step()
    assert lrs[48] == pytest.approx(1e-3) and lrs[49] == pytest.approx(1e-4)   # 1-indexed epoch 50
    assert lrs[73] == pytest.approx(1e-4) and lrs[74] == pytest.approx(1e-5)
    assert lrs[88] == pytest.approx(1e-5) and lrs[89] == pytest.approx(1e-6)


def test_ddu_schedule_counts_finished_epochs():
    opts = resolved("--dataset", "CIFAR10", "--recipe", "ddu")
    assert sorted({round(f * opts.epochs) for f in opts.milestones}) == [150, 250]


@pytest.mark.parametrize("dataset,arch", [("MNIST", "lenet"), ("CIFAR10", "vgg13")])
def test_mcd_runs_train_ccus_mc_dropout_network(dataset, arch):
    flags, seed = run_flags("mcd-s0")
    opts = resolved("--dataset", dataset, "--seed", str(seed), *flags)
    assert (opts.arch, opts.dropout, opts.optimizer, opts.lr) == (arch, 0.5, "adam", 2e-4)


# ------------------------------------------------------------------------------------------------ evaluation

def _digits_runs(root, seeds=(0, 1)) -> list[str]:
    """Small MLP runs on digits with DDU's 10% validation split; member s has its logits scaled by 1 + 2s, so the
    members are differently over-confident and need different temperatures."""
    names = []
    for seed in seeds:
        run_dir = train.main(train.get_args_parser().parse_args(
            ["--dataset", "digits", "--arch", "mlp", "--arch-kwargs", '{"widths": [32]}', "--epochs", "3",
             "--seed", str(seed), "--val-fraction", "0.1", "--runs-root", str(root), "--no-progress"]))
        checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
        for key in [k for k in checkpoint["model"] if k.startswith("fc.")]:
            checkpoint["model"][key] = checkpoint["model"][key] * (1 + 2 * seed)
        checkpoints.save_checkpoint(run_dir / "model.pt", checkpoint)
        names.append(run_dir.name)
    return names


def test_ensemble_is_tempered_per_member_and_attacked_on_its_averaged_probabilities(tmp_path, monkeypatch):
    import data
    import evaluate
    import model_paths
    from utils import attacks, metrics
    from utils.calibration import fit_temperature
    from utils.detectors.bayes import EnsembleModel

    runs = _digits_runs(tmp_path / "runs")
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits",
                        [model_paths.TableEntry("DE", tuple(runs), "ensemble", {"score": "entropy"})])
    attacked = []

    def recording_attack(model, x_in, y_in, opts):
        attacked.append(model)
        return attacks.AdvBatch(x=torch.rand_like(x_in))

    monkeypatch.setitem(attacks.ADV_SETS, "adv_noise", recording_attack)
    results = tmp_path / "results"
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs-root", str(tmp_path / "runs"), "--results-root", str(results), "--ood",
         "uniform", "--n-ood", "200", "--adv-sets", "adv_noise", "--n-adv", "50", "--no-progress", "--no-print"]))
    rows = [json.loads(line) for line in (results / "ood" / "digits.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["ood"] == "uniform")
    # every member tempered on its own validation split
    loaded = [methods.load_run(tmp_path / "runs" / "digits" / run) for run in runs]
    expected_t = []
    for member in loaded:
        val = data.get_dataset("digits", "val", val_fraction=0.1, seed=member.run_config["seed"])
        x, y = next(iter(torch.utils.data.DataLoader(val, batch_size=len(val))))
        with torch.no_grad():
            expected_t.append(fit_temperature(member(x), y))
    assert row["temperature"] == expected_t and expected_t[0] != expected_t[1]
    test = data.get_dataset("digits", "test")
    x, y = next(iter(torch.utils.data.DataLoader(test, batch_size=len(test))))
    with torch.no_grad():
        tempered = torch.stack([(m(x) / t).softmax(1) for m, t in zip(loaded, expected_t)]).mean(0).double()
    assert row["t_accuracy"] == pytest.approx(metrics.accuracy(tempered, y))
    assert row["t_ece"] == pytest.approx(metrics.ece(tempered, y))
    assert row["t_nll"] == pytest.approx(metrics.nll(tempered, y))
    assert row["t_nll"] < row["nll"] and row["t_auroc"] != row["auroc"]
    # the adversarial set attacks the ensemble, not member 0
    (target,) = attacked
    assert isinstance(target, EnsembleModel) and len(target.members) == 2
    with torch.no_grad():
        averaged = torch.stack([m(x[:5]).softmax(1) for m in loaded]).mean(0)
        torch.testing.assert_close(target(x[:5]).softmax(1), averaged)


def _save_run(root, name: str, config: dict, model=None) -> None:
    torch.manual_seed(len(name))
    model = models.build_model(config) if model is None else model
    checkpoints.save_checkpoint(root / "digits" / name / "model.pt",
                           {"model": model.state_dict(), "config": config, "epoch": 0})


def test_ccu_table1_gives_every_entry_its_column_scored_by_its_own_detector(tmp_path, monkeypatch):
    """MCD is MC dropout (dropout active, 10-sample variance score); ODIN and Maha get columns of their own."""
    import gen_attack_stats
    import gen_gmm
    import model_paths
    from argparse import Namespace
    from model_paths import TableEntry
    from utils.detectors import DETECTORS
    from utils.methods.ccu import CCU_METHODS, clamp_out_variances

    runs = tmp_path / "runs"
    base = {"arch": "mlp", "num_classes": 10, "in_channels": 1, "input_size": [1, 8, 8], "dataset": "digits",
            "arch_kwargs": {"widths": [16]}, "method": "plain", "seed": 0}
    for name in ("plain-s0", "plain-s1"):
        _save_run(runs, name, base)
    _save_run(runs, "mcd-s0", {**base, "dropout": 0.5})
    gen_gmm.main(gen_gmm.get_args_parser().parse_args(
        ["--dataset", "digits", "--n-components", "3", "--n-in", "300", "--n-out", "300", "--max-iter", "40",
         "--runs-root", str(tmp_path / "gmm"), "--device", "cpu"]))
    opts = Namespace(**{**base, "method": "ccu", "gmm": str(tmp_path / "gmm" / "digits" / "gmm-s0")})
    ccu = CCU_METHODS["ccu"].wrap_model(models.build_model(base), opts, init=True)
    clamp_out_variances(ccu)
    _save_run(runs, "ccu-s0", vars(opts), ccu)
    entries = [TableEntry("Base", ("plain-s0",)), TableEntry("MCD", ("mcd-s0",), "mcdropout",
                                                             {"samples": 10, "score": "variance"}),
               TableEntry("ODIN", ("plain-s0",), "odin"), TableEntry("Maha", ("plain-s0",), "mahalanobis"),
               TableEntry("DE", ("plain-s0", "plain-s1"), "ensemble"), TableEntry("CCU", ("ccu-s0",))]
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits", entries)
    results = tmp_path / "results"
    gen_attack_stats.main(["--study", "ccu", "--dataset", "digits", "--runs-root", str(runs), "--n-seeds", "8",
                           "--restarts", "1", "--steps", "3", "--n-test", "60", "--results", str(results),
                           "--device", "cpu"])
    rows = [json.loads(line) for line in (results / "attacks" / "digits.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["Base", "MCD", "ODIN", "Maha", "DE", "CCU"]
    dump = np.load(results / "scores" / "digits_ccu_attack.npz")
    in_scores = dict(zip(dump["labels"], dump["in_log_conf"]))
    import data
    x = torch.stack([data.get_dataset("digits", "test")[i][0] for i in range(60)])
    plain = methods.load_run(runs / "digits" / "plain-s0")
    odin = DETECTORS["odin"](plain).confidence(x).log().numpy()
    np.testing.assert_allclose(in_scores["ODIN"], odin, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(in_scores["Base"], plain(x).log_softmax(1).amax(1).detach().numpy(), atol=1e-5)
    maha = DETECTORS["mahalanobis"](plain)
    maha.fit(torch.utils.data.DataLoader(data.get_dataset("digits", "train"), batch_size=500))
    np.testing.assert_allclose(in_scores["Maha"], maha.confidence(x).numpy(), rtol=1e-4)
    # MC dropout: minus the summed variance over 10 stochastic passes, never the deterministic eval-mode MSP
    assert (in_scores["MCD"] <= 0).all() and (in_scores["MCD"] < -1e-6).mean() > 0.9
    de = torch.stack([methods.load_run(runs / "digits" / r)(x).softmax(1) for r in ("plain-s0", "plain-s1")])
    np.testing.assert_allclose(in_scores["DE"], de.mean(0).amax(1).log().detach().numpy(), atol=1e-5)
    assert {r["label"]: r["detector"] for r in rows}["Maha"] == "mahalanobis"


def test_mc_dropout_column_is_stochastic_and_attacked_with_dropout_on(tmp_path):
    from utils.attacks import eval_mode
    from utils.studies.ccu_targets import entry_model

    config = {"arch": "mlp", "num_classes": 10, "in_channels": 1, "input_size": [1, 8, 8], "dataset": "digits",
              "arch_kwargs": {"widths": [16]}, "dropout": 0.5, "seed": 0}
    _save_run(tmp_path, "mcd-s0", config)
    column = entry_model([tmp_path / "digits" / "mcd-s0"], "mcdropout", {"samples": 10, "score": "variance"},
                         "digits", "./datasets", "cpu")
    x = torch.rand(16, 1, 8, 8, requires_grad=True)
    with eval_mode(column):                           # what the attack does to the model it is given
        first = column.objective(x)
        second = column.objective(x)
        (grad,) = torch.autograd.grad(first.sum(), x)
    assert not torch.equal(first, second) and bool((first < 0).all())
    assert float(grad.abs().sum()) > 0

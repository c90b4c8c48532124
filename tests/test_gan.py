"""The confident-classifier GAN (arXiv 1711.09325) and the training loop's auxiliary networks: the KL term, G/D
shapes, training on digits (KL falls, confidence on generated samples near 1/K, accuracy as plain), kill-and-
resume equality of classifier, G, D and their optimisers, and a run folder that every detector scores."""
import json
import math
import warnings
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from torch import nn
from torch.utils.data import DataLoader

import data
import models
import train
from models.gan import GAN_ARCHS, Discriminator, Generator
from tests.test_train import train_full_and_killed
from utils.detectors import DETECTORS
from utils.methods import load_auxiliary, load_run
from utils.methods.base import Auxiliary
from utils.methods.gan import gan_loss, gan_step, kl_uniform_to_softmax
from utils.metrics import auroc

EPOCHS = 6


def test_kl_term_is_the_per_sample_kl_and_the_originals_scaled_kl_div():
    torch.manual_seed(0)
    logits = 3 * torch.randn(32, 10)
    probs = logits.softmax(1).numpy()
    expected = torch.tensor([entropy([0.1] * 10, p) for p in probs], dtype=torch.float32)
    torch.testing.assert_close(kl_uniform_to_softmax(logits), expected, rtol=1e-5, atol=1e-6)
    # the original: kl_div(log_softmax(f), U) (mean over all N*K elements) * K
    with warnings.catch_warnings():  # "mean" (over all elements) is deliberate: it is what the original calls
        warnings.simplefilter("ignore")
        original = F.kl_div(F.log_softmax(logits, 1), torch.full((32, 10), 0.1), reduction="mean") * 10
    torch.testing.assert_close(kl_uniform_to_softmax(logits).mean(), original)
    assert kl_uniform_to_softmax(torch.zeros(4, 10)).abs().max() < 1e-6  # uniform prediction: KL 0


@pytest.mark.parametrize("arch", sorted(GAN_ARCHS))
def test_generator_and_discriminator_shapes(arch):
    side = GAN_ARCHS[arch][0]
    generator, discriminator = Generator(arch, 3, side, latent_dim=16, width=8), Discriminator(arch, 3, side, width=8)
    images = generator(generator.sample_latent(5, "cpu"))
    assert images.shape == (5, 3, side, side) and 0 <= images.min() and images.max() <= 1
    assert discriminator(images).shape == (5,)
    with pytest.raises(ValueError, match="use --gan-arch"):
        Generator(arch, 3, side + 1)


def test_discriminator_has_the_originals_widths_and_parameter_count():
    # _netD(nc=3, ndf=64): conv 3->128, 128->256 (+BN), 256->512 (+BN), 512->1 (4x4 kernels, no biases)
    discriminator = Discriminator("dcgan32", 3, 32, width=64)
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [128, 256, 512, 1]
    expected = 16 * (3 * 128 + 128 * 256 + 256 * 512 + 512) + 2 * (256 + 512)
    assert sum(p.numel() for p in discriminator.parameters()) == expected == 2_637_312
    generator = Generator("dcgan32", 3, 32, width=64)  # _netG(nz=100, ngf=64): 512@4 -> 256@8 -> 128@16 -> 3@32
    assert [m.out_channels for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)] == [512, 256, 128, 3]


def test_vgg13_nobn_is_the_originals_classifier():
    model = models.MODELS["vgg13_nobn"](num_classes=10, in_channels=3, input_size=32, dropout=0.5)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == \
        [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    assert [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)] == \
        [(512, 512), (512, 512), (512, 10)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    # the original's parameter count: 9.4M conv + 0.53M FC
    convs = sum(9 * i * o + o for i, o in [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                                           (256, 512), (512, 512), (512, 512), (512, 512)])
    assert sum(p.numel() for p in model.parameters()) == convs + 2 * (512 * 512 + 512) + 512 * 10 + 10


def test_generated_passes_leave_batch_norm_running_statistics_to_real_data():
    """One GAN step runs the classifier in training mode on G(z) twice and on real data once: its running
    statistics must equal those of the real pass alone."""
    torch.manual_seed(0)
    classifier = models.MODELS["vgg13"](num_classes=10, in_channels=1, input_size=8, width=8)
    opts = Namespace(data_shape=(1, 8, 8), in_channels=1, input_size=8, dataset="digits", gan_arch="dcgan8",
                     gan_latent_dim=16, gan_width=8, gan_lr=2e-4, gan_betas=(0.5, 0.999), gan_beta=1.0,
                     epochs=1, milestones=[], gamma=0.1)
    from utils.methods.gan import build_gan

    aux = build_gan(classifier, opts)
    x, y = torch.rand(32, 1, 8, 8) * 0.2, torch.randint(0, 10, (32,))  # dark images: far from G's sigmoid 0.5
    reference = models.MODELS["vgg13"](num_classes=10, in_channels=1, input_size=8, width=8)
    reference.load_state_dict(classifier.state_dict())
    classifier.train(), reference.train()
    x_out = gan_step(classifier, aux, x, y, None, opts)
    gan_loss(classifier, x, y, x_out, opts)
    reference(x)  # the real pass alone
    bn = [m for m in classifier.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_ref = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and abs(float(bn[0].running_mean.mean()) - 0.0) > 1e-4  # the real pass did update them
    for layer, ref in zip(bn, bn_ref):
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=0)
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 1
        assert layer.momentum == ref.momentum == 0.1


def test_auxiliary_update_steps_only_its_network_and_round_trips_weights_only(tmp_path):
    torch.manual_seed(0)
    classifier, helper = nn.Linear(4, 3), nn.Linear(4, 4)
    aux = Auxiliary({"helper": helper}, {"helper": torch.optim.Adam(helper.parameters(), lr=0.1)})
    before = [p.clone() for p in classifier.parameters()], [p.clone() for p in helper.parameters()]
    aux.update("helper", classifier(helper(torch.randn(8, 4))).square().mean())
    assert all(p.grad is None for p in classifier.parameters())  # the classifier's gradients stay untouched
    assert all(torch.equal(a, b) for a, b in zip(before[0], classifier.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(before[1], helper.parameters()))
    aux.log(loss=torch.tensor(1.0))
    aux.log(loss=torch.tensor(3.0))
    assert aux.epoch_stats() == {"loss": 2.0} and aux.epoch_stats() == {}
    torch.save(aux.state_dict(), tmp_path / "aux.pt")
    copy = Auxiliary({"helper": nn.Linear(4, 4)}, {})
    copy.optimizers["helper"] = torch.optim.Adam(copy.nets["helper"].parameters(), lr=0.1)
    copy.load_state_dict(torch.load(tmp_path / "aux.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(copy.nets["helper"].parameters(), helper.parameters()))
    assert torch.equal(copy.optimizers["helper"].state_dict()["state"][0]["exp_avg"],
                       aux.optimizers["helper"].state_dict()["state"][0]["exp_avg"])


def test_method_defaults_per_dataset_and_explicit_flags_win():
    def resolve(*argv):
        return train.resolve(train.get_args_parser().parse_args(["--method", "gan", *argv]))

    cifar = resolve("--dataset", "CIFAR10")
    assert (cifar.arch, cifar.gan_arch, cifar.gan_beta, cifar.batch_size, cifar.lr) == \
        ("vgg13_nobn", "dcgan32", 0.1, 64, 2e-4)
    assert cifar.dropout == 0.5  # the original VGG-13's nn.Dropout() in its FC head
    assert (cifar.optimizer, cifar.weight_decay, cifar.milestones, cifar.epochs) == ("adam", 0.0, [0.6], 100)
    mnist = resolve("--dataset", "MNIST", "--gan-beta", "0.5", "--lr", "1e-3")
    assert (mnist.arch, mnist.gan_arch, mnist.gan_beta, mnist.lr, tuple(mnist.gan_betas)) == \
        ("lenet", "dcgan28", 0.5, 1e-3, (0.5, 0.999))
    plain = train.resolve(train.get_args_parser().parse_args(["--dataset", "CIFAR10"]))
    assert plain.arch == "resnet18" and plain.gan_beta is None
    with pytest.raises(ValueError, match="no gan defaults for dataset 'moons'.*digits"):
        resolve("--dataset", "moons")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # dropout, so that MC dropout is among the detectors that score the run; the same for both classifiers
    common = ["--dataset", "digits", "--epochs", str(EPOCHS), "--dropout", "0.2", "--runs-root", str(root),
              "--no-progress"]
    return {method: train.main(train.get_args_parser().parse_args([*common, "--method", method]))
            for method in ("plain", "gan")}


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _generated(run_dir, n=500):
    model, aux = load_auxiliary(run_dir)
    generator = aux.nets["generator"]
    torch.manual_seed(123)
    with torch.no_grad():
        return model, generator(generator.sample_latent(n, "cpu"))


def test_training_lowers_the_kl_on_generated_samples_and_keeps_accuracy(runs):
    log = _log(runs["gan"])
    kl = [row["gan_kl_fake"] for row in log]
    assert kl[-1] < 0.75 * kl[0], kl  # 0.73 with the original-width D (2x width at the first layer)
    assert all(math.isfinite(row["gan_d_loss"]) and math.isfinite(row["gan_g_loss"]) for row in log)
    assert abs(log[-1]["test_acc"] - _log(runs["plain"])[-1]["test_acc"]) <= 0.02
    model, fake = _generated(runs["gan"])
    plain = load_run(runs["plain"])
    with torch.no_grad():
        mmc_gan, mmc_plain = (net(fake).softmax(1).max(1).values.mean().item() for net in (model, plain))
    assert mmc_gan < 0.2, mmc_gan          # 1/K = 0.1
    assert mmc_plain > mmc_gan + 0.3, (mmc_plain, mmc_gan)  # a plain classifier is confident on them


def test_gan_run_loads_and_every_single_model_detector_scores_it(runs):
    model = load_run(runs["gan"])
    checkpoint = torch.load(runs["gan"] / "model.pt", weights_only=True)
    assert {"generator", "discriminator"} == set(checkpoint["aux"]) == set(checkpoint["aux_optimizers"])
    test_set = data.get_dataset("digits", "test")
    x, y = next(iter(DataLoader(test_set, batch_size=200)))
    _, fake = _generated(runs["gan"], n=200)
    loader = DataLoader(data.get_dataset("digits", "train", n=512), batch_size=256)
    for name, detector_class in sorted(DETECTORS.items()):
        if name == "ensemble":
            continue
        detector = detector_class(model).fit(loader)
        conf_in, conf_fake = detector.confidence(x), detector.confidence(fake)
        assert conf_in.shape == (200,) and torch.isfinite(conf_in).all() and torch.isfinite(conf_fake).all(), name
    msp = DETECTORS["msp"](model)
    assert auroc(msp.confidence(x), msp.confidence(fake)) > 0.95


def test_kill_and_resume_is_bit_identical_for_classifier_generator_and_discriminator(tmp_path):
    common = ["--dataset", "digits", "--method", "gan", "--epochs", "3", "--max-batches", "4", "--runs-root",
              str(tmp_path), "--no-progress"]
    a, b = train_full_and_killed(common, tmp_path / "digits", epochs=3)
    for net in ("generator", "discriminator"):
        for key in a["aux"][net]:
            assert torch.equal(a["aux"][net][key], b["aux"][net][key]), (net, key)
        for index, state in a["aux_optimizers"][net]["state"].items():
            assert torch.equal(state["exp_avg_sq"], b["aux_optimizers"][net]["state"][index]["exp_avg_sq"]), net
    killed_log = _log(tmp_path / "digits" / "killed")
    assert sum("resumed" in row for row in killed_log) == 1  # the resume is recorded once, in its first epoch
    assert _log(tmp_path / "digits" / "full") == [
        {**{k: v for k, v in row.items() if k != "resumed"}, "seconds": full_row["seconds"]}
        for row, full_row in zip(killed_log, _log(tmp_path / "digits" / "full"))]


def test_gan_column_between_de_and_odin_and_its_run_flags_resolve_on_every_dataset():
    import model_paths

    for dataset in ("MNIST", "FMNIST", "SVHN", "CIFAR10", "CIFAR100"):
        labels = [entry.label for entry in model_paths.MODEL_PATHS[dataset]]
        assert labels.index("GAN") == labels.index("DE") + 1 == labels.index("ODIN") - 1, labels
        flags, seed = model_paths.run_flags("gan-s0")
        opts = train.resolve(train.get_args_parser().parse_args(["--dataset", dataset, "--seed", str(seed), *flags]))
        assert opts.method == "gan" and GAN_ARCHS[opts.gan_arch][0] == opts.input_size
        assert opts.arch == ("lenet" if dataset == "MNIST" else "vgg13_nobn")
    assert "GAN" in [entry.label for entry in model_paths.MODEL_PATHS["digits"]]
    assert "gan-s0" in model_paths.table_runs("digits")
    assert model_paths.run_flags("gan-s0", model_paths.DEMO_BUDGET, "digits")[0][:2] == ["--method", "gan"]


def test_auxiliary_update_averages_gradients_over_processes(tmp_path):
    import torch.multiprocessing as mp

    from tests.aux_worker import update_on_rank

    mp.spawn(update_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "w")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"w.{rank}", weights_only=True) for rank in range(2)]
    torch.manual_seed(0)
    net = nn.Linear(3, 2)  # one process on the whole batch: the mean of the two halves' gradients
    x = torch.arange(24, dtype=torch.float32).view(8, 3) / 10
    (net(x).square().sum() / 8).backward()
    with torch.no_grad():
        expected = {name: param - param.grad for name, param in net.named_parameters()}
    for state in ranks:
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value)

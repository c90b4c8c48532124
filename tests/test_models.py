"""models/: registry contract, normalisation, mod, soft spectral normalisation, safe checkpoint round trips."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import MODELS, build_model
from models.spectral_norm import spectral_norm
from utils.checkpoints import save_checkpoint
from utils.methods import METHODS, load_run

torch.set_num_threads(1)

# one small configuration per registry entry: (input shape C,H,W, arch kwargs)
CASES = {
    "mlp": ((2,), {}),  # ACET's 2-100-100-2 toy
    "lenet": ((1, 8, 8), {}),
    "lenet_ddu": ((1, 28, 28), {}),
    "resnet18": ((1, 28, 28), {"width": 8}),
    "resnet34": ((3, 8, 8), {"width": 4}),
    "resnet50": ((3, 8, 8), {"width": 4}),
    "resnet_small": ((3, 8, 8), {"units": 1, "widths": (4, 8, 16)}),
    "wrn": ((3, 8, 8), {"depth": 10, "widen_factor": 1}),
    "densenet_bc100": ((3, 8, 8), {"depth": 10, "growth_rate": 4}),
    "vgg13": ((1, 28, 28), {"width": 8}),
    "vgg13_nobn": ((1, 28, 28), {"width": 8}),
    "vgg16": ((3, 32, 32), {"width": 8}),
    "good_cnn": ((1, 8, 8), {"width": 0.125}),  # one channel: size L
    "good_cnn_s": ((3, 8, 8), {"width": 0.125, "negative_head": True}),
    "good_cnn_l": ((1, 28, 28), {"width": 0.0625}),
    "good_cnn_xl": ((3, 8, 8), {"width": 0.0625}),
}
FEATURES = {"mlp": 100, "lenet": 1024, "lenet_ddu": 84, "resnet18": 64, "resnet34": 32, "resnet50": 128,
            "resnet_small": 16, "wrn": 64, "densenet_bc100": 9, "vgg13": 64, "vgg13_nobn": 64, "vgg16": 64,
            "good_cnn": 64, "good_cnn_s": 16, "good_cnn_l": 32, "good_cnn_xl": 32}
NUM_CLASSES = 3


def config_for(arch: str, **overrides) -> dict:
    shape, arch_kwargs = CASES[arch]
    config = {"arch": arch, "num_classes": NUM_CLASSES, "in_channels": shape[0],
              "input_size": shape[0] if arch == "mlp" else shape[-1], "arch_kwargs": dict(arch_kwargs)}
    config.update(overrides)
    return config


def batch(arch: str, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *CASES[arch][0], generator=torch.Generator().manual_seed(seed))


def test_every_registry_entry_has_a_case():
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_contract_shapes_and_head_of_features(arch):
    torch.manual_seed(0)
    model = build_model(config_for(arch)).eval()
    x = batch(arch)
    features = model.features(x)
    logits = model(x)
    assert features.shape == (4, FEATURES[arch]) == (4, model.num_features)
    assert logits.shape == (4, NUM_CLASSES) and model.num_classes == NUM_CLASSES
    assert torch.allclose(model.head(features), logits, atol=1e-6, rtol=0)
    assert torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("arch", ["lenet", "resnet_small", "wrn", "vgg13", "mlp"])
def test_dropout_is_active_in_training_only(arch):
    torch.manual_seed(0)
    model = build_model(config_for(arch, dropout=0.5))
    x = batch(arch)
    model.eval()
    assert torch.equal(model(x), model(x))
    assert torch.allclose(model.head(model.features(x)), model(x), atol=1e-6, rtol=0)
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("arch", ["lenet", "resnet18", "mlp"])
def test_normalize_is_the_first_layer(arch):
    shape = CASES[arch][0]
    channels = shape[0]
    mean = tuple(0.1 * (i + 1) for i in range(channels))
    std = tuple(0.2 + 0.1 * i for i in range(channels))
    torch.manual_seed(0)
    plain = build_model(config_for(arch)).eval()
    normed = build_model(config_for(arch, normalize=[list(mean), list(std)])).eval()
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["normalize.mean", "normalize.std"] and not unexpected
    x = batch(arch)
    view = (1, -1) + (1,) * (x.dim() - 2)
    x_std = (x - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)
    assert torch.allclose(normed(x), plain(x_std), atol=1e-5)
    assert not torch.allclose(normed(x), plain(x), atol=1e-3)


def test_mlp_flattens_images_and_has_the_toy_layout():
    model = MODELS["mlp"](num_classes=2, in_channels=1, input_size=(1, 8, 8), widths=(7, 5))
    assert [m.weight.shape for m in model.modules() if isinstance(m, nn.Linear)] == [(7, 64), (5, 7), (2, 5)]
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 2)
    toy = MODELS["mlp"](num_classes=2, in_channels=1, input_size=2)
    assert [m.out_features for m in toy.modules() if isinstance(m, nn.Linear)] == [100, 100, 2]


def test_lenet_fc_size_and_init_follow_input_size():
    for size, fc_in in [(8, 64 * 2 * 2), (28, 3136)]:
        model = MODELS["lenet"](num_classes=10, in_channels=1, input_size=size)
        assert model.fc1.in_features == fc_in
    # ACET init N(0, 2 / fan_in): fan_in 3136 -> std 0.02525
    assert abs(model.fc1.weight.std().item() - (2 / 3136) ** 0.5) < 1e-3
    assert model.fc1.bias.abs().max().item() == 0.0


@pytest.mark.parametrize("arch,size", [("lenet", 3), ("lenet_ddu", 8), ("densenet_bc100", 2)])
def test_too_small_input_raises_a_one_line_error(arch, size):
    kwargs = dict(CASES[arch][1])
    with pytest.raises(ValueError) as info:
        MODELS[arch](num_classes=2, in_channels=1, input_size=size, **kwargs)
    message = str(info.value)
    assert arch in message and str((1, size, size)) in message and "\n" not in message


def test_build_model_errors_and_defaults():
    with pytest.raises(ValueError, match="unknown arch 'nope'; valid: mlp, lenet"):
        build_model({"arch": "nope", "num_classes": 2, "in_channels": 1, "input_size": 8})
    with pytest.raises(ValueError, match="input_size"):
        build_model({"arch": "lenet", "num_classes": 2, "in_channels": 1})
    model = build_model({"arch": "lenet", "num_classes": 2, "in_channels": 1, "input_size": 8})
    assert isinstance(model.dropout, nn.Identity) and isinstance(model.normalize, nn.Identity)
    with pytest.raises(ValueError, match="lenet does not support spectral_norm_coeff"):
        build_model({"arch": "lenet", "num_classes": 2, "in_channels": 1, "input_size": 8,
                     "spectral_norm_coeff": 3.0})


# ----------------------------------------------------------------------------------------------- mod


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wrn", "vgg16"])
def test_mod_uses_leaky_relu_and_parameter_free_shortcuts(arch):
    torch.manual_seed(0)
    plain = build_model(config_for(arch))
    modded = build_model(config_for(arch, mod=True)).eval()
    assert any(isinstance(m, nn.ReLU) for m in plain.modules())
    assert not any(isinstance(m, nn.ReLU) for m in modded.modules())
    leaky = [m for m in modded.modules() if isinstance(m, nn.LeakyReLU)]
    assert leaky and all(m.negative_slope == 0.01 for m in leaky)
    if arch != "vgg16":
        assert any("shortcut" in k for k in plain.state_dict())
        assert not any("shortcut" in k for k in modded.state_dict())
    # numerically: negative pre-activations pass with slope 0.01
    seen = []
    hook = leaky[0].register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    modded(batch(arch))
    hook.remove()
    pre, out = seen[0]
    negative = pre < 0
    assert negative.any()
    assert torch.allclose(out[negative], 0.01 * pre[negative])


# ------------------------------------------------------------------------------------- spectral norm


def operator_norm(layer: nn.Module, input_shape: tuple, iterations: int = 500) -> float:
    """Independent long power iteration on W^T W of the layer as used (weight read from `layer.weight`)."""
    weight = layer.weight.detach()
    gen = torch.Generator().manual_seed(123)
    if isinstance(layer, nn.Linear):
        v = torch.randn(weight.shape[1], generator=gen, dtype=torch.float64)
        w = weight.double()
        for _ in range(iterations):
            v = w.t() @ (w @ v)
            v = v / v.norm()
        return (w @ v).norm().item()
    v = torch.randn(1, *input_shape, generator=gen, dtype=torch.float64)
    w = weight.double()
    out_shape = F.conv2d(v, w, None, layer.stride, layer.padding).shape
    pad = [input_shape[i + 1] - ((out_shape[i + 2] - 1) * layer.stride[i] - 2 * layer.padding[i]
                                 + w.shape[i + 2]) for i in range(2)]
    for _ in range(iterations):
        u = F.conv2d(v, w, None, layer.stride, layer.padding)
        v = F.conv_transpose2d(u, w, None, layer.stride, layer.padding, tuple(pad))
        v = v / v.norm()
    return F.conv2d(v, w, None, layer.stride, layer.padding).norm().item()


@pytest.mark.parametrize("kind", ["conv_stride1", "conv_stride2", "linear"])
def test_spectral_norm_bounds_the_operator_norm(kind):
    torch.manual_seed(0)
    coeff = 1.5
    if kind == "linear":
        layer, shape = nn.Linear(20, 12), (20,)
    else:
        layer, shape = nn.Conv2d(4, 6, 3, stride=1 if kind == "conv_stride1" else 2, padding=1), (4, 7, 7)
    with torch.no_grad():
        layer.weight.mul_(5.0)
    before = operator_norm(layer, shape)
    assert before > 2 * coeff  # the bound has to do something
    spectral_norm(layer, coeff, shape if kind != "linear" else None)
    layer.train()
    x = torch.rand(2, *shape)
    for _ in range(100):  # one power step per training forward
        layer(x)
    layer.eval()
    after = operator_norm(layer, shape)
    assert after <= coeff * (1 + 1e-2)
    assert after >= coeff * 0.97  # soft SN rescales to the coefficient, not below
    # eval reuses u, v: the weight is a fixed tensor
    assert torch.equal(layer.weight, layer.weight)


def test_soft_spectral_norm_leaves_small_layers_unchanged_and_passes_gradients():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    original = layer.weight.detach().clone()
    assert operator_norm(layer, (3, 6, 6)) < 3.0
    spectral_norm(layer, 3.0, (3, 6, 6))
    layer(torch.rand(2, 3, 6, 6)).sum().backward()
    assert torch.allclose(layer.weight, original)
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0


def test_spectral_norm_in_a_model_covers_every_conv_but_not_the_head():
    torch.manual_seed(0)
    coeff = 1.0
    model = build_model(config_for("resnet_small", spectral_norm_coeff=coeff, mod=True))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    assert not hasattr(model.fc, "parametrizations")
    strided = [m for m in convs if m.stride == (2, 2)][0]
    param = strided.parametrizations.weight[0]
    assert param.input_shape == (4, 8, 8)  # recorded by the dry forward: stage 2 input of an 8x8 image
    model.train()
    x = batch("resnet_small", n=8)
    for _ in range(60):
        model(x)
    model.eval()
    for conv in convs:
        shape = getattr(conv.parametrizations.weight[0], "input_shape", None)
        if shape is not None:
            assert operator_norm(conv, shape, iterations=300) <= coeff * (1 + 1e-2)


# --------------------------------------------------------------------------------------- checkpoints


def save_run(tmp_path, model: nn.Module, config: dict, name: str = "run"):
    run_dir = tmp_path / name
    save_checkpoint(run_dir / "model.pt", {"model": model.state_dict(), "config": config, "epoch": 3})
    return run_dir


@pytest.mark.parametrize("arch", sorted(CASES))
def test_save_load_round_trip_gives_identical_outputs(tmp_path, arch):
    torch.manual_seed(1)
    sn = 2.0 if arch in ("resnet18", "wrn", "densenet_bc100", "mlp") else None
    config = config_for(arch, spectral_norm_coeff=sn, lr=0.1, seed=0)  # extra keys are ignored
    model = build_model(config)
    model.train()
    model(batch(arch, seed=5))  # move BN statistics and spectral-norm vectors away from their init
    model.eval()
    run_dir = save_run(tmp_path, model, config)
    assert [p.name for p in run_dir.iterdir()] == ["model.pt"]  # no temporary file left behind
    loaded = load_run(run_dir)
    assert not loaded.training and loaded.run_config["arch"] == arch
    x = batch(arch, seed=2)
    assert torch.equal(loaded(x), model(x))


def test_load_run_applies_the_methods_wrap_model(tmp_path, monkeypatch):
    from utils.methods.base import Method

    class Scaled(nn.Module):
        def __init__(self, backbone, scale):
            super().__init__()
            self.backbone = backbone
            self.log_scale = nn.Parameter(torch.tensor(float(scale)))

        def forward(self, x):
            return self.backbone(x) * self.log_scale.exp()

    calls = []

    def wrap(model, opts, init):
        calls.append((opts.scale, init))
        return Scaled(model, 0.0)

    monkeypatch.setitem(METHODS, "scaled", Method(loss=lambda *a: None, wrap_model=wrap))
    config = config_for("lenet", method="scaled", scale=0.7)
    model = Scaled(build_model(config), 0.7).eval()
    loaded = load_run(save_run(tmp_path, model, config))
    assert calls == [(0.7, False)]
    assert isinstance(loaded, Scaled) and abs(loaded.log_scale.item() - 0.7) < 1e-7
    x = batch("lenet")
    assert torch.equal(loaded(x), model(x))


class Payload:
    """A pickle that runs a shell command when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def test_load_run_refuses_bad_checkpoints(tmp_path):
    config = config_for("lenet")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_run(tmp_path / "missing")

    good = save_run(tmp_path, build_model(config), config, "good")
    data = (good / "model.pt").read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc/model.pt: unreadable checkpoint, truncated"):
        load_run(tmp_path / "trunc")

    marker = tmp_path / "EXECUTED"
    for name, write in [
        ("torch_os", lambda p: torch.save({"model": Payload(marker), "config": config}, p)),
        ("pickle_os", lambda p: p.write_bytes(pickle.dumps({"model": Payload(marker), "config": config}))),
        ("torch_custom", lambda p: torch.save({"model": {}, "config": config, "extra": Custom()}, p)),
    ]:
        (tmp_path / name).mkdir()
        write(tmp_path / name / "model.pt")
        with pytest.raises(ValueError, match=f"refusing to load .*{name}/model.pt: not a plain-tensor") as info:
            load_run(tmp_path / name)
        assert "\n" not in str(info.value)
    assert not marker.exists()

    save_checkpoint(tmp_path / "nokeys" / "model.pt", {"state": {}, "epoch": 1})
    with pytest.raises(ValueError, match="expected a dict with 'model'.*found \\['epoch', 'state'\\]"):
        load_run(tmp_path / "nokeys")

    other = config_for("resnet_small")
    save_checkpoint(tmp_path / "wrong" / "model.pt",
                    {"model": build_model(other).state_dict(), "config": config, "epoch": 1})
    with pytest.raises(ValueError, match="checkpoint does not match arch lenet: missing"):
        load_run(tmp_path / "wrong")

    widened = build_model(config_for("wrn", arch_kwargs={"depth": 10, "widen_factor": 2})).state_dict()
    save_checkpoint(tmp_path / "shape" / "model.pt", {"model": widened, "config": config_for("wrn"), "epoch": 1})
    with pytest.raises(ValueError, match="does not match arch wrn: .*shape-mismatched 33"):
        load_run(tmp_path / "shape")

"""Loading run folders above the models: the core loader takes the methods' wrappers from its caller, and
`utils.methods.load_run` hands in every method's; ProoD's --classifier recognises a wrapped run by its weights."""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch

import models
from utils import checkpoints, methods
from utils.methods.certified import wrap_prood
from utils.methods.edl import EDLModel

CONFIG = {"arch": "mlp", "num_classes": 10, "in_channels": 1, "input_size": [1, 8, 8],
          "arch_kwargs": {"widths": [16]}, "dataset": "digits", "seed": 0}


def _save(root, name: str, model: torch.nn.Module, config: dict):
    run_dir = root / "digits" / name
    checkpoints.save_checkpoint(run_dir / "model.pt", {"model": model.state_dict(), "config": config, "epoch": 1})
    return run_dir


def test_a_wrapped_run_loads_through_the_method_registry_only(tmp_path):
    torch.manual_seed(0)
    edl = EDLModel(models.build_model(CONFIG)).eval()
    run_dir = _save(tmp_path, "edl-s0", edl, {**CONFIG, "method": "edl"})
    x = torch.rand(5, 1, 8, 8)
    loaded = methods.load_run(run_dir)
    assert isinstance(loaded, EDLModel) and torch.equal(loaded(x), edl(x))
    # the core loader knows no method: without the wrapper the weights do not fit the bare backbone
    with pytest.raises(checkpoints.CheckpointError, match=r"does not match arch mlp: missing 4 .*unexpected 4"):
        checkpoints.load_run(run_dir)
    assert isinstance(checkpoints.load_run(run_dir, wrappers={"edl": methods.METHODS["edl"].wrap_model}), EDLModel)


@pytest.mark.parametrize("method, wrap", [("edl", EDLModel), ("plain", None)])
def test_prood_classifier_must_be_a_plain_backbone(tmp_path, method, wrap):
    torch.manual_seed(0)
    backbone = models.build_model(CONFIG)
    _save(tmp_path, "clf-s0", wrap(backbone) if wrap else backbone, {**CONFIG, "method": method})
    opts = Namespace(**{**CONFIG, "method": "prood", "classifier": "clf-s0", "runs_root": str(tmp_path),
                        "discriminator_arch": "good_cnn_s", "discriminator_width": 0.125})
    if wrap is not None:
        with pytest.raises(ValueError, match="--classifier clf-s0 is a edl run with a wrapped model; ProoD takes"):
            wrap_prood(models.build_model(CONFIG), opts, init=True)
        return
    prood = wrap_prood(models.build_model(CONFIG), opts, init=True)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(prood.classifier(x), backbone.eval()(x))

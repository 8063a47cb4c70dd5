"""Which cells params ask for."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import tiny_params

from transfer_study import cells
from transfer_study.config import SplitParams, UserError


def test_cells_for_respects_exclude_and_filters():
    params = tiny_params(architectures=("efficientnet_lite0", "resnet18"), exclude=("resnet18-frozen",),
                         conditions=("scratch", "frozen"))
    names = [c.name for c in cells.cells_for(params)]
    assert names == ["efficientnet_lite0-scratch-s0", "efficientnet_lite0-frozen-s0", "resnet18-scratch-s0"]
    assert [c.name for c in cells.cells_for(params, "resnet18", "frozen")] == []
    with pytest.raises(UserError, match=re.escape("--arch vgg19 is not in train.architectures "
                                                  "['efficientnet_lite0', 'resnet18']")):
        cells.cells_for(params, "vgg19")
    with pytest.raises(UserError, match=re.escape("--condition finetune is not in train.conditions "
                                                  "['scratch', 'frozen']")):
        cells.cells_for(params, "resnet18", "finetune")


def test_pretrained_architectures_are_those_of_pretrained_cells_not_excluded():
    params = tiny_params(architectures=("resnet18", "small_cnn", "efficientnet_lite0"), conditions=("scratch", "frozen"),
                         exclude=("small_cnn-frozen", "resnet18-frozen"))
    assert cells.pretrained_architectures(params) == ["efficientnet_lite0"]
    assert cells.pretrained_architectures(tiny_params(conditions=("scratch",))) == []


def test_each_replicate_is_a_run_of_every_cell_named_after_it():
    import dataclasses

    base = tiny_params(architectures=("small_cnn",), conditions=("scratch",))
    params = dataclasses.replace(base, data=dataclasses.replace(base.data, replicates=3))
    chosen = cells.cells_for(params)
    assert [c.name for c in chosen] == ["small_cnn-scratch-s0", "small_cnn-scratch-s0-rep1", "small_cnn-scratch-s0-rep2"]
    assert [c.replicate for c in chosen] == [0, 1, 2] and cells.runs_per_group(params) == 3
    assert cells.Cell("resnet18", "frozen", 1, 2, 0.25, 4).variant == "s1-rep4-r2-f0.25"
def test_one_run_of_a_cell_is_chosen_by_its_variant():
    params = tiny_params(architectures=("small_cnn",), conditions=("scratch",), seeds=(0, 1))
    params = dataclasses.replace(params, split=SplitParams(repeats=2, train_fractions=(0.5, 1.0)))
    [one] = cells.cells_for(params, "small_cnn", "scratch", "s1-r1-f0.5")
    assert (one.seed, one.repeat, one.fraction) == (1, 1, 0.5)
    with pytest.raises(UserError, match="--run s2 is not a run .* s0-f0.5"):
        cells.cells_for(params, "small_cnn", "scratch", "s2")

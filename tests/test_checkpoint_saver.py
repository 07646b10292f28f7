"""Checkpoints are written atomically: a save that fails leaves the previous file intact."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from uniseg_components.engines import SafeCheckpointSaver


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": net, "opt": opt}, save_final=True, final_filename="model.pt")
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    good = (tmp_path / "model.pt").read_bytes()
    assert torch.load(tmp_path / "model.pt", weights_only=True)["model"]["weight"].shape == (2, 2)
    # the saver's own disk handler, given a checkpoint that fails half-way through pickling
    with pytest.raises(Exception, match="pickle"):
        saver._final_checkpoint.save_handler({"model": net.state_dict(), "bad": lambda x: x}, "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == good  # untouched, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_key_metric_checkpoint_is_atomic_too(tmp_path):
    saver = SafeCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True)
    assert saver._key_metric_checkpoint.save_handler._atomic is True

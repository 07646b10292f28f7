"""The one checkpoint saver and reader: atomic writes, checksums, the three modes, best-metric state."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from uniseg_components.checkpoints import read_checkpoint, state_checksum
from uniseg_components.handlers import CheckpointLoader, SafeCheckpointSaver


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": net, "opt": opt}, mode="final", filename="model.pt")
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    good = (tmp_path / "model.pt").read_bytes()
    assert read_checkpoint(tmp_path / "model.pt")["model"]["weight"].shape == (2, 2)
    # a checkpoint that fails half-way through pickling
    saver.save_dict["bad"] = lambda x: x
    with pytest.raises(Exception, match="pickle"):
        saver.save()
    assert (tmp_path / "model.pt").read_bytes() == good  # untouched, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_checkpoints_carry_a_checksum_that_the_reader_verifies(tmp_path):
    net = torch.nn.Linear(4, 3)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": net}, mode="final")
    path = saver.save()
    raw = torch.load(path, weights_only=True)
    assert raw["checksum"] == state_checksum({"model": net.state_dict()})
    assert "checksum" not in read_checkpoint(path)
    # a flipped weight gives another checksum: the reader refuses the file, naming it
    raw["model"]["weight"][0, 0] += 1.0
    torch.save(raw, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged.pt.*damaged"):
        read_checkpoint(tmp_path / "damaged.pt")


def test_best_mode_writes_only_on_improvement_and_its_state_survives_a_restart(tmp_path):
    net = torch.nn.Linear(1, 1)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": net}, mode="best")
    assert saver.path.name == "model.pt" and saver.best_metric == -math.inf
    values = [0.3, 0.5, 0.4]
    written = []
    for epoch, v in enumerate(values, 1):
        with torch.no_grad():
            net.weight.fill_(epoch)
        ev = Engine(lambda e, b: None)
        ev.state.epoch, ev.state.metrics = epoch, {"val_mean_dice": v}
        written.append(saver(ev))
    assert [w is not None for w in written] == [True, True, False]
    assert saver.state_dict() == {"best_metric": 0.5, "best_epoch": 2}
    assert float(read_checkpoint(tmp_path / "model.pt")["model"]["weight"]) == 2.0
    # a new saver restored from the state keeps epoch 2's model against a worse value
    again = SafeCheckpointSaver(str(tmp_path), {"model": net}, mode="best")
    again.load_state_dict(saver.state_dict())
    ev = Engine(lambda e, b: None)
    ev.state.epoch, ev.state.metrics = 4, {"val_mean_dice": 0.45}
    assert again(ev) is None
    assert float(read_checkpoint(tmp_path / "model.pt")["model"]["weight"]) == 2.0


def test_latest_mode_saves_the_engine_and_the_loader_resumes_it(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = Engine(lambda e, b: None)
    best = SafeCheckpointSaver(str(tmp_path), {"model": net}, mode="best")
    best.best_metric, best.best_epoch = 0.7, 2
    SafeCheckpointSaver(str(tmp_path), {"model": net, "optimizer": opt, "best": best}, mode="latest").attach(trainer)
    trainer.run([0, 1], max_epochs=3)
    state = read_checkpoint(tmp_path / "checkpoint_latest.pt")
    assert state["trainer"]["iteration"] == 6 and state["best"] == {"best_metric": 0.7, "best_epoch": 2}
    # a fresh run restores the engine (epoch 3), the weights and the best saver's state, keeping its own max_epochs
    net2, best2 = torch.nn.Linear(2, 1), SafeCheckpointSaver(str(tmp_path), {"model": net}, mode="best")
    resumed = Engine(lambda e, b: None)
    loader = CheckpointLoader(tmp_path / "checkpoint_latest.pt", {"model": net2, "best": best2}, engine_key="trainer")
    loader.attach(resumed)
    epochs = []
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    resumed.run([0, 1], max_epochs=5)
    assert epochs == [4, 5]
    assert torch.equal(net2.weight, net.weight) and best2.state_dict() == {"best_metric": 0.7, "best_epoch": 2}
    with pytest.raises(ValueError, match="beyond --epochs 2"):
        CheckpointLoader(tmp_path / "checkpoint_latest.pt", {"model": net2}, engine_key="trainer")(
            _with_max_epochs(Engine(lambda e, b: None), 2)
        )


def _with_max_epochs(engine: Engine, n: int) -> Engine:
    engine.state.max_epochs = n
    return engine

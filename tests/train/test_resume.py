"""Resuming a Lightning run: the checkpoint is read with the weights-only unpickler, and a
file that pickles Python objects is refused in one line, without running its code."""

from __future__ import annotations

import os
import pickle

import lightning as L
import pytest
import torch

from rsvl.errors import CheckpointMismatchError
from rsvl.train.resume import fit


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))


def _loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)


@pytest.mark.parametrize("as_torch_save", [True, False])
def test_pickled_payload_as_resume_checkpoint_is_refused_without_running(tmp_path, as_torch_save):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "last.ckpt"
    payload = {"state_dict": {}, "x": _Payload(str(marker))}
    if as_torch_save:
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointMismatchError, match="rsvl refuses to unpickle") as err:
        fit(_trainer(tmp_path, 2), _Tiny(), _loader(), ckpt_path=ckpt)
    assert not marker.exists()
    assert "weights_only=False" not in str(err.value)
    assert "\n" not in str(err.value)


def test_resume_from_a_real_checkpoint_passes_weights_only(tmp_path, monkeypatch):
    t = _trainer(tmp_path, 2)
    fit(t, _Tiny(), _loader())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    seen = {}
    real = L.Trainer.fit

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    t2 = _trainer(tmp_path, 4)
    fit(t2, _Tiny(), _loader(), ckpt_path=ckpt)
    assert seen["weights_only"] is True
    assert t2.global_step == 4

"""--device is checked once against the machine: a missing GPU is one actionable line."""

from __future__ import annotations

import pytest
import torch

import rsvl
from rsvl.errors import DeviceError, RsvlError
from rsvl.models.device import check_device


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for asked in ("cuda", "cuda:0", "gpu"):
        with pytest.raises(DeviceError, match="no usable CUDA GPU") as err:
            check_device(asked)
        assert isinstance(err.value, RsvlError)
        assert "\n" not in str(err.value) and "--device cpu" in str(err.value)
    assert check_device("auto") == "cpu"
    assert check_device(None) == "cpu"
    assert check_device("cpu") == "cpu"


def test_unknown_device_and_gpu_index_beyond_the_count(monkeypatch):
    with pytest.raises(DeviceError, match="unknown device"):
        check_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("auto") == "cuda"
    assert check_device("cuda:0") == "cuda:0"
    with pytest.raises(DeviceError, match="1 CUDA GPU"):
        check_device("cuda:3")


def test_load_checks_the_device_before_building(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        rsvl.load("mini-clip", device="cuda")


def test_cli_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import numpy as np
    from conftest import write_raster

    from rsvl.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    src = write_raster(tmp_path / "s.tif", np.zeros((3, 16, 16), np.uint8))
    assert main(["segment", str(src), "forest, water", "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0] and "--device cpu" in lines[0]
    assert not list(tmp_path.glob("o_*"))


def test_training_checks_the_device_before_writing(tmp_path, monkeypatch):
    from rsvl.train.refer import ReferTrainConfig, train_refer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError):
        train_refer("mini-refer", tmp_path / "data", tmp_path / "run", ReferTrainConfig(device="cuda"), quiet=True)
    assert not (tmp_path / "run").exists()

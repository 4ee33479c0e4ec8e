"""Every CLIP card's load path, offline (torchgeo's ``test_<weights>`` style).

For each card in ``rsvl.models.clip.CARDS`` a random open_clip model is written in the card's
published layout - key names, wrapping, file format and file name:

* FarSLIP: ``{'epoch', 'state_dict': {'module.*'}}``; stage 2 with Long-CLIP's 248-position
  tables (``positional_embedding`` + ``positional_embedding_res`` + ``mask1``/``mask2``);
* RemoteCLIP, GeoRSCLIP: a bare open_clip state dict;
* SkyCLIP: an open_clip training checkpoint ``{'epoch', 'state_dict', 'optimizer'}`` inside the
  published zip, served by a fake ``urlopen`` and extracted by rsvl's download path;
* OpenAI: ``open_clip_pytorch_model.bin``, a bare state dict;

placed where rsvl looks for it (``RSVL_CACHE`` points at ``tmp_path``) and loaded by name
through :func:`rsvl.models.registry.load`, which resolves the file itself.

**Shrunk architectures.** Every architecture (ViT-B-16/32, ViT-L-14, ViT-H-14, RN50) is built
with its width and depth reduced through the family's ``model_cfg`` override (transformers:
2 layers of width 32; ModifiedResNet: one block per stage of width 8; embed dim 32), so the
whole test takes seconds. Patch size, input size, context length, activation, key names and
wrapping are the card's own; only tensor shapes and the number of blocks differ from the
published files.
"""

from __future__ import annotations

import copy
import io
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip import CLIP, get_model_config
from open_clip.transformer import QuickGELU

from rsvl.models import registry, weights
from rsvl.models.cards import ModelCard
from rsvl.models.clip import CARDS, ClipModel, to_long_text_state_dict

torch.set_num_threads(1)

#: card name prefix -> published layout; a new kind of card must say how it is published
LAYOUTS = {
    "farslip": "farslip",
    "remoteclip": "bare",
    "georsclip": "bare",
    "skyclip": "training-zip",
    "openai": "bare",
}


def small_config(arch: str) -> dict:
    """open_clip's config of ``arch`` with width and depth shrunk (see the module docstring)."""
    cfg = copy.deepcopy(get_model_config(arch))
    vision = cfg["vision_cfg"]
    if isinstance(vision["layers"], (list, tuple)):  # ModifiedResNet
        vision.update(layers=[1, 1, 1, 1], width=8, head_width=32)
    else:
        vision.update(layers=2, width=32, head_width=16)
    cfg["text_cfg"].update(width=32, heads=2, layers=2)
    cfg["embed_dim"] = 32
    return cfg


def _layout(card: ModelCard) -> str:
    kind = next((v for k, v in LAYOUTS.items() if card.name.startswith(k)), None)
    assert kind is not None, f"no published layout known for card {card.name!r}"
    return kind


def _random_model(card: ModelCard, cfg: dict) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(**copy.deepcopy(cfg), quick_gelu=card.quick_gelu).eval()
    with torch.no_grad():  # open_clip leaves some tensors at zero/one; make every weight count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "bn" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _write_published(card: ModelCard, sd: dict, monkeypatch) -> tuple[Path, list[str]]:
    """Write ``sd`` as ``card``'s authors publish it, where rsvl's resolver finds it; returns
    the cache path and the URLs a download fetched (a list the fake ``urlopen`` fills)."""
    dest = weights.cache_path(card)
    dest.parent.mkdir(parents=True, exist_ok=True)
    kind = _layout(card)
    seen: list[str] = []
    if kind == "farslip":
        torch.save({"epoch": 10, "state_dict": {"module." + k: v for k, v in sd.items()}}, dest)
    elif kind == "bare":
        torch.save(dict(sd), dest)
    elif kind == "training-zip":
        payload = io.BytesIO()
        torch.save(
            {
                "epoch": 20,
                "name": card.name,
                "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-9, "params": [0, 1]}]},
            },
            payload,
        )
        stem = Path(card.source.url).stem
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(f"{stem}/", b"")
            zf.writestr(f"{stem}/{card.source.archive_member}", payload.getvalue())
            zf.writestr(f"{stem}/params.txt", b"lr: 1e-9")
        def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
            seen.append(url)
            return io.BytesIO(archive.getvalue())

        monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
        monkeypatch.delenv("RSVL_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        return dest, seen  # written by rsvl's download path on load
    else:  # pragma: no cover - LAYOUTS and this function grow together
        raise AssertionError(kind)
    return dest, seen


@pytest.mark.parametrize("card", CARDS, ids=[c.name for c in CARDS])
def test_card_loads_its_published_layout(card, tmp_path, monkeypatch):
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    cfg = small_config(card.architecture)
    ref = _random_model(card, cfg)
    sd = ref.state_dict()
    long_text = card.context_length > 77
    if long_text:  # FarSLIP stage 2 ships Long-CLIP's two 248-position tables
        sd = to_long_text_state_dict(sd)
    dest, downloaded = _write_published(card, sd, monkeypatch)

    model = registry.load(card.name, model_cfg=cfg)

    assert dest.is_file() and dest.name == card.source.filename
    assert downloaded == ([card.source.url] if _layout(card) == "training-zip" else [])
    assert isinstance(model, ClipModel) and model.name == card.name and model.card is card
    assert model.image_size == card.image_size
    assert model.context_length == card.context_length and model.long_text == long_text
    acts = [m for m in model.model.modules() if isinstance(m, QuickGELU)]
    assert bool(acts) == card.quick_gelu
    loaded = model.model.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k].float(), v.float()) for k, v in sd.items())

    images = np.random.default_rng(1).integers(0, 256, (1, 3, card.image_size, card.image_size), dtype=np.uint8)
    x = (torch.from_numpy(images).float() / 255.0 - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(
        card.std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        want = F.normalize(ref.encode_image(x), dim=-1)
    assert (model.encode_image(images) - want).abs().max() <= 1e-5
    assert model.encode_text(["a satellite image of farmland"]).shape == (1, 32)


@pytest.mark.parametrize("card", CARDS, ids=[c.name for c in CARDS])
def test_registry_build_follows_the_card(card):
    """``build``: the card's architecture with random weights (shrunk as above), its activation
    and text layout; float32 in train mode, as training starts from it."""
    net = registry.build(card.name, model_cfg=small_config(card.architecture))
    assert net.training and all(p.dtype == torch.float32 for p in net.parameters())
    assert net.positional_embedding.shape[0] == card.context_length
    assert hasattr(net, "positional_embedding_res") == (card.context_length > 77)
    assert bool([m for m in net.modules() if isinstance(m, QuickGELU)]) == card.quick_gelu
    size = net.visual.image_size
    assert (size if isinstance(size, int) else size[0]) == card.image_size


def test_every_card_kind_has_a_layout():
    assert {_layout(c) for c in CARDS} == set(LAYOUTS.values())

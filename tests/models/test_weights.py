"""Model cards and weight resolution. The network is never touched: the one download function
is replaced in every test, and a stray call fails the test."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

import pytest

from rsvl.errors import UnknownModelError, WeightsChecksumError, WeightsNotFoundError
from rsvl.models import registry, weights
from rsvl.models.cards import ModelCard, WeightsSource
from rsvl.models.registry import REGISTRY, get_card, list_cards

PAYLOAD = b"not really a checkpoint, but bytes with a known hash"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _card(sha256: str | None = None, **source) -> ModelCard:
    src = source or {
        "filename": "Tiny_ViT-B-16.pt",
        "hf_repo": "example/tiny",
        "revision": "a" * 40,
    }
    return ModelCard(
        name="tiny-weights-test",
        family="clip",
        architecture="ViT-B-16",
        source=WeightsSource(**src),
        sha256=sha256,
        licence="test",
        description="test card",
    )


class Downloads:
    """Stand-in for the network: records calls, writes ``payload`` or raises ``error``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path]] = []
        self.payload: bytes | None = None
        self.error: Exception | None = None

    def __call__(self, card: ModelCard, dest: Path) -> None:
        self.calls.append((card.name, dest))
        if self.payload is None and self.error is None:
            raise AssertionError("unexpected download: tests must not touch the network")
        if self.payload is not None:
            dest.write_bytes(self.payload)
        if self.error is not None:
            raise self.error


@pytest.fixture
def net(tmp_path, monkeypatch) -> Downloads:
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RSVL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_hf_cached_path", lambda card: None)
    fake = Downloads()
    monkeypatch.setattr(weights, "_download_to", fake)
    return fake


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError) as err:
        get_card("farslip2-vit-b61")
    msg = str(err.value)
    assert "farslip2-vit-b16" in msg and "rsvl models" in msg
    with pytest.raises(UnknownModelError, match="rsvl models"):
        get_card("completely-different")


def test_names_are_forgiving():
    assert get_card("FarSLIP2_ViT_B16").name == "farslip2-vit-b16"
    card = get_card("remoteclip-vit-b32")
    assert get_card(card) is card


def test_builtin_cards():
    expected = {
        "farslip1-vit-b16", "farslip1-vit-b32", "farslip2-vit-b16", "farslip2-vit-b32",
        "remoteclip-rn50", "remoteclip-vit-b32", "remoteclip-vit-l14",
        "georsclip-vit-b32", "georsclip-vit-h14", "skyclip-vit-b32", "skyclip-vit-l14",
        "openai-vit-b16", "openai-vit-b32", "openai-vit-l14",
    }  # fmt: skip
    assert expected <= set(REGISTRY)
    for name in expected:
        card = REGISTRY[name]
        assert card.family == "clip" and card in registry.FAMILIES["clip"].CARDS
        assert card.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", card.sha256)
        rev = card.source.revision
        assert rev is None or re.fullmatch(r"[0-9a-f]{40}", rev)
        if rev is None:  # an unpinned source must say so
            assert "not pinned" in card.notes or "cannot be pinned" in card.notes
        assert card.source.download_url.startswith("https://")
    assert get_card("farslip2-vit-b16").source.filename == "FarSLIP2_ViT-B-16.pt"
    assert get_card("farslip1-vit-b32").source.download_url.endswith("FarSLIP1_ViT-B-32.pt")
    assert get_card("farslip2-vit-b32").context_length == 248
    assert get_card("farslip1-vit-b16").context_length == 77
    assert all(REGISTRY[f"farslip{s}-vit-b{p}"].quick_gelu for s in (1, 2) for p in (16, 32))
    assert get_card("georsclip-vit-h14").source.repo_filename == "ckpt/RS5M_ViT-H-14.pt"
    segmenters = [c.name for c in list_cards(family="clip", task="segment")]
    assert "farslip1-vit-b16" in segmenters and "remoteclip-rn50" not in segmenters


def test_registry_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, rsvl.models.cards, rsvl.models.weights; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_refuses_duplicate_and_misfiled_cards(monkeypatch):
    import types

    card = ModelCard(
        name="mini-test",
        family="mini",
        architecture="tiny towers",
        source=WeightsSource(filename="heads.safetensors", bundled="assets/none.safetensors"),
        licence="Apache-2.0",
        description="x",
    )
    monkeypatch.setattr(registry, "FAMILIES", {"mini": types.SimpleNamespace(CARDS=(card, card))})
    with pytest.raises(ValueError, match="two model cards are named 'mini-test'"):
        registry._collect()
    monkeypatch.setattr(registry, "FAMILIES", {"clip": types.SimpleNamespace(CARDS=(card,))})
    with pytest.raises(ValueError, match="says family 'mini'"):
        registry._collect()
    monkeypatch.setattr(registry, "FAMILIES", {"mini": types.SimpleNamespace(CARDS=(card,))})
    assert registry._collect() == {"mini-test": card}


def test_card_validation():
    with pytest.raises(ValueError):
        WeightsSource(filename="x.pt")  # no source
    with pytest.raises(ValueError):
        WeightsSource(filename="x.pt", url="https://x", revision="b" * 40)
    with pytest.raises(ValueError):
        _card(sha256="1234")


# --------------------------------------------------------------------------------------------
# resolve_weights
# --------------------------------------------------------------------------------------------


def test_explicit_path(net, tmp_path):
    card = _card()
    f = tmp_path / "mine.pt"
    f.write_bytes(PAYLOAD)
    assert weights.resolve_weights(card, f) == f
    assert weights.resolve_weights(card, str(f)) == f
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / card.source.filename).write_bytes(PAYLOAD)
    assert weights.resolve_weights(card, folder) == folder / card.source.filename
    with pytest.raises(WeightsNotFoundError) as err:
        weights.resolve_weights(card, tmp_path / "nope.pt")
    assert "nope.pt" in str(err.value) and "does not exist" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="folder without"):
        weights.resolve_weights(card, tmp_path)
    assert net.calls == []


def test_cache_hit(net, tmp_path):
    card = _card()
    target = weights.cache_path(card)
    assert target == tmp_path / "cache" / card.name / card.source.filename
    assert not weights.is_available_offline(card)
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    assert weights.is_available_offline(card)
    assert weights.resolve_weights(card) == target
    assert net.calls == []


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("RSVL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.cache_root() == tmp_path / ".cache" / "rsvl"


@pytest.mark.parametrize("var", ["RSVL_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_message_names_file_url_and_place(net, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    card = get_card("farslip2-vit-b16")
    with pytest.raises(WeightsNotFoundError) as err:
        weights.resolve_weights(card)
    msg = str(err.value)
    assert "FarSLIP2_ViT-B-16.pt" in msg
    assert "https://huggingface.co/ZhenShiL/FarSLIP/resolve/main/FarSLIP2_ViT-B-16.pt" in msg
    assert str(weights.cache_path(card)) in msg
    assert "--weights PATH" in msg and "rsvl fetch farslip2-vit-b16" in msg
    assert "offline" in msg
    assert net.calls == []


def test_offline_message_for_zip_sources(net, monkeypatch):
    monkeypatch.setenv("RSVL_OFFLINE", "true")
    card = get_card("skyclip-vit-b32")
    with pytest.raises(WeightsNotFoundError) as err:
        weights.fetch(card)
    msg = str(err.value)
    assert card.source.url in msg and "extract epoch_20.pt" in msg
    assert str(weights.cache_path(card)) in msg


def test_network_failure_message(net):
    net.error = OSError("Temporary failure in name resolution")
    card = _card()
    with pytest.raises(WeightsNotFoundError) as err:
        weights.resolve_weights(card)
    msg = str(err.value)
    assert "download failed" in msg and "name resolution" in msg
    assert card.source.download_url in msg and str(weights.cache_path(card)) in msg
    assert _leftovers(weights.cache_path(card).parent) == []


def test_download_verify_and_reuse(net):
    net.payload = PAYLOAD
    card = _card(sha256=PAYLOAD_SHA)
    path = weights.resolve_weights(card)
    assert path == weights.cache_path(card) and path.read_bytes() == PAYLOAD
    assert len(net.calls) == 1
    assert net.calls[0][1] != path  # written under a temporary name first
    assert sorted(_leftovers(path.parent)) == sorted([path.name, path.name + ".sha256"])
    assert weights.resolve_weights(card) == path and len(net.calls) == 1
    assert weights.fetch(card) == path and len(net.calls) == 1
    weights.fetch(card, force=True)
    assert len(net.calls) == 2


def test_sha256_mismatch_leaves_nothing(net):
    net.payload = PAYLOAD
    card = _card(sha256="0" * 64)
    with pytest.raises(WeightsChecksumError) as err:
        weights.resolve_weights(card)
    assert PAYLOAD_SHA in str(err.value) and "0" * 64 in str(err.value)
    assert isinstance(err.value, WeightsNotFoundError)
    final = weights.cache_path(card)
    assert not final.exists()
    assert _leftovers(final.parent) == []  # no partial file either


def test_interrupted_download_leaves_nothing(net):
    net.payload = PAYLOAD[:10]
    net.error = ConnectionResetError("connection reset by peer")
    card = _card()
    with pytest.raises(WeightsNotFoundError):
        weights.fetch(card)
    assert _leftovers(weights.cache_path(card).parent) == []


def test_hand_placed_file_with_wrong_hash(net):
    card = _card(sha256="1" * 64)
    target = weights.cache_path(card)
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    with pytest.raises(WeightsChecksumError, match="rsvl fetch"):
        weights.resolve_weights(card)
    good = _card(sha256=PAYLOAD_SHA)
    assert weights.resolve_weights(good) == target  # verified once, then remembered
    assert (target.parent / (target.name + ".sha256")).read_text().startswith(PAYLOAD_SHA)
    assert net.calls == []


def test_huggingface_download_uses_pinned_revision(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RSVL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_hf_cached_path", lambda card: None)
    seen = {}

    def fake_hf_hub_download(repo_id, filename, revision, local_dir):
        seen.update(repo_id=repo_id, filename=filename, revision=revision)
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(PAYLOAD)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    card = get_card("georsclip-vit-b32")
    path = weights.fetch(card)
    assert seen == {
        "repo_id": "Zilun/GeoRSCLIP",
        "filename": "ckpt/RS5M_ViT-B-32.pt",
        "revision": card.source.revision,
    }
    assert path.name == "RS5M_ViT-B-32.pt" and path.read_bytes() == PAYLOAD
    assert sorted(_leftovers(path.parent)) == sorted([path.name, path.name + ".sha256"])


def test_zip_download_extracts_member(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RSVL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("SkyCLIP_ViT_B32_top50pct/", b"")
        zf.writestr("SkyCLIP_ViT_B32_top50pct/epoch_20.pt", PAYLOAD)
        zf.writestr("SkyCLIP_ViT_B32_top50pct/params.txt", b"lr: 1e-9")
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(buf.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    card = get_card("skyclip-vit-b32")
    path = weights.resolve_weights(card)
    assert urls == [card.source.url]
    assert path == weights.cache_path(card) and path.read_bytes() == PAYLOAD
    assert sorted(_leftovers(path.parent)) == sorted([path.name, path.name + ".sha256"])


def test_bundled_weights(net, monkeypatch):
    import rsvl

    pkg = Path(rsvl.__file__).parent
    rel = "py.typed"  # any file shipped with the package
    card = ModelCard(
        name="bundled-test",
        family="mini-clip",
        architecture="x",
        source=WeightsSource(filename="py.typed", bundled=rel),
        licence="x",
        description="x",
    )
    assert weights.resolve_weights(card) == pkg / rel
    assert weights.is_available_offline(card)
    missing = ModelCard(**{**card.__dict__, "source": WeightsSource(filename="a", bundled="nope")})
    with pytest.raises(WeightsNotFoundError, match="reinstall"):
        weights.resolve_weights(missing)
    assert net.calls == []


def test_unpublished_weights_say_how_to_get_them(net, monkeypatch):
    card = ModelCard(
        name="unpub-test", family="fianet", architecture="x", licence="unknown", description="x",
        source=WeightsSource(filename="unpub.pth", unpublished="Train it with `rsvl train refer`."),
    )
    assert card.source.download_url is None
    with pytest.raises(WeightsNotFoundError, match="publish no weights") as e:
        weights.resolve_weights(card)
    assert "rsvl train refer" in e.value.hint and str(weights.cache_path(card)) in e.value.hint
    assert net.calls == []  # nothing was downloaded
    placed = weights.cache_path(card)
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"trained here")
    assert weights.resolve_weights(card) == placed
    assert weights.is_available_offline(card)
    with pytest.raises(ValueError, match="exactly one"):
        WeightsSource(filename="x", unpublished="y", url="https://example.org/x")


def test_cards_whose_trained_weights_are_unpublished_are_bring_your_own(net, tmp_path):
    """RSPrompter's cards name SAM ViT-B (what training starts from): `fetch` must not
    download it as if it were the model, `models` must not call it available, and the
    message says in one line what to pass."""
    card = get_card("rsprompter-anchor-nwpu")
    assert not weights.trained_weights_published(card)
    assert weights.weights_state(card) == "bring your own"
    # even with SAM ViT-B already in rsvl's cache under the card's name
    placed = weights.cache_path(card)
    placed.parent.mkdir(parents=True)
    placed.write_bytes(PAYLOAD)
    assert not weights.is_available_offline(card) and weights.weights_state(card) == "bring your own"
    with pytest.raises(WeightsNotFoundError, match="no trained checkpoint") as e:
        weights.fetch(card)
    assert "--weights PATH" in str(e.value) and "\n" not in str(e.value)
    assert net.calls == []  # nothing was downloaded


def test_weights_state_of_each_kind(net):
    assert weights.weights_state(get_card("mini-clip")) == "bundled"
    assert weights.weights_state(get_card("fianet-rrsisd")) == "bring your own"
    card = get_card("farslip2-vit-b16")
    assert weights.weights_state(card) == "download"
    weights.cache_path(card).parent.mkdir(parents=True)
    weights.cache_path(card).write_bytes(PAYLOAD)
    assert weights.weights_state(card) == "cached"
    assert net.calls == []

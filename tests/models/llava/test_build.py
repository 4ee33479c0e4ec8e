"""Loading VHM / GeoChat folders in their published layouts (tiny random models) through
the registry, against a direct computation written from the upstream notes: CLIP hidden
states of the selected layers without CLS, concatenated -> Linear -> GELU -> Linear ->
written at the image position -> LlamaForCausalLM on inputs_embeds."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from models.llava.tiny import (
    tiny_text_config,
    tiny_vision_config,
    write_tiny_geochat,
    write_tiny_vhm,
)
from torch.nn import functional as F
from transformers import CLIPVisionModel, LlamaForCausalLM

from rsvl.errors import CheckpointMismatchError, DeviceError, WeightsNotFoundError
from rsvl.models import llava, registry
from rsvl.models.llava import LlavaChat
from rsvl.models.llava.model import preprocess_image
from rsvl.models.llava.prompt import build_prompt, tokenize_prompt

IMAGE = (np.random.default_rng(3).random((30, 50, 3)) * 255).astype(np.uint8)


def _read_folder(folder):
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    sd = {}
    for name in sorted(set(index["weight_map"].values())):
        sd.update(torch.load(folder / name, weights_only=True))
    return sd


def _clip(sd, image_size):
    clip = CLIPVisionModel(tiny_vision_config(image_size)).eval()
    if not any(k.startswith("vision_model.") for k in clip.state_dict()):  # transformers 5.x
        sd = {k[len("vision_model.") :]: v for k, v in sd.items()}
    clip.load_state_dict(sd, strict=True)
    return clip


def _geochat_pos(pos, new_side):
    """GeoChat's clip_interpolate_embeddings, step by step on (1, 1 + s*s, D)."""
    pos = pos.unsqueeze(0)
    _, n, dim = pos.shape
    side = int((n - 1) ** 0.5)
    img = pos[:, 1:, :].permute(0, 2, 1).reshape(1, dim, side, side)
    img = F.interpolate(img, size=new_side, mode="bicubic", align_corners=True)
    img = img.reshape(1, dim, new_side * new_side).permute(0, 2, 1)
    return torch.cat([pos[:, :1, :], img], dim=1)[0]


def direct_logits(model: LlavaChat, text_sd, vision_sd, layers, image_size, question, task):
    llama = LlamaForCausalLM(tiny_text_config()).eval()
    llama.load_state_dict(
        {
            k: v
            for k, v in text_sd.items()
            if "mm_projector" not in k and "rotary_emb" not in k and "vision_tower" not in k
        },
        strict=True,
    )
    side = image_size // tiny_vision_config().patch_size
    vision_sd = dict(vision_sd)
    vision_sd["vision_model.embeddings.position_embedding.weight"] = _geochat_pos(
        vision_sd["vision_model.embeddings.position_embedding.weight"], side
    )
    clip = _clip(vision_sd, image_size)
    pixels = preprocess_image(IMAGE, image_size)
    with torch.no_grad():
        hs = clip(pixels, output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i][:, 1:] for i in layers], dim=-1)
        proj = F.linear(
            F.gelu(
                F.linear(
                    feats,
                    text_sd["model.mm_projector.0.weight"],
                    text_sd["model.mm_projector.0.bias"],
                )
            ),
            text_sd["model.mm_projector.2.weight"],
            text_sd["model.mm_projector.2.bias"],
        )
        tok = model.tokenizer
        ids = tokenize_prompt(
            build_prompt(question, variant=model.variant, task=task),
            lambda t: tok.encode(t, add_bos=False),
            tok.bos_id,
            -200,
        )
        at = ids.index(-200)
        emb = llama.get_input_embeddings()(torch.tensor([ids[:at] + ids[at + 1 :]]))
        seq = torch.cat([emb[:, :at], proj, emb[:, at:]], dim=1)
        return llama(inputs_embeds=seq).logits, pixels


@pytest.fixture(scope="module")
def vhm_folder(tmp_path_factory):
    return write_tiny_vhm(tmp_path_factory.mktemp("vhm") / "vhm_7B")


@pytest.fixture(scope="module")
def vhm(vhm_folder) -> LlavaChat:
    return registry.load("vhm-7b", weights=vhm_folder)


def test_vhm_logits_match_the_direct_computation(vhm, vhm_folder):
    assert isinstance(vhm, LlavaChat) and vhm.name == "vhm-7b" and vhm.variant == "vhm"
    assert vhm.feature_layers == [1, 2, 3] and vhm.num_image_tokens == 16 and vhm.image_size == 336
    vision = torch.load(vhm_folder / "vision_tower" / "pytorch_model.bin", weights_only=True)
    want, pixels = direct_logits(
        vhm, _read_folder(vhm_folder), vision, [1, 2, 3], 336, "What is in this image?", "cls"
    )
    ids = vhm.prompt_ids("What is in this image?", task="cls")
    got = vhm(torch.tensor([ids]), pixels)
    assert got.shape[1] == want.shape[1] == len(ids)
    torch.testing.assert_close(got[..., : want.shape[-1]], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("embed_tower", [True, False])
def test_geochat_logits_match_with_the_504_px_interpolated_tower(tmp_path, embed_tower):
    folder = write_tiny_geochat(tmp_path / "geochat-7B", embed_tower=embed_tower)
    model = registry.load("geochat-7b", weights=folder)
    assert model.variant == "geochat" and model.image_size == 504 and model.num_image_tokens == 36
    text = _read_folder(folder)
    if embed_tower:
        prefix = "model.vision_tower.vision_tower."
        vision = {k[len(prefix) :]: v for k, v in text.items() if k.startswith(prefix)}
    else:
        vision = torch.load(folder / "vision_tower" / "pytorch_model.bin", weights_only=True)
    want, pixels = direct_logits(model, text, vision, [-2], 504, "Where is the plane?", "vg")
    got = model(torch.tensor([model.prompt_ids("Where is the plane?", task="vg")]), pixels)
    torch.testing.assert_close(got[..., : want.shape[-1]], want, atol=1e-5, rtol=0)


def test_the_image_token_row_is_the_mean_row_and_extends_the_vocabulary(vhm, vhm_folder):
    text = _read_folder(vhm_folder)
    embed = vhm.decoder.get_input_embeddings().weight
    n = text["model.embed_tokens.weight"].shape[0]
    assert vhm.image_token_id == n and embed.shape[0] == n + 1
    torch.testing.assert_close(embed[n], text["model.embed_tokens.weight"].mean(0))
    assert vhm.lm_head.weight.shape[0] == n + 1


def test_a_renamed_folder_still_loads_as_vhm(vhm, vhm_folder, tmp_path):
    renamed = tmp_path / "my_llama_model"  # upstream would load this as a plain LLaMA
    shutil.copytree(vhm_folder, renamed)
    model = llava.load("vhm-7b", renamed)
    assert model.variant == "vhm" and model.feature_layers == [1, 2, 3]
    ids = torch.tensor([model.prompt_ids("What is in this image?")])
    pixels = preprocess_image(IMAGE, 336)
    torch.testing.assert_close(model(ids, pixels), vhm(ids, pixels), atol=0, rtol=0)


def test_a_geochat_folder_is_not_loaded_as_vhm(tmp_path):
    folder = write_tiny_geochat(tmp_path / "vhm_lookalike")
    with pytest.raises(CheckpointMismatchError, match="holds a geochat model") as err:
        llava.load("vhm-7b", folder)
    assert "geochat-7b" in err.value.hint


def test_missing_vision_tower_names_the_repository_and_the_folder(tmp_path):
    folder = write_tiny_vhm(tmp_path / "vhm", vision=False)
    with pytest.raises(WeightsNotFoundError, match="vision tower") as err:
        llava.load("vhm-7b", folder)
    assert "FitzPC/vhm_7b_pretrain_vit" in err.value.hint
    assert str(folder / "vision_tower") in err.value.hint


def test_the_vision_tower_option_and_the_cache_folder(vhm_folder, tmp_path, monkeypatch):
    folder = tmp_path / "vhm"
    shutil.copytree(vhm_folder, folder)
    tower = tmp_path / "elsewhere"
    shutil.move(folder / "vision_tower", tower)
    model = llava.load("vhm-7b", folder, vision_tower=tower)
    assert model.num_image_tokens == 16
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    shutil.copytree(vhm_folder, tmp_path / "cache" / "vhm-7b")
    assert registry.load("vhm-7b").variant == "vhm"


def test_no_folder_anywhere_says_what_to_download_where(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("RSVL_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="not on this machine") as err:
        registry.load("geochat-7b")
    assert (
        "MBZUAI/geochat-7B" in err.value.hint
        and str(tmp_path / "cache" / "geochat-7b") in err.value.hint
    )
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        registry.load("vhm-7b", weights=tmp_path)


def test_missing_shard_and_tokenizer_are_named(vhm_folder, tmp_path):
    folder = tmp_path / "vhm"
    shutil.copytree(vhm_folder, folder)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(WeightsNotFoundError, match="pytorch_model-00002-of-00002.bin"):
        llava.load("vhm-7b", folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(WeightsNotFoundError, match="no tokenizer.model"):
        llava.load("vhm-7b", folder)


def test_a_hostile_pickle_as_a_shard_is_refused(vhm_folder, tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "vhm"
    shutil.copytree(vhm_folder, folder)
    torch.save({"model.norm.weight": Boom()}, folder / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointMismatchError, match="refuses to unpickle"):
        llava.load("vhm-7b", folder)


def test_quantisation_without_bitsandbytes_says_how_to_install_it(vhm_folder):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(DeviceError, match="bitsandbytes") as err:
        llava.load("vhm-7b", vhm_folder, load_in_8bit=True)
    assert "pip install bitsandbytes" in err.value.hint


def test_cpu_dtype_is_fp32_and_a_float16_request_is_honoured(vhm_folder):
    assert vhm_dtype(llava.load("vhm-7b", vhm_folder)) == torch.float32
    half = llava.load("vhm-7b", vhm_folder, dtype="bfloat16")
    assert vhm_dtype(half) == torch.bfloat16


def vhm_dtype(model: LlavaChat) -> torch.dtype:
    return model.lm_head.weight.dtype


def test_build_gives_a_random_model_of_any_size():
    model = registry.build(
        "geochat-7b",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=50,
        vision={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 84,
        },
        image_size=168,
    )
    assert model.variant == "geochat" and model.num_image_tokens == 4 and model.image_token_id == 50
    logits = model(torch.tensor([[1, 5] + [50] * 4 + [7]]), preprocess_image(IMAGE, 168))
    assert logits.shape == (1, 7, 51)


def _param_count(variant: str) -> int:
    v, h, inter, n = 32001, 4096, 11008, 32
    llama = 2 * v * h + n * (4 * h * h + 3 * h * inter + 2 * h) + h
    w, layers, mlp = 1024, 24, 4096
    side = 24 if variant == "vhm" else 36
    clip = w + 3 * 14 * 14 * w + (side * side + 1) * w + 2 * w + 2 * w
    clip += layers * (4 * (w * w + w) + 4 * w + (w * mlp + mlp) + (mlp * w + w))
    k = 3 if variant == "vhm" else 1
    proj = (k * w * h + h) + (h * h + h)
    return llama + clip + proj


@pytest.mark.parametrize(("name", "variant"), [("vhm-7b", "vhm"), ("geochat-7b", "geochat")])
def test_memory_estimate_counts_the_published_shapes(name, variant):
    n = _param_count(variant)
    assert llava.memory_estimate(name, "float16") == 2 * n
    assert llava.memory_estimate(name, "float32") == 4 * n
    int8, int4 = llava.memory_estimate(name, "int8"), llava.memory_estimate(name, "int4")
    assert 0.5 * 2 * n < int8 < 0.6 * 2 * n and 0.3 * 2 * n < int4 < int8
    with pytest.raises(ValueError, match="unknown dtype"):
        llava.memory_estimate(name, "int2")


def test_fetch_downloads_the_listed_files_and_the_vision_tower_config_last(tmp_path, monkeypatch):
    """`rsvl fetch vhm-7b` asks the Hub for exactly the card's files (model folder, then the
    vision tower into vision_tower/), config.json last; offline it is one clear error."""
    from rsvl.errors import WeightsNotFoundError
    from rsvl.models import registry
    llava_build = importlib.import_module("rsvl.models.llava.build")  # the module, not build()

    monkeypatch.setenv("RSVL_CACHE", str(tmp_path))
    monkeypatch.delenv("RSVL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_download(repo, *, revision=None, local_dir, allow_patterns):
        calls.append((repo, Path(local_dir).relative_to(tmp_path).as_posix(), tuple(allow_patterns)))
        for name in allow_patterns:
            (Path(local_dir) / name).write_text("{}")

    monkeypatch.setattr(llava_build.huggingface_hub, "snapshot_download", fake_download)
    path = registry.fetch("vhm-7b")
    assert path == tmp_path / "vhm-7b" and (path / "config.json").is_file()
    assert [c[:2] for c in calls] == [("FitzPC/vhm_7B", "vhm-7b"), ("FitzPC/vhm_7b_pretrain_vit", "vhm-7b/vision_tower"),
                                      ("FitzPC/vhm_7B", "vhm-7b")]
    assert "config.json" not in calls[0][2] and "pytorch_model-00001-of-00002.bin" in calls[0][2]
    assert calls[-1][2] == ("config.json",)
    calls.clear()
    assert registry.fetch("vhm-7b") == path and calls == []  # cached: nothing asked
    monkeypatch.setenv("RSVL_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="offline mode is on"):
        registry.fetch("geochat-7b")

"""LISA / FSVLM loading and seg_chat parity against a direct computation from the notes on
independent parts (transformers' LLaMA and CLIP, segment-anything's SAM)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
import torch
from conftest import write_raster

pytest.importorskip("segment_anything")

from models.lisa.tiny import TinyParts, reference, reference_ids, steer_seg_second  # noqa: E402

from rsvl.cli import main  # noqa: E402
from rsvl.errors import CheckpointMismatchError, PromptError, WeightsNotFoundError  # noqa: E402
from rsvl.models import registry  # noqa: E402
from rsvl.models.lisa import load  # noqa: E402
from rsvl.models.lisa.model import clip_pixels  # noqa: E402
from rsvl.models.llava.tokenizer import SentencePieceBPE  # noqa: E402

TOL = 1e-5
REQUEST = "This is a remote sensing image. Please segment the farmland."


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


def _image(h: int = 70, w: int = 53, seed: int = 3) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(parts with [SEG] steered to be the second answer token, merged folder, prompt ids)."""
    torch.set_num_threads(1)
    parts = TinyParts()
    root = tmp_path_factory.mktemp("lisa")
    parts.write_tokenizer(root)
    sp = SentencePieceBPE.from_file(root / "tokenizer.model")
    ids = reference_ids(parts, lambda t: sp.encode(t, add_bos=False), REQUEST)
    first = steer_seg_second(parts, _image(), ids)
    folder = parts.write_merged(root / "fsvlm")
    return parts, folder, ids, first


@pytest.fixture(scope="module")
def model(tiny):
    return load("fsvlm-7b", weights=tiny[1])


def test_clip_input_matches_the_slow_clip_image_processor():
    transformers = pytest.importorskip("transformers")
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    for hw in [(70, 53), (300, 500), (513, 512)]:
        img = _image(*hw)
        ref = proc(images=img, return_tensors="pt")["pixel_values"]
        assert torch.allclose(clip_pixels(img, 224), ref, atol=1e-6)


def test_seg_id_and_markers_come_from_the_tokenizer(tiny, model):
    parts = tiny[0]
    assert model.seg_token_id == parts.added["[SEG]"]
    base = len(parts.added) and min(parts.added.values())
    # not any default a loader could assume: LISA-7B-v1's 32003, FSVLM's base+0, the last row
    assert model.seg_token_id not in (32000, 32003, base, parts.vocab - 1)
    assert model.markers == ("<|im_start|>", "<|im_end|>")


def test_prompt_ids_follow_llava_v1_and_the_lisa_era_tokenizer(tiny, model):
    assert model.prompt_ids(REQUEST) == tiny[2]


def test_generated_seg_mask_matches_the_direct_computation(tiny, model):
    parts, _, ids, first = tiny
    img = _image()
    ref_tokens, ref_masks = reference(parts, img, ids, 5)
    assert ref_tokens[:2] == [first, parts.added["[SEG]"]]  # the steering worked: [SEG] is second
    ans = model.seg_chat(img, REQUEST, max_new_tokens=5)
    assert ans.new_tokens == len(ref_tokens)
    assert "[SEG]" in ans.text
    assert len(ans.masks) == len(ref_masks) >= 1
    for ours, ref in zip(ans.masks, ref_masks, strict=True):
        assert ours.shape == img.shape[:2] and ours.dtype == np.float32
        assert np.abs(ours - ref).max() < TOL
        assert ((ours > 0) == (ref > 0)).mean() > 0.999


def test_forced_seg_mask_matches_the_direct_computation(tiny, model):
    parts, _, ids, _ = tiny
    img = _image(64, 96, seed=5)
    _, ref_masks = reference(parts, img, ids, 0, force=True)
    ans = model.seg_chat(img, REQUEST, force_seg=True)
    assert ans.text == "[SEG]."
    assert np.abs(ans.masks[0] - ref_masks[0]).max() < TOL


def test_an_answer_without_seg_has_no_mask(tiny, model):
    ans = model.seg_chat(_image(), REQUEST, max_new_tokens=1)  # stops after the first token
    assert ans.masks == [] and ans.logits is None and ans.new_tokens == 1


def test_requests_are_checked(model):
    with pytest.raises(PromptError):
        model.seg_chat(_image(), "  ")
    with pytest.raises(PromptError):
        model.seg_chat(_image(), "<image> segment the farmland")


def test_unmerged_lora_training_output_merges_to_the_same_masks(tiny, model, tmp_path):
    parts, folder, _, _ = tiny
    sd = parts.state_dict()
    g = torch.Generator().manual_seed(11)
    lora: dict[str, torch.Tensor] = {}
    for key in list(sd):
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            w = sd[key]
            a = 0.2 * torch.randn(8, w.shape[1], generator=g)
            b = 0.2 * torch.randn(w.shape[0], 8, generator=g)
            sd[key] = w - (b @ a) * (16 / 8)  # so that merging gives the published weight back
            layer = key[: -len(".weight")]
            lora[f"base_model.model.{layer}.lora_A.default.weight"] = a
            lora[f"base_model.model.{layer}.lora_B.default.weight"] = b
    wrapped = {f"base_model.model.{k}": v for k, v in sd.items()}
    wrapped.update(lora)
    wrapped["base_model.model.model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)
    out = tmp_path / "unmerged"
    out.mkdir()
    torch.save(wrapped, out / "pytorch_model.bin")
    cfg = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in ("out_dim",)}
    (out / "config.json").write_text(json.dumps(cfg))
    shutil.copy(folder / "tokenizer.model", out / "tokenizer.model")
    shutil.copy(folder / "added_tokens.json", out / "added_tokens.json")
    merged = load("fsvlm-7b", weights=out, vision_tower=folder / "vision_tower")
    img = _image()
    a = merged.seg_chat(img, REQUEST, max_new_tokens=5)
    b = model.seg_chat(img, REQUEST, max_new_tokens=5)
    assert a.text == b.text
    assert np.abs(a.masks[0] - b.masks[0]).max() < TOL


def test_registry_loads_the_folder(tiny):
    m = registry.load("fsvlm-7b", weights=tiny[1])
    assert m.name == "fsvlm-7b" and m.image_size == 512


# ---------------------------------------------------------------------------------- errors


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def _rewrite(folder, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))


def test_missing_key_is_named(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path / "f")
    _rewrite(folder, lambda sd: sd.pop("model.visual_model.mask_decoder.iou_token.weight"))
    with pytest.raises(CheckpointMismatchError, match="iou_token"):
        load("fsvlm-7b", weights=folder)


def test_misshaped_key_is_named(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path / "f")

    def edit(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(7, 32)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointMismatchError, match="q_proj"):
        load("fsvlm-7b", weights=folder)


def test_foreign_key_and_missing_sam_are_refused(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path / "f")
    _rewrite(folder, lambda sd: sd.__setitem__("model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointMismatchError, match="extra_head"):
        load("fsvlm-7b", weights=folder)
    folder2 = _copy(tiny[1], tmp_path / "g")

    def drop_sam(sd):
        for k in [k for k in sd if k.startswith("model.visual_model.")]:
            del sd[k]

    _rewrite(folder2, drop_sam)
    with pytest.raises(CheckpointMismatchError, match="SAM"):
        load("fsvlm-7b", weights=folder2)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_payload_is_refused(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path / "f")
    (folder / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(2), "evil": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError):
        load("fsvlm-7b", weights=folder)


def test_tokenizer_that_does_not_fit_the_embeddings(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path / "f")
    added = json.loads((folder / "added_tokens.json").read_text())
    added["<extra>"] = max(added.values()) + 1
    (folder / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(CheckpointMismatchError, match="rows"):
        load("fsvlm-7b", weights=folder)


def test_missing_tower_and_folder_say_what_to_place(tiny, tmp_path):
    folder = _copy(tiny[1], tmp_path / "f")
    shutil.rmtree(folder / "vision_tower")
    with pytest.raises(WeightsNotFoundError, match="CLIP tower") as err:
        load("fsvlm-7b", weights=folder)
    assert "openai/clip-vit-large-patch14" in str(err.value.hint)
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        load("fsvlm-7b", weights=tmp_path)


# ----------------------------------------------------------------------- through the task


def test_rsvl_segment_runs_fsvlm_through_the_farmland_task(tiny, tmp_path, capsys):
    data = (np.random.RandomState(0).rand(3, 150, 200) * 255).astype(np.uint8)
    src = write_raster(tmp_path / "scene.tif", data)
    out = tmp_path / "o"
    code = main(["segment", str(src), "--model", "fsvlm-7b", "--weights", str(tiny[1]), "--tile", "96",
                 "--overlap", "16", "--out", str(out), "--json", REQUEST])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    res = json.loads(stdout)
    assert res["target"] == "farmland" and isinstance(res["answer"], str) and res["tiles"] >= 4
    with rasterio.open(res["outputs"]["classes"]) as ds:
        assert ds.shape == (150, 200) and ds.tags()["request"] == REQUEST
        assert ds.tags()["answer"] == res["answer"]
        assert set(np.unique(ds.read(1))) <= {0, 1}


def test_bfloat16_load_gives_the_same_mask(tiny, model):
    """Upstream's default precision: every part (SAM's buffers included) in bf16."""
    bf = load("fsvlm-7b", weights=tiny[1], dtype="bfloat16")
    assert bf.net.sam.prompt_encoder.no_mask_embed.weight.dtype == torch.bfloat16
    img = _image()
    a = bf.seg_chat(img, REQUEST, force_seg=True).masks[0]
    b = model.seg_chat(img, REQUEST, force_seg=True).masks[0]
    assert a.dtype == np.float32 and np.abs(a - b).max() < 0.05

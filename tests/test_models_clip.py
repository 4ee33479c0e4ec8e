"""RS CLIP loading and inference against open_clip itself, on tiny random configs.

Every checkpoint layout the published RS CLIPs use is written from a tiny open_clip model and
loaded back through rsvl; embeddings must equal open_clip's own (max abs diff <= 1e-5). The
Long-CLIP text tower is checked against the formula tok + pos*mask1 + pos_res*mask2.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
F = torch.nn.functional

from rsvl.errors import CheckpointMismatchError, PromptError, UnknownModelError  # noqa: E402
from rsvl.models.clip import model as rclip  # noqa: E402
from rsvl.models.base import ImageTextModel  # noqa: E402
from rsvl.models.cards import ModelCard, WeightsSource  # noqa: E402
from rsvl.models.registry import list_cards  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-5
TEXTS = ["a satellite image of a harbor", "farmland", "a dense residential area with roads"]

VIT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
RN_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _cfg(base: dict, **text: int) -> dict:
    cfg = copy.deepcopy(base)
    cfg["text_cfg"].update(text)
    return cfg


def _card(image_size: int = 32, context_length: int = 77, **kw) -> ModelCard:
    fields = dict(
        name="tiny-test",
        family="clip",
        architecture="tiny (test config)",
        quick_gelu=True,
        source=WeightsSource(filename="tiny.pt", url="https://example.invalid/tiny.pt"),
        licence="test",
        description="tiny random open_clip model for tests",
        image_size=image_size,
        context_length=context_length,
        tasks=("classify", "search", "segment"),
    )
    fields.update(kw)
    return ModelCard(**fields)


def _tiny(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(cfg), quick_gelu=True).eval()
    with torch.no_grad():  # open_clip leaves some tensors at zero/one; make every weight count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "bn" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _images(n: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _ref_image(model, images: np.ndarray, card: ModelCard) -> torch.Tensor:
    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.normalize(model.encode_image(x), dim=-1)


def _ref_text(model, texts: list[str], context_length: int = 77) -> torch.Tensor:
    tokens = open_clip.tokenize(texts, context_length=context_length)
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens), dim=-1)


def _save(sd: dict, path: Path, layout: str) -> Path:
    if layout == "farslip":  # open_clip training checkpoint under DDP (FarSLIP, SkyCLIP)
        obj = {
            "epoch": 1,
            "name": "farslip2",
            "state_dict": {"module." + k: v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0, 1]}]},
        }
    elif layout == "bare":  # RemoteCLIP, GeoRSCLIP
        obj = dict(sd)
    elif layout == "model":
        obj = {"model": dict(sd), "step": 10}
    elif layout == "state_dict":
        obj = {"state_dict": dict(sd)}
    elif layout == "openai":  # JIT-free OpenAI state dict: extra plain entries
        obj = {**sd, "input_resolution": 32, "context_length": 77, "vocab_size": 49408}
    elif layout == "safetensors":
        from safetensors.torch import save_file

        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    else:
        raise AssertionError(layout)
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def vit():
    return _tiny(VIT_CFG)


@pytest.mark.parametrize(
    "layout", ["farslip", "bare", "model", "state_dict", "openai", "safetensors"]
)
def test_vit_layouts_match_open_clip(vit, tmp_path, layout):
    card = _card()
    path = _save(vit.state_dict(), tmp_path / "ckpt.pt", layout)
    model = rclip.load_clip(card, weights=path, model_cfg=VIT_CFG)
    images = _images(2, 32)
    assert (model.encode_image(images) - _ref_image(vit, images, card)).abs().max() <= TOL
    assert (model.encode_text(TEXTS) - _ref_text(vit, TEXTS)).abs().max() <= TOL
    assert model.context_length == 77 and not model.long_text
    assert isinstance(model, ImageTextModel)
    assert model.logit_scale == pytest.approx(float(vit.logit_scale.detach().exp()), rel=1e-6)


def test_half_precision_and_legacy_files(vit, tmp_path):
    """fp16 files (as OpenAI weights often are) and pre-zip torch.save files both load."""
    card = _card()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in vit.state_dict().items()}
    ref_model = copy.deepcopy(vit)
    ref_model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    )
    path = tmp_path / "half.pt"
    torch.save(half, path, _use_new_zipfile_serialization=False)
    model = rclip.load_clip(card, weights=path, model_cfg=VIT_CFG)
    assert model.dtype == torch.float32
    assert not any(t.is_meta for t in model.model.state_dict(keep_vars=True).values())
    assert not model.model.attn_mask.is_meta
    images = _images(2, 32)
    assert (model.encode_image(images) - _ref_image(ref_model, images, card)).abs().max() <= TOL
    assert (model.encode_text(TEXTS) - _ref_text(ref_model, TEXTS)).abs().max() <= TOL


def test_torch_tensor_input_and_single_image(vit):
    card = _card()
    model = rclip.from_open_clip(copy.deepcopy(vit), card)
    images = _images(1, 32)
    ref = _ref_image(vit, images, card)
    assert (model.encode_image(torch.from_numpy(images)) - ref).abs().max() <= TOL
    assert (model.encode_image(images[0]) - ref).abs().max() <= TOL
    with pytest.raises(TypeError):
        model.encode_image(images.astype(np.float32))
    texts = TEXTS * 3
    assert (model.encode_text(texts, batch_size=2) - _ref_text(vit, texts)).abs().max() <= TOL


def test_resnet_layout_matches_open_clip(tmp_path):
    torch.manual_seed(3)
    rn = _tiny(RN_CFG, seed=3)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that losing them would show
        for mod in rn.visual.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    card = _card(image_size=64, architecture="RN (test config)", quick_gelu=False)
    rn_gelu = open_clip.CLIP(**copy.deepcopy(RN_CFG), quick_gelu=False).eval()
    rn_gelu.load_state_dict(rn.state_dict())
    path = _save(rn.state_dict(), tmp_path / "rn.pt", "bare")
    model = rclip.load_clip(card, weights=path, model_cfg=RN_CFG)
    images = _images(2, 64)
    assert (model.encode_image(images) - _ref_image(rn_gelu, images, card)).abs().max() <= TOL
    assert (model.encode_text(TEXTS) - _ref_text(rn_gelu, TEXTS)).abs().max() <= TOL

    # a file without BatchNorm's num_batches_tracked counters still loads (they change nothing)
    sd = {k: v for k, v in rn.state_dict().items() if not k.endswith("num_batches_tracked")}
    path2 = _save(sd, tmp_path / "rn2.pt", "bare")
    model2 = rclip.load_clip(card, weights=path2, model_cfg=RN_CFG)
    assert (model2.encode_image(images) - _ref_image(rn_gelu, images, card)).abs().max() <= TOL


def test_quick_gelu_override_changes_the_text_tower(vit, tmp_path):
    path = _save(vit.state_dict(), tmp_path / "ckpt.pt", "bare")
    card = _card()
    qg = rclip.load_clip(card, weights=path, model_cfg=VIT_CFG)
    gelu = rclip.load_clip(card, weights=path, model_cfg=VIT_CFG, quick_gelu=False)
    assert (qg.encode_text(TEXTS) - gelu.encode_text(TEXTS)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# long-text (Long-CLIP) towers
# --------------------------------------------------------------------------------------------


def _long_reference(model, pos_res, mask1, mask2, texts):
    """tok + pos*mask1 + pos_res*mask2 -> transformer -> ln_final -> EOT -> projection."""
    tokens = open_clip.tokenize(texts, context_length=248)
    with torch.no_grad():
        x = model.token_embedding(tokens)
        x = x + model.positional_embedding * mask1 + pos_res * mask2
        batch_first = getattr(model.transformer, "batch_first", False)
        x = x if batch_first else x.transpose(0, 1)
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = x if batch_first else x.transpose(0, 1)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
        return F.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def long_text():
    cfg = _cfg(VIT_CFG, context_length=248)
    base = _tiny(cfg, seed=5)
    torch.manual_seed(6)
    pos_res = 0.05 * torch.randn(248, 32)
    mask1 = torch.zeros(248, 1)
    mask1[:20] = 1
    mask2 = 1 - mask1
    sd = dict(base.state_dict())
    sd.update(positional_embedding_res=pos_res, mask1=mask1, mask2=mask2)
    return cfg, base, sd, pos_res, mask1, mask2


def test_long_text_farslip2_layout(long_text, tmp_path):
    cfg, base, sd, pos_res, mask1, mask2 = long_text
    card = _card(context_length=248)
    path = _save(sd, tmp_path / "farslip2.pt", "farslip")
    # built from a 77-token config: the 248-row table in the file decides, never squashed
    model = rclip.load_clip(card, weights=path, model_cfg=VIT_CFG)
    assert model.context_length == 248 and model.long_text
    assert model.tokenize(TEXTS).shape == (3, 248)
    long = [" ".join(["a large parking lot next to a river with many cars"] * 12)]
    texts = TEXTS + long  # the last one is > 77 tokens: positions >= 20 use pos_res
    ref = _long_reference(base, pos_res, mask1, mask2, texts)
    assert (model.encode_text(texts) - ref).abs().max() <= TOL
    # the second table matters: a plain 248-position model gives other embeddings
    assert (_ref_text(base, texts, 248) - ref).abs().max() > 1e-4
    images = _images(2, 32)
    assert (model.encode_image(images) - _ref_image(base, images, card)).abs().max() <= TOL


def test_long_text_without_stored_masks_uses_first_20(long_text, tmp_path):
    cfg, base, sd, pos_res, mask1, mask2 = long_text
    sd = {k: v for k, v in sd.items() if k not in ("mask1", "mask2")}
    path = _save(sd, tmp_path / "nomask.pt", "bare")
    model = rclip.load_clip(_card(context_length=248), weights=path, model_cfg=cfg)
    ref = _long_reference(base, pos_res, mask1, mask2, TEXTS)
    assert (model.encode_text(TEXTS) - ref).abs().max() <= TOL


def test_248_position_single_table_loads_as_is(long_text, tmp_path):
    cfg, base, *_ = long_text
    path = _save(base.state_dict(), tmp_path / "plain248.pt", "bare")
    model = rclip.load_clip(_card(), weights=path, model_cfg=VIT_CFG)
    assert model.context_length == 248 and not model.long_text
    assert (model.encode_text(TEXTS) - _ref_text(base, TEXTS, 248)).abs().max() <= TOL


def test_long_clip_stretch_of_a_77_table(vit, tmp_path):
    """Keep 20 rows, interpolate the rest x4 (plus 4 extrapolated rows): 77 -> 248."""
    pos = torch.randn(77, 8, dtype=torch.float64)
    table, res = rclip.long_clip_positional_tables(pos)
    assert table.shape == (248, 8) and torch.equal(table, res)
    expected = [pos[i] for i in range(20)]
    for i in range(20, 76):
        expected += [pos[i] + (pos[i + 1] - pos[i]) * j / 4 for j in range(4)]
    expected += [pos[76] + (pos[76] - pos[75]) * j / 4 for j in range(4)]
    assert torch.allclose(table, torch.stack(expected), atol=1e-12)

    # a stretched 77-token model loads as a Long-CLIP model and reads 248 tokens
    sd = rclip.to_long_text_state_dict(vit.state_dict())
    path = _save(sd, tmp_path / "stretched.pt", "bare")
    model = rclip.load_clip(_card(), weights=path, model_cfg=VIT_CFG)
    assert model.long_text and model.context_length == 248
    short = ["farmland"]  # < 20 tokens: identical to the 77-token model
    assert (model.encode_text(short) - _ref_text(vit, short)).abs().max() <= TOL


# --------------------------------------------------------------------------------------------
# mismatches and unreadable files
# --------------------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_named(vit, tmp_path):
    sd = dict(vit.state_dict())
    del sd["visual.ln_post.weight"]
    sd["visual.extra_head.weight"] = torch.zeros(3)
    path = _save(sd, tmp_path / "bad.pt", "farslip")
    with pytest.raises(CheckpointMismatchError) as err:
        rclip.load_clip(_card(), weights=path, model_cfg=VIT_CFG)
    msg = str(err.value)
    assert "visual.ln_post.weight" in msg and "1 missing key" in msg
    assert "visual.extra_head.weight" in msg and "1 unexpected key" in msg
    assert "tiny (test config)" in msg and "QuickGELU" in msg
    assert str(path) in msg


def test_many_missing_keys_are_counted(vit, tmp_path):
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith("transformer.")}
    path = _save(sd, tmp_path / "notext.pt", "bare")
    with pytest.raises(CheckpointMismatchError) as err:
        rclip.load_clip(_card(), weights=path, model_cfg=VIT_CFG)
    n = sum(k.startswith("transformer.") for k in vit.state_dict())
    assert f"{n} missing key(s)" in str(err.value) and "more)" in str(err.value)


def test_wrong_architecture_names_shapes(tmp_path):
    other = _cfg(VIT_CFG)
    other["vision_cfg"] = {**other["vision_cfg"], "patch_size": 8}
    sd = _tiny(other).state_dict()
    path = _save(sd, tmp_path / "p8.pt", "bare")
    with pytest.raises(CheckpointMismatchError) as err:
        rclip.load_clip(_card(), weights=path, model_cfg=VIT_CFG)
    msg = str(err.value)
    assert "visual.conv1.weight" in msg and "shape mismatch" in msg
    assert "patch 8" in msg  # what the file looks like


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"epoch": 3, "note": "no weights here"}, path)
    with pytest.raises(CheckpointMismatchError, match="not a state dict"):
        rclip.read_checkpoint(path)


def test_pickled_objects_are_refused(vit, tmp_path):
    path = tmp_path / "args.pt"
    torch.save({"state_dict": vit.state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointMismatchError, match="refuses to unpickle"):
        rclip.read_checkpoint(path)


def test_truncated_file(vit, tmp_path):
    path = _save(vit.state_dict(), tmp_path / "ok.pt", "bare")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointMismatchError, match="cannot be read"):
        rclip.read_checkpoint(path)


def test_unknown_open_clip_architecture(vit, tmp_path):
    path = _save(vit.state_dict(), tmp_path / "x.pt", "bare")
    with pytest.raises(UnknownModelError, match="ViT-Nope"):
        rclip.load_clip(_card(architecture="ViT-Nope"), weights=path)


def test_registered_architectures_exist_in_open_clip():
    names = set(open_clip.list_models())
    for card in list_cards(family="clip"):
        assert card.architecture in names, card.name


# --------------------------------------------------------------------------------------------
# preprocessing, prompts, dtype
# --------------------------------------------------------------------------------------------


def test_resize_and_crop_follow_open_clip_preprocessing(vit):
    from PIL import Image

    card = _card()
    model = rclip.from_open_clip(copy.deepcopy(vit), card)
    transform = open_clip.image_transform(32, is_train=False, mean=card.mean, std=card.std)
    rng = np.random.default_rng(0)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    for h, w in [(48, 80), (80, 48), (20, 30), (64, 64)]:
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, h // 4 + 1, w // 4 + 1)).astype("f4"))
        img = F.interpolate(coarse, size=(h, w), mode="bilinear").round().byte()[0].numpy()
        ours = model.preprocess(img)
        ref = transform(Image.fromarray(img.transpose(1, 2, 0)))[None]
        assert ours.shape == ref.shape == (1, 3, 32, 32)
        levels = ((ours - ref).abs() * std * 255).flatten()
        assert levels.max() <= 1.01 and levels.mean() < 0.5  # within one 8-bit level of PIL


def test_prompt_errors(vit):
    model = rclip.from_open_clip(copy.deepcopy(vit), _card())
    with pytest.raises(PromptError):
        model.encode_text([])
    with pytest.raises(PromptError):
        model.encode_text(["farmland", "  "])


def test_bf16(vit):
    model = rclip.from_open_clip(copy.deepcopy(vit), _card(), dtype="bf16")
    assert model.dtype == torch.bfloat16
    images = _images(2, 32)
    emb = model.encode_image(images)
    assert emb.dtype == torch.float32
    assert (emb - _ref_image(vit, images, _card())).abs().max() < 0.05
    assert model.dense_features(images).shape == (2, 32, 2, 2)


# --------------------------------------------------------------------------------------------
# dense features
# --------------------------------------------------------------------------------------------


def _segearth_reference(model, images: np.ndarray, card: ModelCard) -> torch.Tensor:
    """Blocks 0..L-2, then out_proj([softmax(qq)+softmax(kk)+softmax(vv)] v) on ln_1(x),
    no residual, no MLP, then ln_post and proj (per-head loop, written independently)."""
    v = model.visual
    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        x = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding)
        batch_first = getattr(v.transformer, "batch_first", False)
        for blk in v.transformer.resblocks[:-1]:
            x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
        last = v.transformer.resblocks[-1]
        h = last.ln_1(x)
        attn = last.attn
        width = h.shape[-1]
        q_all, k_all, v_all = (
            h @ attn.in_proj_weight[i * width : (i + 1) * width].T
            + attn.in_proj_bias[i * width : (i + 1) * width]
            for i in range(3)
        )
        hd = width // attn.num_heads
        heads = []
        for i in range(attn.num_heads):
            sl = slice(i * hd, (i + 1) * hd)
            q, k, vv = q_all[..., sl], k_all[..., sl], v_all[..., sl]
            a = sum(torch.softmax(t @ t.transpose(1, 2) / hd**0.5, dim=-1) for t in (q, k, vv))
            heads.append(a @ vv)
        y = attn.out_proj(torch.cat(heads, dim=-1))
        y = v.ln_post(y) @ v.proj
    grid = images.shape[-1] // 16
    return F.normalize(y[:, 1:].transpose(1, 2).reshape(len(images), -1, grid, grid), dim=1)


def test_dense_features_shape_and_norm(vit):
    model = rclip.from_open_clip(copy.deepcopy(vit), _card())
    dense = model.dense_features(_images(2, 32))
    assert dense.shape == (2, 32, 2, 2) and dense.dtype == torch.float32
    assert torch.allclose(dense.norm(dim=1), torch.ones(2, 2, 2), atol=1e-5)
    # other sizes: the positional table is resized, non-multiples of the patch are padded
    assert model.dense_features(_images(1, 64)).shape == (1, 32, 4, 4)
    odd = np.random.default_rng(0).integers(0, 256, (1, 3, 40, 56), dtype=np.uint8)
    assert model.dense_features(odd).shape == (1, 32, 3, 4)


def test_dense_features_follow_the_segearth_formula(vit):
    card = _card()
    model = rclip.from_open_clip(copy.deepcopy(vit), card)
    images = _images(2, 32)
    dense = model.dense_features(images)
    assert (dense - _segearth_reference(vit, images, card)).abs().max() <= TOL
    vanilla = model.dense_features(images, attn="vanilla")
    assert (dense - vanilla).abs().max() > 1e-3  # the modification is really applied


def test_dense_unmodified_block_reproduces_open_clip(vit):
    """With the original attention, residual and MLP the 'modified' pass is the ordinary
    forward: its CLS is encode_image's global embedding and its patch tokens are open_clip's."""
    card = _card()
    model = rclip.from_open_clip(copy.deepcopy(vit), card)
    images = _images(2, 32)
    dense, cls = model.dense_features(
        images, attn="vanilla", ignore_residual=False, return_cls=True
    )
    assert (cls - model.encode_image(images)).abs().max() <= TOL
    ref = copy.deepcopy(vit)
    ref.visual.output_tokens = True
    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        _, tokens = ref.visual(x)
    tokens = F.normalize(tokens @ ref.visual.proj, dim=-1).transpose(1, 2).reshape(2, -1, 2, 2)
    assert (dense - tokens).abs().max() <= TOL
    # the global embedding is untouched by the OVSS modification
    _, seg_cls = model.dense_features(images, return_cls=True)
    assert (model.encode_image(images) - _ref_image(vit, images, card)).abs().max() <= TOL
    assert (seg_cls - cls).abs().max() > 1e-4


def test_dense_features_resnet():
    rn = _tiny(RN_CFG, seed=4)
    model = rclip.from_open_clip(rn, _card(image_size=64))
    images = _images(2, 64)
    dense, cls = model.dense_features(images, return_cls=True)
    assert dense.shape == (2, 32, 2, 2)
    assert torch.allclose(dense.norm(dim=1), torch.ones(2, 2, 2), atol=1e-5)
    assert (cls - model.encode_image(images)).abs().max() <= TOL
    assert model.dense_features(_images(1, 96)).shape == (1, 32, 3, 3)


def test_bare_open_clip_architecture_loads_with_weights(vit, tmp_path, monkeypatch):
    """`--model ARCH --weights FILE`: what `rsvl train clip` writes from a bare architecture."""
    from open_clip import factory

    import rsvl

    monkeypatch.setitem(factory._MODEL_CONFIGS, "Tiny-Test-ViT", copy.deepcopy(VIT_CFG))
    path = _save(vit.state_dict(), tmp_path / "final.pt", "farslip")
    model = rsvl.load("tiny-test-vit-quickgelu", weights=path)
    assert model.card.architecture == "Tiny-Test-ViT" and model.card.quick_gelu and model.card.image_size == 32
    images = _images(2, 32)
    assert (model.encode_image(images) - _ref_image(vit, images, model.card)).abs().max() <= TOL
    assert (model.encode_text(TEXTS) - _ref_text(vit, TEXTS)).abs().max() <= TOL
    with pytest.raises(UnknownModelError, match="Unknown model"):
        rsvl.load("tiny-test-vit")  # without weights an architecture is not a model
    with pytest.raises(UnknownModelError, match="Unknown model"):
        rsvl.load("no-such-arch", weights=path)

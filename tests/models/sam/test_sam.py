"""rsvl's SAM against segment-anything and transformers' SamModel on tiny random models.

Every test builds its models here (no network, no downloaded weights) and runs in well
under a second of CPU each.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from rsvl.errors import (
    BandSelectionError,
    CheckpointMismatchError,
    PromptError,
    RsvlError,
    UnknownModelError,
    WeightsNotFoundError,
)
from rsvl.models.sam.build import SAM_CONFIGS, build_sam, load, load_sam
from rsvl.models.sam.cards import SAM_CARDS
from rsvl.models.sam.config import SamConfig, sam_config_from_hf
from rsvl.models.sam.convert import detect_sam_layout, hf_key_for, infer_sam_config
from rsvl.models.sam.predictor import SamPredictor
from rsvl.models.sam.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from rsvl.models.sam.sam import Sam as RsvlSam
from rsvl.models.sam.transforms import ResizeLongestSide

sa = pytest.importorskip("segment_anything")
transformers = pytest.importorskip("transformers")

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.predictor import SamPredictor as MetaPredictor  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide as MetaResize  # noqa: E402

TOL = 1e-4
# tiny: 96 px, patch 16 -> 6x6 grid; window 4 (so windows are padded), block 1 global
IMG, PATCH, DIM, HEADS, WIN, PDIM = 96, 16, 32, 2, 4, 32

TINY = SamConfig(
    image_size=IMG,
    patch_size=PATCH,
    encoder_embed_dim=DIM,
    encoder_depth=2,
    encoder_num_heads=HEADS,
    encoder_global_attn_indexes=(1,),
    window_size=WIN,
    prompt_embed_dim=PDIM,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (zero-initialised tables like rel_pos would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or "pixel_" in name:
                continue
            noise = torch.randn(t.shape, generator=g)
            if "positional_e" in name:  # Fourier matrix: N(0, 1), as published
                t.copy_(noise)
            elif t.ndim == 1 and name.endswith("weight"):  # LayerNorm gains
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.15 * noise)


def _meta_model(seed: int = 0) -> Sam:
    enc = ImageEncoderViT(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=2,
        num_heads=HEADS,
        mlp_ratio=4.0,
        out_chans=PDIM,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=WIN,
        global_attn_indexes=(1,),
    )
    grid = IMG // PATCH
    pe = PromptEncoder(
        embed_dim=PDIM,
        image_embedding_size=(grid, grid),
        input_image_size=(IMG, IMG),
        mask_in_chans=16,
    )
    dec = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PDIM, mlp_dim=64, num_heads=2),
        transformer_dim=PDIM,
        iou_head_depth=3,
        iou_head_hidden_dim=32,
    )
    model = Sam(enc, pe, dec).eval()
    _randomise(model, seed)
    return model


def _hf_model(seed: int = 1):
    cfg = transformers.SamConfig(
        vision_config=dict(
            hidden_size=DIM,
            output_channels=PDIM,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            image_size=IMG,
            patch_size=PATCH,
            window_size=WIN,
            global_attn_indexes=[1],
            num_pos_feats=PDIM // 2,
        ),
        prompt_encoder_config=dict(
            hidden_size=PDIM, image_size=IMG, patch_size=PATCH, mask_input_channels=16
        ),
        mask_decoder_config=dict(
            hidden_size=PDIM,
            mlp_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=32,
        ),
    )
    model = transformers.SamModel(cfg).eval()
    _randomise(model, seed)
    # the prompt encoder's copy of the Fourier matrix is tied to shared_image_embedding
    with torch.no_grad():
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(
            model.shared_image_embedding.positional_embedding
        )
    return model


def _image(h: int = 70, w: int = 53, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _maxdiff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def meta_pair(tmp_path_factory):
    meta = _meta_model()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(meta.state_dict(), path)
    ours = load_sam(path, TINY)
    return meta, ours


@pytest.fixture(scope="module")
def hf_pair():
    hf = _hf_model()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = load_sam(sd, sam_config_from_hf(hf.config.to_dict()))
    return hf, ours


# ---------------------------------------------------------------- pre/post-processing


@pytest.mark.parametrize("hw", [(70, 53), (53, 70), (96, 96), (3, 300), (301, 7)])
def test_resize_longest_side_matches_segment_anything(hw):
    ours, meta = ResizeLongestSide(IMG), MetaResize(IMG)
    img = _image(*hw)
    got, want = ours.apply_image(img), meta.apply_image(img)
    assert got.shape == want.shape and max(got.shape[:2]) == IMG
    assert np.array_equal(got, want)
    pts = np.array([[0.0, 0.0], [hw[1] - 1, hw[0] - 1], [3.3, 1.7]])
    np.testing.assert_allclose(ours.apply_coords(pts, hw), meta.apply_coords(pts, hw))
    boxes = np.array([[1, 2, 30, 40], [0, 0, hw[1], hw[0]]], dtype=float)
    np.testing.assert_allclose(ours.apply_boxes(boxes, hw), meta.apply_boxes(boxes, hw))
    tpts = torch.tensor(pts, dtype=torch.float32)
    assert torch.allclose(ours.apply_coords(tpts, hw), meta.apply_coords_torch(tpts, hw))
    assert ResizeLongestSide.get_preprocess_shape(*hw, 1024) == MetaResize.get_preprocess_shape(
        *hw, 1024
    )


def test_resize_never_gives_an_empty_side():
    out = ResizeLongestSide(IMG).apply_image(_image(1, 300))
    assert out.shape == (1, IMG, 3)


def test_preprocess_pads_and_normalises_like_segment_anything(meta_pair):
    meta, ours = meta_pair
    img = ResizeLongestSide(IMG).apply_image(_image(70, 53))
    x = torch.as_tensor(img).permute(2, 0, 1)[None].float()
    got = ours.preprocess(x)
    assert got.shape == (1, 3, IMG, IMG)
    assert _maxdiff(got, meta.preprocess(x)) < 1e-5
    h, w = img.shape[:2]
    assert torch.all(got[..., h:, :] == 0) and torch.all(got[..., :, w:] == 0)
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    assert torch.allclose(got[0, :, :h, :w], (x[0] - mean) / std)


@pytest.mark.parametrize("orig", [(70, 53), (40, 96), (200, 150)])
def test_postprocess_back_to_original_size(meta_pair, orig):
    meta, ours = meta_pair
    inp = ResizeLongestSide(IMG).target_shape(orig)
    low = torch.randn(2, 3, 4 * IMG // PATCH, 4 * IMG // PATCH)
    got = ours.postprocess_masks(low, inp, orig)
    assert got.shape == (2, 3, *orig)
    assert _maxdiff(got, meta.postprocess_masks(low, inp, orig)) < 1e-5


# ---------------------------------------------------------------- parity: segment-anything


def test_meta_image_embeddings_match(meta_pair):
    meta, ours = meta_pair
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = meta.image_encoder(x)
        got = ours.encode_image(x)
    assert got.shape == (2, PDIM, IMG // PATCH, IMG // PATCH)
    assert _maxdiff(got, want) < TOL
    assert _maxdiff(ours.prompt_encoder.get_dense_pe(), meta.prompt_encoder.get_dense_pe()) < TOL


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["point", "points", "box", "box+point", "mask+point"])
def test_meta_predictor_parity(meta_pair, prompt, multimask):
    meta, ours = meta_pair
    img = _image(70, 53)
    mp, op = MetaPredictor(meta), SamPredictor(ours)
    mp.set_image(img)
    op.set_image(img)
    assert _maxdiff(op.features, mp.features) < TOL

    kw: dict = {}
    if prompt in ("point", "mask+point"):
        kw = dict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]))
    elif prompt == "points":
        kw = dict(point_coords=np.array([[20.0, 30.0], [5.0, 60.0], [40, 10]]),
                  point_labels=np.array([1, 0, 1]))
    elif prompt == "box":
        kw = dict(box=np.array([4.0, 8.0, 45.0, 60.0]))
    elif prompt == "box+point":
        kw = dict(box=np.array([4.0, 8.0, 45.0, 60.0]), point_coords=np.array([[20.0, 30.0]]),
                  point_labels=np.array([0]))
    if prompt == "mask+point":
        kw["mask_input"] = np.random.default_rng(0).normal(size=(1, 24, 24)).astype(np.float32)
    want = mp.predict(**kw, multimask_output=multimask, return_logits=True)
    got = op.predict(
        points=kw.get("point_coords"),
        point_labels=kw.get("point_labels"),
        box=kw.get("box"),
        mask_input=kw.get("mask_input"),
        multimask=multimask,
        return_logits=True,
    )
    m = 3 if multimask else 1
    assert got[0].shape == (m, 70, 53) and got[1].shape == (m,) and got[2].shape == (m, 24, 24)
    for g, w in zip(got, want, strict=True):
        assert _maxdiff(g, w) < TOL
    masks, _, _ = op.predict(box=kw.get("box"), points=kw.get("point_coords"),
                             point_labels=kw.get("point_labels"), multimask=multimask)
    assert masks.dtype == bool


def test_meta_batched_boxes(meta_pair):
    meta, ours = meta_pair
    img = _image(70, 53)
    mp, op = MetaPredictor(meta), SamPredictor(ours)
    mp.set_image(img)
    op.set_image(img)
    boxes = np.array([[4.0, 8.0, 45.0, 60.0], [0, 0, 20, 20], [10, 30, 52, 69]])
    tb = mp.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (70, 53))
    with torch.no_grad():
        want = mp.predict_torch(None, None, boxes=tb, multimask_output=False, return_logits=True)
    got = op.predict(box=boxes, multimask=False, return_logits=True)
    assert got[0].shape == (3, 1, 70, 53) and got[1].shape == (3, 1)
    for g, w in zip(got, want, strict=True):
        assert _maxdiff(g, w) < TOL
    # each batched result equals the single-box call
    single = op.predict(box=boxes[1], multimask=False, return_logits=True)
    assert _maxdiff(got[1][1], single[1]) < 1e-5


def test_hidden_states_for_feature_aggregators(meta_pair):
    _, ours = meta_pair
    out, hidden = ours.image_encoder(torch.randn(1, 3, IMG, IMG), return_hidden_states=True)
    assert len(hidden) == TINY.encoder_depth + 1
    assert hidden[-1].shape == (1, IMG // PATCH, IMG // PATCH, DIM)
    assert out.shape == (1, PDIM, IMG // PATCH, IMG // PATCH)


# ---------------------------------------------------------------- parity: transformers


def _hf_inputs(ours: RsvlSam):
    img = ResizeLongestSide(IMG).apply_image(_image(70, 53))
    return ours.preprocess(torch.as_tensor(img).permute(2, 0, 1)[None].float())


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["points", "boxes", "boxes+points"])
def test_hf_parity(hf_pair, prompt, multimask):
    hf, ours = hf_pair
    pix = _hf_inputs(ours)
    pts = torch.tensor([[[[20.0, 30.0], [60.0, 10.0]]]])  # (1 image, 1 set, 2 points, xy)
    lab = torch.tensor([[[1, 0]]])
    boxes = torch.tensor([[[4.0, 8.0, 60.0, 80.0], [0.0, 0.0, 30.0, 30.0]]])  # (1, 2, 4)
    kw: dict = {}
    if prompt == "points":
        kw = dict(input_points=pts, input_labels=lab)
    elif prompt == "boxes":
        kw = dict(input_boxes=boxes)
    else:
        kw = dict(input_boxes=boxes, input_points=pts.expand(1, 2, 2, 2),
                  input_labels=lab.expand(1, 2, 2))
    with torch.no_grad():
        out = hf(pixel_values=pix, multimask_output=multimask, **kw)
        want_emb = hf.get_image_embeddings(pix)
        emb = ours.encode_image(pix)
        if prompt == "points":
            low, iou = ours.decode(emb, pts[0], lab[0], multimask_output=multimask)
        elif prompt == "boxes":
            low, iou = ours.decode(emb, boxes=boxes[0], multimask_output=multimask)
        else:
            low, iou = ours.decode(emb, pts[0].expand(2, 2, 2), lab[0].expand(2, 2),
                                   boxes=boxes[0], multimask_output=multimask)
    assert _maxdiff(emb, want_emb) < TOL
    assert _maxdiff(low, out.pred_masks[0]) < TOL
    assert _maxdiff(iou, out.iou_scores[0]) < TOL


def test_hf_save_pretrained_folder_loads_with_its_config(tmp_path):
    hf = _hf_model(seed=5)
    hf.save_pretrained(tmp_path / "sam_tiny")
    ours = load_sam(tmp_path / "sam_tiny")  # config.json gives the head counts
    assert ours.config.decoder_num_heads == 2 and ours.config.decoder_ln_eps == 1e-6
    pix = _hf_inputs(ours)
    with torch.no_grad():
        want = hf(pixel_values=pix, input_boxes=torch.tensor([[[4.0, 8.0, 60.0, 80.0]]]))
        low, iou = ours.decode(ours.encode_image(pix), boxes=torch.tensor([[4.0, 8.0, 60.0, 80.0]]))
    assert _maxdiff(low, want.pred_masks[0]) < TOL
    assert _maxdiff(iou, want.iou_scores[0]) < TOL


# ---------------------------------------------------------------- layouts, inference, errors


def test_layout_detection_and_key_translation(meta_pair, hf_pair):
    meta, _ = meta_pair
    hf, _ = hf_pair
    assert detect_sam_layout(meta.state_dict()) == "meta"
    assert detect_sam_layout(hf.state_dict()) == "hf"
    # our names map one to one onto transformers' names
    hf_keys = set(hf.state_dict()) - {"prompt_encoder.shared_embedding.positional_embedding"}
    assert {hf_key_for(k, TINY) for k in build_sam(TINY).state_dict()} == hf_keys
    with pytest.raises(CheckpointMismatchError, match="Not a SAM checkpoint"):
        detect_sam_layout({"backbone.conv.weight": torch.zeros(1)})


def test_infer_config_from_shapes(meta_pair, hf_pair):
    meta, _ = meta_pair
    hf, _ = hf_pair
    got = infer_sam_config(meta.state_dict(), decoder_num_heads=2)
    assert got == TINY
    got_hf = infer_sam_config(hf.state_dict(), decoder_num_heads=2)
    assert got_hf == sam_config_from_hf(hf.config.to_dict())


def test_published_architectures_have_published_shapes():
    with torch.device("meta"):  # shapes only: no memory, no init time
        sd = RsvlSam(SAM_CONFIGS["vit_b"]).state_dict()
    assert sd["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert sd["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    assert sd["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)
    assert sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape == (2, 128)
    assert SAM_CONFIGS["vit_h"].encoder_global_attn_indexes == (7, 15, 23, 31)
    names = {c["name"] for c in SAM_CARDS}
    assert {"sam-vit-b", "sam-vit-l", "sam-vit-h", "sam-vit-base-hf"} <= names
    assert all(c["licence"] == "Apache-2.0" for c in SAM_CARDS)


def test_missing_and_renamed_keys_are_named(meta_pair, tmp_path):
    meta, _ = meta_pair
    sd = dict(meta.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra_head.weight"] = sd.pop("mask_decoder.transformer.norm_final_attn.weight")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_sam(tmp_path / "broken.pth", TINY)
    msg = str(err.value)
    assert "missing key(s)" in msg and "mask_decoder.iou_token.weight" in msg
    assert "mask_decoder.transformer.norm_final_attn.weight" in msg
    assert "unexpected key(s)" in msg and "mask_decoder.extra_head.weight" in msg


def test_hf_mismatch_names_keys_in_transformers_spelling(hf_pair):
    hf, _ = hf_pair
    sd = dict(hf.state_dict())
    del sd["vision_encoder.neck.conv1.weight"]
    del sd["mask_decoder.iou_prediction_head.proj_out.bias"]
    with pytest.raises(CheckpointMismatchError) as err:
        load_sam(sd, sam_config_from_hf(hf.config.to_dict()))
    msg = str(err.value)
    assert "vision_encoder.neck.conv1.weight" in msg
    assert "mask_decoder.iou_prediction_head.proj_out.bias" in msg


def test_wrong_size_is_a_shape_mismatch(meta_pair):
    meta, _ = meta_pair
    other = SamConfig(**{**TINY.to_dict(), "encoder_embed_dim": 64, "encoder_num_heads": 4})
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch\(es\): image_encoder"):
        load_sam(meta.state_dict(), other)


def test_safetensors_and_no_pickle(meta_pair, tmp_path):
    from safetensors.torch import save_file

    meta, ours = meta_pair
    save_file({k: v.contiguous() for k, v in meta.state_dict().items()}, tmp_path / "m.safetensors")
    loaded = load_sam(tmp_path / "m.safetensors", TINY)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # a pickle with arbitrary objects is refused by weights_only loading
    torch.save({"state_dict": meta.state_dict(), "cfg": Path("x")}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointMismatchError, match="refuses to unpickle") as err:
        load_sam(tmp_path / "evil.pth", TINY)
    assert "weights_only=False" not in str(err.value)


def test_predictor_errors(meta_pair):
    _, ours = meta_pair
    p = SamPredictor(ours)
    with pytest.raises(RsvlError, match="set_image"):
        p.predict(box=[0, 0, 5, 5])
    with pytest.raises(BandSelectionError):
        p.set_image(np.zeros((10, 10), dtype=np.uint8))
    p.set_image(_image(30, 40))
    with pytest.raises(PromptError):
        p.predict(points=[[1, 2]])
    with pytest.raises(PromptError):
        p.predict(box=[1, 2, 3])


def test_cards_are_registered_and_resolve(tmp_path):
    from rsvl.models.registry import get_card, list_cards

    names = {c.name for c in list_cards(family="sam")}
    assert names == {c["name"] for c in SAM_CARDS}
    meta_b = get_card("sam_vit_b")
    assert meta_b.source.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert meta_b.sha256 is None and meta_b.licence == "Apache-2.0"
    hf_b = get_card("sam-vit-base-hf")
    assert hf_b.source.hf_repo == "facebook/sam-vit-base"
    assert hf_b.source.repo_filename == "model.safetensors"
    with pytest.raises(WeightsNotFoundError):
        load("sam-vit-b", weights=tmp_path / "absent.pth")
    other = next(c for c in list_cards() if c.family != "sam")
    with pytest.raises(UnknownModelError, match="not a sam model"):
        load(other.name, weights=tmp_path / "absent.pth")


def test_full_size_vit_b_names_and_shapes_match_both_layouts():
    """Published ViT-B sizes, built on the meta device (no memory, no init time)."""
    from segment_anything import sam_model_registry

    cfg = SAM_CONFIGS["vit_b"]
    with torch.device("meta"):
        meta = sam_model_registry["vit_b"]().state_dict()
        ours = RsvlSam(cfg).state_dict()
        hf = transformers.SamModel(transformers.SamConfig()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    assert shapes == {k: tuple(v.shape) for k, v in meta.items()}
    hf.pop("prompt_encoder.shared_embedding.positional_embedding")
    assert {hf_key_for(k, cfg): s for k, s in shapes.items()} == {
        k: tuple(v.shape) for k, v in hf.items()
    }
    assert infer_sam_config(meta) == cfg
    assert infer_sam_config(hf) == SamConfig(**{**cfg.to_dict(), "decoder_ln_eps": 1e-6})

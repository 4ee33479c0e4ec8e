"""FIANet (rsvl.models.fianet) on tiny random models: checkpoint layout, the three masked BERT
passes, pretrained initialisation from Swin / BERT files, parity of the Swin blocks with
timm and of the text passes with transformers, and upstream's optimiser groups.

Everything is built here (no network, no downloaded weights)."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from rsvl.data.refer_text import text_role_masks
from rsvl.errors import CheckpointMismatchError, PromptError, WeightsNotFoundError
from rsvl.models.fianet.backbone import MultiModalSwinTransformer
from rsvl.models.fianet.build import load_fianet
from rsvl.models.fianet.config import IMAGENET_MEAN, IMAGENET_STD, FianetConfig
from rsvl.models.fianet.convert import (
    infer_fianet_config,
    init_fianet_pretrained,
    load_bert_pretrained,
    load_fianet_state_dict,
    load_swin_pretrained,
    read_fianet_checkpoint,
)
from rsvl.models.fianet.decoder import SimpleDecoding
from rsvl.models.fianet.model import FianetModel, build_fianet
from rsvl.models.fianet.swin import PatchMerging, SwinTransformerBlock, shift_mask
from rsvl.models.fianet.text import bert_config

transformers = pytest.importorskip("transformers")
timm_swin = pytest.importorskip("timm.models.swin_transformer")

torch.set_num_threads(1)

WORDS = (
    "the a of on in at to and large small white red left right top bottom middle side near "
    "next road car building tank storage tennis court harbor ship bridge vehicle airplane "
    "parked upper lower two three is are with by ten ##nis wind ##mill mill"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]

SENTENCE = "the small ship on the left of the harbor"


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def cfg():
    return FianetConfig.tiny()


def _randomise_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """BatchNorm running stats / affine values away from identity, so a loader that drops
    them would change the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def model(cfg, vocab_file):
    torch.manual_seed(0)
    m = build_fianet(cfg)
    _randomise_bn(m, torch.Generator().manual_seed(1))
    m.set_vocab(vocab_file)
    return m.eval()


@pytest.fixture(scope="module")
def batch(model):
    text = model.tokenize([SENTENCE, "the large storage tank near the road"])
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(2))
    return images, text


def _fresh(cfg, vocab_file, seed=5):
    torch.manual_seed(seed)
    return build_fianet(cfg, vocab=vocab_file).eval()


# ----------------------------------------------------------------------------- tokenizer


def test_tokenize_gives_ids_and_the_three_role_masks(model):
    text = model.tokenize([SENTENCE, "a red car"])
    assert set(text) == {"input_ids", "attention_mask", "object_mask", "spatial_mask"}
    for v in text.values():
        assert v.shape == (2, model.config.max_tokens) and v.dtype == torch.long
    ref = text_role_masks(SENTENCE, model.tokenizer, max_tokens=model.config.max_tokens)
    assert text["input_ids"][0].tolist() == ref.input_ids.tolist()
    assert text["object_mask"][0].tolist() == ref.target_mask.tolist()
    assert text["spatial_mask"][0].tolist() == ref.position_mask.tolist()
    # [CLS] the small ship on the left of the harbor [SEP]: "ship" (word 2) -> position 3,
    # "harbor" (word 8) -> 9,
    # "on the left" starts at word 3 -> positions 4-6
    ids = text["input_ids"][0].tolist()
    assert ids[0] == VOCAB.index("[CLS]") and ids[3] == VOCAB.index("ship")
    assert text["object_mask"][0].nonzero().flatten().tolist() == [3, 9]  # ship, harbor
    assert text["spatial_mask"][0].nonzero().flatten().tolist() == [4, 5, 6]
    assert text["attention_mask"][0].sum() == 11
    # no class name, no phrase: empty object mask, spatial mask falls back to the sentence
    assert text["object_mask"][1].sum() == 0
    assert torch.equal(text["spatial_mask"][1], text["attention_mask"][1])


def test_tokenize_errors(cfg, model):
    with pytest.raises(PromptError):
        model.tokenize(["  "])
    with pytest.raises(WeightsNotFoundError, match="vocab"):
        FianetModel(cfg).tokenize(["a ship"])


def test_refsegrs_settings():
    c = FianetConfig.refsegrs()
    assert (c.num_tmem, c.max_tokens, c.window_size, c.embed_dim) == (1, 20, 12, 128)
    assert "road marking" in c.class_names
    d = FianetConfig()
    assert (d.num_tmem, d.max_tokens, d.depths, d.num_heads) == (3, 22, (2, 2, 18, 2), (4, 8, 16, 32))


# ----------------------------------------------------------------------------- shapes


def test_forward_shapes_and_stage_maps(model, cfg, batch):
    images, text = batch
    with torch.no_grad():
        out = model.forward_features(images, text)
        logits = model(images, text)
    s = cfg.image_size
    assert logits.shape == (2, 2, s, s) and torch.isfinite(logits).all()
    for i, (st, tm) in enumerate(zip(out["stages"], out["tmem"], strict=True)):
        shape = (2, cfg.embed_dim * 2**i, s // 4 // 2**i, s // 4 // 2**i)
        assert st.shape == shape and tm.shape == shape
    assert out["logits"].shape == (2, 2, s // 4, s // 4)
    tx = out["text"]
    for feats, mask, key in ((tx.l, tx.l_mask, "attention_mask"), (tx.t, tx.t_mask, "object_mask"),
                             (tx.p, tx.p_mask, "spatial_mask")):  # fmt: skip
        assert feats.shape == (2, cfg.text_hidden_size, cfg.max_tokens)
        assert mask.shape == (2, cfg.max_tokens, 1)
        assert torch.equal(mask[..., 0], text[key].float())
    # the final logits are the 1/4-size logits upsampled (bilinear, align_corners=True)
    up = torch.nn.functional.interpolate(out["logits"], size=(s, s), mode="bilinear", align_corners=True)
    assert torch.allclose(up, logits, atol=1e-5)
    assert model.predict(images, text).shape == (2, s, s)


def test_odd_sizes_pad_windows_and_merges(cfg, vocab_file, batch):
    m = _fresh(cfg, vocab_file)
    _, text = batch
    x = torch.randn(2, 3, 72, 72)  # 18 -> 9 -> 5 -> 3 tokens: padded windows, odd merges
    with torch.no_grad():
        out = m.forward_features(x, text)
        y = m(x, text)
    assert [tuple(t.shape[-2:]) for t in out["stages"]] == [(18, 18), (9, 9), (5, 5), (3, 3)]
    assert y.shape == (2, 2, 72, 72) and torch.isfinite(y).all()


def test_full_size_layout_matches_upstream_keys():
    """Swin-B / TMEM x3 / decoder key names and shapes of an upstream checkpoint (no BERT,
    built on the meta device: nothing is allocated)."""
    c = FianetConfig()
    with torch.device("meta"):
        sd = {f"backbone.{k}": v for k, v in MultiModalSwinTransformer(c).state_dict().items()}
        sd.update({f"classifier.{k}": v for k, v in SimpleDecoding(8 * c.embed_dim).state_dict().items()})
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["backbone.patch_embed.proj.weight"] == (128, 3, 4, 4)
    assert shapes["backbone.layers.2.blocks.17.attn.relative_position_bias_table"] == (529, 16)
    assert shapes["backbone.layers.2.blocks.17.attn.relative_position_index"] == (144, 144)
    assert shapes["backbone.layers.3.fc1.weight"] == (128, 1024)
    assert shapes["backbone.layers.0.context_pixel_attn.image_lang_att.f_key.0.weight"] == (128, 768, 1)
    assert shapes["backbone.layers.1.object_position_align_blk.go_embedding.weight"] == (256, 256)
    assert shapes["backbone.layers.1.object_position_align_blk.conv1.weight"] == (1, 2, 3, 3)
    assert shapes["backbone.layers.2.downsample.reduction.weight"] == (1024, 2048)
    assert "backbone.layers.3.downsample.norm.weight" not in shapes
    assert shapes["backbone.norm3.weight"] == (1024,)
    assert shapes["backbone.tmem.down_channel.weight"] == (480, 1920, 1, 1)
    assert shapes["backbone.tmem.block.2.tma.f_key.0.weight"] == (480, 768, 1)
    assert shapes["backbone.tmem.block.2.ff.net.0.weight"] == (960, 480)
    assert shapes["backbone.tmem.fusion.3.global_act.weight"] == (1024, 1024, 1, 1)
    assert "backbone.tmem.fusion.0.bn3.num_batches_tracked" in shapes
    assert shapes["classifier.conv1_4.weight"] == (512, 1536, 3, 3)
    assert shapes["classifier.conv1_2.weight"] == (512, 640, 3, 3)
    assert shapes["classifier.conv1_1.weight"] == (2, 512, 1, 1)
    assert sum(1 for k in shapes if re.match(r"backbone\.layers\.\d+\.blocks\.\d+\.norm1\.weight", k)) == 24
    # the inferred configuration of such a file is the published one
    fake = dict(sd)
    for k, shp in {
        "text_encoder.embeddings.word_embeddings.weight": (30522, 768),
        "text_encoder.embeddings.position_embeddings.weight": (512, 768),
        "text_encoder.embeddings.token_type_embeddings.weight": (2, 768),
        **{f"text_encoder.encoder.layer.{i}.intermediate.dense.weight": (3072, 768) for i in range(12)},
    }.items():
        fake[k] = torch.empty(shp, device="meta")
    inferred = infer_fianet_config(fake)
    assert inferred == FianetConfig()


# ----------------------------------------------------------------------------- text passes


def test_three_bert_passes_use_the_three_masks(model, batch, monkeypatch):
    images, text = batch
    seen = []
    real = model.bert_pass

    def spy(ids, mask):
        seen.append(mask.clone())
        return real(ids, mask)

    monkeypatch.setattr(model, "bert_pass", spy)
    with torch.no_grad():
        model.encode_text(text)
    assert [s.tolist() for s in seen] == [
        text["attention_mask"].tolist(),
        text["object_mask"].tolist(),
        text["spatial_mask"].tolist(),
    ]


def test_word_outside_a_role_only_changes_the_passes_that_see_it(model, batch):
    """Replacing "small" (position 2: in the sentence, not the object, not the phrase)
    changes the context pass but neither the object nor the spatial pass on their words,
    so the object-position branch of every stage is unchanged."""
    images, text = batch
    text1 = {k: v[:1] for k, v in text.items()}
    text2 = {k: v.clone() for k, v in text1.items()}
    assert text1["input_ids"][0, 2] == VOCAB.index("small")
    assert text1["object_mask"][0, 2] == 0 and text1["spatial_mask"][0, 2] == 0
    text2["input_ids"][0, 2] = VOCAB.index("large")
    with torch.no_grad():
        a, b = model.encode_text(text1), model.encode_text(text2)
    assert not torch.allclose(a.l, b.l, atol=1e-4)
    for fa, fb, m in ((a.t, b.t, a.t_mask), (a.p, b.p, a.p_mask)):
        on = m[0, :, 0].bool()
        assert torch.allclose(fa[..., on], fb[..., on], atol=1e-5)
        assert not torch.allclose(fa[..., ~on], fb[..., ~on], atol=1e-4)  # own position differs
    x = torch.randn(1, model.config.embed_dim, 16 * 16).transpose(1, 2)
    opab = model.backbone.layers[0].object_position_align_blk
    with torch.no_grad():
        assert torch.allclose(opab(x, (16, 16), a.t, a.t_mask, a.p, a.p_mask),
                              opab(x, (16, 16), b.t, b.t_mask, b.p, b.p_mask), atol=1e-5)  # fmt: skip
        pwam = model.backbone.layers[0].context_pixel_attn
        assert not torch.allclose(pwam(x, a.l, a.l_mask), pwam(x, b.l, b.l_mask), atol=1e-4)


def test_changing_the_object_word_changes_the_object_pass(model, batch):
    images, text = batch
    text1 = {k: v[:1] for k, v in text.items()}
    text2 = {k: v.clone() for k, v in text1.items()}
    text2["input_ids"][0, 3] = VOCAB.index("car")  # "ship" -> "car", inside the object mask
    with torch.no_grad():
        a, b = model.encode_text(text1), model.encode_text(text2)
    on = a.t_mask[0, :, 0].bool()
    assert not torch.allclose(a.t[..., on], b.t[..., on], atol=1e-4)
    sp = a.p_mask[0, :, 0].bool()  # the spatial words do not attend to position 3
    assert torch.allclose(a.p[..., sp], b.p[..., sp], atol=1e-5)


def test_bert_pass_matches_transformers_with_a_padding_mask(model, batch):
    _, text = batch
    with torch.no_grad():
        ours = model.bert_pass(text["input_ids"], text["attention_mask"])
        ref = model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    assert torch.allclose(ours, ref.last_hidden_state, atol=1e-5)


def test_empty_object_mask_gives_a_zero_object_branch(model):
    x = torch.randn(1, 16 * 16, model.config.embed_dim)
    t = torch.randn(1, model.config.text_hidden_size, model.config.max_tokens)
    zero = torch.zeros(1, model.config.max_tokens, 1)
    with torch.no_grad():
        out = model.backbone.layers[0].object_position_align_blk.go_cross_attn(x, t, zero)
    assert torch.isfinite(out).all() and out.abs().max() < 1e-3  # instance norm of a constant


# ----------------------------------------------------------------------------- checkpoints


def _upstream_file(model, path, prefix=""):
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 3e-5, "params": [0, 1]}]},
            "epoch": 7,
            "args": argparse.Namespace(dataset="rrsisd", num_tmem=1, lr=3e-5, window12=True),
            "lr_scheduler": {"base_lrs": [3e-5], "last_epoch": 10, "lr_lambdas": [None]},
            "best_oIoU": torch.tensor(61.5),
        },
        path,
    )
    return path


def test_checkpoint_round_trip_is_exact(model, cfg, batch, tmp_path):
    images, text = batch
    path = _upstream_file(model, tmp_path / "model_best_fianet.pth")
    sd = read_fianet_checkpoint(path)
    assert any(k.startswith("backbone.") for k in sd) and any(k.startswith("text_encoder.") for k in sd)
    inferred = infer_fianet_config(sd, FianetConfig.tiny(text_heads=1))
    assert inferred == replace_heads(cfg, inferred.text_heads)  # shapes give all but BERT heads
    loaded = FianetModel(cfg)
    load_fianet_state_dict(loaded, sd)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(images, text), loaded(images, text))
    # DDP prefix and safetensors
    ddp = _upstream_file(model, tmp_path / "ddp.pth", prefix="module.")
    assert read_fianet_checkpoint(ddp).keys() == sd.keys()
    from safetensors.torch import save_file

    st = tmp_path / "fianet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    again = FianetModel(cfg)
    load_fianet_state_dict(again, read_fianet_checkpoint(st))
    with torch.no_grad():
        assert torch.equal(model(images, text), again.eval()(images, text))


def replace_heads(cfg, heads):
    from dataclasses import replace

    return replace(cfg, text_heads=heads)


def test_mismatched_keys_are_named(model, cfg):
    sd = dict(model.state_dict())
    renamed = dict(sd)
    renamed["backbone.layers.1.object_position_align_blk.go_embed.weight"] = renamed.pop(
        "backbone.layers.1.object_position_align_blk.go_embedding.weight"
    )
    with pytest.raises(CheckpointMismatchError) as err:
        load_fianet_state_dict(FianetModel(cfg), renamed)
    msg = str(err.value)
    assert "missing key(s): backbone.layers.1.object_position_align_blk.go_embedding.weight" in msg
    assert "unexpected key(s): backbone.layers.1.object_position_align_blk.go_embed.weight" in msg

    missing = {k: v for k, v in sd.items() if k != "classifier.bn2_3.running_var"}
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): classifier\.bn2_3\.running_var"):
        load_fianet_state_dict(FianetModel(cfg), missing)

    wrong = dict(sd)
    wrong["backbone.tmem.down_channel.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch\(es\): backbone\.tmem\.down_channel"):
        load_fianet_state_dict(FianetModel(cfg), wrong)

    # harmless buffers of newer transformers versions are accepted
    extra = dict(sd)
    extra["text_encoder.embeddings.position_ids"] = torch.arange(cfg.text_max_positions)[None]
    load_fianet_state_dict(FianetModel(cfg), extra)


def test_non_checkpoint_files_fail_clearly(tmp_path):
    p = tmp_path / "x.pth"
    torch.save({"epoch": 1}, p)
    with pytest.raises(CheckpointMismatchError, match="is not a state dict"):
        read_fianet_checkpoint(p)
    with pytest.raises(CheckpointMismatchError, match="missing key"):
        infer_fianet_config({"backbone.patch_embed.proj.weight": torch.zeros(16, 3, 4, 4)})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "x": Evil()}, bad)
    with pytest.raises(CheckpointMismatchError, match=r"\(print\) that rsvl refuses to unpickle") as err:
        read_fianet_checkpoint(bad)
    assert "weights_only=False" not in str(err.value)


def test_card_and_loader(model, cfg, batch, vocab_file, tmp_path, monkeypatch):
    from rsvl.models.registry import get_card, list_cards

    monkeypatch.setenv("RSVL_CACHE", str(tmp_path / "cache"))
    names = {c.name for c in list_cards(family="fianet")}
    assert {"fianet-rrsisd", "fianet-refsegrs"} <= names
    card = get_card("fianet-rrsisd")
    assert card.tasks == ("refer",) and card.sha256 is None and card.image_size == 480
    assert card.mean == IMAGENET_MEAN and card.std == IMAGENET_STD
    assert "No public download" in card.notes and "vocab.txt" in card.notes
    assert get_card("fianet-refsegrs").metadata["num_tmem"] == 1
    with pytest.raises(WeightsNotFoundError, match="--weights"):
        load_fianet(card)

    images, text = batch
    ckpt = _upstream_file(model, tmp_path / "model_best.pth")
    with pytest.raises(WeightsNotFoundError, match=r"vocab\.txt"):
        load_fianet(card, weights=ckpt, text_heads=cfg.text_heads)
    overrides = {f: getattr(cfg, f) for f in ("text_heads", "image_size", "max_tokens", "class_names")}
    loaded = load_fianet(card, weights=ckpt, vocab=vocab_file, **overrides)
    assert loaded.name == "fianet-rrsisd" and not loaded.training
    with torch.no_grad():
        assert torch.equal(model(images, text), loaded(images, text))
    assert torch.equal(loaded.tokenize([SENTENCE])["object_mask"], text["object_mask"][:1])
    # vocab.txt next to the checkpoint is found by itself
    (tmp_path / "vocab.txt").write_text(vocab_file.read_text())
    import rsvl

    via_api = rsvl.load("fianet-rrsisd", weights=ckpt, **overrides)
    net = getattr(via_api, "module", via_api)  # rsvl.load may wrap the network
    assert isinstance(net, FianetModel) and net.tokenizer is not None
    # a bare checkpoint path works as the first argument too (RRSIS-D card settings)
    assert load_fianet(str(ckpt), **overrides).name == "fianet-rrsisd"


# ----------------------------------------------------------------------------- init


def _timm_swin(cfg, window=None):
    torch.manual_seed(3)
    return timm_swin.SwinTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=window or cfg.window_size,
        num_classes=7,
    ).eval()


def _original_layout(timm_sd):
    """timm -> the original Microsoft layout (merging at the end of a stage, ``head.``)."""
    out = {}
    for k, v in timm_sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_swin_init_from_original_and_timm_layouts(cfg, vocab_file, tmp_path):
    ref = _timm_swin(cfg)
    tsd = ref.state_dict()
    orig = _original_layout(tsd)
    for i, d in enumerate(cfg.depths):  # buffers the original file also carries
        for j in range(d):
            orig[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
            if j % 2:
                orig[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 16, 16)
    path = tmp_path / "swin_tiny_22k.pth"
    torch.save({"model": orig}, path)
    for source in (path, tsd):
        m = _fresh(cfg, vocab_file)
        before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
        left = load_swin_pretrained(m, source)
        bb = m.backbone.state_dict()
        assert torch.equal(bb["patch_embed.proj.weight"], tsd["patch_embed.proj.weight"])
        assert torch.equal(bb["layers.2.blocks.1.attn.qkv.weight"], tsd["layers.2.blocks.1.attn.qkv.weight"])
        assert torch.equal(bb["layers.0.downsample.reduction.weight"], tsd["layers.1.downsample.reduction.weight"])
        assert torch.equal(bb["layers.0.blocks.0.attn.relative_position_index"],
                           before["layers.0.blocks.0.attn.relative_position_index"])  # fmt: skip
        assert "norm0.weight" in left and "tmem.down_channel.weight" in left
        assert "layers.0.context_pixel_attn.vis_project.0.weight" in left
        assert not any(k.startswith("patch_embed") or ".blocks." in k for k in left)
        for k in left:
            assert torch.equal(bb[k], before[k])

    # another window size: the bias tables are resized (bicubic), not rejected
    m = _fresh(cfg, vocab_file)
    load_swin_pretrained(m, _timm_swin(cfg, window=7).state_dict())
    assert m.backbone.layers[0].blocks[0].attn.relative_position_bias_table.shape == (49, 1)

    broken = {k: v for k, v in orig.items() if k != "layers.2.blocks.1.mlp.fc2.bias"}
    broken["layers.9.blocks.0.norm1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_swin_pretrained(_fresh(cfg, vocab_file), broken)
    assert "missing key(s): layers.2.blocks.1.mlp.fc2.bias" in str(err.value)
    assert "unexpected key(s): layers.9.blocks.0.norm1.weight" in str(err.value)


def test_swin_blocks_match_timm(cfg):
    """Our window attention block (plain and shifted) and patch merging against timm's with
    the same weights."""
    dim, heads, win, res = 16, 2, 4, 8
    x = torch.randn(2, res * res, dim)
    ours_mask = shift_mask(res, res, win, win // 2, x.device)
    for shift in (0, win // 2):
        torch.manual_seed(4)
        ref = timm_swin.SwinTransformerBlock(dim, (res, res), num_heads=heads, window_size=win,
                                             shift_size=shift).eval()  # fmt: skip
        ours = SwinTransformerBlock(dim, heads, win, shift, 4.0, 0.0).eval()
        missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
        assert missing == ["attn.relative_position_index"] and unexpected == []
        with torch.no_grad():
            y_ref = ref(x.reshape(2, res, res, dim)).reshape(2, res * res, dim)
            y = ours(x, (res, res), ours_mask if shift else None)
        assert torch.allclose(y, y_ref, atol=1e-5), shift
    ref_pm = timm_swin.PatchMerging(dim).eval()
    ours_pm = PatchMerging(dim)
    ours_pm.load_state_dict(ref_pm.state_dict())
    with torch.no_grad():
        y_ref = ref_pm(x.reshape(2, res, res, dim)).reshape(2, -1, 2 * dim)
        assert torch.allclose(ours_pm(x, (res, res)), y_ref, atol=1e-5)


def test_bert_init_from_hf_layouts(cfg, vocab_file, tmp_path, batch):
    torch.manual_seed(6)
    hf = transformers.BertModel(bert_config(cfg), add_pooling_layer=True).eval()
    sd = {f"bert.{k}": v for k, v in hf.state_dict().items()}
    sd = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
          for k, v in sd.items()}  # fmt: skip
    sd["cls.predictions.bias"] = torch.zeros(cfg.vocab_size)
    sd["bert.embeddings.position_ids"] = torch.arange(cfg.text_max_positions)[None]
    folder = tmp_path / "bert-base-uncased"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text(vocab_file.read_text())
    m = FianetModel(cfg).eval()
    load_bert_pretrained(m, folder)
    assert m.tokenizer is not None
    _, text = batch
    with torch.no_grad():
        ref = hf(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
        assert torch.allclose(m.bert_pass(text["input_ids"], text["attention_mask"]), ref, atol=1e-5)

    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(st))
    m2 = FianetModel(cfg)
    load_bert_pretrained(m2, st)
    assert torch.equal(m2.text_encoder.encoder.layer[1].output.dense.weight,
                       hf.encoder.layer[1].output.dense.weight)  # fmt: skip

    short = {k: v for k, v in hf.state_dict().items() if "layer.1." not in k}
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): text_encoder\.encoder\.layer\.1\."):
        load_bert_pretrained(FianetModel(cfg), short)

    # the whole upstream starting point in one call
    swin = _timm_swin(cfg).state_dict()
    init = init_fianet_pretrained(cfg, swin, folder)
    assert torch.equal(init.backbone.patch_embed.proj.weight, swin["patch_embed.proj.weight"])
    assert init.tokenize(["a ship"])["input_ids"].shape == (1, cfg.max_tokens)


# ----------------------------------------------------------------------------- optimiser


def test_param_groups_follow_upstream(cfg, vocab_file):
    m = _fresh(cfg.__class__.tiny(text_layers=12, text_trainable_layers=10), vocab_file)
    groups = m.param_groups(lr=3e-5, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["backbone_no_decay", "backbone", "classifier", "text_encoder"]
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.01
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    assert "backbone.norm3.weight" in no_decay and "backbone.tmem.block.0.norm1.bias" in no_decay
    assert "backbone.layers.0.downsample.norm.weight" in no_decay
    assert all(re.search(r"norm|relative_position_bias_table", n) for n in no_decay)
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert "backbone.tmem.bn.weight" in decay  # "bn" is not "norm": decayed, as upstream
    assert no_decay.isdisjoint(decay)
    assert no_decay | decay == {n for n in names.values() if n.startswith("backbone.")}
    assert {names[id(p)] for p in groups[2]["params"]} == {
        n for n in names.values() if n.startswith("classifier.")
    }
    bert = {names[id(p)] for p in groups[3]["params"]}
    layers = {int(re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", n).group(1)) for n in bert}
    assert layers == set(range(10))
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in names.values() if n.startswith("text_encoder.") and n not in bert}
    assert any(n.startswith("text_encoder.embeddings.") for n in frozen)
    assert any(n.startswith("text_encoder.encoder.layer.11.") for n in frozen)
    opt = torch.optim.AdamW(groups, lr=3e-5, weight_decay=0.01)
    assert len(opt.param_groups) == 4


def test_gradients_reach_the_trainable_parts(cfg, vocab_file, batch):
    m = _fresh(cfg, vocab_file)
    groups = m.param_groups(lr=1e-4, weight_decay=0.01)
    m.train()
    images, text = batch
    out = m(images, text)
    target = torch.zeros(2, cfg.image_size, cfg.image_size, dtype=torch.long)
    torch.nn.functional.cross_entropy(out, target).backward()
    for g in groups:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"]), g["name"]
    assert m.text_encoder.embeddings.word_embeddings.weight.grad is None

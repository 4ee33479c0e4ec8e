"""``rsvl.models.llava.convert`` and ``config``: layouts, shards, GeoChat's interpolation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rsvl.errors import CheckpointMismatchError, WeightsNotFoundError
from rsvl.models.llava.config import detect_variant, infer_vision_fields, llava_config
from rsvl.models.llava.convert import (
    add_rows,
    interpolate_position_embedding,
    read_weights,
    split_checkpoint,
    weight_files,
)


def _llava_sd() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.zeros(5, 4),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 4),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(2),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.zeros(5, 4),
        "model.mm_projector.0.weight": torch.zeros(4, 6),
        "model.mm_projector.0.bias": torch.zeros(4),
        "model.mm_projector.2.weight": torch.zeros(4, 4),
        "model.mm_projector.2.bias": torch.zeros(4),
    }


def test_split_sorts_llama_projector_and_an_embedded_tower_and_drops_buffers():
    sd = _llava_sd()
    sd["model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"] = torch.zeros(3)
    sd["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.zeros(1, 5)
    parts = split_checkpoint(sd)
    assert set(parts.text) == {
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    assert set(parts.projector) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(parts.vision) == {"vision_model.embeddings.class_embedding"}


def test_split_refuses_foreign_keys_and_a_missing_projector():
    sd = _llava_sd()
    sd["model.mm_resampler.query"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="model.mm_resampler.query"):
        split_checkpoint(sd)
    sd = {k: v for k, v in _llava_sd().items() if "mm_projector.2" not in k}
    with pytest.raises(CheckpointMismatchError, match="no complete mlp2x_gelu projector"):
        split_checkpoint(sd)


def test_geochat_interpolation_keeps_cls_and_corners_and_keeps_the_grid_orientation():
    side, dim = 4, 3
    yy, xx = torch.meshgrid(
        torch.arange(side, dtype=torch.float32),
        torch.arange(side, dtype=torch.float32),
        indexing="ij",
    )
    plane = torch.stack([xx, yy, 2 * xx - yy], dim=-1).reshape(side * side, dim)  # row-major grid
    weight = torch.cat([torch.full((1, dim), 7.0), plane])
    out = interpolate_position_embedding(weight, 6)
    assert out.shape == (37, dim)
    assert torch.equal(out[0], weight[0])
    grid = out[1:].reshape(6, 6, dim)
    # align_corners=True: the corners stay; x still varies along columns only, y along rows only
    torch.testing.assert_close(grid[0, 0], plane[0])
    torch.testing.assert_close(grid[5, 5], plane[-1])
    torch.testing.assert_close(grid[0, 5], plane[3])
    assert torch.allclose(grid[:, :, 0], grid[:1, :, 0].expand(6, 6), atol=1e-5)
    assert torch.allclose(grid[:, :, 1], grid[:, :1, 1].expand(6, 6), atol=1e-5)
    assert (grid[0, 1:, 0] > grid[0, :-1, 0]).all() and (grid[1:, 0, 1] > grid[:-1, 0, 1]).all()
    assert interpolate_position_embedding(weight, 4) is weight
    with pytest.raises(CheckpointMismatchError, match="not a square grid"):
        interpolate_position_embedding(torch.zeros(6, 2), 3)


def test_added_rows_are_the_mean_row():
    w = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(add_rows(w, 1), torch.tensor([[1.0, 2.0], [3.0, 6.0], [2.0, 4.0]]))
    assert add_rows(w, 0) is w


def test_shards_named_by_the_index_are_read_and_safetensors_twins_accepted(tmp_path):
    index = {
        "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
        }
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    save_file({"b": torch.zeros(3)}, str(tmp_path / "pytorch_model-00002-of-00002.safetensors"))
    sd = read_weights(tmp_path)
    assert set(sd) == {"a", "b"} and sd["b"].shape == (3,)
    (tmp_path / "pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="lacks 1 of the 2 weight shards") as err:
        weight_files(tmp_path)
    assert "pytorch_model-00002-of-00002.bin" in str(err.value)


def test_a_folder_without_weights_is_reported(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="has no weights"):
        weight_files(tmp_path)


def test_the_variant_comes_from_the_config_contents_not_its_model_type():
    assert detect_variant({"model_type": "llava", "mm_vision_select_layer": [8, 16, 24]}) == "vhm"
    assert detect_variant({"model_type": "vhm", "mm_vision_select_layer": -2}) == "geochat"
    with pytest.raises(CheckpointMismatchError, match="no mm_vision_select_layer"):
        detect_variant({"model_type": "llama"})


def test_llava_config_carries_the_layers_and_refuses_other_projectors():
    base = {
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": [1, 2],
    }
    vision = {
        "hidden_size": 4,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "patch_size": 14,
    }
    cfg = llava_config(base, vision, image_size=56, image_token_id=10)
    assert cfg.vision_feature_layer == [1, 2] and cfg.text_config.vocab_size == 11
    assert cfg.vision_config.image_size == 56 and cfg.image_seq_length == 16
    with pytest.raises(CheckpointMismatchError, match="mlp2x_gelu projectors only"):
        llava_config(
            {**base, "mm_projector_type": "linear"}, vision, image_size=56, image_token_id=10
        )
    with pytest.raises(CheckpointMismatchError, match="mm_use_im_start_end"):
        llava_config(
            {**base, "mm_use_im_start_end": True}, vision, image_size=56, image_token_id=10
        )


def test_vision_shape_is_read_from_the_weights():
    sd = {
        "vision_model.embeddings.patch_embedding.weight": torch.zeros(1024, 3, 14, 14),
        "vision_model.embeddings.position_embedding.weight": torch.zeros(577, 1024),
        **{
            f"vision_model.encoder.layers.{i}.mlp.fc1.weight": torch.zeros(4096, 1024)
            for i in range(24)
        },
    }
    fields = infer_vision_fields(sd)
    assert fields == {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 336,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    with pytest.raises(CheckpointMismatchError, match="not a CLIP vision model"):
        infer_vision_fields({})

"""rsvl train fsvlm --model fsvlm-7b on a tiny LLaVA base (upstream's train_ds.py recipe):
the conversation's labels, the loss going down, what trains and what stays frozen, the two
saved layouts loading to the same masks, resume, and the errors a user can cause."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")
pytest.importorskip("peft")

from train.lisa_tiny import write_fit, write_llava_base  # noqa: E402

from rsvl.cli import main  # noqa: E402
from rsvl.data.farmseg import read_split  # noqa: E402
from rsvl.errors import ResumeError, UnknownModelError, WeightsNotFoundError  # noqa: E402
from rsvl.models.lisa import load  # noqa: E402
from rsvl.models.lisa.prompt import IMAGE_TOKEN_INDEX  # noqa: E402
from rsvl.train.lisa import (  # noqa: E402
    IGNORE,
    FitTrainSet,
    LisaTrainConfig,
    collate,
    conversation,
    lisa_card,
    lisa_losses,
    start_model,
    train_lisa,
    warmup_decay,
)

REQUEST = "This is a remote sensing image. Please segment the farmland."


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lisa_train")
    paths = write_llava_base(root)
    paths["data"] = write_fit(root / "data")
    return paths


def _start(files, **kw):
    return start_model("fsvlm-7b", files["base"], vision_tower=files["vision"], sam=files["sam"],
                       log=lambda _m: None, **kw)


def _cfg(**kw):
    base = {"steps": 30, "batch_size": 2, "grad_accumulation": 1, "warmup": 2, "lr": 3e-3, "device": "cpu",
            "save_every": 10, "seed": 0}
    return LisaTrainConfig(**{**base, **kw})


@torch.no_grad()
def _dataset_loss(model, data):
    """The loss over every train image with fixed questions and answers (seeded), in eval mode."""
    model.eval()
    ds = FitTrainSet(read_split(data, "train"), model, 512, seed=123)
    parts = lisa_losses(model, collate([ds[i] for i in range(len(ds))]))
    return {k: float(v) for k, v in parts.items()}


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """(start, losses before, summary) of one 30-step run."""
    torch.set_num_threads(1)
    start = _start(files)
    before_state = {k: v.clone() for k, v in start.model.net.state_dict().items()}
    tower_state = {k: v.clone() for k, v in start.model.vision_tower.state_dict().items()}
    before = _dataset_loss(start.model, files["data"])
    out = tmp_path_factory.mktemp("run")
    summary = train_lisa("fsvlm-7b", files["data"], out, _cfg(), start=start, quiet=True)
    return start, before, summary, before_state, tower_state


# ------------------------------------------------------------------------------ recipe pieces


def test_base_gets_seg_and_fsvlm_markers_with_mean_rows(files):
    start = _start(files)
    tok = start.model.tokenizer
    assert start.kind == "llava"
    assert start.added_tokens == ["[SEG]", "<|im_start|>", "<|im_end|>"]
    n = len(tok) - 3
    assert start.model.seg_token_id == n  # read from the tokenizer the run grew
    emb = start.model.net.llm.embed_tokens.weight
    assert torch.allclose(emb[n:], emb[:n].mean(0).expand(3, -1), atol=1e-6)
    assert start.model.markers == ("<|im_start|>", "<|im_end|>")


def test_markers_follow_the_card_even_when_the_base_used_none(files, tmp_path):
    """train_ds.py's --use_mm_start_end is on by default: a base trained without markers (the
    LLaMA-2 lightning LLaVA) still gets them; LISA's are <im_start>/<im_end>."""
    import shutil

    base = shutil.copytree(files["base"], tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "mm_use_im_start_end": False}))
    start = start_model("lisa-7b-v1", base, vision_tower=files["vision"], sam=files["sam"], log=lambda _m: None)
    assert start.added_tokens == ["[SEG]", "<im_start>", "<im_end>"]
    assert start.model.markers == ("<im_start>", "<im_end>") and start.config["mm_use_im_start_end"] is True


def test_conversation_masks_everything_but_the_answer(files):
    model = _start(files).model
    tok = model.tokenizer
    ids, labels = conversation(tok, REQUEST, "Sure, it is [SEG].", model.markers, 512, 16)
    prompt = model.prompt_ids(REQUEST)  # what inference asks with
    assert ids[: len(prompt)] == prompt and IMAGE_TOKEN_INDEX in ids
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    answer = ids[len(prompt):]
    assert labels[len(prompt):] == answer and answer[-1] == tok.eos_id
    assert model.seg_token_id in answer and tok.decode(answer[:-1]) == "Sure, it is [SEG] ."
    # truncation counts the image as its 16 patch tokens (upstream: model_max_length - 255)
    short, short_labels = conversation(tok, REQUEST, "[SEG].", model.markers, len(prompt) + 15 + 1, 16)
    assert len(short) == len(prompt) + 1 and short_labels[-1] == short[-1]


def test_warmup_decay_is_deepspeeds_warmupdecaylr():
    f = warmup_decay(1000, 100)
    assert f(0) == 0 and f(50) == 0.5 and f(100) == 1.0 and f(550) == 0.5 and f(1000) == 0 and f(2000) == 0


def test_lora_wraps_only_llama_q_and_v(trained):
    start = trained[0]
    names = {n for n, p in start.model.net.named_parameters() if p.requires_grad}
    lora = {n for n in names if ".lora_" in n}
    # 2 layers x (q, v) x (A, B); SAM's decoder has q_proj / v_proj too and must not be wrapped
    assert len(lora) == 8 and all(n.startswith("model.layers.") for n in lora)
    assert all(n.split(".self_attn.")[1].split(".")[0] in ("q_proj", "v_proj") for n in lora)
    full = names - lora
    assert {n.split(".")[0 if n.startswith("lm_head") else 1] for n in full} == {
        "lm_head", "embed_tokens", "visual_model", "text_hidden_fcs"}
    assert all(".mask_decoder." in n for n in full if ".visual_model." in n)


# ------------------------------------------------------------------------------ training


def test_loss_decreases(trained):
    start, before, summary = trained[:3]
    after = _dataset_loss(start.model, summary["data"])
    assert summary["steps"] == 30
    assert after["loss"] < 0.7 * before["loss"]
    assert after["ce"] < 0.8 * before["ce"]  # five answer templates: the CE cannot reach 0
    assert 2 * after["bce"] + 0.5 * after["dice"] < 2 * before["bce"] + 0.5 * before["dice"]


def test_only_upstreams_trainable_parts_and_lora_change(trained):
    start, _, _, before_state, tower_state = trained
    after = start.model.net.state_dict()
    changed: dict[str, bool] = {}
    for key, value in after.items():
        if ".lora_" in key:
            group = "lora"
        else:
            old = before_state[key.replace(".base_layer.", ".")]
            group = next((g for g in ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs") if g in key), None)
            if group is None:
                assert torch.equal(value, old), f"frozen {key} changed"
                continue
            value = value - old
        changed[group] = changed.get(group, False) or bool(value.abs().max() > 0)
    assert changed == {g: True for g in ("lora", "lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")}
    for key, value in start.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower_state[key]), f"CLIP {key} changed"


def test_merged_folder_and_lora_bin_load_to_the_same_masks(trained, files):
    start, _, summary = trained[:3]
    img = (np.random.RandomState(5).rand(70, 53, 3) * 255).astype(np.uint8)
    merged = load("fsvlm-7b", weights=summary["merged"])  # the tower through the folder's vision_tower link
    unmerged = load("fsvlm-7b", weights=summary["lora"], vision_tower=files["vision"])
    assert merged.seg_token_id == unmerged.seg_token_id == summary["seg_token_id"]
    a = merged.seg_chat(img, REQUEST, force_seg=True)
    b = unmerged.seg_chat(img, REQUEST, force_seg=True)
    c = start.model.eval().seg_chat(img, REQUEST, force_seg=True)  # the trained model, LoRA unmerged
    assert np.abs(a.masks[0] - b.masks[0]).max() < 1e-5
    assert np.abs(a.masks[0] - c.masks[0]).max() < 1e-4
    assert merged.seg_chat(img, REQUEST, max_new_tokens=6).text == unmerged.seg_chat(img, REQUEST, max_new_tokens=6).text


def test_saved_layouts_are_upstreams(trained):
    summary = trained[2]
    sd = torch.load(summary["lora"], weights_only=True)
    assert all(k.startswith("base_model.model.") for k in sd)
    assert any(k.endswith("q_proj.lora_A.default.weight") for k in sd)
    assert not any(".base_layer." in k for k in sd)  # peft 0.4's spelling, as LISA's zero_to_fp32 output
    from pathlib import Path

    merged = Path(summary["merged"])
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["architectures"] == ["LISAForCausalLM"] and cfg["model_type"] == "llava"
    assert cfg["out_dim"] == 32 and cfg["vocab_size"] == summary["seg_token_id"] + 3
    added = json.loads((merged / "added_tokens.json").read_text())
    assert added["[SEG]"] == summary["seg_token_id"]
    adapter = json.loads((Path(summary["lora"]).parent / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16


def test_fine_tuning_from_the_trained_lisa_folder_keeps_its_tokens(trained, files):
    summary = trained[2]
    start = start_model("fsvlm-7b", summary["merged"], vision_tower=files["vision"], log=lambda _m: None)
    assert start.kind == "lisa" and start.added_tokens == []
    assert start.model.seg_token_id == summary["seg_token_id"]


def test_resume_continues_from_the_saved_step(files, tmp_path):
    out = tmp_path / "run"
    first = train_lisa("fsvlm-7b", files["data"], out, _cfg(steps=4, save_every=2), start=_start(files), quiet=True)
    assert first["steps"] == 4 and first["resumed_from"] is None
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert all(".lora_" in k or any(g in k for g in ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs"))
               for k in saved["state_dict"])  # the trained tensors only
    second = train_lisa("fsvlm-7b", files["data"], out, _cfg(steps=6, save_every=2), start=_start(files),
                        resume=True, quiet=True)
    assert second["resumed_from"] == 4 and second["steps"] == 6
    history = json.loads((out / "summary.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------ errors


def test_errors_a_user_can_cause(files, tmp_path):
    with pytest.raises(UnknownModelError, match="not a LISA-family model"):
        lisa_card("mini-chat")
    with pytest.raises(WeightsNotFoundError, match="--base .* does not exist"):
        start_model("fsvlm-7b", tmp_path / "missing")
    with pytest.raises(WeightsNotFoundError, match="--sam"):
        start_model("fsvlm-7b", files["base"], vision_tower=files["vision"], log=lambda _m: None)
    with pytest.raises(ResumeError, match="nothing to resume"):
        train_lisa("fsvlm-7b", files["data"], tmp_path / "new", _cfg(), base=files["base"], resume=True)


def test_cli_refuses_clearly(files, tmp_path, capsys):
    data = str(files["data"])
    assert main(["train", "fsvlm", data, "--model", "mini-chat", "--out", str(tmp_path / "o")]) == 2
    assert "not a LISA-family model" in capsys.readouterr().err
    assert main(["train", "fsvlm", data, "--model", "fsvlm-7b", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main(["train", "fsvlm", data, "--model", "lisa-7b-v1", "--base", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_trains_a_few_steps(files, tmp_path):
    out = tmp_path / "o"
    assert main(["train", "fsvlm", str(files["data"]), "--model", "fsvlm-7b", "--base", str(files["base"]),
                 "--vision-tower", str(files["vision"]), "--sam", str(files["sam"]), "--out", str(out),
                 "--steps", "2", "--grad-accumulation", "2", "--warmup", "1", "--device", "cpu", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["history"]) == 4  # 2 optimiser steps x 2 batches
    assert (out / "merged" / "model.safetensors").is_file() and (out / "lora" / "pytorch_model.bin").is_file()

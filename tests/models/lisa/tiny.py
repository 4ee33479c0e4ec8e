"""A tiny LISA / FSVLM folder in the merged Hugging Face layout, written from independent
parts (transformers' ``LlamaForCausalLM`` and ``CLIPVisionModel``, segment-anything's ``Sam``,
a plain ``nn.Sequential`` for ``text_hidden_fcs``), never from rsvl's own network.

Shapes: LLaMA 2 x 32 wide on the llava tests' ~330-piece SentencePiece vocabulary plus three
added tokens in FSVLM's order of our choosing (``<|im_start|>``, ``[SEG]``, ``<|im_end|>``: so
``[SEG]`` is neither the first added id nor the last row); CLIP 3 x 128 wide at 224 px with
56 px patches (16 image tokens); SAM 96 px, patch 16 (6 x 6 embeddings), prompt width 32
(= ``out_dim``), 8 decoder heads (the published count, which shapes cannot show).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from models.llava.tiny import TEXT, tiny_pieces, write_tokenizer
from safetensors.torch import save_file
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

ADDED = ("<|im_start|>", "[SEG]", "<|im_end|>")
VISION: dict[str, Any] = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2,
    "image_size": 224, "patch_size": 56, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 8,
}
SAM_IMG, SAM_PATCH, SAM_DIM, PDIM = 96, 16, 32, 32
SAM_OVERRIDES: dict[str, Any] = {
    "image_size": SAM_IMG, "patch_size": SAM_PATCH, "encoder_embed_dim": SAM_DIM, "encoder_depth": 2,
    "encoder_num_heads": 2, "encoder_global_attn_indexes": (1,), "window_size": 4, "prompt_embed_dim": PDIM,
    "mask_in_chans": 16, "decoder_depth": 2, "decoder_num_heads": 8, "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 32,
}


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or "pixel_" in name:
                continue
            noise = torch.randn(t.shape, generator=g)
            if "positional_e" in name:
                t.copy_(noise)
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(scale * noise)


def meta_sam(seed: int = 0) -> Sam:
    grid = SAM_IMG // SAM_PATCH
    enc = ImageEncoderViT(img_size=SAM_IMG, patch_size=SAM_PATCH, embed_dim=SAM_DIM, depth=2, num_heads=2,
                          mlp_ratio=4.0, out_chans=PDIM, qkv_bias=True,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
                          global_attn_indexes=(1,))
    pe = PromptEncoder(embed_dim=PDIM, image_embedding_size=(grid, grid), input_image_size=(SAM_IMG, SAM_IMG),
                       mask_in_chans=16)
    dec = MaskDecoder(num_multimask_outputs=3,
                      transformer=TwoWayTransformer(depth=2, embedding_dim=PDIM, mlp_dim=64, num_heads=8),
                      transformer_dim=PDIM, iou_head_depth=3, iou_head_hidden_dim=32)
    model = Sam(enc, pe, dec).eval()
    _randomise(model, seed)
    return model


class TinyParts:
    """The independent parts of a tiny LISA and their merged state dict."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        n = len(tiny_pieces())
        self.added = {t: n + i for i, t in enumerate(ADDED)}
        self.vocab = n + len(ADDED)
        self.llama = LlamaForCausalLM(LlamaConfig(vocab_size=self.vocab, tie_word_embeddings=False, **TEXT)).eval()
        self.clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
        hidden = TEXT["hidden_size"]
        self.projector = torch.nn.Linear(VISION["hidden_size"], hidden)
        self.fcs = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, PDIM), torch.nn.Dropout(0.0)).eval()
        _randomise(self.fcs, seed + 5, 0.3)
        self.sam = meta_sam(seed + 7)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k: v for k, v in self.llama.state_dict().items() if "rotary_emb" not in k}
        sd.update({f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()})
        sd.update({f"model.visual_model.{k}": v for k, v in self.sam.state_dict().items()})
        sd.update({f"model.text_hidden_fcs.0.{k}": v for k, v in self.fcs.state_dict().items()})
        return {k: v.contiguous().clone() for k, v in sd.items()}

    def config(self) -> dict[str, Any]:
        return {
            "model_type": "llava", "architectures": ["LISAForCausalLM"], **TEXT, "vocab_size": self.vocab,
            "mm_vision_select_layer": -2, "mm_use_im_start_end": True, "mm_hidden_size": VISION["hidden_size"],
            "out_dim": PDIM, "train_mask_decoder": True, "vision_tower": "openai/clip-vit-large-patch14",
            "torch_dtype": "float32",
        }

    def write_tokenizer(self, folder: Path, *, added: bool = True) -> None:
        write_tokenizer(folder / "tokenizer.model")
        if added:
            (folder / "added_tokens.json").write_text(json.dumps(self.added))
        (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                    "unk_token": "<unk>"}))

    def write_merged(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config()))
        save_file(self.state_dict(), str(folder / "model.safetensors"))
        self.write_tokenizer(folder)
        self.write_tower(folder / "vision_tower")
        return folder

    def write_tower(self, folder: Path) -> Path:
        """openai/clip-vit-large-patch14's layout: a CLIP config.json and ``vision_model.*`` keys."""
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": "clip", "vision_config": {**VISION, "model_type": "clip_vision_model"}}
        (folder / "config.json").write_text(json.dumps(cfg))
        sd = self.clip.state_dict()
        sd = {k if k.startswith("vision_model.") else "vision_model." + k: v.contiguous() for k, v in sd.items()}
        save_file(sd, str(folder / "model.safetensors"))
        return folder


# ------------------------------------------------------------------------------------------
# the direct computation (reference), from the notes, on the independent parts
# ------------------------------------------------------------------------------------------

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
IMAGE = -200


def reference_ids(parts: TinyParts, encode: Any, request: str) -> list[int]:
    """llava_v1 with ``<|im_start|><image><|im_end|>``; LISA-era slow tokenizer: whitespace next
    to an added token is stripped, each text piece encoded on its own, BOS once."""
    return ([1] + encode(f"{SYSTEM} USER:") + [parts.added["<|im_start|>"], IMAGE, parts.added["<|im_end|>"]]
            + encode(f"{request.strip()} ASSISTANT:"))


@torch.no_grad()
def reference(parts: TinyParts, image: Any, ids: list[int], steps: int, *, force: bool = False) -> tuple[list[int], list]:
    """Greedy decoding without a cache (upstream's ``use_cache=False``), the [SEG] states
    picked with upstream's mask (``output_ids[:, 1:] == SEG`` after N - 1 zeros, on the last
    layer's states), then text_hidden_fcs -> segment-anything's decoder; masks (K, H, W)."""
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    pixels = proc(images=image, return_tensors="pt")["pixel_values"]
    feats = parts.clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    img = parts.projector(feats)[0]
    n_img = img.shape[0]
    table = parts.llama.model.embed_tokens
    pos = ids.index(IMAGE)
    seg = parts.added["[SEG]"]

    def states(seq: list[int]) -> torch.Tensor:
        embeds = torch.cat([table(torch.tensor(seq[:pos])), img, table(torch.tensor(seq[pos + 1:], dtype=torch.long))])
        out = parts.llama(inputs_embeds=embeds[None], output_hidden_states=True)
        return out.hidden_states[-1][0], out.logits[0, -1]

    out_ids = list(ids)
    if force:  # teacher-forced "[SEG]."
        out_ids += [seg]
    else:
        for _ in range(steps):
            _, logits = states(out_ids)
            nxt = int(logits.argmax())
            if nxt == 2:
                break
            out_ids.append(nxt)
    hidden, _ = states(out_ids[:-1])
    mask = torch.cat([torch.zeros(n_img - 1, dtype=torch.bool), torch.tensor(out_ids[1:]) == seg])
    assert mask.shape[0] == hidden.shape[0]
    pred = hidden[mask]
    generated = out_ids[len(ids):]
    if pred.shape[0] == 0:
        return generated, []
    prompts = parts.fcs(pred)
    sam = parts.sam
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(np.asarray(image))
    x = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
    emb = sam.image_encoder(x)
    k = prompts.shape[0]
    sparse = torch.cat([torch.empty(k, 0, prompts.shape[1]), prompts[:, None]], dim=1)
    grid = emb.shape[-1]
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, grid, grid)
    low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    masks = sam.postprocess_masks(low, resized.shape[:2], np.asarray(image).shape[:2])[:, 0]
    return generated, list(masks.numpy())


def steer_seg_second(parts: TinyParts, image: Any, ids: list[int]) -> int:
    """Set ``lm_head``'s [SEG] row so that greedy decoding answers <token> [SEG] ...: the row is
    orthogonal to the state after the prompt and aligned with the one after the first token.
    Returns that first token."""
    with torch.no_grad():
        seg = parts.added["[SEG]"]
        parts.llama.lm_head.weight[seg] = 0
        first, _ = reference(parts, image, ids, 1)
        h1 = _last_state(parts, image, ids)
        h2 = _last_state(parts, image, ids + first)
        ortho = h2 - (h2 @ h1) / (h1 @ h1) * h1
        parts.llama.lm_head.weight[seg] = 60.0 * ortho / (ortho @ ortho)
    return first[0]


@torch.no_grad()
def _last_state(parts: TinyParts, image: Any, seq: list[int]) -> torch.Tensor:
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    pixels = proc(images=image, return_tensors="pt")["pixel_values"]
    img = parts.projector(parts.clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
    table = parts.llama.model.embed_tokens
    pos = seq.index(IMAGE)
    embeds = torch.cat([table(torch.tensor(seq[:pos])), img, table(torch.tensor(seq[pos + 1:], dtype=torch.long))])
    return parts.llama(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[-1][0, -1]

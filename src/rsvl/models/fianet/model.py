"""FIANet: referring segmentation of remote-sensing images ("the large storage tank next to
the road" -> mask), re-implemented after Lei et al., TGRS 2024 (Shaosifan/FIANet, ``lavt_one``).

Architecture (module and parameter names follow the upstream checkpoint, which is the
contract; see ``../shared/reference/farslip-fsvlm-fianet.md`` section 3):

* ``text_encoder``: a transformers ``BertModel`` without pooler, run **three times** on the
  same token ids with three attention masks: the whole sentence (context, ``l``), the
  ground-object words (``t``) and the spatial-position phrases (``p``). The padding mask is
  applied as upstream's BERT does, an additive ``(1 - mask) * -10000`` on the scores.
* ``backbone``: a Swin Transformer (Swin-B: embed 128, depths 2-2-18-2, heads 4-8-16-32,
  window 12, drop path 0.3) whose every stage, after its Swin blocks, fuses language:

  - channel gate ``g = sigmoid(fc2(relu(fc1(mean_HW x))))`` (reduction C/8);
  - ``x_res = PWAM(x, l)`` (LAVT's pixel-word attention: ``GELU(conv(x)) * SILA(x, l)``,
    conv, GELU); ``ctx = tanh_gate(x_res) * x_res``;
  - object-position branch (OPAB): ``go = SILA(x, t)`` gated by its own tanh gate;
    ``sp = SILA(x, p)`` turned into a spatial attention ``sigmoid(conv3x3([mean_c; max_c]))``;
    ``op = go * att``;
  - ``x = x + (ctx + op) * g``, then patch merging into the next stage.

  Each stage sends its PWAM output ``x_res`` (not ``x``) through ``norm{i}`` to the decoder;
  the four maps then go through TMEM (text-aware multi-scale enhancement: pool all scales to
  the coarsest grid, 1x1 conv to a quarter of the channels, ``num_tmem`` blocks of
  ``x + SILA(LN x, l)`` and ``+ FFN(LN x)``, BN, 1x1 conv back, split per scale and fuse
  each scale with a scale-aware gate).
* ``classifier``: LAVT's ``SimpleDecoding`` (three top-down fusions, two conv3x3-BN-ReLU
  each, width 4*embed) ending in a 1x1 conv to **2 logits** at 1/4 resolution, upsampled
  bilinearly (``align_corners=True``) to the input size.

What the optimizer sees (:meth:`FianetModel.param_groups`) is upstream's: the whole backbone
(no weight decay on ``norm`` / ``absolute_pos_embed`` / ``relative_position_bias_table``
parameters), the classifier, and BERT layers 0-9 only; BERT's embeddings and layers 10-11
keep their pretrained values.

Checkpoints
-----------
* FIANet training checkpoints (``{'model': state_dict, 'optimizer', 'epoch', 'args', ...}``,
  keys prefixed ``backbone.`` / ``classifier.`` / ``text_encoder.``) load strictly with
  :func:`load_fianet_state_dict`; :func:`read_fianet_checkpoint` reads them with
  ``torch.load(weights_only=True)`` (``argparse.Namespace`` and numpy scalars allowed, since
  upstream pickles its ``args``) or safetensors. The authors publish no weights.
* Training starts from the Swin-B ImageNet-22k checkpoint
  (``swin_base_patch4_window12_384_22k.pth``, original Microsoft layout, or timm's layout)
  and bert-base-uncased (Hugging Face layout): :func:`load_swin_pretrained`,
  :func:`load_bert_pretrained`, :func:`init_fianet_pretrained`.

Tokenizer: BERT WordPiece (``transformers.BertTokenizer``, lower-cased) from the
bert-base-uncased ``vocab.txt``; the two role masks come from :mod:`rsvl.data.refer_text`
(upstream's NLTK-based rules, re-implemented offline). Maximum length 22 tokens for RRSIS-D
and 20 for RefSegRS, as upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsvl.data.refer_text import text_role_masks
from rsvl.errors import PromptError, WeightsNotFoundError
from rsvl.models.fianet.backbone import MultiModalSwinTransformer
from rsvl.models.fianet.cards import BERT_VOCAB_URL
from rsvl.models.fianet.config import IMAGENET_MEAN, IMAGENET_STD, FianetConfig
from rsvl.models.fianet.decoder import SimpleDecoding
from rsvl.models.fianet.text import (
    TextFeatures,
    bert_config,
    hf_cached_vocab,
    masked_bert,
    wordpiece_tokenizer,
)


class FianetModel(nn.Module):
    """FIANet: ``forward(images, text)`` -> (B, 2, S, S) logits (channel 1 = the referent)."""

    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, config: FianetConfig) -> None:
        super().__init__()
        from transformers import BertModel  # lazy: 6.7 s measured (rsvl.models.fianet.text)

        self.config = config
        self.name = f"fianet-{config.dataset}"
        self.image_size = config.image_size
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.backbone = MultiModalSwinTransformer(config)
        self.classifier = SimpleDecoding(8 * config.embed_dim)
        self.text_encoder = BertModel(bert_config(config), add_pooling_layer=False)
        self.tokenizer: Any = None

    # ---------------------------------------------------------------- text
    def set_vocab(self, vocab: str | Path) -> None:
        """Use the BERT WordPiece vocabulary ``vocab`` (a ``vocab.txt`` or a folder with one)."""
        self.tokenizer = wordpiece_tokenizer(vocab, self.config.vocab_size)

    def tokenize(self, expressions: list[str]) -> dict[str, Tensor]:
        """Token ids and the three role masks, each (B, L) int64 with L = ``max_tokens``.

        ``attention_mask``: the sentence; ``object_mask``: the ground-object words;
        ``spatial_mask``: the spatial phrases (the attention mask when none is found).
        """
        if self.tokenizer is None:
            cached = hf_cached_vocab() if self.config.vocab_size == 30522 else None
            if cached is None:
                raise WeightsNotFoundError(
                    "FIANet has no tokenizer: the BERT vocabulary (vocab.txt) was not given.",
                    hint=f"Download bert-base-uncased's vocab.txt ({BERT_VOCAB_URL}) and place "
                    "it next to the weights, or call set_vocab(PATH).",
                )
            self.set_vocab(cached)
        if isinstance(expressions, str):
            expressions = [expressions]
        rows = []
        for text in expressions:
            if not isinstance(text, str) or not text.strip():
                raise PromptError(
                    "A referring expression is empty.",
                    hint='Describe the object, e.g. "the storage tank on the left".',
                )
            rows.append(
                text_role_masks(
                    text.strip(),
                    self.tokenizer,
                    class_names=self.config.class_names,
                    max_tokens=self.config.max_tokens,
                    alignment=self.config.mask_alignment,
                )
            )
        if not rows:
            raise PromptError("No referring expression was given.")

        def stack(attr: str) -> Tensor:
            return torch.stack([torch.as_tensor(getattr(r, attr), dtype=torch.long) for r in rows])

        return {
            "input_ids": stack("input_ids"),
            "attention_mask": stack("attention_mask"),
            "object_mask": stack("target_mask"),
            "spatial_mask": stack("position_mask"),
        }

    def bert_pass(self, ids: Tensor, mask: Tensor) -> Tensor:
        """One BERT pass over ``ids`` with ``mask`` (B, N) applied as upstream does."""
        return masked_bert(self.text_encoder, ids, mask)

    def encode_text(self, text: Mapping[str, Tensor]) -> TextFeatures:
        """The three masked BERT passes (upstream ``lavt_one``)."""
        for key in ("input_ids", "attention_mask", "object_mask", "spatial_mask"):
            if key not in text:
                raise PromptError(
                    f"text is missing {key!r}.", hint="Build it with FianetModel.tokenize()."
                )
        device = self.classifier.conv1_1.weight.device
        dtype = self.classifier.conv1_1.weight.dtype
        ids = text["input_ids"].to(device)
        feats = []
        for key in ("attention_mask", "object_mask", "spatial_mask"):
            m = text[key].to(device)
            feats.append((self.bert_pass(ids, m).permute(0, 2, 1).to(dtype), m.to(dtype).unsqueeze(-1)))
        (l, lm), (t, tm), (p, pm) = feats  # noqa: E741
        return TextFeatures(l, lm, t, tm, p, pm)

    # ---------------------------------------------------------------- image
    def forward_features(self, images: Tensor, text: Mapping[str, Tensor]) -> dict[str, Any]:
        """Intermediate results: ``text`` (the three passes), ``stages`` (PWAM outputs after
        ``norm{i}``), ``tmem`` (the maps sent to the decoder) and ``logits`` at 1/4 size."""
        tx = self.encode_text(text)
        stages = self.backbone.stages(images, tx)
        fused = self.backbone.tmem(stages, tx.l, tx.l_mask)
        logits = self.classifier(fused[3], fused[2], fused[1], fused[0])
        return {"text": tx, "stages": stages, "tmem": fused, "logits": logits}

    def forward(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """``images``: (B, 3, S, S) normalised; returns logits (B, 2, S, S)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        tx = self.encode_text(text)
        feats = self.backbone(images, tx)
        logits = self.classifier(feats[3], feats[2], feats[1], feats[0])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def predict(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """Boolean masks (B, S, S): argmax of the two logits, as upstream evaluates."""
        return self(images, text).argmax(1).bool()

    # ---------------------------------------------------------------- training
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups as upstream ``train.py`` builds them.

        backbone (no decay on ``norm`` / ``absolute_pos_embed`` / ``relative_position_bias_table``
        names, substring match as upstream), backbone (decay), classifier, BERT layers
        ``0 .. text_trainable_layers-1``. BERT's embeddings and later layers are not optimised
        upstream; here they are also set ``requires_grad=False`` (same result, no wasted
        gradients).
        """
        no_decay, decay = [], []
        for name, p in self.backbone.named_parameters():
            if not p.requires_grad:
                continue
            if "norm" in name or "absolute_pos_embed" in name or "relative_position_bias_table" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        n_train = min(self.config.text_trainable_layers, len(self.text_encoder.encoder.layer))
        bert: list[nn.Parameter] = []
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)
        for i in range(n_train):
            for p in self.text_encoder.encoder.layer[i].parameters():
                p.requires_grad_(True)
                bert.append(p)
        return [
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
            {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
            {
                "params": [p for p in self.classifier.parameters() if p.requires_grad],
                "lr": lr,
                "weight_decay": weight_decay,
                "name": "classifier",
            },
            {"params": bert, "lr": lr, "weight_decay": weight_decay, "name": "text_encoder"},
        ]


def build_fianet(config: FianetConfig, *, vocab: str | Path | None = None) -> FianetModel:
    """A randomly initialised FIANet (backbone initialised as upstream ``init_weights()``).

    ``vocab``: a BERT ``vocab.txt`` for :meth:`FianetModel.tokenize`; without it the tokenizer
    is found lazily (see :meth:`FianetModel.tokenize`) or set later with ``set_vocab``.
    """
    model = FianetModel(config)
    model.backbone.init_weights()
    if vocab is not None:
        model.set_vocab(vocab)
    return model


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FianetConfig", "FianetModel", "build_fianet"]

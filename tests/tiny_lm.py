"""A tiny stand-in for SmolLM2 (mini-chat's language model) for tests: a word-level ChatML
tokenizer and a 2-layer LLaMA with SmolLM2's interface."""

from __future__ import annotations

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_language_model():
    """A word-level ChatML tokenizer and a 2-layer LLaMA: SmolLM2's interface, tiny."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ("<unk> <|im_start|> <|im_end|> system user assistant you are a remote-sensing image "
             "answer briefly and honestly. how many ships is there yes no one two three [ ] , 0 500 1000 "
             "describe this ? . \n").split(" ")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=vocab["<|im_end|>"])
    return LlamaForCausalLM(cfg).eval(), fast

"""A real-shaped chat model folder, built offline: tiny Llama, ChatML template, pad == EOS == <|im_end|>.

It has the shape of SmolLM2-Instruct's folder (what a user points the package at): special tokens
``<|im_start|>`` (bos), ``<|im_end|>`` (eos and pad), ``<|endoftext|>`` (unk), a ChatML chat template, a
``generation_config.json``, all written by ``save_pretrained``. Plus hand-written HH-style chat data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QUESTIONS = [
    ("What do bees make?", "Bees make honey.", "Bees make cars."),
    ("What colour is the sky?", "The sky is blue.", "The sky is a sandwich."),
    ("How many legs does a cat have?", "A cat has four legs.", "A cat has ninety legs."),
    ("Where do fish live?", "Fish live in water.", "Fish live on the moon."),
    ("What do cows drink?", "Cows drink water.", "Cows drink petrol."),
    ("When do owls hunt?", "Owls hunt at night.", "Owls hunt in the bank."),
    ("What is ice made of?", "Ice is frozen water.", "Ice is made of wool."),
    ("What do we breathe?", "We breathe air.", "We breathe sand."),
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def chat_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(q) for q in QUESTIONS] + ["user assistant system You are a helpful assistant."]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # as SmolLM2 / Qwen chat models ship: padding with EOS
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def write_chat_model(folder: Path) -> Path:
    tokenizer = chat_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_chat_data(folder: Path) -> dict[str, Path]:
    """SFT messages, conversational preference pairs and conversational prompts (hand-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    sft, pairs, prompts = [], [], []
    for question, good, bad in QUESTIONS * 4:
        user = {"role": "user", "content": question}
        sft.append({"messages": [SYSTEM, user, {"role": "assistant", "content": good}]})
        pairs.append(
            {
                "prompt": [SYSTEM, user],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
        prompts.append({"prompt": [SYSTEM, user]})
    files = {
        "sft": folder / "sft.jsonl",
        "pairs": folder / "pairs.jsonl",
        "prompts": folder / "prompts.jsonl",
    }
    for name, rows in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files

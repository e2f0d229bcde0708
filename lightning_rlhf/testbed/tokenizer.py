"""A tiny byte-level BPE tokenizer trained in-process, wrapped as a transformers fast tokenizer.

Byte-level means every string can be encoded (no unknown token), so the same tokenizer also serves text that
is not from the testbed. The merges are learned from the task's own corpus, so each invented word is one or
two tokens and a ~1M-parameter model learns the task in minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each message is "<|role|>\n{content}" followed by EOS for assistant turns (the policy learns to stop there)
# and by a newline otherwise; add_generation_prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(
    corpus: Iterable[str], *, vocab_size: int = 512, alphanumeric_words: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it with pad/eos tokens and a chat template.

    Training is deterministic for a given corpus order, so the saved files are identical run to run.
    ``alphanumeric_words``: split words at spaces and punctuation only, so a name like ``add1`` can become
    one token (GPT-2's split separates letters from digits); the program task's operations need that.
    """
    special = [PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE())
    if alphanumeric_words:
        words = pre_tokenizers.Split(Regex(r" ?[A-Za-z0-9]+|\s+|[^\sA-Za-z0-9]+"), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [words, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

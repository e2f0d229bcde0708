"""Pair encoding without a data module: encode_pair truncation, the collator, implicit prompts, sampler."""

import pytest
import torch

from lightning_rlhf.data.collate import PreferenceCollator
from lightning_rlhf.data.formats import RowError, split_implicit
from lightning_rlhf.data.sampling import LengthGroupedSampler
from lightning_rlhf.data.tokenize import encode_pair
from lightning_rlhf.testbed.task import TaskConfig, WordTask

WORDS = WordTask(TaskConfig(seed=0)).words  # each " word" is exactly one token of the testbed tokenizer
HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: I am fine."
HH_REJECTED = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: I am bad."


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def words(start, count):
    return " " + " ".join(WORDS[start : start + count])


def test_encode_pair_truncates_one_shared_prompt(tokenizer):
    """Prompt 10 tokens; chosen 6 + EOS = 7; rejected 3 + EOS = 4; max_prompt_length 4.

    max_length 12: the longer response (7) sets the budget, so the prompt keeps max(4, 12 - 7) = 5 tokens
    from its end and both responses fit 12 - 5 = 7 whole.
    max_length 8: the prompt keeps max(4, 8 - 7) = 4 tokens; responses are cut to 8 - 4 = 4: chosen loses
    its last 2 words and its EOS, rejected (3 + EOS = 4) is untouched. Both see the same 4 prompt tokens.
    """
    prompt, chosen, rejected = words(0, 10), words(10, 6), words(20, 3)
    p, c, r, eos = (
        ids(tokenizer, prompt),
        ids(tokenizer, chosen),
        ids(tokenizer, rejected),
        tokenizer.eos_token_id,
    )
    assert (len(p), len(c), len(r)) == (10, 6, 3)
    pair = encode_pair(tokenizer, prompt, chosen, rejected, max_length=12, max_prompt_length=4)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (p[-5:], c + [eos], r + [eos])
    assert pair.truncated
    pair = encode_pair(tokenizer, prompt, chosen, rejected, max_length=8, max_prompt_length=4)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (p[-4:], c[:4], r + [eos])
    untouched = encode_pair(tokenizer, prompt, chosen, rejected, max_length=64)
    assert untouched.prompt_ids == p and not untouched.truncated


def test_encode_pair_eos_once_and_drops_empty_responses(tokenizer):
    eos = tokenizer.eos_token_id
    pair = encode_pair(tokenizer, "P:", " a</s>", " b", max_length=32)
    assert pair.chosen_ids == ids(tokenizer, " a") + [eos] and pair.rejected_ids == ids(tokenizer, " b") + [
        eos
    ]
    assert encode_pair(tokenizer, "P:", "", " b", max_length=32) is None
    assert encode_pair(tokenizer, "P:", " a", "</s>", max_length=32) is None
    # A 10-token prompt kept whole leaves one slot: each response keeps its word (not its EOS): kept.
    prompt, one, other = words(0, 10), words(10, 1), words(11, 1)
    kept = encode_pair(tokenizer, prompt, one, other, max_length=11, max_prompt_length=10)
    assert (kept.chosen_ids, kept.rejected_ids) == (ids(tokenizer, one), ids(tokenizer, other))
    # No slot left: nothing of either response survives, so the pair is dropped.
    assert encode_pair(tokenizer, prompt, one, other, max_length=10, max_prompt_length=10) is None


def test_collator_layout():
    rows = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "margin": 0.5, "index": 7},
        {"prompt_ids": [6], "chosen_ids": [7, 8, 9], "rejected_ids": [10], "margin": 0.0, "index": 2},
    ]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 8, 9], [1, 2, 4, 5], [6, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [0.5, 0.0]
    assert batch["index"].tolist() == [7, 2]


def test_implicit_prompt_splits_after_the_last_assistant_tag():
    prompt, chosen, rejected = split_implicit(HH_CHOSEN, HH_REJECTED, "\n\nAssistant:")
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert (chosen, rejected) == (" I am fine.", " I am bad.")
    # Without the delimiter: back to the last word boundary, the space going with the response.
    assert split_implicit("Q: it is hot", "Q: it is cold", "") == ("Q: it is", " hot", " cold")
    assert split_implicit("Q: help", "Q: hello", "\n\nAssistant:") == ("Q:", " help", " hello")
    with pytest.raises(RowError, match="share no prompt"):
        split_implicit("yes", "no", "\n\nAssistant:")
    with pytest.raises(RowError, match="response is empty") as info:
        split_implicit("\n\nHuman: hi\n\nAssistant:", "\n\nHuman: hi\n\nAssistant: ok", "\n\nAssistant:")
    assert info.value.field == "chosen"


def test_length_grouped_sampler_keeps_the_short_batch_last():
    sampler = LengthGroupedSampler(list(range(23)), batch_size=4, mega_batch_factor=2)
    batches = sampler.batches(epoch=0)
    assert [len(b) for b in batches] == [4] * 5 + [3]
    assert sorted(i for b in batches for i in b) == list(range(23))
    # With one window covering all 23 examples, the batches are the length-sorted runs (in shuffled order).
    whole = LengthGroupedSampler(list(range(23)), batch_size=4, mega_batch_factor=10).batches(epoch=0)
    runs = [list(range(22 - 4 * k, max(-1, 18 - 4 * k), -1)) for k in range(6)]
    assert sorted(whole) == sorted(runs) and whole[-1] == [2, 1, 0]
    assert list(sampler) == [i for b in batches for i in b]  # first iteration is epoch 0 ...
    assert list(sampler) == [i for b in sampler.batches(epoch=1) for i in b]  # ... then it moves on


def test_length_grouping_survives_the_distributed_wrapper():
    """Each rank takes every W-th index (Lightning's wrapper); with num_replicas=W every rank's batch is
    drawn from one length-sorted global batch, so padding stays near the one-rank level."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(8, 512) for _ in range(4096)]
    world, batch = 8, 8

    def padding_share(num_replicas: int) -> float:
        order = list(LengthGroupedSampler(lengths, batch, num_replicas=num_replicas, seed=1))
        padded = real = 0
        for rank in range(world):
            mine = order[rank::world]
            for start in range(0, len(mine) - batch + 1, batch):
                chunk = [lengths[i] for i in mine[start : start + batch]]
                padded += max(chunk) * len(chunk)
                real += sum(chunk)
        return 1 - real / padded

    assert padding_share(num_replicas=world) < 0.05
    assert padding_share(num_replicas=1) > 0.3  # the bug this guards against: grouping lost across ranks
    assert sorted(LengthGroupedSampler(lengths, batch, num_replicas=world)) == list(range(len(lengths)))


def test_bos_is_kept_for_tokenizers_that_add_one():
    """A Llama-style tokenizer adds <s> to text: prompts start with it (once), responses never contain it,
    and a prompt cut from the left gets it back in front. Tokenizers without that habit get no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from lightning_rlhf.data.tokenize import encode_pair, encode_prompt, prompt_token_ids

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "d": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert prompt_token_ids(llama_like, "a b") == [0, 2, 3]
    assert prompt_token_ids(llama_like, "<s> a") == [0, 2]  # already there: not doubled
    pair = encode_pair(llama_like, "a b c", "d", "c", max_length=64)
    assert pair.prompt_ids == [0, 2, 3, 4] and pair.chosen_ids == [5, 1] and pair.rejected_ids == [4, 1]
    cut = encode_pair(llama_like, "a b c d a", "d", "c", max_length=5, max_prompt_length=3)
    assert cut.prompt_ids == [0, 5, 2]  # last 3 prompt tokens, BOS back in front
    assert encode_prompt(llama_like, "a b c d", max_prompt_length=2) == ([0, 5], True)

    backend.post_processor = None
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert prompt_token_ids(plain, "a b") == [2, 3]

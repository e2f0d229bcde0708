"""The synthetic "word utility" task: a language task whose true (gold) reward is known exactly.

A prompt asks for ``n`` words about a topic while avoiding one word::

    Write 4 words about sea, not bako:

A response is a list of words from the task's invented vocabulary (``" kemo lipa runo tesa"``). Every word
has a hidden *utility* in [-1, 1] and belongs to one topic. The gold reward of a response is

    gold = mean_i v_i  -  length_penalty * |#words - n|

where ``v_i = utility(w_i) + topic_bonus * [topic(w_i) == prompt topic]`` for the first use of a vocabulary
word, and ``v_i = -1`` for a repeated word, the avoided word, or anything that is not a vocabulary word.
An empty response scores ``-1 - length_penalty * n``.

Why this shape (see README "The testbed"):

* An untrained model emits byte soup: about ``-1 - length_penalty * |len - n|``. SFT on demonstrations of
  ``n`` *random* words teaches the form and lands near ``topic_bonus / num_topics`` (mediocre), leaving
  headroom up to about ``1 + topic_bonus`` for RL.
* Preference pairs are drawn from a *behaviour* distribution that over-samples a seeded "favoured" half of
  the vocabulary by ``exp(2 * behaviour_shift)``. Words the pairs rarely show are out of distribution for a
  learned reward model and for DPO, which is the mechanism the paper (Xu et al. 2024, Sec. 4) blames for
  DPO's failures. ``behaviour_shift = 0`` gives pairs from the SFT distribution itself.
* A reward model fitted on those pairs mis-scores the rare words, so a policy optimised hard against it can
  raise the learned score while the gold reward stalls or falls: reward hacking is visible.

Everything is drawn from ``random.Random(seed)``: one seed gives the same words, utilities, prompts and
files, byte for byte.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_TOPICS = ("sea", "sky", "wood", "hill", "fire", "snow", "sand", "rain")
_TEMPLATES = (
    "Write {n} words about {topic}, not {avoid}:",
    "Give {n} {topic} words, avoiding {avoid}:",
    "List {n} words on {topic} without {avoid}:",
)
# Value of a word position that earns nothing: repeats, the avoided word, non-words.
BAD_WORD_VALUE = -1.0


@dataclass(frozen=True)
class TaskConfig:
    """Knobs of the word-utility task (all have defaults that suit a ~1M-parameter model on 2 CPU cores)."""

    seed: int = 0
    """Seed for words, utilities, topics and every sample drawn."""
    num_words: int = 48
    """Size of the invented vocabulary."""
    num_topics: int = 4
    """Number of topics; each word belongs to one."""
    topic_bonus: float = 0.5
    """Added to a word's utility when its topic matches the prompt's."""
    length_penalty: float = 0.25
    """Subtracted per word of difference between the requested and the produced length."""
    min_request: int = 3
    """Fewest words a prompt asks for."""
    max_request: int = 6
    """Most words a prompt asks for."""
    behaviour_shift: float = 1.0
    """How far the preference pairs' behaviour distribution is from the SFT one (0 = the same)."""
    form_noise: float = 0.2
    """Probability that a behaviour response has a form error (wrong length or a repeated word)."""
    label_temperature: float = 0.25
    """Bradley-Terry temperature of the preference labels: P(a > b) = sigmoid((gold(a) - gold(b)) / T)."""

    def __post_init__(self) -> None:
        checks = {
            "num_words": self.num_words >= 2 * self.max_request,
            "num_topics": 1 <= self.num_topics <= len(_TOPICS),
            "min_request": 1 <= self.min_request <= self.max_request,
            "length_penalty": self.length_penalty >= 0,
            "behaviour_shift": self.behaviour_shift >= 0,
            "form_noise": 0 <= self.form_noise <= 1,
            "label_temperature": self.label_temperature > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"TaskConfig.{name}={getattr(self, name)!r} is out of range: need num_words >= "
                    f"2 * max_request, 1 <= num_topics <= {len(_TOPICS)}, 1 <= min_request <= max_request, "
                    "length_penalty >= 0, behaviour_shift >= 0, 0 <= form_noise <= 1, label_temperature > 0."
                )


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: what is asked for."""

    text: str
    topic: str
    n: int
    avoid: str


@dataclass
class WordTask:
    """The task instance drawn from a :class:`TaskConfig`: vocabulary, hidden utilities and topics."""

    config: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        rng = random.Random(f"word-task-{self.config.seed}")
        syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
        words: set[str] = set()
        while len(words) < self.config.num_words:
            words.add("".join(rng.choice(syllables) for _ in range(2)))
        self.words: list[str] = sorted(words)
        rng.shuffle(self.words)
        self.topics: tuple[str, ...] = _TOPICS[: self.config.num_topics]
        self.utility: dict[str, float] = {w: round(rng.uniform(-1.0, 1.0), 4) for w in self.words}
        self.topic_of: dict[str, str] = {
            w: self.topics[i % len(self.topics)] for i, w in enumerate(self.words)
        }
        # The half of the vocabulary that the behaviour distribution over-samples.
        self.favoured: frozenset[str] = frozenset(rng.sample(self.words, len(self.words) // 2))
        self._by_text: dict[str, Prompt] = {}

    # ------------------------------------------------------------------ prompts
    def make_prompt(self, rng: random.Random) -> Prompt:
        topic = rng.choice(self.topics)
        n = rng.randint(self.config.min_request, self.config.max_request)
        avoid = rng.choice(self.words)
        text = rng.choice(_TEMPLATES).format(n=n, topic=topic, avoid=avoid)
        prompt = Prompt(text=text, topic=topic, n=n, avoid=avoid)
        self._by_text[text] = prompt
        return prompt

    def parse_prompt(self, text: str) -> Prompt:
        """Recover topic, requested length and avoided word from a prompt's text."""
        if text in self._by_text:
            return self._by_text[text]
        for template in _TEMPLATES:
            for topic in self.topics:
                for n in range(self.config.min_request, self.config.max_request + 1):
                    head, _, tail = template.format(n=n, topic=topic, avoid="\0").partition("\0")
                    if text.startswith(head) and text.endswith(tail):
                        avoid = text[len(head) : len(text) - len(tail)]
                        if avoid in self.utility:
                            prompt = Prompt(text=text, topic=topic, n=n, avoid=avoid)
                            self._by_text[text] = prompt
                            return prompt
        raise ValueError(f"not a prompt of this word task: {text!r}")

    # ------------------------------------------------------------------ gold reward
    def word_values(self, prompt: Prompt, response: str) -> list[float]:
        """Per-word values ``v_i`` of a response (see module docstring)."""
        seen: set[str] = set()
        values = []
        for word in response.split():
            if word in self.utility and word not in seen and word != prompt.avoid:
                bonus = self.config.topic_bonus if self.topic_of[word] == prompt.topic else 0.0
                values.append(self.utility[word] + bonus)
            else:
                values.append(BAD_WORD_VALUE)
            seen.add(word)
        return values

    def gold_reward(self, prompt: str | Prompt, response: str) -> float:
        """The true reward of ``response`` to ``prompt`` (a prompt text or a parsed :class:`Prompt`)."""
        parsed = prompt if isinstance(prompt, Prompt) else self.parse_prompt(prompt)
        values = self.word_values(parsed, response)
        mean_value = sum(values) / len(values) if values else BAD_WORD_VALUE
        return mean_value - self.config.length_penalty * abs(len(values) - parsed.n)

    def best_reward(self, prompt: str | Prompt) -> float:
        """The highest gold reward any response can reach (the n best distinct allowed words)."""
        parsed = prompt if isinstance(prompt, Prompt) else self.parse_prompt(prompt)
        allowed = [w for w in self.words if w != parsed.avoid]
        best = sorted(allowed, key=lambda w: self.word_values(parsed, w)[0], reverse=True)[: parsed.n]
        return self.gold_reward(parsed, " ".join(best))

    # ------------------------------------------------------------------ samples
    def sft_response(self, prompt: Prompt, rng: random.Random) -> str:
        """A demonstration: ``n`` distinct allowed words chosen uniformly (right form, mediocre content)."""
        allowed = [w for w in self.words if w != prompt.avoid]
        return " " + " ".join(rng.sample(allowed, prompt.n))

    def behaviour_response(self, prompt: Prompt, rng: random.Random) -> str:
        """A response from the behaviour distribution that generated the preference pairs."""
        shift = self.config.behaviour_shift
        allowed = [w for w in self.words if w != prompt.avoid]
        weights = [math.exp(shift if w in self.favoured else -shift) for w in allowed]
        n = prompt.n
        repeat = False
        if rng.random() < self.config.form_noise:
            if rng.random() < 0.5:
                n = max(1, n + rng.choice((-2, -1, 1, 2)))
            else:
                repeat = n >= 2
        chosen: list[str] = []
        while len(chosen) < n - repeat:
            word = rng.choices(allowed, weights=weights)[0]
            if word not in chosen:
                chosen.append(word)
        if repeat:
            chosen.insert(rng.randrange(1, len(chosen) + 1), rng.choice(chosen))
        return " " + " ".join(chosen)

    def preference_pair(self, prompt: Prompt, rng: random.Random) -> dict[str, str | float]:
        """Two behaviour responses labelled by a Bradley-Terry draw on the gold reward."""
        while True:
            a, b = self.behaviour_response(prompt, rng), self.behaviour_response(prompt, rng)
            if a != b:
                break
        ga, gb = self.gold_reward(prompt, a), self.gold_reward(prompt, b)
        p_a = _sigmoid((ga - gb) / self.config.label_temperature)
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        return {"prompt": prompt.text, "chosen": chosen, "rejected": rejected}

    def describe(self) -> dict:
        """Everything hidden about this task instance, for ``task.json``."""
        return {
            "config": asdict(self.config),
            "words": [
                {
                    "word": w,
                    "utility": self.utility[w],
                    "topic": self.topic_of[w],
                    "favoured": w in self.favoured,
                }
                for w in self.words
            ],
        }


def _sigmoid(x: float) -> float:
    # Split by sign so that exp never overflows, however small label_temperature is.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


def mean_gold_reward(task: WordTask, prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Average gold reward of paired prompts and responses."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many responses as prompts (got {len(responses)} and {len(prompts)})")
    return sum(task.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)) / len(prompts)

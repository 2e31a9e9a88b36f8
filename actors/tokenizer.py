"""Text <-> token ids at the ingress.

A simulated engine needs only counts; a vLLM engine needs the ids themselves, and a
session's next prompt must repeat the ids of its earlier prompts and outputs exactly,
or vLLM's prefix cache (hashes of token ids per block) misses. Two tokenizers:

* :class:`WordTokenizer` (the simulated model, ``vllm_model`` unset): one token per
  whitespace-separated word. A sampled token ``i`` is written as the word ``t<i>``
  and read back as ``i``, so an assistant message the client echoes in its next
  request becomes the very ids the engine generated; any other word maps to a
  stable hash in the vocabulary.
* :class:`HfTokenizer` (a real model): the model's own tokenizer and chat template
  (``transformers``, loaded from the model's directory).
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Protocol

from mars_ray.engine.costmodel import load_profile

from .api import ChatMessage
from .config import DeploymentConfig

_SAMPLED_WORD = re.compile(r"t(\d{1,9})")


class Tokenizer(Protocol):
    """What the ingress needs to turn requests into ids and ids into text."""

    vocab_size: int

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt of a chat request (template applied, generation prompt added)."""
        ...

    def text_ids(self, text: str) -> list[int]:
        """The prompt of a completion request."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of sampled ids (a streamed chunk or a whole turn)."""
        ...


def message_text(message: ChatMessage) -> str:
    """A message's text: its string content, or its text parts joined by spaces."""
    if isinstance(message.content, str):
        return message.content
    if message.content is None:
        return ""
    return " ".join(p["text"] for p in message.content if isinstance(p.get("text"), str))


def sampled_text(ids: list[int]) -> str:
    """The simulated model's text of sampled ids: `` t<i>`` each (read back as ``i``)."""
    return "".join(f" t{i}" for i in ids)


class WordTokenizer:
    """The simulated model's tokenizer (module docstring); ids below ``vocab_size``."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def word_id(self, word: str) -> int:
        sampled = _SAMPLED_WORD.fullmatch(word)
        if sampled is not None and int(sampled.group(1)) < self.vocab_size:
            return int(sampled.group(1))
        return zlib.crc32(word.encode()) % self.vocab_size

    def text_ids(self, text: str) -> list[int]:
        return [self.word_id(word) for word in text.split()]

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        # No template: the words of the messages in order (the simulator's counts).
        return [i for message in messages for i in self.text_ids(message_text(message))]

    def decode(self, ids: list[int]) -> str:
        return sampled_text(ids)


class HfTokenizer:
    """A real model's tokenizer and chat template, from its directory or hub id."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer  # a vLLM dependency

        self._tok: Any = AutoTokenizer.from_pretrained(model)
        self.vocab_size = len(self._tok)

    def text_ids(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        turns = [{"role": m.role, "content": message_text(m)} for m in messages]
        if getattr(self._tok, "chat_template", None) is None:
            # a base model: the contents one after another, as a completion prompt
            return self.text_ids("\n".join(t["content"] for t in turns))
        ids = self._tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def make_tokenizer(config: DeploymentConfig) -> Tokenizer | None:
    """The ingress's tokenizer: None for simulated engines (they only count words),
    the word tokenizer for vLLM on a simulated device, the model's own otherwise."""
    if config.engine != "vllm":
        return None
    if config.vllm_model is None:
        profile = load_profile(config.cluster.gpu, config.cluster.model)
        return WordTokenizer(profile.model.vocab_size)
    return HfTokenizer(config.vllm_model)

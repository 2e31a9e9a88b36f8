"""The ingress's tokenizers: the simulated model's word tokenizer (ids must round
trip through the text the API returns) and a real model's, from a local directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mars_ray.actors.api import ChatMessage
from mars_ray.actors.config import deployment_config
from mars_ray.actors.tokenizer import HfTokenizer, WordTokenizer, make_tokenizer


def test_sampled_ids_round_trip_through_their_text() -> None:
    tok = WordTokenizer(vocab_size=1000)
    sampled = [0, 7, 999, 123]
    assert tok.text_ids(tok.decode(sampled)) == sampled
    # other words hash to stable ids inside the vocabulary
    ids = tok.text_ids("fix the failing test t1000 t99x")
    assert len(ids) == 6 and all(0 <= i < 1000 for i in ids)
    assert ids == tok.text_ids("fix  the\nfailing test t1000 t99x")
    assert ids[4] != 1000, "t1000 is outside the vocabulary: hashed, not read as an id"


def test_chat_ids_are_the_words_of_every_message_in_order() -> None:
    tok = WordTokenizer(vocab_size=32000)
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content=[{"type": "text", "text": "hello there"}]),
        ChatMessage(role="assistant", content=" t5 t6"),
    ]
    assert tok.chat_ids(messages) == [*tok.text_ids("be brief hello there"), 5, 6]


def test_which_tokenizer_the_ingress_uses() -> None:
    assert make_tokenizer(deployment_config({})) is None  # sim engines only count
    simulated = make_tokenizer(deployment_config({"engine": "vllm"}))
    assert isinstance(simulated, WordTokenizer) and simulated.vocab_size == 128256


def _local_model_tokenizer(directory: Path) -> Path:
    """A tiny word-level tokenizer with a chat template, as a model directory has."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "user", "assistant", ":", "hi", "there"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "chat_template": template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_a_real_model_s_tokenizer_and_chat_template(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model_dir = _local_model_tokenizer(tmp_path / "model")
    tok = HfTokenizer(str(model_dir))
    assert tok.vocab_size == 7
    assert tok.text_ids("hi there") == [5, 6]
    ids = tok.chat_ids([ChatMessage(role="user", content="hi there")])
    assert ids == [2, 4, 5, 6, 3, 4], "template applied, generation prompt added"
    assert tok.decode([5, 6]) == "hi there"

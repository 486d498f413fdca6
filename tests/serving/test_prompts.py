"""Prompts as text need a tokenizer in the model folder; token ids are checked against the vocab."""

import shutil

import pytest

from serving.decode import DecodeWorker, settled_text, stop_string_at
from serving.errors import BadRequest
from serving.model import load
from serving.prompts import prompt_token_ids

WORDS = ["[UNK]", "<pad>", "<s>", "</s>", "hello", "world", "kv", "wire"]


@pytest.fixture(scope="module")
def with_tokenizer(kimi_dir, tmp_path_factory):
    """The tiny model plus a word-level tokenizer saved next to it, as save_pretrained() would."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tokenized") / "model"
    shutil.copytree(kimi_dir, path)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    return load(path)


def test_text_prompt_is_tokenized_when_the_folder_has_a_tokenizer(with_tokenizer):
    assert prompt_token_ids("hello kv wire world", with_tokenizer) == [4, 6, 7, 5]


@pytest.fixture(scope="module")
def without_tokenizer(kimi_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("untokenized") / "model"
    shutil.copytree(kimi_dir, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (path / name).unlink(missing_ok=True)
    return load(path)


def test_text_prompt_without_tokenizer_names_the_folder(without_tokenizer):
    with pytest.raises(BadRequest) as info:
        prompt_token_ids("hello", without_tokenizer)
    assert str(info.value) == (f"`prompt` is text but the model at {without_tokenizer.path} has no tokenizer; "
                               "send a list of token ids")


def test_token_ids_pass_through_and_are_checked_against_the_vocabulary(kimi):
    assert prompt_token_ids([3, 511], kimi) == [3, 511]
    with pytest.raises(BadRequest, match=r"^`prompt\[0\]` is 512, outside the model's vocabulary of 512 tokens$"):
        prompt_token_ids([512], kimi)


def test_streamed_text_is_the_incremental_decoding(with_tokenizer):
    worker = DecodeWorker.__new__(DecodeWorker)  # only the text helper, no receiver
    worker.loaded = with_tokenizer
    pieces, text = [], ""
    for n in range(1, 4):
        piece, text = settled_text(worker.decoded([4, 5, 6][:n]), text, 0, n == 3)
        pieces.append(piece)
    assert pieces == ["hello", " world", " kv"]
    assert text == "hello world kv"


def test_a_character_split_across_byte_tokens_waits_for_its_last_byte(kimi):
    """The tiny checkpoints' byte-level tokenizer: 'é' is two byte tokens; the first alone
    would decode to U+FFFD, so the stream holds it back and the pieces join to decode()."""
    worker = DecodeWorker.__new__(DecodeWorker)
    worker.loaded = kimi
    tokens = kimi.tokenizer("é!")["input_ids"]
    first_byte = kimi.tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3 in the byte-level alphabet
    sequence = [first_byte, kimi.tokenizer.convert_tokens_to_ids("©"), *tokens]  # 0xC3 0xA9 = 'é'
    pieces, text = [], ""
    for n in range(1, len(sequence) + 1):
        piece, text = settled_text(worker.decoded(sequence[:n]), text, 0, n == len(sequence))
        pieces.append(piece)
    assert pieces[0] == ""  # half a character
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == kimi.tokenizer.decode(sequence, skip_special_tokens=True) == "éé!"


def test_text_that_may_begin_a_stop_string_is_held_back():
    """With stop strings of up to 4 characters, the last 3 wait; the pieces join to the final text."""
    pieces, text = [], ""
    for full, last in (("hello", False), ("hello wo", False), ("hello world", True)):
        piece, text = settled_text(full, text, 0 if last else 3, last)
        pieces.append(piece)
    assert pieces == ["he", "llo", " world"]
    assert stop_string_at("hello world", ["xyz", "o w", "wor"], 0) == 4
    assert stop_string_at("hello world", ["xyz"], 0) is None

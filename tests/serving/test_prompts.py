"""Prompts as text need a tokenizer in the model folder; token ids are checked against the vocab."""

import shutil

import pytest

from serving.decode import DecodeWorker
from serving.http import BadRequest
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


def test_text_prompt_without_tokenizer_names_the_folder(kimi):
    with pytest.raises(BadRequest) as info:
        prompt_token_ids("hello", kimi)
    assert str(info.value) == f"`prompt` is text but the model at {kimi.path} has no tokenizer; send a list of token ids"


def test_token_ids_pass_through_and_are_checked_against_the_vocabulary(kimi):
    assert prompt_token_ids([3, 511], kimi) == [3, 511]
    with pytest.raises(BadRequest, match=r"^`prompt\[0\]` is 512, outside the model's vocabulary of 512 tokens$"):
        prompt_token_ids([512], kimi)


def test_streamed_text_is_the_incremental_decoding(with_tokenizer):
    worker = DecodeWorker.__new__(DecodeWorker)  # only the text helper, no receiver
    worker.loaded = with_tokenizer
    pieces, text = [], ""
    for n in range(1, 4):
        piece, text = worker._text_delta([4, 5, 6][:n], text)
        pieces.append(piece)
    assert pieces == ["hello", " world", " kv"]
    assert text == "hello world kv"

"""The toy tokenizer: template words are single tokens, task strings round-trip, chat template."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from cppo.toy.task import TaskConfig, generate_splits
from cppo.toy.tokenizer import collect_words
from evaluation.dapo import PROMPT_PREFIX, PROMPT_SUFFIX, format_prompt
from evaluation.testing import make_char_tokenizer
from evaluation.tiny import CHARS, IM_END, IM_START, PAD, SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def problems():
    return generate_splits(TaskConfig(), {"train": 300, "val": 50, "test": 50}, seed=3)


@pytest.fixture(scope="module")
def tok(problems, tmp_path_factory):
    texts = [t for p in problems["train"] for t in (p.text, p.solution)]
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(collect_words(texts)).save_pretrained(path)
    return AutoTokenizer.from_pretrained(str(path))


def test_special_tokens(tok):
    assert tok.eos_token == IM_END
    assert tok.pad_token == PAD
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids(IM_START) != tok.unk_token_id


def test_template_words_are_single_tokens(tok):
    for w in set(re.findall(r"[A-Za-z]+", PROMPT_PREFIX + PROMPT_SUFFIX)):
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    # ~200 characters of template, far fewer tokens than characters
    n = len(tok(PROMPT_PREFIX + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
    assert n < 0.4 * len(PROMPT_PREFIX + PROMPT_SUFFIX)


def test_digits_and_operators_are_single_characters(tok):
    ids = tok("12+7=19.\nAnswer: 19", add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ["1", "2", "+", "7", "=", "1", "9", ".", "\n", "Answer", ":", " ", "1", "9"]


def test_round_trip_every_task_string(tok, problems):
    for split in problems.values():
        for p in split:
            for s in (p.text, p.solution, format_prompt(p.text)):
                ids = tok(s, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids
                assert tok.decode(ids) == s


def test_round_trip_unseen_ascii(tok):
    s = "Thereafter, x_1 = {3/4}; the answers' ~sum~ is |-5|!\tok\n"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == s
    # "There" is not " the" + "re": a word only matches whole
    assert tok.convert_ids_to_tokens(ids)[:2] == ["T", "h"]


def test_chat_template(tok, problems):
    p = problems["val"][0]
    msgs = [{"role": "user", "content": format_prompt(p.text)}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == f"{IM_START}user\n{format_prompt(p.text)}{IM_END}\n{IM_START}assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids(IM_START)
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 2
    full = tok.apply_chat_template(
        [*msgs, {"role": "assistant", "content": p.solution}], tokenize=False
    )
    assert full == text + p.solution + IM_END + "\n"
    # the assistant mask marks exactly the response and its end-of-turn token
    enc = tok.apply_chat_template(
        [*msgs, {"role": "assistant", "content": p.solution}],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    mask = enc["assistant_masks"]
    kept = [i for i, m in zip(enc["input_ids"], mask, strict=True) if m]
    assert tok.decode(kept) == p.solution + IM_END


def test_decode_skips_special_tokens(tok):
    ids = tok("7+1=8.\nAnswer: 8", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "7+1=8.\nAnswer: 8"


def test_without_words_the_builder_is_character_level():
    tok = build_tokenizer()
    assert len(tok) == len(SPECIAL_TOKENS) + len(CHARS)
    text = "Answer: 12 + 3\n\tok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    chat = [{"role": "user", "content": "hi"}]
    expected = f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    # the tests' tokenizer: same vocabulary, its own (equivalent) template, right padding
    test_tok = make_char_tokenizer()
    assert test_tok.get_vocab() == tok.get_vocab() and test_tok.padding_side == "right"
    assert (
        test_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    )
    ids = test_tok(f"{IM_START}x{IM_END}", add_special_tokens=False)["input_ids"]
    assert test_tok.decode(ids, skip_special_tokens=True) == "x"


def test_vocab_size_pads_with_fillers():
    tok = build_tokenizer(vocab_size=200)
    assert len(tok) == 200 and tok.convert_ids_to_tokens(199) == "<filler199>"
    with pytest.raises(ValueError, match="vocab_size must be"):
        build_tokenizer(vocab_size=10)

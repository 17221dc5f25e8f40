"""Chat formats: exact template text, segments, prompt labels, docs/method.md §11 truncation/discard rules, EOS block padding."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tide_ds.data.chat_format import LLADA2, QWEN3, WEDLM, DropCounter, encode_chat, normalize_messages
from tide_ds.data.more_tokenizers import train_sentencepiece_tokenizer
from tide_ds.data.tokenizers import ensure_qwen3_tokenizer, load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EOS = 151645  # <|im_end|>
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi in 中文 🙂"},
    {"role": "assistant", "content": "你好"},
    {"role": "user", "content": "Again, with code:"},
    {"role": "assistant", "content": "def hi():\n    return '你好'"},
]


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return load_tokenizer(ensure_qwen3_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache"))


@pytest.fixture(scope="session")
def spm_tok(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """Same corpus, size and path as in test_more_tokenizers.py, so it is trained once."""
    names = ["textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "locale.py", "encodings/cp1252.py"]
    out = tmp_path_factory.getbasetemp() / "spm_teacher"
    return load_tokenizer(train_sentencepiece_tokenizer([STDLIB / n for n in names], out, vocab_size=1500))


def test_qwen3_format_text() -> None:
    text, ranges = QWEN3.render(CONVERSATION)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nSay hi in 中文 🙂<|im_end|>\n"
        "<|im_start|>assistant\n你好<|im_end|>\n"  # earlier turns: no think block (Qwen3 template)
        "<|im_start|>user\nAgain, with code:<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\ndef hi():\n    return '你好'<|im_end|>\n"
    )
    assert [text[a:b] for a, b in ranges] == [m["content"] for m in CONVERSATION]


def test_llada2_and_wedlm_format_text() -> None:
    messages = CONVERSATION[1:3]
    text, ranges = LLADA2.render(messages)
    assert text == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|>"
        "<role>HUMAN</role>Say hi in 中文 🙂<|role_end|><role>ASSISTANT</role>你好<|role_end|>"
    )
    assert [text[a:b] for a, b in ranges] == ["Say hi in 中文 🙂", "你好"]
    assert LLADA2.render(CONVERSATION)[0].count("<role>SYSTEM</role>") == 1  # a given system replaces the default
    text, _ = WEDLM.render(messages)
    assert text == "<|im_start|>user\nSay hi in 中文 🙂<|im_end|>\n<|im_start|>assistant\n你好<|im_end|>\n"


@pytest.mark.parametrize("fmt", [QWEN3, LLADA2, WEDLM], ids=lambda f: f.name)
def test_generation_prompt_is_the_prefix_before_the_last_content(fmt) -> None:
    text, ranges = fmt.render(CONVERSATION)
    prompt, _ = fmt.render(CONVERSATION[:-1], add_generation_prompt=True)
    assert text[: ranges[-1][0]] == prompt


@pytest.mark.parametrize("fmt", [QWEN3, WEDLM], ids=lambda f: f.name)
def test_labels_mask_the_prompt(qwen3: PreTrainedTokenizerFast, fmt) -> None:
    chat = encode_chat(CONVERSATION, qwen3, fmt)
    prompt, _ = fmt.render(CONVERSATION[:-1], add_generation_prompt=True)
    assert chat.prompt_len == len(qwen3.encode(prompt, add_special_tokens=False))  # the docs/method.md §11.1 definition
    assert chat.labels[: chat.prompt_len] == [-100] * chat.prompt_len
    assert chat.labels[chat.prompt_len:] == chat.input_ids[chat.prompt_len:]
    assert qwen3.decode(chat.input_ids[chat.prompt_len:]) == "def hi():\n    return '你好'<|im_end|>\n"
    assert chat.input_ids == qwen3.encode(chat.text, add_special_tokens=False)


def test_llada2_labels_with_sentencepiece(spm_tok: PreTrainedTokenizerFast) -> None:
    chat = encode_chat(CONVERSATION[1:3], spm_tok, LLADA2)
    assert spm_tok.decode(chat.input_ids[chat.prompt_len:]) == "你好<|role_end|>"
    assert chat.labels[: chat.prompt_len] == [-100] * chat.prompt_len


def test_segments_locate_every_content(qwen3: PreTrainedTokenizerFast, spm_tok: PreTrainedTokenizerFast) -> None:
    for tok, fmt in [(qwen3, QWEN3), (spm_tok, LLADA2), (qwen3, WEDLM)]:
        chat = encode_chat(CONVERSATION, tok, fmt)
        raw = chat.text.encode("utf-8")
        assert [s.message_index for s in chat.segments] == list(range(len(CONVERSATION)))
        for seg, message in zip(chat.segments, CONVERSATION):
            assert seg.role == message["role"]
            assert chat.text[seg.char_start:seg.char_end] == message["content"]
            assert raw[seg.byte_start:seg.byte_end] == message["content"].encode("utf-8")
            assert tok.decode(chat.input_ids[seg.token_start:seg.token_end]) == message["content"], fmt.name


def test_segments_are_found_sequentially_not_by_first_occurrence(qwen3: PreTrainedTokenizerFast) -> None:
    # The response also appears, earlier, inside the prompt (docs/method.md §15.3).
    messages = [{"role": "user", "content": "Repeat: yes"}, {"role": "assistant", "content": "yes"}]
    chat = encode_chat(messages, qwen3, QWEN3)
    seg = chat.segments[1]
    assert seg.char_start == chat.text.rindex("yes") and seg.token_start == chat.prompt_len
    assert qwen3.decode(chat.input_ids[seg.token_start:seg.token_end]) == "yes"


def test_token_straddling_a_content_edge_is_left_out(qwen3: PreTrainedTokenizerFast) -> None:
    # "user\n" + "\nHi": Qwen's regex makes one "\n\n" token across the template/content boundary.
    messages = [{"role": "user", "content": "\nHi"}, {"role": "assistant", "content": "ok"}]
    chat = encode_chat(messages, qwen3, QWEN3)
    seg = chat.segments[0]
    assert qwen3.decode(chat.input_ids[seg.token_start - 1]) == "\n\n"
    assert qwen3.decode(chat.input_ids[seg.token_start:seg.token_end]) == "Hi"


def test_normalisation_nfc_and_final_newlines(qwen3: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": "cafe\u0301"}, {"role": "assistant", "content": "\n\nre\u0301sume\u0301\n"}]
    assert normalize_messages(messages) == [
        {"role": "user", "content": "café"}, {"role": "assistant", "content": "résumé\n"},
    ]
    chat = encode_chat(messages, qwen3, QWEN3)
    assert "</think>\n\nrésumé\n<|im_end|>" in chat.text
    assert qwen3.decode(chat.input_ids) == chat.text


def test_empty_response_supervises_the_end_of_turn(qwen3: PreTrainedTokenizerFast) -> None:
    chat = encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], qwen3, QWEN3)
    seg = chat.segments[1]
    assert seg.char_start == seg.char_end and seg.token_start == seg.token_end == chat.prompt_len
    assert chat.input_ids[chat.prompt_len:] == [EOS, 198] and chat.labels[chat.prompt_len:] == [EOS, 198]


def test_eos_block_padding(qwen3: PreTrainedTokenizerFast) -> None:
    chat = encode_chat(CONVERSATION, qwen3, QWEN3, block_size=16)
    n = chat.length
    assert len(chat.input_ids) == len(chat.labels) == -(-n // 16) * 16 > n
    assert chat.input_ids[n:] == chat.labels[n:] == [EOS] * (len(chat.input_ids) - n)  # labelled, hence trained
    plain = encode_chat(CONVERSATION, qwen3, QWEN3)
    assert chat.input_ids[:n] == plain.input_ids and chat.segments == plain.segments


def test_truncation_cuts_on_the_right(qwen3: PreTrainedTokenizerFast) -> None:
    full = encode_chat(CONVERSATION, qwen3, QWEN3)
    counter = DropCounter()
    max_length = full.prompt_len + 3 + (-(full.prompt_len + 3) % 8)
    chat = encode_chat(CONVERSATION, qwen3, QWEN3, max_length=max_length, block_size=8, counter=counter)
    assert chat.length == max_length < full.length == chat.untruncated_length
    assert chat.input_ids == full.input_ids[:max_length] and chat.labels == full.labels[:max_length]
    last = chat.segments[-1]
    assert last.token_start == full.segments[-1].token_start and last.token_end == max_length
    assert (counter.kept, counter.truncated, dict(counter.dropped)) == (1, 1, {})


def test_discard_rules_are_counted(qwen3: PreTrainedTokenizerFast) -> None:
    counter = DropCounter()
    full = encode_chat(CONVERSATION, qwen3, QWEN3)
    cases = [
        [],
        [{"role": "user", "content": "hi"}],
        [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
        [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}],
    ]
    for messages in cases:
        assert encode_chat(messages, qwen3, QWEN3, counter=counter) is None
    # docs/method.md §11.2: the prompt fills max_length -> discarded (prompt_len == max_length is already too long).
    assert encode_chat(CONVERSATION, qwen3, QWEN3, max_length=full.prompt_len, counter=counter) is None
    assert encode_chat(CONVERSATION, qwen3, QWEN3, max_length=full.prompt_len + 1, counter=counter) is not None
    assert dict(counter.dropped) == {"no_messages": 1, "last_not_assistant": 1, "bad_message": 2, "prompt_too_long": 1}
    assert counter.kept == counter.truncated == 1
    total = DropCounter()
    total.update(counter)
    total.update(counter)
    assert total.dropped["bad_message"] == 4 and total.kept == 2
    assert total.summary() == ("kept 2 (2 truncated); dropped: bad_message=4, last_not_assistant=2, "
                               "no_messages=2, prompt_too_long=2")


def test_max_length_must_be_a_block_multiple(qwen3: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="max_length=100 is not a multiple of diffusion.block_size=32"):
        encode_chat(CONVERSATION, qwen3, QWEN3, max_length=100, block_size=32)

"""data/tokenizer.py against GPT-2's own BPE (tiktoken "gpt2") and loops written here: the cut vocabulary
round-trips any text exactly, every id it emits is below vocab_size, every id below vocab_size - 1 is the very
token GPT-2 has at that id, <|endoftext|> is the last id and decodes to nothing, a vocab_size out of range is a
UserError, and collate_rankings puts example i's response k at row i * K + k."""
import pytest
import tiktoken
import torch

import data
from common import UserError
from data import tokenizer

GPT2 = tiktoken.get_encoding("gpt2")
TEXTS = [
    "",
    "a",
    "Hello, world! This movie was GREAT.",
    "Café crème brûlée, naïve façade, Ångström, Zürich, São Paulo",
    "emoji: 😀🎬🍿 👍🏽 🇫🇷 and a family 👨‍👩‍👧 at the end",
    "漢字とかなの混じった文、한국어 문장, русский текст, ελληνικά, עברית, العربية",
    "spaces    in     runs\t\ttabs\tand\nnew\n\n\nlines \r\n windows  ",
    "   leading and trailing   ",
    "I loved it.<br /><br />The ending<br/>was<br>great.",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<|endoftext|> written as plain text",
    "\x00\x01 control \x7f chars \u200b zero-width \ufeff bom",
    "a" * 300 + " " + "ab" * 100,
]


@pytest.mark.parametrize("V", [257, 1024, 8192])
def test_the_cut_vocabulary_round_trips_every_text_exactly(V):
    enc = data.get_tokenizer(V)
    assert enc.n_vocab == V
    for text in TEXTS:
        ids = enc.encode_ordinary(text)
        assert all(0 <= i < V - 1 for i in ids), text  # never the EOT id for ordinary text, never past it
        assert enc.decode(ids) == text, text
        assert data.decode(ids, V) == text, text
    if V < data.GPT2_VOCAB:  # fewer merges: never fewer tokens than GPT-2's own encoding
        for text in TEXTS:
            assert len(enc.encode_ordinary(text)) >= len(GPT2.encode_ordinary(text)), text


@pytest.mark.parametrize("V", [1024, 8192])
def test_every_id_is_gpt2s_token_of_that_id(V):
    enc = data.get_tokenizer(V)
    for i in range(V - 1):
        assert enc.decode_single_token_bytes(i) == GPT2.decode_single_token_bytes(i), i
    assert enc.decode_single_token_bytes(V - 1) == b"<|endoftext|>"
    with pytest.raises(KeyError):  # no id past the vocabulary
        enc.decode_single_token_bytes(V)


def test_the_whole_vocabulary_is_gpt2s():
    enc = data.get_tokenizer(data.GPT2_VOCAB)
    assert enc.n_vocab == 50257 and data.EOT == 50256 == data.eot_id(50257)
    for text in TEXTS:
        assert enc.encode_ordinary(text) == GPT2.encode_ordinary(text)


@pytest.mark.parametrize("V", [257, 1024, 8192, 50257])
def test_eot_is_the_last_id_and_decodes_to_nothing(V):
    assert data.eot_id(V) == V - 1
    enc = data.get_tokenizer(V)
    assert enc.encode("<|endoftext|>", allowed_special="all") == [V - 1]
    answer = enc.encode_ordinary(" a fine film.")
    assert data.decode(answer + [V - 1], V) == " a fine film."  # an answer's final EOT prints as nothing
    assert data.decode([V - 1], V) == ""
    assert data.decode(answer[:2] + [V - 1] + answer[2:], V) == " a fine film."


@pytest.mark.parametrize("V", [0, 1, 255, 256, 50258, 100000])
def test_a_vocab_size_out_of_range_is_a_user_error(V):
    with pytest.raises(UserError, match=f"--vocab_size={V}"):
        tokenizer.check_vocab_size(V)
    with pytest.raises(UserError, match=f"--vocab_size={V}"):
        data.get_tokenizer(V)


def test_the_ends_of_the_range_are_accepted():
    tokenizer.check_vocab_size(257)
    tokenizer.check_vocab_size(50257)


# ----------------------------------------------------------------------------- collate_rankings
RANKINGS = [  # K = 3 responses of different lengths per prompt, best first
    dict(prompt=[5, 6, 7], responses=[[8, 9, 10, 11], [12], [13, 14]]),
    dict(prompt=[20], responses=[[21, 22], [23, 24, 25, 26, 27, 28], [29]]),
    dict(prompt=[30, 31, 32, 33, 34], responses=[[35], [36, 37, 38], [39, 40]]),
    dict(prompt=[41, 42], responses=[[43], [44], [45]]),
]
PAD = 777


def test_collate_rankings_puts_example_i_response_k_at_row_i_k():
    b = data.collate_rankings(RANKINGS, pad_id=PAD)
    P, K = len(RANKINGS), 3
    T = max(len(e["prompt"]) + len(r) for e in RANKINGS for r in e["responses"])
    assert b["idx"].shape == b["attention_mask"].shape == b["target_mask"].shape == (P * K, T)
    assert b["idx"].dtype == torch.long and b["attention_mask"].dtype == b["target_mask"].dtype == torch.float32
    for i, e in enumerate(RANKINGS):
        for k, resp in enumerate(e["responses"]):
            row, n = i * K + k, len(e["prompt"]) + len(resp)
            want_idx = e["prompt"] + resp + [PAD] * (T - n)  # right-padded
            want_attention = [1.0] * n + [0.0] * (T - n)
            want_response = [0.0] * len(e["prompt"]) + [1.0] * len(resp) + [0.0] * (T - n)
            assert b["idx"][row].tolist() == want_idx, (i, k)
            assert b["attention_mask"][row].tolist() == want_attention, (i, k)
            assert b["target_mask"][row].tolist() == want_response, (i, k)


def test_collate_rankings_with_k_2_is_a_pair_batch_reordered():
    """K = 2: the rows of collate_pairs (chosen rows [:B], rejected rows [B:]) interleaved, chosen at even rows."""
    pairs = [dict(prompt=e["prompt"], chosen=e["responses"][0], rejected=e["responses"][1]) for e in RANKINGS]
    rankings = [dict(prompt=e["prompt"], responses=e["responses"][:2]) for e in RANKINGS]
    a, b = data.collate_pairs(pairs, pad_id=PAD), data.collate_rankings(rankings, pad_id=PAD)
    B = len(pairs)
    order = [r for i in range(B) for r in (i, B + i)]
    for key in ("idx", "attention_mask", "target_mask"):
        assert torch.equal(b[key], a[key][order]), key


def test_collate_rankings_needs_the_same_k_everywhere():
    with pytest.raises(ValueError, match="same number of responses"):
        data.collate_rankings([RANKINGS[0], dict(prompt=[1], responses=[[2], [3]])])

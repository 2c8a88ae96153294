"""GPT-2's tokenizer (all of it, or its first merges) in the form Hugging Face and llama.cpp
expect: a string vocabulary and a merge list, both recovered from tiktoken's ``r50k_base`` ranks.

tiktoken stores each token as raw bytes with a rank that is also its GPT-2 id. GPT-2's own files
(``vocab.json`` / ``merges.txt``) spell tokens as printable strings instead, one unicode
character per byte, and list the merges that build every multi-byte token. Both are
recomputed here, so exports need no file beyond the vocabulary tiktoken already caches.
"""

from __future__ import annotations

from functools import cache

from model.config import GPT2_VOCAB_SIZE
from model.tokenizer import END_OF_TEXT, get_tokenizer


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → character map: printable Latin-1 bytes stand for themselves,
    the rest (control characters, space, ...) are shifted to U+0100 and beyond so that no
    token string contains whitespace or unprintable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = [byte for byte in range(256) if byte not in mapping]
    for offset, byte in enumerate(shifted):
        mapping[byte] = chr(256 + offset)
    return mapping


def _token_string(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[byte] for byte in token)


def _split_in_two(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates ``token``: run byte-pair encoding on its bytes with only the
    merges ranked before it, which must stop at exactly two parts."""
    rank = ranks[token]
    parts = [bytes([byte]) for byte in token]
    while True:
        best: tuple[int, int] | None = None  # (rank, index) of the earliest-ranked merge
        for index in range(len(parts) - 1):
            pair_rank = ranks.get(parts[index] + parts[index + 1])
            if pair_rank is not None and pair_rank < rank and (best is None or pair_rank < best[0]):
                best = (pair_rank, index)
        if best is None:
            break
        index = best[1]
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two earlier tokens")
    return parts[0], parts[1]


@cache
def gpt2_vocab_and_merges(
    vocab_size: int = GPT2_VOCAB_SIZE,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``vocab.json`` (token string → id, ``<|endoftext|>`` included) and ``merges.txt`` (pairs
    in merge order: merge ``i`` creates token ``256 + i``) of GPT-2's vocabulary, or of GPT-2's
    first merges: ``vocab_size`` tokens, ``vocab_size - 257`` merges."""
    tokenizer = get_tokenizer(vocab_size)
    ranks = tokenizer.ranks()
    vocab = {_token_string(token): rank for token, rank in ranks.items()}
    vocab[END_OF_TEXT] = tokenizer.eot_id
    merges = [
        (_token_string(left), _token_string(right))
        for left, right in (
            _split_in_two(token, ranks)
            for token, _ in sorted(ranks.items(), key=lambda item: item[1])
            if len(token) > 1
        )
    ]
    return vocab, merges

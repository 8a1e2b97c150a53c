"""A real `CLIPTokenizer` built offline from a word list, for small models (the pocket model, tests).

CLIP's tokenizer is byte-level BPE: every byte is a symbol (also in an end-of-word form `x</w>`),
and a ranked list of merges joins symbols into larger tokens. With no hub to download the real
vocabulary, we build one in which each word of a given vocabulary becomes exactly one token and
every other text still tokenizes (byte by byte). Merges are found by *simulating* BPE on each word:
apply the existing merges in rank order, and where none applies, add a merge of the first pair.
Without simulation a word can split unexpectedly, because BPE always applies the lowest-ranked
merge first, whichever word it was made for.

Notes for transformers 5: the tokenizer is constructed from `vocab=` / `merges=`; the old
`vocab_file=` / `merges_file=` keywords are accepted silently and yield a broken 2-token tokenizer,
so this module always goes through `save_pretrained`-style files and `from_pretrained`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode map (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _word_symbols(word: str, byte_map: dict[int, str]) -> list[str]:
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return symbols


def _merges_for(words: list[str], byte_map: dict[int, str]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    rank: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _word_symbols(word, byte_map)
        while len(symbols) > 1:
            pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
            known = [p for p in pairs if p in rank]
            if known:
                best = min(known, key=rank.__getitem__)
            else:
                best = pairs[0]
                rank[best] = len(merges)
                merges.append(best)
            i = pairs.index(best)
            symbols = symbols[:i] + [best[0] + best[1]] + symbols[i + 2 :]
    return merges


def write_word_tokenizer(words: list[str], out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for a CLIP BPE tokenizer to `out_dir`.

    Args:
        words (`list[str]`): words that must each become a single token (lower-case, no spaces).
        out_dir (`str | Path`): folder to write (created).
        model_max_length (`int`, *optional*, defaults to 77): padded sequence length.
    """
    bad = [w for w in words if not w or w != w.strip().lower() or " " in w]
    if bad:
        raise ValueError(f"tokenizer words must be non-empty, lower-case and space-free; got {bad[:5]}")
    byte_map = _bytes_to_unicode()
    base = list(byte_map.values())
    vocab_list = base + [s + "</w>" for s in base]
    merges = _merges_for(sorted(set(words)), byte_map)
    vocab_list += [a + b for a, b in merges]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return out


def build_word_tokenizer(words: list[str], model_max_length: int = 77):
    """A `CLIPTokenizer` in memory (written to a temporary folder and loaded back)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_word_tokenizer(words, tmp, model_max_length)
        return CLIPTokenizer.from_pretrained(tmp)

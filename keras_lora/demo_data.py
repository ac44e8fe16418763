"""The demo's texts and a GPT-2 tokenizer built from them, without downloads.

The two texts ship with the package (`keras_lora/data/*.txt`) and were written
for it: `demo_base.txt` (plain prose about the sea: the base model is
pre-trained on it) and `demo_target.txt` (a lighthouse keeper's log: the base
is adapted to it with LoRA).

The tokenizer is a real byte-level BPE `keras_hub.models.GPT2Tokenizer`
(same byte map and merge rules as GPT-2's), with a small vocabulary learnt
here from the two texts: the 256 byte symbols, a few hundred merges and
`<|endoftext|>`. Any string can be tokenized with it.
"""

import collections
import importlib.resources
import math
import re

import numpy as np

BASE_TEXT = "demo_base.txt"
TARGET_TEXT = "demo_target.txt"
TEXTS = (BASE_TEXT, TARGET_TEXT)
END_TOKEN = "<|endoftext|>"
# GPT-2's split pattern, restricted to ASCII letters and digits (the texts are
# ASCII; the tokenizer itself still splits with GPT-2's full pattern).
_SPLIT = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
)


def read_text(name):
    """The text of a packaged data file, e.g. `read_text("demo_base.txt")`."""
    return (
        importlib.resources.files("keras_lora")
        .joinpath("data", name)
        .read_text(encoding="utf-8")
    )


def bytes_to_unicode():
    """GPT-2's map from the 256 bytes to printable unicode symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            symbols.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, symbols)))


def train_bpe(texts, num_merges=300):
    """Learns byte-level BPE merges from `texts`; returns (vocabulary, merges).

    Deterministic: ties between equally frequent pairs go to the smallest
    pair. Stops early when no pair occurs twice.
    """
    byte_map = bytes_to_unicode()
    counts = collections.Counter()
    for text in texts:
        for piece in _SPLIT.findall(text):
            counts[tuple(byte_map[b] for b in piece.encode("utf-8"))] += 1
    words = [[list(word), count] for word, count in sorted(counts.items())]
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        for word in words:
            symbols, merged, i = word[0], [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            word[0] = merged
    vocabulary = {symbol: i for i, symbol in enumerate(byte_map[b] for b in range(256))}
    for left, right in merges:
        vocabulary.setdefault(left + right, len(vocabulary))
    vocabulary[END_TOKEN] = len(vocabulary)
    return vocabulary, [f"{left} {right}" for left, right in merges]


def build_tokenizer(texts, num_merges=300):
    """A `keras_hub.models.GPT2Tokenizer` with BPE merges learnt from `texts`."""
    import keras_hub

    vocabulary, merges = train_bpe(texts, num_merges)
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)


def tokenize(tokenizer, text):
    """Token ids of `text` as a 1-D int32 NumPy array."""
    import keras

    return np.asarray(keras.ops.convert_to_numpy(tokenizer(text))).astype("int32")


def windows(ids, sequence_length, multiple_of=1):
    """Next-token training data from a token stream.

    Returns (x, y): x a dict with `token_ids` and `padding_mask` of shape
    (n, sequence_length), y the same ids shifted by one. The windows are
    spread evenly from the start to the end of the text, overlapping by about
    half a window; n is a multiple of `multiple_of` (so that every batch has
    the same shape: one compiled step).
    """
    span = sequence_length + 1
    if len(ids) < span:
        raise ValueError(
            f"The text has {len(ids)} tokens, fewer than sequence_length + 1 "
            f"= {span}: use a shorter --sequence-length."
        )
    count = max(1, 2 * (len(ids) - span) // sequence_length + 1)
    count = multiple_of * math.ceil(count / multiple_of)
    starts = np.linspace(0, len(ids) - span, count).round().astype(int)
    chunks = np.stack([ids[s : s + span] for s in starts])
    x = {
        "token_ids": chunks[:, :-1],
        "padding_mask": np.ones_like(chunks[:, :-1]),
    }
    return x, chunks[:, 1:]

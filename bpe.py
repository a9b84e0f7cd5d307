"""Byte-level BPE tokenizer: train, encode, decode; ids identical to tiktoken's, in plain Python.

A tokenizer turns text into a list of integer ids and back. Byte-level BPE (byte pair encoding), the
scheme of GPT-2 and GPT-4, starts from the 256 possible bytes of UTF-8 and learns "merges": the most
frequent adjacent pair of tokens becomes a new token, again and again, until the vocabulary is full.

Run it, or call it from Python:
    python bpe.py --input=a.txt,b.txt --vocab_size=8192 --out=tok.bpe   # train, print bytes/token
    python bpe.py --tokenizer=tok.bpe --encode="Hello world"            # ids and the pieces they stand for
    tok = Tokenizer.train(open("corpus.txt").read(), vocab_size=8192)   # or .load("tok.bpe"), .from_gpt2()
    assert tok.decode(tok.encode("Hello world")) == "Hello world"       # tok.save(path), tok.to_tiktoken()

A worked example you can check by hand. Train on "aaabdaaabac" (one pre-token, since it is all letters)
with vocab_size=259, i.e. three merges after the 256 bytes (a=97, b=98, c=99, d=100):

    ids [97 97 97 98 100 97 97 97 98 97 99]     pairs: (97,97) x4, (97,98) x2, every other pair x1
    merge 1: (97,97) -> 256 "aa"     [256 97 98 100 256 97 98 97 99]  ("aaa" merges left to right: "aa","a")
    merge 2: (97,98) -> 257 "ab"     [256 257 100 256 257 97 99]      ((97,98) and (256,97) tie at 2: the
                                                                        smaller pair wins)
    merge 3: (256,257) -> 258 "aaab" [258 100 258 97 99]

so Tokenizer.train("aaabdaaabac", 259, special_tokens=()).encode("aaabdaaabac") == [258, 100, 258, 97, 99].

Part I, the lesson: the whole tokenizer, each piece written the plain way first.
  1. split patterns         the regex that cuts text into pre-tokens; merges never cross their edges
  2. pairs and merging      the whole idea in ten lines, and the simplest trainer built from it
  3. training, fast         the same merges: count each distinct pre-token once, update incrementally
  4. the Tokenizer          ranks, split pattern, special tokens; train() puts 1-3 together
  5. encoding               tiktoken's rule: merge the adjacent pair of lowest rank; special tokens
  6. decoding               ids -> bytes -> text
  7. saving and loading     a versioned text format with a checksum
Part II, the workshop: the same ids faster, and the tokenizer connected to the rest of the world:
  8. chunks, 9. encode caches, 10. GPT-2's files, 11. tiktoken, 12. batch encoding,
  13. the chat template (special tokens for roles, a conversation as ids and a loss mask),
  14. files (the one atomic write and tokenizer loader of all three programs), 15. command line.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import regex  # the third-party `regex` module: unlike `re`, it knows Unicode classes such as \p{L} (letters)

# ----------------------------------------------------------------------------------------------------------
# 1. Split patterns
#
# Before BPE sees the text, a regex cuts it into "pre-tokens" (words with their leading space, runs of
# digits, punctuation, whitespace) and merges happen only inside a pre-token. So " dog" can become one
# token, but "dog." never does, and the vocabulary is not wasted on "dog.", "dog!", "dog?".

# GPT-2 (2019): contractions, an optional space + letters / digits / other symbols, then whitespace runs.
# "\s+(?!\S)" keeps the last space of a run for the word after it: "a   b" -> "a", "  ", " b".
# (OpenAI's published form spells the contractions out: 's|'t|'re|'ve|'m|'ll|'d; the group is the same set.)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4 (tiktoken's cl100k_base): case-insensitive contractions, a word may start with one punctuation
# character ("(dog", "_init"), digits come in groups of at most 3 (so numbers do not eat the vocabulary),
# and newlines are kept apart from other whitespace. `?+` and `++` are possessive: they never give back.
# This is the default for new tokenizers. (One regex, written as two adjacent strings to fit the page.)
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def count_pretokens_simple(texts: str | Iterable[str], pattern: str,
                           special_tokens: Sequence[str] = ()) -> Counter:
    """{pre-token: occurrences} over all documents: "a dog, a dog" -> {" dog": 2, "a": 1, ",": 1, " a": 1}."""
    split_pattern = regex.compile(pattern)
    special_cut = re.compile("|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True)))
    pretoken_counts: Counter = Counter()
    for text in [texts] if isinstance(texts, str) else texts:
        # Special-token text (e.g. "<|endoftext|>" between stories) is a delimiter, not something to learn.
        for part in special_cut.split(text) if special_tokens else [text]:
            pretoken_counts.update(split_pattern.findall(part))
    return pretoken_counts


# ----------------------------------------------------------------------------------------------------------
# 2. Counting pairs and merging: the idea
#
# A token sequence is a list of ids; the 256 byte values are ids 0..255. Training repeats two steps:
#   count every adjacent pair:  [97, 97, 97, 98] -> {(97, 97): 2, (97, 98): 1}   (overlapping pairs count)
#   merge the most frequent one into a new id, left to right:
#                               merge([97, 97, 97, 98], (97, 97), 256) -> [256, 97, 98]
# Ties go to the smallest pair (left id, then right id), so the result never depends on dict order.
# Merge k (k = 0, 1, ...) gets id 256 + k. This is rustbpe's rule, and the tests check our merges against it.
# The docstring's worked example is these two steps, three times.

def count_pairs(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict[tuple[int, int], int]:
    """Add `weight` for every adjacent pair in ids: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of pair, left to right: merge([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_merges_simple(pretoken_counts: dict[str, int], num_merges: int) -> list[tuple[int, int]]:
    """The plainest trainer (minbpe's): recount all pairs of all pre-tokens before every merge.

    pretoken_counts maps each distinct pre-token to how often it occurs. Returns the merged pairs in order.
    It does O(merges x corpus) work, fine for a page of text; `train_merges` below gets the same answer fast.
    """
    words = [list(w.encode("utf-8")) for w in pretoken_counts]
    freqs = list(pretoken_counts.values())
    merges = []
    for k in range(num_merges):
        counts: dict[tuple[int, int], int] = {}
        for ids, n in zip(words, freqs):
            count_pairs(ids, counts, n)
        if not counts:
            break  # every pre-token is a single token: nothing left to merge
        pair = min(counts, key=lambda p: (-counts[p], p))  # highest count, then smallest pair
        words = [merge(ids, pair, 256 + k) for ids in words]
        merges.append(pair)
    return merges


# ----------------------------------------------------------------------------------------------------------
# 3. Training, fast
#
# train_merges_simple recounts every pair of every pre-token for each merge. Three observations avoid that:
#  - Text repeats: count each distinct pre-token once and weight its pairs by its frequency.
#  - A merge only changes the pre-tokens ("words") that contain the merged pair. Keep an index
#    pair -> words containing it, and update those words only; in the common case of one occurrence,
#    only the pairs that touch it.
#  - The best pair comes from a heap. Counts of existing pairs only ever go down (a merge creates pairs
#    only with the new id), so a stale heap entry overstates its count: when we pop one whose count is out
#    of date, we push it back with the true count ("lazy" refresh). An entry whose count is current is the
#    true maximum, and the heap's order on (-count, pair) gives rustbpe's tie rule.
# Representation: a word is a Python str whose characters are token ids (chr(id)); a pair is a 2-character
# str. Bytes 0..255 map to chr(0)..chr(255), which is exactly what bytes.decode("latin-1") produces, and
# merging a pair is str.replace(pair, chr(new_id)), which scans left to right without overlaps, like
# merge() above, but at C speed. Comparing 2-character strings compares (left id, right id) in order.
# (Ids up to 65,535 include the surrogate code points; Python strings hold them fine, we never encode them.)

def index_pairs(words: list[str], freqs: list[int]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Each adjacent pair's count, weighted by word frequency, and the indices of the words holding it."""
    pair_counts: dict[str, int] = defaultdict(int)
    words_with_pair: dict[str, list[int]] = defaultdict(list)  # may repeat a word; harmless, see below
    for j, (word, n) in enumerate(zip(words, freqs)):
        for i in range(len(word) - 1):
            pair = word[i:i + 2]
            pair_counts[pair] += n
            words_with_pair[pair].append(j)
    return pair_counts, words_with_pair


def train_merges(pretoken_counts: dict[str, int], num_merges: int,
                 verbose: bool = False) -> list[tuple[int, int]]:
    """The merges train_merges_simple would pick, computed incrementally (see the notes above)."""
    words = [w.encode("utf-8").decode("latin-1") for w in pretoken_counts]  # one char per byte = byte id
    freqs = list(pretoken_counts.values())
    pair_counts, words_with_pair = index_pairs(words, freqs)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    t0 = last_report = time.perf_counter()
    while len(merges) < num_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count == 0:
            continue  # the pair no longer occurs anywhere
        if -negative_count != count:
            heapq.heappush(heap, (-count, pair))  # stale entry: put it back with its true count
            continue
        new_token = chr(256 + len(merges))
        changed = set()  # pairs created by this merge, for the heap
        for j in words_with_pair.pop(pair):
            old = words[j]
            if pair not in old:
                continue  # the index is lazy too: a repeat, or the word lost the pair to an earlier merge
            new = words[j] = old.replace(pair, new_token)
            n, created = freqs[j], []
            site = old.find(pair)
            if old.find(pair, site + 2) == -1:
                # The common case, the pair occurs once ("xaby" -> "xZy"): only the pairs that touch it
                # change. Subtract xa, ab, by here; add the created xZ, Zy below.
                pair_counts[pair] -= n
                if site > 0:
                    pair_counts[old[site - 1:site + 1]] -= n
                    created.append(new[site - 1:site + 1])
                if site + 2 < len(old):
                    pair_counts[old[site + 1:site + 3]] -= n
                    created.append(new[site:site + 2])
            else:
                # Several occurrences, maybe overlapping ("aaaa" -> "ZZ"): simply recount the whole word.
                for i in range(len(old) - 1):
                    pair_counts[old[i:i + 2]] -= n
                for i in range(len(new) - 1):
                    p = new[i:i + 2]
                    if new_token in p:
                        created.append(p)
                    else:
                        pair_counts[p] += n
            for p in created:  # pairs with the new token: counted, indexed, pushed once all words are done
                pair_counts[p] += n
                words_with_pair[p].append(j)
                changed.add(p)
        for p in changed:
            heapq.heappush(heap, (-pair_counts[p], p))
        merges.append((ord(pair[0]), ord(pair[1])))
        now = time.perf_counter()
        if verbose and (now - last_report > 1.0 or len(merges) == num_merges):
            last_report = now
            print(f"merge {len(merges):,}/{num_merges:,}: pair {merges[-1]} x {count:,}, "
                  f"{len(merges) / (now - t0):,.0f} merges/s", flush=True)
    return merges


# ----------------------------------------------------------------------------------------------------------
# 4. The Tokenizer: mergeable ranks, a split pattern, special tokens; train() puts sections 1-3 together

FORMAT_HEADER = "bpe.py tokenizer v1"  # the first line of a saved tokenizer (section 7)
NOT_A_TOKEN = sys.maxsize  # the "rank" of a pair whose concatenation is not a token: larger than any rank


class Tokenizer:
    """A byte-level BPE tokenizer: mergeable_ranks {token bytes: id}, a split pattern, special tokens.
    As in tiktoken, the ranks are all it needs: a token's id is also its merge priority (lower first)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = GPT4_PATTERN,
                 special_tokens: dict[str, int] | None = None):
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        missing = [b for b in range(256) if bytes([b]) not in self.mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable_ranks lacks the single byte {bytes([missing[0]])!r}: "
                             "a byte-level tokenizer needs all 256 bytes to encode any text")
        self._decoder = {i: b for b, i in self.mergeable_ranks.items()}
        self._decoder.update((i, s.encode("utf-8")) for s, i in self.special_tokens.items())
        if len(self._decoder) != len(self.mergeable_ranks) + len(self.special_tokens):
            raise ValueError("two tokens share an id: every token and special token needs its own id")
        # The number of ids, so the size of the model's embedding table: the largest id + 1, which is
        # len(mergeable_ranks) + len(special_tokens) for every tokenizer trained here and for GPT-2 (no gaps).
        self.vocab_size = max(self._decoder) + 1
        self._split = regex.compile(pattern)
        self._cache: dict[str, tuple[int, ...]] = {}  # chunk -> ids: see Part II, encode caches
        self._pretoken_cache: dict[bytes, tuple[int, ...]] = {}  # pre-token that is not a token -> ids

    @property
    def eot_token(self) -> int | None:
        return self.special_tokens.get("<|endoftext|>")

    def __repr__(self) -> str:
        split = {GPT4_PATTERN: "GPT-4", GPT2_PATTERN: "GPT-2"}.get(self.pattern, "custom")
        return f"Tokenizer(vocab_size={self.vocab_size}, specials={list(self.special_tokens)}, split={split})"

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int, pattern: str = GPT4_PATTERN,
              special_tokens: Sequence[str] = ("<|endoftext|>",), verbose: bool = False) -> Tokenizer:
        """Learn vocab_size - 256 - len(special_tokens) merges; specials take the ids after the merges."""
        special_tokens = list(dict.fromkeys(special_tokens))
        if not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError(f"special_tokens must be non-empty strings, got {special_tokens!r}")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size {vocab_size} is too small: it must hold the 256 byte tokens + "
                             f"{len(special_tokens)} special tokens, so at least {256 + len(special_tokens)}")
        if vocab_size > 65_536:
            raise ValueError(f"vocab_size {vocab_size} is above 65,536: token shards store ids as uint16")
        t0 = time.perf_counter()
        # count_pretokens_simple's counts, without the regex over repeated text: see the workshop, chunks.
        pretoken_counts = count_pretokens(texts, pattern, special_tokens, verbose)
        if not pretoken_counts:
            raise ValueError("the training text is empty: give at least one non-empty document")
        if verbose:
            print(f"pre-tokenized: {sum(pretoken_counts.values()):,} pre-tokens, {len(pretoken_counts):,} "
                  f"distinct, {time.perf_counter() - t0:.2f} s", flush=True)
        num_merges = vocab_size - 256 - len(special_tokens)
        merges = train_merges(pretoken_counts, num_merges, verbose)
        if verbose and len(merges) < num_merges:
            print(f"stopped after {len(merges):,} merges: every pre-token is a single token", flush=True)
        token_bytes = [bytes([b]) for b in range(256)]
        for left, right in merges:
            token_bytes.append(token_bytes[left] + token_bytes[right])
        ranks = {b: i for i, b in enumerate(token_bytes)}
        specials = {s: len(token_bytes) + k for k, s in enumerate(special_tokens)}
        return cls(ranks, pattern, specials)

    # --- 5. Encoding ----------------------------------------------------------------------------------------
    #
    # tiktoken's rule, for each pre-token: if its bytes are a token, that is the answer (the common case,
    # " the"). Otherwise start from single bytes and repeatedly merge the adjacent pair whose concatenation
    # has the lowest rank, leftmost first on a tie, until no adjacent pair is a token. For a trained
    # tokenizer this replays the training merges in order; it also works for vocabularies given only as
    # ranks (tiktoken's), where no list of merges exists.

    def encode_ordinary_simple(self, text: str) -> list[int]:
        """encode_ordinary's ids the plain way: split the text, apply the rule above to each pre-token."""
        ranks, ids = self.mergeable_ranks, []
        for pretoken in self._split.findall(text):
            piece = pretoken.encode("utf-8")
            # The whole pre-token if it is a token (" the"), else its single bytes, merged by the loop.
            parts = [piece] if piece in ranks else [piece[i:i + 1] for i in range(len(piece))]
            while len(parts) > 1:
                pair_ranks = [ranks.get(a + b, NOT_A_TOKEN) for a, b in zip(parts, parts[1:])]
                best = min(pair_ranks)
                if best == NOT_A_TOKEN:
                    break  # no adjacent pair is a token: done
                i = pair_ranks.index(best)  # the leftmost of equal ranks, as in tiktoken
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [ranks[part] for part in parts]
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token text like any other text."""
        # encode_ordinary_simple's ids, with each distinct chunk of text (" the", " of") split and merged
        # once, then cached: see the workshop, chunks (split_chunks) and encode caches (_encode_chunk).
        cache, ids = self._cache, []
        for chunk in split_chunks(text):
            tokens = cache.get(chunk)
            ids += tokens if tokens is not None else self._encode_chunk(chunk)
        return ids

    def encode(self, text: str, allowed_special: set[str] | str = frozenset(),
               disallowed_special: set[str] | str = "all") -> list[int]:
        """Encode like tiktoken: special-token text raises ValueError unless allowed ("all" allows all)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (set(self.special_tokens) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        for special in disallowed:
            if special in text:
                raise ValueError(f"text contains the special token {special!r}: pass allowed_special="
                                 f"{{{special!r}}} (or 'all') to encode it as a special token, or use "
                                 "encode_ordinary for plain text")
        allowed &= set(self.special_tokens)
        if not allowed:
            return self.encode_ordinary(text)
        # Cut at the allowed specials only (longest first, so a special that contains another wins); the
        # capturing group keeps them in the list at odd positions: [text, special, text, special, text].
        special_cut = re.compile("(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")")
        ids: list[int] = []
        for k, part in enumerate(special_cut.split(text)):
            if k % 2 == 1:
                ids.append(self.special_tokens[part])
            else:
                ids += self.encode_ordinary(part)
        return ids

    # --- 6. Decoding ----------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for. One token may hold part of a UTF-8 character, so bytes are exact."""
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"cannot decode id {e.args[0]!r}: the vocabulary has ids "
                             f"0..{self.vocab_size - 1}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that are not UTF-8 (half a character) become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- 7. Saving and loading ------------------------------------------------------------------------------
    #
    # The format, UTF-8 text, one record per line:
    #     bpe.py tokenizer v1
    #     pattern "'(?i:[sdmt]|ll|ve|re)|..."          the split regex as a JSON string
    #     specials 1
    #     "<|endoftext|>" 8191                          each special token: JSON string, id
    #     ranks 8191
    #     AA== 0                                        each token: base64 of its bytes, id (as in .tiktoken
    #     ...                                            files: tokens are bytes, often not valid UTF-8)
    #     sha256 9f86d0...                              SHA-256 of every line above, including their newlines
    # The counts catch truncation early, the checksum catches any edit, and the first line names the
    # version, so a file is either loaded exactly or rejected with the line that is wrong.

    def dumps(self) -> str:
        """The tokenizer as text in the format above (what save() writes; gpt.py keeps it in checkpoints)."""
        lines = [FORMAT_HEADER, f"pattern {json.dumps(self.pattern)}", f"specials {len(self.special_tokens)}"]
        lines += [f"{json.dumps(s)} {i}" for s, i in self.special_tokens.items()]
        lines.append(f"ranks {len(self.mergeable_ranks)}")
        lines += [f"{base64.b64encode(b).decode('ascii')} {i}" for b, i in self.mergeable_ranks.items()]
        body = "".join(line + "\n" for line in lines)
        return body + f"sha256 {hashlib.sha256(body.encode('utf-8')).hexdigest()}\n"

    @classmethod
    def loads(cls, text: str, source: str = "tokenizer text") -> Tokenizer:
        """Parse dumps() output; any damage raises ValueError naming `source` and the line."""
        lines = text.split("\n")
        line_no = 0

        def fail(problem: str) -> ValueError:
            return ValueError(f"{source} line {line_no}: {problem}")

        def next_line() -> str:
            nonlocal line_no
            line_no += 1
            if line_no >= len(lines):  # a complete file ends with "\n", so lines[-1] is the empty rest
                raise fail("the file ends here: it is truncated")
            return lines[line_no - 1]

        def read_count(keyword: str) -> int:
            line = next_line()
            name, _, value = line.partition(" ")
            if name != keyword or not value.isdigit():
                raise fail(f"expected '{keyword} <count>', found {line[:60]!r}")
            return int(value)

        def read_entry(decode_key) -> tuple:
            line = next_line()
            key, _, value = line.rpartition(" ")
            try:
                if not value.isdigit():
                    raise ValueError("the id is not a number")
                return decode_key(key), int(value)
            except ValueError as e:  # also bad JSON and bad base64 (both subclass ValueError)
                raise fail(f"expected '<token> <id>', found {line[:60]!r} ({e})") from None

        if next_line() != FORMAT_HEADER:
            raise fail(f"expected {FORMAT_HEADER!r}: not a bpe.py tokenizer, "
                       "or another version of the format")
        line = next_line()
        try:
            if not line.startswith("pattern "):
                raise ValueError
            pattern = json.loads(line[len("pattern "):])
        except ValueError:  # json.JSONDecodeError is a ValueError
            raise fail(f"expected 'pattern <json string>', found {line[:60]!r}") from None
        specials = dict(read_entry(json.loads) for _ in range(read_count("specials")))
        ranks = dict(read_entry(lambda key: base64.b64decode(key, validate=True))
                     for _ in range(read_count("ranks")))
        body = "".join(line + "\n" for line in lines[:line_no])
        if next_line() != f"sha256 {hashlib.sha256(body.encode('utf-8')).hexdigest()}":
            raise fail("checksum does not match the lines above: the file was edited or corrupted")
        if line_no + 1 != len(lines) or lines[-1] != "":
            raise fail("unexpected text after the checksum line")
        return cls(ranks, pattern, specials)

    def save(self, path: str | os.PathLike) -> None:
        """Write dumps() to path atomically: a crash leaves the old file. See Part II, write_atomically."""
        write_atomically(path, lambda tmp: tmp.write_text(self.dumps(), encoding="utf-8", newline="\n"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file "
                                    f"(train one with: python bpe.py --input FILE --out {path})")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a bpe.py tokenizer (byte {e.start} is not UTF-8)") from None
        return cls.loads(text, source=str(path))


# ===== Part II: the workshop (speed, GPT-2 and tiktoken interop, files, command line) =====================
#
# Nothing here changes an id: each fast route gives what its plain twin in Part I gives, and the tests
# check that on the shared corpora. The Tokenizer methods that belong here are written as functions and
# attached by @tokenizer_method below, so that the class body in Part I holds only the lesson, while
# callers still write Tokenizer.from_gpt2(...) and tok.to_tiktoken() as with any method.

def tokenizer_method(method: Callable | classmethod | staticmethod) -> Callable | classmethod | staticmethod:
    """Attach a function, classmethod or staticmethod to Tokenizer under its own name; return it unchanged."""
    setattr(Tokenizer, getattr(method, "__func__", method).__name__, method)
    return method


# ----------------------------------------------------------------------------------------------------------
# 8. Chunks: where text can be cut without changing its pre-tokens
#
# The regex runs at Python speed, and most text repeats (" the", " of", ...). So we cut the text at C speed
# into "chunks" at places where a new pre-token provably begins under both patterns, and split each
# distinct chunk only once. Encoding caches the ids of each chunk (section 9), so repeated text costs one
# dict lookup. Training counts the chunks and runs the regex over the distinct ones only, which hold a
# share of the characters that falls as the corpus grows.
#
# The cut: before a space " " that is followed by a non-whitespace character X ("dog| bites", "a |  X").
# Why that is safe, for both patterns:
#  (a) No pre-token contains the character before the cut and the space. An alternative allows a space
#      after its first character only inside an all-whitespace run ("\s*[\r\n]", "\s+(?!\S)", "\s+"),
#      and such a run cannot end at our space: "\s*[\r\n]" ends with a line break, "\s+(?!\S)" is not
#      followed by X, and "\s+" is only tried where "\s+(?!\S)" failed, which for a run of two or more
#      whitespace characters never happens (it backs off one character, to end before our space).
#  (b) So every match that starts before the cut ends before it, and nothing before the cut can tell the
#      space from the end of the text: a path that consumes the space fails either way (by (a)), and
#      "(?!\S)" succeeds on both.
#  (c) Neither pattern looks behind, so the pre-tokens after the cut do not depend on what came before.
# Hence findall(whole text) == findall(chunk 1) + findall(chunk 2) + ... (the tests check it on the shared
# corpora). Note that the cut depends only on the text after it: any string followed by a chunk that starts
# with " " + non-space also splits there, which lets us glue chunks together and run the regex once.
# `re`'s \S means "not str.isspace()", which excludes every character that `regex`'s \s matches, so X is
# non-whitespace for the patterns too.
CHUNK_CUT = re.compile(r"(?= \S)")


def split_chunks(text: str) -> list[str]:
    """Cut text before every space followed by a non-space: "a dog  bites" -> ["a", " dog ", " bites"]."""
    return CHUNK_CUT.split(text)


def starts_chunk(chunk: str) -> bool:
    """Whether any text followed by `chunk` has a cut right before it (see above)."""
    return len(chunk) > 1 and chunk[0] == " " and not chunk[1].isspace()


def count_pretokens(texts: str | Iterable[str], pattern: str, special_tokens: Sequence[str] = (),
                    verbose: bool = False) -> Counter:
    """{pre-token: occurrences} over all documents; documents are consumed one at a time, never all held.

    The counts of count_pretokens_simple (section 1), with the regex run over each distinct chunk once."""
    split_pattern = regex.compile(pattern)
    special_cut = re.compile("|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True)))
    chunk_counts: Counter = Counter()
    documents = characters = 0
    t0 = last_report = time.perf_counter()
    for text in [texts] if isinstance(texts, str) else texts:
        # Special-token text (e.g. "<|endoftext|>" between stories) is a delimiter, not something to learn.
        for part in special_cut.split(text) if special_tokens else [text]:
            chunk_counts.update(split_chunks(part))  # Counter.update over a list runs in C
        documents, characters = documents + 1, characters + len(text)
        if verbose and time.perf_counter() - last_report > 5.0:
            last_report = time.perf_counter()
            print(f"read {documents:,} documents, {characters / 1e6:,.1f}M characters, "
                  f"{characters / 1e6 / (last_report - t0):.1f}M characters/s", flush=True)
    # Most distinct chunks are short, so one regex call each would be mostly call overhead. Instead, glue
    # together all chunks that occur equally often (safe: each starts a pre-token, see starts_chunk) and
    # split that string in one call. The first chunk of a document may not start with a space; it goes alone.
    chunks_by_count: dict[int, list[str]] = defaultdict(list)
    pretoken_counts: Counter = Counter()
    for chunk, n in chunk_counts.items():
        if starts_chunk(chunk):
            chunks_by_count[n].append(chunk)
        else:
            for pretoken in split_pattern.findall(chunk):
                pretoken_counts[pretoken] += n
    for n, chunks in chunks_by_count.items():
        for pretoken, k in Counter(split_pattern.findall("".join(chunks))).items():
            pretoken_counts[pretoken] += n * k
    return pretoken_counts


# ----------------------------------------------------------------------------------------------------------
# 9. Encode caches
#
# encode_ordinary (section 5) looks each chunk up in tok._cache. A chunk seen for the first time goes to
# _encode_chunk, which splits it into pre-tokens; a pre-token that is not a token goes to _merge_pretoken,
# the rule of section 5 with two shortcuts: a cache per pre-token (a word recurs in many chunks), and
# after a merge only the ranks of the two neighbouring pairs are looked up again, not every pair's.

# Entries per encode cache: a full cache is cleared, which bounds memory on endless streams (each entry is
# a short string or bytes and a tuple of ids, so a full cache takes tens of MB).
CACHE_LIMIT = 1 << 18


@tokenizer_method
def _merge_pretoken(self, piece: bytes) -> tuple[int, ...]:
    """Ids of a pre-token whose bytes are not a single token."""
    ids = self._pretoken_cache.get(piece)  # a word seen before, in another chunk
    if ids is not None:
        return ids
    ranks = self.mergeable_ranks
    parts = [piece[i:i + 1] for i in range(len(piece))]
    # pair_ranks[i] = rank of parts[i] + parts[i + 1]. After a merge only the two neighbours change, so
    # each step is one min() and one index() (both in C) plus two lookups, not a rescan of all pairs.
    pair_ranks = [ranks.get(a + b, NOT_A_TOKEN) for a, b in zip(parts, parts[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best == NOT_A_TOKEN:
            break
        i = pair_ranks.index(best)  # the leftmost of equal ranks, as in tiktoken
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], NOT_A_TOKEN)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], NOT_A_TOKEN)
    if len(self._pretoken_cache) >= CACHE_LIMIT:
        self._pretoken_cache.clear()
    self._pretoken_cache[piece] = ids = tuple(ranks[p] for p in parts)
    return ids


@tokenizer_method
def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
    ranks, ids = self.mergeable_ranks, []
    for piece in self._split.findall(chunk):
        piece = piece.encode("utf-8")
        token = ranks.get(piece)  # most pre-tokens (" the", ",") are a token: no merging to do
        if token is not None:
            ids.append(token)
        else:
            ids += self._merge_pretoken(piece)
    if len(self._cache) >= CACHE_LIMIT:
        self._cache.clear()
    self._cache[chunk] = result = tuple(ids)
    return result


# ----------------------------------------------------------------------------------------------------------
# 10. GPT-2's files
#
# OpenAI's GPT-2 tokenizer comes as two files (Hugging Face ships the same content as vocab.json and
# merges.txt):
#   encoder.json  {token string: id} for 50,257 tokens, <|endoftext|> = 50256
#   vocab.bpe     "#version: 0.2", then the 50,000 merges in order, one "left right" pair per line
# Tokens are bytes, but JSON holds text, so GPT-2 writes each byte as a printable stand-in character:
# the 188 printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves, and the other 68
# (control characters, space, DEL, ...) take chr(256), chr(257), ... in byte order. So the space 0x20
# is written "Ġ" (chr(288)) and " the" is "Ġthe". Note GPT-2's byte tokens have ids in this printable
# order ("!" = 0), not byte values; only the ranks matter to encoding, so that is fine.

@tokenizer_method
@staticmethod
def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> stand-in character table (see above)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


@tokenizer_method
@classmethod
def from_gpt2(cls, vocab_bpe: str | os.PathLike, encoder_json: str | os.PathLike) -> Tokenizer:
    """GPT-2's tokenizer from OpenAI's vocab.bpe and encoder.json (ids identical to tiktoken's "gpt2")."""
    vocab_bpe, encoder_json = Path(vocab_bpe), Path(encoder_json)
    for path in (vocab_bpe, encoder_json):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (GPT-2's vocab.bpe and encoder.json are needed)")
    to_byte = {c: b for b, c in cls.gpt2_byte_chars().items()}
    try:
        encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
        specials = {s: i for s, i in encoder.items() if s == "<|endoftext|>"}
        ranks = {bytes(to_byte[c] for c in s): i for s, i in encoder.items() if s not in specials}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
        raise ValueError(f"{encoder_json}: not GPT-2's encoder.json ({type(e).__name__}: {e})") from None
    # vocab.bpe must agree: merge k (counting from 0) makes the token with id 256 + k.
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    first = 1 if lines[0].startswith("#version") else 0  # "#version: 0.2"; some copies of merges.txt lack it
    merge_lines = lines[first:-1] if lines[-1] == "" else lines[first:]
    if len(merge_lines) != len(ranks) - 256:
        raise ValueError(f"{vocab_bpe}: {len(merge_lines)} merges, but encoder.json has {len(ranks) - 256} "
                         "merged tokens: the two files do not belong together")
    for k, line in enumerate(merge_lines):
        line_no = first + k + 1
        left, _, right = line.partition(" ")
        try:
            token = bytes(to_byte[c] for c in left + right)
        except KeyError:  # a character that is not one of GPT-2's 256 stand-ins
            token = None
        if not right or ranks.get(token) != 256 + k:
            raise ValueError(f"{vocab_bpe} line {line_no}: merge {line!r} does not match "
                             f"encoder.json id {256 + k}")
    return cls(ranks, GPT2_PATTERN, specials)


# ----------------------------------------------------------------------------------------------------------
# 11. tiktoken: the same ranks, pattern and specials make a tiktoken.Encoding with identical ids

@tokenizer_method
def to_tiktoken(self, name: str = "bpe") -> tiktoken.Encoding:
    """A tiktoken.Encoding with the same ranks, pattern and specials: identical ids, encoded in Rust."""
    import tiktoken
    return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=self.mergeable_ranks,
                             special_tokens=self.special_tokens)


@tokenizer_method
@classmethod
def from_tiktoken(cls, enc: tiktoken.Encoding) -> Tokenizer:
    """From a tiktoken.Encoding, e.g. tiktoken.get_encoding("gpt2") (downloads its files once)."""
    # tiktoken keeps these as private attributes; they are the Encoding's constructor arguments.
    return cls(enc._mergeable_ranks, enc._pat_str, enc._special_tokens)


# ----------------------------------------------------------------------------------------------------------
# 12. Batch encoding, with tiktoken's method names

@tokenizer_method
def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
    """encode_ordinary for many documents (one thread; the chunk cache is shared across them)."""
    return [self.encode_ordinary(text) for text in texts]


@tokenizer_method
def encode_batch(self, texts: list[str], allowed_special: set[str] | str = frozenset(),
                 disallowed_special: set[str] | str = "all") -> list[list[int]]:
    return [self.encode(text, allowed_special, disallowed_special) for text in texts]


# ----------------------------------------------------------------------------------------------------------
# 13. The chat template: a conversation as ids, and which of them a model learns to write
#
# Instruction tuning trains a pretrained model on conversations. Four special tokens, added after the
# tokenizer's own ids (<|endoftext|> keeps its id, so a pretrained model's rows all stay in place), mark who
# speaks and where a message ends. A conversation starts with <|endoftext|>, as every document does, then
# each message (system, user or assistant) is <|role|> content <|end|>:
#
#     ids:  <|endoftext|> <|user|> Hi ! <|end|> <|assistant|> Hello . <|end|>
#     mask:       0           0     0 0    0          0          1   1    1
#
# A message's content is encoded as ordinary text, so a user who types "<|end|>" gets the tokens of those
# seven characters, never the special id: nobody can close a message or speak as the assistant by typing.
# The mask is 1 exactly on each assistant message's content and its closing <|end|>: the model learns to
# answer and to stop, not to predict the user. prepare_fineweb.py --chat writes conversations this way and
# gpt.py --chat talks in it; this is the template's one definition.

CHAT_ROLES = ("system", "user", "assistant")
CHAT_END = "<|end|>"
CHAT_TOKENS = tuple(f"<|{role}|>" for role in CHAT_ROLES) + (CHAT_END,)


@tokenizer_method
def with_chat_tokens(self) -> Tokenizer:
    """The tokenizer plus CHAT_TOKENS, each new one given the next id after the largest so far; tokens
    it already has keep theirs, so a second call changes nothing."""
    specials = dict(self.special_tokens)
    for token in CHAT_TOKENS:
        if token not in specials:
            specials[token] = max([self.vocab_size - 1, *specials.values()]) + 1
    return Tokenizer(self.mergeable_ranks, self.pattern, specials)


@tokenizer_method
def render_message(self, role: str, content: str) -> tuple[list[int], list[int]]:
    """One message as ids, <|role|> content <|end|>, and its loss mask (1 on an assistant's content and
    <|end|>, else 0). ValueError for an unknown role, content that is not a string, or no chat tokens."""
    if role not in CHAT_ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"the {role} message's content is {type(content).__name__}, not a string")
    missing = [token for token in CHAT_TOKENS if token not in self.special_tokens]
    if missing:
        raise ValueError(f"the tokenizer has no {missing[0]} token: extend it with with_chat_tokens()")
    content_ids = self.encode_ordinary(content)  # ordinary: special-token text in content is plain text
    ids = [self.special_tokens[f"<|{role}|>"], *content_ids, self.special_tokens[CHAT_END]]
    learned = int(role == "assistant")
    return ids, [0] + [learned] * (len(content_ids) + 1)


@tokenizer_method
def render_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A conversation [{"role": ..., "content": ...}, ...] as ids, <|endoftext|> first, and its loss mask."""
    if self.eot_token is None:
        raise ValueError("the tokenizer has no <|endoftext|> token, which starts every conversation")
    ids, mask = [self.eot_token], [0]
    for message in messages:
        message_ids, message_mask = self.render_message(message["role"], message["content"])
        ids += message_ids
        mask += message_mask
    return ids, mask


@tokenizer_method
def parse_chat(self, ids: Iterable[int]) -> list[dict]:
    """render_chat's inverse: the messages in ids (<|endoftext|> ignored). A last message without its
    <|end|> (a reply cut short) is kept as it is; ValueError for text outside a message."""
    roles = {self.special_tokens.get(f"<|{role}|>"): role for role in CHAT_ROLES}
    end, specials = self.special_tokens.get(CHAT_END), set(self.special_tokens.values())
    messages, content = [], None  # content: the ids of the open message; None between messages
    for i in ids:
        if content is not None and i not in specials:
            content.append(i)
        elif content is not None and i == end:
            messages[-1]["content"], content = self.decode(content), None
        elif content is None and i in roles:
            messages.append({"role": roles[i], "content": ""})
            content = []
        elif not (content is None and i == self.eot_token):
            raise ValueError(f"id {i} ({self.decode([i])!r}) is not where a rendered chat has it")
    if content is not None:
        messages[-1]["content"] = self.decode(content)
    return messages


# ----------------------------------------------------------------------------------------------------------
# 14. Files: the one atomic write, and the one tokenizer loader (prepare_fineweb.py and gpt.py use both)

def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call write(temp_path) on a new file beside path, flush it to disk, then rename it over path.

    Readers see the old file or the new one, never half of one: a crash, a full disk or Ctrl-C mid-write
    leaves the old file intact and removes the temp file. The fsync before the rename makes the new name
    point at the whole content even after a power cut. The temp file is created with mode 0666 minus the
    umask, like any file the user creates, so others on a shared machine can read what they usually can."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tokenizer(spec: str | os.PathLike, flag: str = "--tokenizer") -> Tokenizer:
    """The tokenizer a command-line spec names: "gpt2" (tiktoken's, downloaded once), a folder holding
    GPT-2's files (vocab.bpe + encoder.json, or HF's merges.txt + vocab.json), or a file saved by
    Tokenizer.save. `flag` names the option in error messages."""
    if str(spec) == "gpt2":
        import tiktoken
        try:
            encoding = tiktoken.get_encoding("gpt2")  # downloads two files once, then uses tiktoken's cache
        except Exception as error:
            raise ValueError(f"cannot download GPT-2's tokenizer ({type(error).__name__}); give a folder "
                             f"holding vocab.bpe and encoder.json (or merges.txt and vocab.json): "
                             f"{flag}=FOLDER") from None
        return Tokenizer.from_tiktoken(encoding)
    path = Path(spec)
    if path.is_dir():
        for merges, vocab in (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json")):
            if (path / merges).is_file() and (path / vocab).is_file():
                return Tokenizer.from_gpt2(path / merges, path / vocab)
        raise FileNotFoundError(f"{flag}={spec}: the folder holds neither vocab.bpe + encoder.json "
                                "nor merges.txt + vocab.json")
    if path.is_file():
        return Tokenizer.load(path)
    raise FileNotFoundError(f"{flag}={spec}: no such file or folder (use gpt2, a folder with GPT-2's files, "
                            "or a saved tokenizer file)")


# ----------------------------------------------------------------------------------------------------------
# 15. Command line

class FlagParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump; exit 2, as argparse does
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def read_utf8(path: str | os.PathLike) -> str:
    """A file's text; a clear error names the file and the byte offset where it stops being UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start}: "
                         f"{data[e.start:e.start + 4]!r})") from None


def show_token(token: bytes) -> str:
    """A token for people: its text if it is whole UTF-8 characters, else its bytes (part of a character)."""
    try:
        return repr(token.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(token)


def train_command(paths: list[str], vocab_size: int, pattern: str, out: str) -> None:  # pattern: gpt4 or gpt2
    """Train on the files, save the tokenizer, and print what it reached and its bytes/token on them."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--input {path}: no such file")
    texts = (read_utf8(path) for path in paths)  # one file in memory at a time
    t0 = time.perf_counter()
    split_pattern = GPT4_PATTERN if pattern == "gpt4" else GPT2_PATTERN
    tok = Tokenizer.train(texts, vocab_size, split_pattern, verbose=True)
    seconds = time.perf_counter() - t0
    if tok.vocab_size < vocab_size:  # a small corpus: every pre-token became a single token first
        merges = tok.vocab_size - 256 - len(tok.special_tokens)
        print(f"note: vocab_size is {tok.vocab_size:,}, not {vocab_size:,}: the input allows only "
              f"{merges:,} merges (more text gives more)")
    tok.save(out)
    n_bytes = n_tokens = 0
    for path in paths:
        text = read_utf8(path)
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tok.encode(text, allowed_special="all"))
    print(f"trained vocab_size {tok.vocab_size:,} in {seconds:.2f} s; "
          f"{n_bytes / max(n_tokens, 1):.3f} bytes/token on the input; saved {out}")


def main(argv: list[str] | None = None) -> None:
    """Train or encode, as the flags say. Bad input ends with one `error: ...` line: exit 2 for a bad flag,
    1 for a failed run, 130 on Ctrl-C."""
    parser = FlagParser(description="Train a byte-level BPE tokenizer, or encode text with one.")
    parser.add_argument("--input", nargs="+", metavar="FILE[,FILE...]",
                        help="UTF-8 text files to train on: --input=a.txt,b.txt (or --input a.txt b.txt)")
    parser.add_argument("--vocab_size", type=int, default=8192, help="256 bytes + merges + special tokens")
    parser.add_argument("--pattern", choices=["gpt4", "gpt2"], default="gpt4", help="split regex")
    parser.add_argument("--out", default="tok.bpe", help="where to save the trained tokenizer")
    parser.add_argument("--tokenizer", metavar="FILE", help="a saved tokenizer, for --encode")
    parser.add_argument("--encode", metavar="TEXT", help="text to encode (special tokens allowed)")
    args = parser.parse_args(argv)
    # One way to name several files across the project (prepare_fineweb.py's): commas; spaces work too.
    paths = [part for arg in args.input or [] for part in arg.split(",") if part]
    if args.input is not None and not paths:
        parser.error("--input names no file: give --input=FILE[,FILE...]")
    try:
        if paths:
            train_command(paths, args.vocab_size, args.pattern, args.out)
        elif args.tokenizer and args.encode is not None:
            tok = Tokenizer.load(args.tokenizer)
            ids = tok.encode(args.encode, allowed_special="all")
            print(ids)
            print(" | ".join(show_token(tok.decode_bytes([i])) for i in ids))
        else:
            parser.error("give --input=FILE[,FILE...] to train, or --tokenizer=FILE --encode=TEXT to encode")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # nothing is saved before training ends, so there is nothing to clean up
        sys.exit(130)


if __name__ == "__main__":
    main()

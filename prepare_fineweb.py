"""Tokenize a text dataset into the token shards that gpt.py, llm.c and modded-nanogpt read.

    python prepare_fineweb.py                                        # FineWeb-edu sample-10BT, 100M tokens
    python prepare_fineweb.py --dataset=tinystories                  # TinyStories, with its own val split
    python prepare_fineweb.py --input=a.txt,b.jsonl --val_from=end   # your own files, offline
    python prepare_fineweb.py --input=input.txt --vocab_size=257 --val_from=end   # byte-level, last 10% val
    python prepare_fineweb.py --dataset=tinystories --tokenizer=gpt2 # GPT-2's tokenizer, not a new one
    python prepare_fineweb.py --chat --input=chats.jsonl --tokenizer=data/tinystories/tokenizer.bpe
                                       # conversations for instruction tuning: shards and loss masks
(The README's recipes are the tested end-to-end runs.)

What happens, in order:
  1. The documents are read as a stream (`datasets` in streaming mode, for hub datasets and local files
     alike): nothing is downloaded ahead, shards appear while the rest still streams in.
  2. A tokenizer is trained with bpe.py on the first --tokenizer_train_mb MB of training documents
     (vocab 8192, GPT-4 split pattern by default), or loaded (--tokenizer=gpt2, a folder, a saved file).
  3. Documents are encoded in order, each preceded by <|endoftext|>, and packed whole into shards of at
     most --shard_size tokens, until --max_tokens training tokens. With --min_chars / --max_chars /
     --dedup, documents of another length and exact repeats of an earlier document are dropped first.

Output, in data/<name>/ (name: fineweb, tinystories, or the first input file's stem):
  <name>_val_000000.bin, <name>_train_000001.bin, ...   shards, numbered in the order of their documents
  tokenizer.bpe                                          the tokenizer, in bpe.py's format (also for gpt2)
  meta.json                                              vocab size, <|endoftext|> id, and per shard and
                                                         split: tokens, documents, UTF-8 bytes (for gpt.py);
                                                         per split: the documents the filters dropped
Validation never overlaps training: it is the dataset's own validation split where there is one, else the
first --val_size documents (a count, or a fraction of all documents), or the last ones with --val_from=end.
A stopped run resumes where it stopped when rerun, byte for byte; --overwrite starts over (and deletes
only files this program wrote). Exit status: 0 done, 1 failed (one line on stderr), 2 bad flag, 130 stopped
by Ctrl-C or SIGTERM.

Map. Part I, the lesson: the shard format; the pipeline (keep or drop each document, encode in order,
pack whole documents, write shards). Part II, the workshop: document sources; the document filter's
memory and counts; the tokenizer; encoding workers; chat conversations (--chat); the resume ledger
(meta.json, settings, clean-up); progress; flags; main.
"""
from __future__ import annotations

import argparse
import bisect
import codecs
import errno
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import signal
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import tiktoken

from bpe import CHAT_ROLES, CHAT_TOKENS, GPT2_PATTERN, GPT4_PATTERN, Tokenizer, load_tokenizer, \
    write_atomically

EOT = "<|endoftext|>"  # separates documents in .txt inputs and precedes every document in the shards

# ----------------------------------------------------------------------------------------------------------
# The shard format: llm.c's (dev/data/data_common.py), so llm.c and modded-nanogpt read these files as is.
# This is its one definition; gpt.py's reader keeps its own constants, pinned equal to these by a test.
#
#   bytes 0..1023   header: 256 little-endian int32 = [20240520 (magic), 1 (version), N (token count), 0, ...]
#   bytes 1024..    N little-endian uint16 token ids
#
# so a complete shard is exactly 1024 + 2 * N bytes. Reading one back:
#
#   header = np.fromfile(path, dtype="<i4", count=256);  tokens = np.fromfile(path, dtype="<u2", offset=1024)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
SHARD_FORMAT = (f"llm.c shards: {HEADER_INTS} int32 header [{SHARD_MAGIC}, {SHARD_VERSION}, token count, "
                "0...], then uint16 tokens")  # what meta.json says about its shards


def shard_header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    return header.tobytes()


def shard_file_size(n_tokens: int) -> int:
    """The size of a complete shard: anything else is a shard cut short."""
    return HEADER_BYTES + 2 * n_tokens


# ----------------------------------------------------------------------------------------------------------
# The pipeline: keep or drop each document, encode the kept ones in order, pack them whole into shards

def encode_documents(texts: list[str]) -> tuple[np.ndarray, list[int], list[int]]:
    """[doc, ...] -> (uint16 tokens, <|endoftext|> before each doc; tokens per doc; UTF-8 bytes per doc).
    It runs in the worker processes, with the tokenizer they were given (Part II, start_worker)."""
    eot = worker_encoding.eot_token
    flat, token_counts = [], []
    for text in texts:
        ids = worker_encoding.encode_ordinary(text)  # ordinary: "<|endoftext|>" inside a text is just text
        flat.append(eot)
        flat.extend(ids)
        token_counts.append(len(ids) + 1)
    byte_counts = [len(text.encode("utf-8")) for text in texts]
    return np.array(flat, dtype="<u2"), token_counts, byte_counts


class Shard:
    """One shard on its way to disk: written under a .tmp name, so that a file with the shard's own name
    is always complete. The ledger renames it when it is complete (Part II, Ledger.complete)."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = path, split
        self.tmp_path = path.with_name(path.name + ".tmp")
        self.tokens = self.documents = self.bytes = self.max_token_id = 0
        self.file = open(self.tmp_path, "wb")
        self.file.write(shard_header(0))  # the real count goes in when the shard is complete

    def add(self, tokens: np.ndarray, n_bytes: int) -> None:
        """Append one document's tokens (<|endoftext|> first); n_bytes: its length in UTF-8."""
        self.file.write(tokens.tobytes())
        self.tokens += len(tokens)
        self.documents += 1
        self.bytes += n_bytes
        self.max_token_id = max(self.max_token_id, int(tokens.max()))  # meta.json records it

    def close(self) -> None:
        """Write the header with the token count, then flush to disk: the .tmp file is complete."""
        self.file.seek(0)
        self.file.write(shard_header(self.tokens))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def kept_documents(documents: Iterable[str], doc_filter: DocumentFilter) -> Iterator[str]:
    """The documents worth training on, in order. Is this document one we keep? Its length in characters
    must be within --min_chars..--max_chars (0: no limit), and with --dedup no earlier document may have
    had exactly its text. The filter holds what the question needs from one document to the next: a hash
    of every text kept so far, and the count of each kind of drop (Part II, DocumentFilter)."""
    for text in documents:
        if len(text) < doc_filter.min_chars:
            doc_filter.drop("too_short")
        elif doc_filter.max_chars and len(text) > doc_filter.max_chars:
            doc_filter.drop("too_long")
        elif doc_filter.is_duplicate(text):  # with --dedup; a new text is remembered here
            doc_filter.drop("duplicates")
        else:
            doc_filter.keep()
            yield text


def write_split(split: str, documents: Iterable[str], budget: int | None, shard_size: int,
                encoder: EncodingPool, ledger: Ledger, progress: Progress) -> None:
    """Encode one split's documents (those kept_documents lets through) and pack them whole into shards
    of at most shard_size tokens. With a budget, stop at the first document boundary at or past `budget`
    tokens of this split. The encoder's workers encode chunks of documents in parallel, and the chunks
    come back in order (Part II, EncodingPool); the ledger is meta.json (Part II, Ledger)."""
    split_tokens = ledger.meta["splits"][split]["tokens"]  # in complete shards: above 0 when resuming
    shard = None
    for tokens, token_counts, byte_counts in encoder.encode_in_order(documents):
        start = taken = 0  # tokens[start:start + n_tokens] is the next document
        for n_tokens, n_bytes in zip(token_counts, byte_counts):
            # Has this split reached its budget?
            if budget is not None and split_tokens >= budget:
                break
            # Does the next document still fit in the current shard? If not, that shard is complete.
            if shard is not None and shard.tokens + n_tokens > shard_size:
                ledger.complete(shard)  # rename it and list it in meta.json (Part II, Ledger)
                shard = None
            # Is there a shard to write to? Every shard starts at a document boundary, and a document
            # longer than shard_size gets a shard of its own.
            if shard is None:
                shard = ledger.new_shard(split)
            shard.add(tokens[start:start + n_tokens], n_bytes)
            start += n_tokens
            split_tokens += n_tokens
            taken += 1
        progress.update(taken, start, len(ledger.meta["shards"]))  # Part II, Progress
        if budget is not None and split_tokens >= budget:
            break
    if shard is not None:
        ledger.complete(shard)
    progress.update(0, 0, len(ledger.meta["shards"]), force=True)


# ===== Part II: the workshop (sources, filter, tokenizer, encoding workers, resume ledger, flags, main) ==

# ----------------------------------------------------------------------------------------------------------
# Document sources
#
# Everything is read with `datasets` in streaming mode: hub datasets arrive file by file over HTTP, local
# files are read in 10 MB chunks, and either way a document is a string. Empty documents are skipped.

# --dataset shortcuts: (hub id, config). Any other hub id with a text column works as is.
HUB_DATASETS = {
    "fineweb": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "tinystories": ("roneneldan/TinyStories", None),
}
HUB_VAL_DOCUMENTS = 10_000  # validation documents of a hub stream without a validation split (~10M tokens)
LOCAL_VAL_FRACTION = 0.1    # default for local files, as nanoGPT's 90/10 split


@dataclass
class Source:
    """Where documents come from: a hub dataset (hub_id) or local files."""
    name: str
    hub_id: str | None
    hub_config: str | None
    files: list[Path]
    text_column: str
    chat: bool = False  # --chat: .jsonl conversations, one per line (see "Chat conversations")

    def describe(self) -> str:
        if self.hub_id:
            return self.hub_id + (f" ({self.hub_config})" if self.hub_config else "")
        return ",".join(str(path) for path in self.files)


LOCAL_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def open_source(args: argparse.Namespace) -> Source:
    """The source named by the flags; local files are checked here (exist, not empty, UTF-8 .txt)."""
    if not args.input:
        hub_id, config = HUB_DATASETS.get(args.dataset or "fineweb", (args.dataset, None))
        name = args.name or (args.dataset or "fineweb").split("/")[-1].lower()
        return Source(name, hub_id, args.config or config, [], args.text_column)
    files = [Path(part) for part in args.input.split(",") if part]
    for path in files:
        if args.chat and path.suffix.lower() != ".jsonl":
            raise ValueError(f"--input {path}: --chat reads .jsonl files, one conversation per line")
        if path.suffix.lower() not in LOCAL_LOADERS:
            raise ValueError(f"--input {path}: unsupported file type {path.suffix!r} "
                             "(use .txt, .jsonl, .json, .parquet)")
        if not path.is_file():
            raise FileNotFoundError(f"--input {path}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"--input {path}: the file is empty")
        if path.suffix.lower() == ".txt":
            check_utf8(path)
    for i, path in enumerate(files):  # the same documents twice would be in the shards twice
        for earlier in files[:i]:
            if path.samefile(earlier):
                raise ValueError(f"--input {path}: given twice (also as {earlier}); give each file once")
    return Source(args.name or files[0].stem, None, None, files, args.text_column, args.chat)


def check_utf8(path: Path, block_size: int = 1 << 20) -> None:
    """Fail early, naming the byte, rather than after hours of encoding (a read is cheap next to encoding)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(block_size):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                bad = offset + error.start
                raise ValueError(f"--input {path}: not UTF-8 text (byte offset {bad}); convert it first, "
                                 "e.g. iconv -f latin1 -t utf-8") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"--input {path}: not UTF-8 text (it ends inside a character)") from None


def has_eot_lines(path: Path, block_size: int = 1 << 20) -> bool:
    """Whether a .txt file separates its documents with <|endoftext|> (else blank lines do)."""
    marker = EOT.encode()
    tail = b""  # the end of the previous block, so a marker cut in two is still found
    with open(path, "rb") as f:
        while block := f.read(block_size):
            if marker in tail + block:
                return True
            tail = block[-len(marker):]
    return False


def check_column(dataset, column: str, where: str) -> None:
    if dataset.column_names is not None and column not in dataset.column_names:
        raise ValueError(f"{where} has no {column!r} column (it has: {', '.join(dataset.column_names)}); "
                         "pick one with --text_column")


def column_texts(dataset, column: str, where: str) -> Iterator[str]:
    """The strings of one column of a streaming dataset, fetched as Arrow batches (not row by row: far
    fewer Python objects). A value that is not a string is an error. (datasets gives a column of mixed
    JSON values as JSON text: read as is, a number or a list among the texts would put JSON quotes into
    the shards.)"""
    import pyarrow as pa
    row = 0
    for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=1024):
        values = table.column(column)
        texts = values.to_pylist()
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            if getattr(values.type, "extension_name", None) == "arrow.json":
                texts = [None if text is None else json.loads(text) for text in texts]
            check_all_strings(texts, row, column, where)
        yield from texts
        row += len(texts)


class NotAString(ValueError):
    pass


def check_all_strings(values: list, first_row: int, column: str, where: str) -> None:
    """Raise for the first value that is neither a string nor missing, naming its row (from 1)."""
    for row, value in enumerate(values, start=first_row + 1):
        if value is not None and not isinstance(value, str):
            kind = {bool: "true/false", int: "a number", float: "a number", list: "a list",
                    dict: "an object"}.get(type(value), type(value).__name__)
            raise NotAString(f"{where}: row {row} of column {column!r} is {kind}, not a string; "
                             "give each document as a JSON string")


def read_text_file(path: Path) -> Iterator[str]:
    """A .txt file's documents: the text between <|endoftext|> lines if it has any, else between blank
    lines. Line breaks around a document are dropped; the text inside is kept exactly."""
    import datasets  # here, not at the top: it is slow to import, and the workers never need it
    if has_eot_lines(path):
        # One row per line (keeping its "\n"), regrouped here at the marker lines.
        lines = datasets.load_dataset("text", data_files=str(path), split="train", streaming=True,
                                      keep_linebreaks=True)
        document = []
        for line in column_texts(lines, "text", f"--input {path}"):
            if line.strip() == EOT:
                yield "".join(document).strip("\n")
                document = []
            else:
                document.append(line)
        yield "".join(document).strip("\n")
    else:
        # datasets' "paragraph" rows are text.split("\n\n"): a run of 3 newlines leaves one on the next row.
        paragraphs = datasets.load_dataset("text", data_files=str(path), split="train", streaming=True,
                                           sample_by="paragraph")
        for paragraph in column_texts(paragraphs, "text", f"--input {path}"):
            yield paragraph.strip("\n")


def read_file(path: Path, column: str) -> Iterator[str]:
    """One local file's documents, in file order."""
    import datasets
    loader = LOCAL_LOADERS[path.suffix.lower()]
    if loader == "text":
        documents = read_text_file(path)
    else:
        dataset = datasets.load_dataset(loader, data_files=str(path), split="train", streaming=True)
        check_column(dataset, column, f"--input {path}")
        documents = column_texts(dataset, column, f"--input {path}")
    try:
        yield from documents
    except NotAString:
        raise
    except (ValueError, OSError) as error:  # also UnicodeDecodeError and pyarrow's errors (subclasses)
        first_line = str(error).strip().split("\n")[0]
        raise ValueError(f"--input {path}: cannot read it as {loader} "
                         f"({type(error).__name__}: {first_line})") from None


def read_hub(source: Source, split: str) -> Iterator[str]:
    """One split of a hub dataset, streamed over HTTP."""
    import datasets
    try:
        dataset = datasets.load_dataset(source.hub_id, source.hub_config, split=split, streaming=True)
    except Exception as error:  # the hub raises many types (ConnectionError, HfHubHTTPError, ...)
        raise hub_error(source, error) from None
    check_column(dataset, source.text_column, source.describe())
    yield from column_texts(dataset, source.text_column, source.describe())


def hub_error(source: Source, error: Exception) -> ValueError:
    first_line = str(error).strip().split("\n")[0]
    return ValueError(f"cannot open {source.describe()} on the Hugging Face hub ({type(error).__name__}: "
                      f"{first_line}); check the name and your connection, or use local files: --input=FILE")


def hub_split_names(source: Source) -> list[str]:
    import datasets
    try:
        return datasets.get_dataset_split_names(source.hub_id, source.hub_config)
    except Exception as error:
        raise hub_error(source, error) from None


def read_documents(source: Source, split: str = "train") -> Iterator[str]:
    """All non-empty documents of the source in order (split: a hub split name)."""
    if source.hub_id:
        documents = read_hub(source, split)
    elif source.chat:  # each conversation as the JSON of its messages: see "Chat conversations"
        documents = (text for path in source.files for text in read_conversations(path))
    else:
        documents = (text for path in source.files for text in read_file(path, source.text_column))
    return (text for text in documents if text)


def count_documents(source: Source) -> int:
    return sum(1 for _ in read_documents(source))


def validation_range(source: Source, val_size: float | None, val_from: str) -> range | None:
    """Indices (in source order) of the validation documents; None where the dataset has its own split."""
    if source.hub_id:
        if "validation" in hub_split_names(source):
            if val_size:
                print(f"note: --val_size is not used: {source.describe()} has its own validation split",
                      file=sys.stderr)
            return None
        val_size = val_size or HUB_VAL_DOCUMENTS
        if val_from == "end" or val_size < 1:
            raise ValueError(f"{source.describe()} has no validation split and a stream cannot be counted "
                             "ahead: use a document count from the start (--val_size=5000) or local files "
                             "(--input)")
        return range(int(val_size))
    total = count_documents(source)
    val_size = val_size or LOCAL_VAL_FRACTION
    n_val = round(val_size * total) if val_size < 1 else int(val_size)
    if total == 0:
        raise ValueError(f"--input {source.describe()}: no documents (the files hold only blank lines)")
    if not 1 <= n_val < total:
        raise ValueError(f"--val_size={val_size:g} gives {n_val} validation documents of {total}: "
                         "both splits need at least one")
    return range(n_val) if val_from == "start" else range(total - n_val, total)


def split_documents(source: Source, split: str, val_range: range | None) -> Iterator[str]:
    """The documents of "train" or "val", in source order; the two never share a document."""
    if val_range is None:
        return read_documents(source, "validation" if split == "val" else "train")
    documents = read_documents(source)
    if split == "val":
        return islice(documents, val_range.start, val_range.stop)
    if val_range.start == 0:  # validation came first: training is everything after it
        return islice(documents, val_range.stop, None)
    return islice(documents, val_range.start)  # validation is the end: training is everything before it


# ----------------------------------------------------------------------------------------------------------
# The document filter: what kept_documents (Part I) needs from one document to the next
#
# One filter serves both splits, in the order they are written, so a text is kept only where it first
# appears: validation first (the start of the source, or the dataset's own validation split), training
# first when validation is the end of the source. Either way no text is in both splits. The validation
# documents are chosen before filtering, by their place in the source (so --val_size and --val_from pick the
# same places whatever the filters); the filters then drop within each split, and a split they leave empty
# is an error. With --dedup, a split that another follows is read to its end even where --max_tokens stops
# its shards early: all its texts are then in the seen-set, and what the next split keeps depends neither on
# --max_tokens nor on how far the encoding workers had read ahead.

DROP_REASONS = ("duplicates", "too_short", "too_long")  # meta.json's names for the dropped documents


class DocumentFilter:
    """--min_chars, --max_chars and --dedup: the seen-set, and per split the drops and where they fell."""

    def __init__(self, min_chars: int = 0, max_chars: int = 0, dedup: bool = False):
        self.min_chars, self.max_chars = min_chars, max_chars
        # 16 bytes of BLAKE2b per kept text (a collision among 10^9 texts has odds of about 10^-21); as bytes
        # objects in a set that is about 83 MB per million documents kept.
        self.seen: set[bytes] | None = set() if dedup else None
        self.start_split()

    def reasons(self) -> list[str]:
        """The kinds of drop these flags can make."""
        return [reason for reason, on in zip(DROP_REASONS, (self.seen is not None, self.min_chars,
                                                            self.max_chars)) if on]

    def start_split(self) -> None:
        """Counts start again for each split; the seen-set carries on."""
        self.kept = 0
        # Per reason, the number of documents kept before each drop (8 bytes a drop). The numbers never
        # decrease, so a bisection finds the drops that came before the n-th kept document.
        self.drops = {reason: array("q") for reason in DROP_REASONS}

    def is_duplicate(self, text: str) -> bool:
        """Whether an earlier kept document had this exact text (always False without --dedup). A new text
        is remembered."""
        if self.seen is None:
            return False
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self.seen:
            return True
        self.seen.add(digest)
        return False

    def keep(self) -> None:
        self.kept += 1

    def drop(self, reason: str) -> None:
        self.drops[reason].append(self.kept)

    def dropped(self, documents_written: int | None = None) -> dict[str, int]:
        """This split's drops by reason: all of them (the split was read to its end), or, for a split that
        stopped at its token budget, those before the last of its `documents_written` documents: the
        encoding workers read further ahead than the shards reached, and the same run resumed would not."""
        if documents_written is None:
            return {reason: len(drops) for reason, drops in self.drops.items()}
        return {reason: bisect.bisect_left(drops, documents_written) for reason, drops in self.drops.items()}


def describe_drops(dropped: dict[str, int], reasons: list[str]) -> str:
    """{"duplicates": 12, ...} -> "duplicates 12, too short 3" (the reasons named)."""
    return ", ".join(f"{reason.replace('_', ' ')} {dropped[reason]:,}" for reason in reasons)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: train one with bpe.py, or load GPT-2's or a saved one (bpe.load_tokenizer)

PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}


def first_megabytes(texts: Iterable[str], megabytes: float) -> Iterator[str]:
    """The leading documents up to about `megabytes` MB of UTF-8 (the last one may cross the limit)."""
    budget = megabytes * 1e6
    for text in texts:
        yield text
        budget -= len(text.encode("utf-8"))
        if budget <= 0:
            return


def train_tokenizer(documents: Iterable[str], args: argparse.Namespace) -> Tokenizer:
    texts = list(first_megabytes(documents, args.tokenizer_train_mb))  # 100 MB of str is fine in memory
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    print(f"training a {args.vocab_size:,}-token tokenizer ({args.pattern} split) on {n_bytes / 1e6:.1f} MB "
          f"({len(texts):,} training documents) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    tokenizer = Tokenizer.train(texts, vocab_size=args.vocab_size, pattern=PATTERNS[args.pattern])
    print(f"trained in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if tokenizer.vocab_size < args.vocab_size:  # every pre-token became one token before the last merge
        print(f"note: the training text allows only {tokenizer.vocab_size - 257:,} merges: the vocabulary "
              f"has {tokenizer.vocab_size:,} tokens, not --vocab_size={args.vocab_size}", file=sys.stderr)
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer) -> None:
    if tokenizer.eot_token is None:
        raise ValueError(f"the tokenizer has no {EOT} token, which the shards put before every document")
    if tokenizer.vocab_size > 65_536:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} tokens: shards store ids as uint16 "
                         "(at most 65,536 tokens)")


# ----------------------------------------------------------------------------------------------------------
# Encoding workers
#
# The workers encode with the tokenizer's to_tiktoken() twin: the same ids as bpe.py's encoder, computed in
# Rust. bpe.py's own encoder is faster only on text it has already seen (its chunk cache), and a stream is
# mostly new text. Each worker gets the Encoding once (pickled by the pool's initializer), then chunks of
# about 1 MB of documents. The pool uses "spawn" on every OS: it is the only method on Windows and the
# default on macOS, so what the tests run here is what those users run.

worker_encoding: tiktoken.Encoding | Tokenizer | None = None  # set in each worker by start_worker


def start_worker(encoding: tiktoken.Encoding | Tokenizer, main_pid: int, stop: threading.Event) -> None:
    """Each worker's setup. Signals are the main process's to handle: Ctrl-C, or SIGTERM sent to the
    whole process group (`timeout`, a scheduler), must not kill a worker part way, since a worker that
    dies holding the pool's queue lock leaves the pool unable to stop. A worker exits when the main
    process has set `stop` (its pool.terminate() then sends SIGTERM), or on its own when the main process
    has died (kill -9): nothing else would end it."""
    global worker_encoding
    worker_encoding = encoding
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if stop.is_set() else None)
    threading.Thread(target=exit_with_parent, args=(main_pid,), daemon=True).start()


def exit_with_parent(main_pid: int) -> None:
    while os.getppid() == main_pid:
        time.sleep(0.2)
    os._exit(0)


def chunks_of(texts: Iterable[str], chunk_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Group documents into lists of about chunk_chars characters: big enough that the cost of sending a
    chunk to a worker is noise, small enough that several are in flight."""
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class EncodingPool:
    """A "spawn" pool of encoding workers that stops within seconds, whoever sends the signal."""

    def __init__(self, tokenizer: Tokenizer, workers: int, chat: bool = False):
        self.workers = workers
        # --chat: conversations go through the chat template, which is bpe.py's (see "Chat conversations")
        self.encode = encode_conversations if chat else encode_documents
        context = multiprocessing.get_context("spawn")
        self.stop_event = context.Event()
        self.others = set(multiprocessing.active_children())  # children that are not ours to stop
        setup = (tokenizer if chat else tokenizer.to_tiktoken(), os.getpid(), self.stop_event)
        self.pool = context.Pool(workers, start_worker, setup)
        self.processes = [p for p in multiprocessing.active_children() if p not in self.others]

    def encode_in_order(self, texts: Iterable[str]) -> Iterator[tuple[np.ndarray, list[int], list[int]]]:
        """pool.imap(encode_documents, chunks) with at most 2 chunks per worker in flight. (imap itself reads
        its whole input ahead on a thread: on a 10B-token stream, the whole dataset into memory.)"""
        in_flight = deque()
        for chunk in chunks_of(texts):
            in_flight.append(self.pool.apply_async(self.encode, (chunk,)))
            if len(in_flight) >= 2 * self.workers:
                yield self.result(in_flight.popleft())
        while in_flight:
            yield self.result(in_flight.popleft())

    def result(self, pending):
        """pending.get(), but an error instead of waiting forever for the chunk of a worker that was
        killed (the pool replaces the worker, not its chunk)."""
        while True:
            try:
                return pending.get(timeout=1)
            except multiprocessing.TimeoutError:
                dead = [p for p in self.processes if p.exitcode is not None]
                if dead:
                    raise WorkerDied(f"an encoding worker stopped (exit code {dead[0].exitcode}; killed, "
                                     "perhaps for lack of memory?); rerun the same command to continue")

    def close(self, timeout: float = 10) -> None:
        """pool.terminate(), which lets each worker finish its chunk; a worker killed from outside can leave
        the pool's lock taken forever, so after `timeout` seconds the workers are killed instead."""
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        stopper = threading.Thread(target=self.pool.terminate, daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            for process in multiprocessing.active_children():
                if process not in self.others:  # the workers, and any the pool started to replace one
                    process.kill()
                    process.join()


class WorkerDied(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Chat conversations (--chat): shards of conversations, and a loss mask beside each
#
# Each line of a .jsonl input is one conversation, {"messages": [{"role": ..., "content": ...}, ...]}, or
# {"prompt": ..., "response": ...} for one user turn and its answer. The main process checks every line as
# it reads it (a bad one stops the run naming its file and line) and hands the messages on as JSON text,
# one "document" per conversation, so the filters and the pipeline of Part I run unchanged. The workers
# render them with bpe.py's chat template (its one definition, so they get the bpe.py Tokenizer rather than
# its tiktoken twin): ids and the loss mask, as (token, mask) rows that a ChatShard writes to two files,
# the shard and beside it its mask (<shard>.mask: the same format, uint16 1 where the token is a learned
# target, 0 elsewhere; not .bin, so tools that glob *_train_*.bin never read a mask as tokens). meta.json
# lists the masks of each split under "masks", parallel to "shards".

CHAT_FORMAT = "<shard>.mask beside each shard: the same format, uint16 1 where the token is learned, else 0"


def read_conversations(path: Path) -> Iterator[str]:
    """A .jsonl file's conversations, in order, each as the JSON text of its messages; blank lines skipped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    yield json.dumps(conversation_messages(json.loads(line)), ensure_ascii=False)
            except json.JSONDecodeError as error:
                raise ValueError(f"--input {path} line {line_no}: not valid JSON ({error.msg} at column "
                                 f"{error.colno}); give one JSON object per line") from None
            except UnicodeDecodeError as error:
                raise ValueError(f"--input {path} line {line_no}: not UTF-8 (byte {error.start} of the "
                                 "line); convert the file to UTF-8") from None
            except ValueError as error:
                raise ValueError(f"--input {path} line {line_no}: {error}") from None


def conversation_messages(record: object) -> list[dict]:
    """One line's conversation as [{"role", "content"}, ...]; a ValueError says what is wrong with it."""
    usage = 'give {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "response": ...}'
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise ValueError(f"no \"messages\" (nor \"prompt\" and \"response\"): {usage}")
    if messages == []:
        raise ValueError("\"messages\" is empty: give at least a user message and the assistant's answer")
    if not isinstance(messages, list):
        raise ValueError(f"\"messages\" is {json.dumps(messages)[:30]}, not a list of messages: {usage}")
    for k, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {k} is {json.dumps(message)[:30]}, not an object: {usage}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"message {k} has the role {json.dumps(role)[:30]}: use one of "
                             f"{', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {k}'s content is {json.dumps(content)[:30]}, not a string; give its "
                             "text as a JSON string")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message: training learns only the assistant's answers; add one")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def encode_conversations(texts: list[str]) -> tuple[np.ndarray, list[int], list[int]]:
    """encode_documents for --chat, in the workers: each conversation rendered with the chat template, as
    (N, 2) uint16 rows of (token id, mask); per conversation its tokens and the UTF-8 bytes of its text."""
    rows, token_counts, byte_counts = [], [], []
    for text in texts:
        messages = json.loads(text)
        ids, mask = worker_encoding.render_chat(messages)  # a bpe.py Tokenizer here (EncodingPool)
        rows.append(np.array([ids, mask], dtype="<u2").T)
        token_counts.append(len(ids))
        byte_counts.append(sum(len(message["content"].encode("utf-8")) for message in messages))
    return np.concatenate(rows), token_counts, byte_counts


class ChatShard(Shard):
    """A shard of conversations: the tokens as Shard writes them, and the mask beside them, in its own
    Shard (same format, same .tmp-then-rename life)."""

    def __init__(self, path: Path, split: str):
        super().__init__(path, split)
        self.mask = Shard(path.with_suffix(".mask"), split)

    def add(self, rows: np.ndarray, n_bytes: int) -> None:
        """rows: (n, 2) of one conversation, token ids then mask values."""
        super().add(np.ascontiguousarray(rows[:, 0]), n_bytes)
        self.mask.add(np.ascontiguousarray(rows[:, 1]), 0)

    def close(self) -> None:
        super().close()
        self.mask.close()


def shard_files(shard: Shard) -> list[Shard]:
    """The files a shard writes: a chat shard's mask, then the shard itself."""
    return [shard.mask, shard] if isinstance(shard, ChatShard) else [shard]


def listed_masks(meta: dict) -> dict[str, str]:
    """{mask file: its shard} for the masks meta.json lists (none without --chat)."""
    return {mask: shard for totals in meta["splits"].values()
            for shard, mask in zip(totals["shards"], totals.get("masks", []))}


def add_chat_meta(meta: dict) -> None:
    """What meta.json says about chat data: the template's tokens (in the tokenizer), what a mask is, and
    each split's list of masks (filled as its shards are)."""
    meta["chat"] = {"tokens": list(CHAT_TOKENS), "masks": CHAT_FORMAT}
    for totals in meta["splits"].values():
        totals["masks"] = []


# ----------------------------------------------------------------------------------------------------------
# The resume ledger: meta.json
#
# meta.json lists the complete shards (name -> split, tokens, documents, bytes, max_token_id), sums them
# per split, and turns "complete" true at the end. It is rewritten after every shard, so a killed run
# leaves exactly the shards it lists, plus at most a .tmp file that the rerun deletes. A rerun with the
# same settings skips the documents of the listed shards: documents come in a fixed order, so the shards
# are byte-identical to those of an uninterrupted run.

class Ledger:
    """meta.json of one output folder, and the shards it lists."""

    def __init__(self, out_dir: Path, name: str, meta: dict):
        self.out_dir, self.name, self.meta = out_dir, name, meta
        self.open_shard: Shard | None = None  # the shard being written, removed if the run stops

    def new_shard(self, split: str) -> Shard:
        """The next shard, numbered in source order across both splits."""
        path = self.out_dir / f"{self.name}_{split}_{len(self.meta['shards']):06d}.bin"
        kind = ChatShard if "chat" in self.meta else Shard  # --chat: a loss mask beside the tokens
        # A Ctrl-C between creating the .tmp file and noting it here would leave the file behind.
        with interrupts_deferred(), naming_errors(path):
            self.open_shard = kind(path, split)
        return self.open_shard

    def complete(self, shard: Shard) -> None:
        """Flush the shard to disk, give it its name, and list it in meta.json."""
        with naming_errors(shard.path):
            shard.close()
        # The rename and meta.json's new entry belong together: a shard on disk that meta.json does not list
        # would look complete but be unknown to a resume. So a Ctrl-C here waits until both are done.
        with interrupts_deferred():
            for part in shard_files(shard):  # a chat shard's mask first: a named shard always has its mask
                os.replace(part.tmp_path, part.path)
            self.open_shard = None
            self.meta["shards"][shard.path.name] = {"split": shard.split, "tokens": shard.tokens,
                                                    "documents": shard.documents, "bytes": shard.bytes,
                                                    "max_token_id": shard.max_token_id}
            totals = self.meta["splits"][shard.split]
            totals["shards"].append(shard.path.name)
            totals["tokens"] += shard.tokens
            totals["documents"] += shard.documents
            totals["bytes"] += shard.bytes
            if isinstance(shard, ChatShard):
                totals["masks"].append(shard.mask.path.name)
            write_json(self.out_dir / "meta.json", self.meta)

    def discard_open_shard(self) -> None:
        """Remove the incomplete shard of a stopped or failed run: no .tmp file outlives the run."""
        shard, self.open_shard = self.open_shard, None
        for part in shard_files(shard) if shard is not None else []:
            try:
                part.file.close()
            except OSError:  # the buffered tail cannot be written either (a full disk): it is dropped anyway
                pass
            part.tmp_path.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    with naming_errors(path):
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n",
                                                          encoding="utf-8"))


@contextmanager
def naming_errors(path: Path):
    """An OSError inside names `path` (an error while writing a temp file names the temp file, or nothing)."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None


@contextmanager
def interrupts_deferred(then_raise: bool = True):
    """Hold back Ctrl-C and SIGTERM inside the block; one that arrived is raised when the block ends
    (unless then_raise is false: the run is stopping anyway)."""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and then_raise:
        raise KeyboardInterrupt


# Settings added after shards were first written, with the value the older runs had (None: unknown, so an
# older meta.json without it is not a change; the filters were off).
SETTINGS_ADDED_LATER = {"input_mtime_ns": None, "dedup": False, "min_chars": 0, "max_chars": 0,
                        "chat": False}


def run_settings(args: argparse.Namespace, source: Source, tokenizer: Tokenizer | None) -> dict:
    """Everything that decides the shards' content: a rerun with other settings must not mix with these.
    An input file counts as unchanged while its size and modification time (in ns) are: an edit that keeps
    the size still changes the time, and both cost nothing to read, where a hash of a large input would
    cost a full read on every run. A file touched without a change is taken as changed: the safe side."""
    settings = {"source": source.describe(), "text_column": source.text_column, "val_size": args.val_size,
                "val_from": args.val_from, "max_tokens": args.max_tokens, "shard_size": args.shard_size,
                "tokenizer": args.tokenizer, "dedup": args.dedup, "min_chars": args.min_chars,
                "max_chars": args.max_chars, "chat": args.chat}
    if source.files:
        settings["input_bytes"] = [path.stat().st_size for path in source.files]
        settings["input_mtime_ns"] = [path.stat().st_mtime_ns for path in source.files]
    if tokenizer is None:  # trained here: its recipe
        settings.update(vocab_size=args.vocab_size, pattern=args.pattern,
                        tokenizer_train_mb=args.tokenizer_train_mb)
    else:
        settings["tokenizer_sha256"] = hashlib.sha256(tokenizer.dumps().encode("utf-8")).hexdigest()
    return settings


# What this program may delete: only files it can show it wrote. Shards and their .tmp files carry the run's
# name (<name>_<split>_NNNNNN.bin), meta.json lists the shards of the run that wrote it, and write_atomically
# leaves .<name>.<pid>.<hex>.tmp when it is killed. Anything else in the folder belongs to someone else.
ATOMIC_TEMP = re.compile(r"\.(meta\.json|tokenizer\.bpe)\.(\d+)\.[0-9a-f]{8}\.tmp")


def is_shard_name(file_name: str, name: str) -> bool:
    """A shard of the run `name`, or its loss mask (--chat), or the .tmp file of either."""
    return re.fullmatch(rf"{re.escape(name)}_(train|val)_\d{{6}}\.(bin|mask)(\.tmp)?", file_name) is not None


def listed_files(meta: dict) -> set[str]:
    """The files meta.json lists: its shards, and with --chat their loss masks."""
    return set(meta["shards"]) | set(listed_masks(meta))


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def leftovers(out_dir: Path, name: str, meta: dict | None) -> list[Path]:
    """Files of this program that no complete run needs: shards meta.json does not list (or all of them
    when meta is None), their .tmp files, and temp files of killed writes."""
    listed = listed_files(meta) if meta is not None else set()
    found = []
    for path in out_dir.iterdir():
        atomic = ATOMIC_TEMP.fullmatch(path.name)
        if atomic:
            if not process_is_alive(int(atomic.group(2))):
                found.append(path)
        elif path.name.endswith(".tmp") and path.name[:-len(".tmp")] in listed:
            found.append(path)
        elif path.name not in listed and (is_shard_name(path.name, name) or path.name == "meta.json.tmp"):
            found.append(path)
    return found


def read_ledger(meta_path: Path) -> dict:
    """meta.json as this program writes it; anything else is someone else's file, never replaced."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        meta = error
    if not (isinstance(meta, dict) and isinstance(meta.get("shards"), dict)
            and isinstance(meta.get("splits"), dict)):
        raise ValueError(f"{meta_path}: not a meta.json written by prepare_fineweb.py; move it away or "
                         "choose another --out_dir")
    return meta


def resume_state(out_dir: Path, settings: dict) -> dict | None:
    """meta.json of an earlier run with the same settings (None: start fresh); other settings are an error."""
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        if list(out_dir.glob("*.bin")):
            raise ValueError(f"{out_dir} holds .bin files that no meta.json describes; pass --overwrite to "
                             "replace them or choose another --out_dir")
        return None
    meta = read_ledger(meta_path)
    if not (out_dir / "tokenizer.bpe").is_file():
        if not meta["shards"]:  # stopped between writing meta.json and the tokenizer: start again
            return None
        raise ValueError(f"{out_dir / 'tokenizer.bpe'} is missing, and the shards in {out_dir} need it; "
                         "pass --overwrite to rebuild them")
    tokens = {name: shard["tokens"] for name, shard in meta["shards"].items()}
    tokens.update({mask: tokens.get(name, -1) for mask, name in listed_masks(meta).items()})  # --chat's
    for name, count in tokens.items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != shard_file_size(count):
            raise ValueError(f"{path} is missing or not the {count:,}-token shard meta.json lists; "
                             f"pass --overwrite to rebuild {out_dir}")
    earlier = {key: settings.get(key) if value is None else value
               for key, value in SETTINGS_ADDED_LATER.items()}
    old = {**earlier, **meta.get("settings", {})}
    changed = [key for key in settings if old.get(key) != settings[key]]
    if changed:
        if any(key.startswith(("tokenizer", "vocab", "pattern")) for key in changed):
            what = "a different tokenizer"
        elif set(changed) <= {"input_bytes", "input_mtime_ns"}:
            what = "input files that have changed since"
        else:
            what = "different settings"
        details = ", ".join(f"{key}: {old.get(key)!r} -> {settings[key]!r}" for key in changed)
        raise ValueError(f"{out_dir} holds shards made with {what} ({details}); pass --overwrite to replace "
                         "them or choose another --out_dir")
    for totals in meta["splits"].values():  # a meta.json from before the filters
        totals.setdefault("dropped", dict.fromkeys(DROP_REASONS, 0))
    return meta


def new_meta(source: Source, tokenizer: Tokenizer, settings: dict, command: str) -> dict:
    """meta.json before the first shard; ShardWriter adds each shard, and "complete" turns true at the end."""
    meta = {"dataset": source.describe(), "tokenizer": "tokenizer.bpe", "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_token, "pattern": tokenizer.pattern,
            "format": SHARD_FORMAT,
            "command": command, "settings": settings, "complete": False,
            "splits": {split: {"shards": [], "tokens": 0, "documents": 0, "bytes": 0,
                               "dropped": dict.fromkeys(DROP_REASONS, 0)} for split in ("train", "val")},
            "shards": {}}
    if settings.get("chat"):  # and the loss masks: see "Chat conversations"
        add_chat_meta(meta)
    return meta


def check_out_dir(out_dir: Path) -> None:
    """Refuse an --out_dir that cannot be written before any slow work (a file, a read-only disk)."""
    folder = out_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest folder that exists: mkdir creates the rest there
    if not folder.is_dir():
        raise ValueError(f"--out_dir {out_dir}: {folder} is a file, not a folder; choose another --out_dir")
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY
        raise OSError(errno.EROFS if read_only else errno.EACCES, "", str(folder))


def start_fresh(out_dir: Path, name: str, tokenizer: Tokenizer, meta: dict, overwrite: bool) -> None:
    """Clear what earlier runs of this program left in out_dir, then write meta.json and tokenizer.bpe."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, tokenizer_path = out_dir / "meta.json", out_dir / "tokenizer.bpe"
    old = read_ledger(meta_path) if meta_path.is_file() else None
    if old is None and tokenizer_path.is_file() \
            and tokenizer_path.read_text(encoding="utf-8") != tokenizer.dumps():
        raise ValueError(f"{tokenizer_path} is not from a run of prepare_fineweb.py (no meta.json lists it); "
                         "move it away or choose another --out_dir")
    ours = leftovers(out_dir, name, None)
    if old is not None:
        ours += [out_dir / file_name for file_name in listed_files(old)]
    if overwrite:
        foreign = sorted(path.name for path in out_dir.iterdir()
                         if path not in ours and path.name not in ("meta.json", "tokenizer.bpe"))
        if foreign:
            named = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            print(f"note: --overwrite leaves alone the {len(foreign)} files in {out_dir} that "
                  f"prepare_fineweb.py did not write: {named}", file=sys.stderr)
    for path in ours:
        path.unlink(missing_ok=True)
    # meta.json first: a tokenizer.bpe that no meta.json lists is then never one of ours.
    write_json(meta_path, meta)
    with naming_errors(tokenizer_path):
        tokenizer.save(tokenizer_path)


# ----------------------------------------------------------------------------------------------------------
# Progress

class Progress:
    """A \\r-updated line on stderr per split: documents, tokens, tokens/s, shards written."""

    def __init__(self):
        self.started = time.perf_counter()
        self.total_tokens = 0  # over all splits, for the summary
        self.printed = False

    def start(self, split: str) -> None:
        self.end_line()
        self.split, self.documents, self.tokens = split, 0, 0
        self.split_started = self.last_print = time.perf_counter()

    def update(self, documents: int, tokens: int, shards: int, force: bool = False) -> None:
        self.documents += documents
        self.tokens += tokens
        self.total_tokens += tokens
        now = time.perf_counter()
        if force or now - self.last_print >= 0.5:
            self.last_print, self.printed = now, True
            rate = self.tokens / max(now - self.split_started, 1e-9)
            print(f"\r{self.split:>5}: {self.documents:,} documents, {self.tokens:,} tokens, "
                  f"{rate:,.0f} tokens/s, {shards} shards written ", end="", file=sys.stderr, flush=True)

    def end_line(self) -> None:
        if self.printed:
            print(file=sys.stderr)
            self.printed = False

    def tokens_per_second(self) -> float:
        return self.total_tokens / (time.perf_counter() - self.started)


# ----------------------------------------------------------------------------------------------------------
# Flags

def parse_count(text: str) -> int:
    """'100M' -> 100_000_000. Accepts K, M, B suffixes and plain integers ('2_000_000' too)."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = float(number.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 5000, 100M, 2.5B)") from None
    if value != int(value * scale) / scale or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole, non-negative count")
    return int(value * scale)


def parse_max_tokens(text: str) -> int | None:
    """A token budget, or 'all' (None): stream the whole dataset."""
    return None if text.lower() == "all" else parse_count(text)


def parse_val_size(text: str) -> float:
    """A document count (5000) or a fraction of all documents (0.1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a document count nor a fraction") from None
    if not (0 < value < 1 or (value >= 1 and value == int(value))):
        raise argparse.ArgumentTypeError(f"{text!r}: give a fraction between 0 and 1 or a whole count >= 1")
    return value


class FlagParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FlagParser(description="Tokenize FineWeb-edu, TinyStories or your own files into llm.c-format "
                        "shards.")
    source = parser.add_argument_group("source")
    source.add_argument("--dataset", help="fineweb, tinystories, or a hub id with a text column "
                        "(default: fineweb unless --input is given)")
    source.add_argument("--config", help="hub config (default: sample-10BT for fineweb, none otherwise)")
    source.add_argument("--input", metavar="FILE[,FILE...]", help="local .txt (documents separated by "
                        f"{EOT} lines, else by blank lines), .jsonl/.json or .parquet (a text column)")
    source.add_argument("--chat", action="store_true", help="the inputs are .jsonl conversations, one per "
                        'line: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} or '
                        '{"prompt": ..., "response": ...}; written with bpe.py\'s chat template, a loss mask '
                        "beside each shard (needs --tokenizer: the model's own)")
    source.add_argument("--text_column", default="text",
                        help="column holding the documents (default: %(default)s)")
    tokenizer = parser.add_argument_group("tokenizer")
    tokenizer.add_argument("--tokenizer", default="train", help="train (a new one with bpe.py), gpt2 "
                           "(tiktoken's download), a folder with vocab.bpe+encoder.json or "
                           "merges.txt+vocab.json, or a saved bpe.py tokenizer file (default: %(default)s)")
    tokenizer.add_argument("--vocab_size", type=int, default=8192,
                           help="for training: 256 bytes + merges + <|endoftext|> (257 = byte-level; "
                           "default: %(default)s)")
    tokenizer.add_argument("--pattern", choices=sorted(PATTERNS), default="gpt4",
                           help="split regex for training (default: %(default)s)")
    tokenizer.add_argument("--tokenizer_train_mb", type=float, default=100,
                           help="train on about this many MB of the first training documents "
                           "(default: %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--name",
                        help="shard name prefix (default: fineweb, tinystories, the first input's stem)")
    output.add_argument("--out_dir", help="output folder (default: data/<name>)")
    output.add_argument("--max_tokens", type=parse_max_tokens, default="100M",
                        help="stop after this many training tokens (at a document boundary); 'all' for "
                        "everything (default: 100M)")
    output.add_argument("--shard_size", type=parse_count, default="100M",
                        help="tokens per shard at most (default: 100M)")
    output.add_argument("--val_size", type=parse_val_size, help="validation documents where the dataset has "
                        "no validation split: a count or a fraction (default: "
                        f"{LOCAL_VAL_FRACTION} for --input, {HUB_VAL_DOCUMENTS} for a hub stream, which "
                        "cannot be counted ahead)")
    output.add_argument("--val_from", choices=["start", "end"], default="start",
                        help="take the validation documents from the start or the end of the source "
                        "(default: %(default)s)")
    output.add_argument("--overwrite", action="store_true", help="replace the output folder's shards")
    filters = parser.add_argument_group("filters (off by default; meta.json counts the dropped documents)")
    filters.add_argument("--dedup", action="store_true", help="drop a document whose exact text an earlier "
                         "one had: each text is kept where it first appears, so no text is in both splits")
    filters.add_argument("--min_chars", type=int, default=0,
                         help="drop documents shorter than this many characters (default: 0, no limit)")
    filters.add_argument("--max_chars", type=int, default=0,
                         help="drop documents longer than this many characters (default: 0, no limit)")
    system = parser.add_argument_group("system")
    system.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="encoding processes (default: %(default)s, the cores but one, which the main "
                        "process needs to read and write)")
    args = parser.parse_args(argv)
    check_flags(parser, args)
    return args


def check_flags(parser: FlagParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone: an error here exits 2, as argparse's own do."""
    if args.dataset and args.input:
        parser.error("give either --dataset or --input, not both")
    if args.chat and (not args.input or args.tokenizer == "train"):
        parser.error("--chat needs --input=FILE.jsonl and the tokenizer of the model to fine-tune: "
                     "--tokenizer=gpt2 or --tokenizer=<its data folder>/tokenizer.bpe")
    if args.workers < 1:
        parser.error(f"--workers={args.workers}: need at least 1")
    if args.shard_size < 1 or args.max_tokens == 0:
        parser.error("--shard_size and --max_tokens must be at least 1 token")
    if not 256 + 1 <= args.vocab_size <= 65_536:  # uint16 holds ids 0..65535
        parser.error(f"--vocab_size={args.vocab_size}: must be 257 (bytes + <|endoftext|>) to 65536 "
                     "(token ids are stored as uint16)")
    if args.tokenizer_train_mb <= 0:
        parser.error("--tokenizer_train_mb must be positive")
    for flag, value in (("--min_chars", args.min_chars), ("--max_chars", args.max_chars)):
        if value < 0:
            parser.error(f"{flag}={value}: give a number of characters, or 0 for no limit")
    if args.max_chars and args.min_chars > args.max_chars:
        parser.error(f"--min_chars={args.min_chars} is above --max_chars={args.max_chars}: no document could "
                     "pass; lower --min_chars or raise --max_chars")


# ----------------------------------------------------------------------------------------------------------
# Main

def prepare(args: argparse.Namespace, command: str) -> int:
    """The whole run: source, output folder (fresh or resumed), tokenizer, then the shards of both splits."""
    source = open_source(args)
    out_dir = Path(args.out_dir or Path("data") / source.name)
    loaded = None if args.tokenizer == "train" else load_tokenizer(args.tokenizer)
    if args.chat:  # the chat template's tokens after the tokenizer's own (see "Chat conversations")
        loaded = loaded.with_chat_tokens()
    settings = run_settings(args, source, loaded)

    meta = None if args.overwrite else resume_state(out_dir, settings)
    if meta is not None and meta["complete"]:
        print(f"nothing to do: {out_dir} already holds this run's {len(meta['shards'])} shards "
              f"({meta['splits']['train']['tokens']:,} training tokens); --overwrite rebuilds them",
              file=sys.stderr)
        return 0
    check_out_dir(out_dir)  # before the slow work: counting documents, training a tokenizer

    val_range = validation_range(source, args.val_size, args.val_from)
    ledger, tokenizer = open_output(args, source, out_dir, loaded, settings, val_range, meta, command)
    progress = Progress()
    if write_splits(args, source, val_range, tokenizer, ledger, progress) == "interrupted":
        print(f"interrupted: {out_dir} keeps its {len(ledger.meta['shards'])} complete shards (listed in "
              "meta.json); rerun the same command to continue from there", file=sys.stderr)
        return 130

    meta = ledger.meta
    meta["complete"] = True
    with interrupts_deferred():
        write_json(out_dir / "meta.json", meta)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    reasons = DocumentFilter(args.min_chars, args.max_chars, args.dedup).reasons()
    dropped = {split: f"; dropped: {describe_drops(meta['splits'][split]['dropped'], reasons)}" if reasons
               else "" for split in ("train", "val")}
    print(f"wrote {len(meta['shards'])} shards to {out_dir}: train {train['tokens']:,} tokens "
          f"({train['documents']:,} documents, {train['bytes'] / max(train['tokens'], 1):.2f} bytes/token"
          f"{dropped['train']}), val {val['tokens']:,} tokens ({val['documents']:,} documents"
          f"{dropped['val']}); encoded {progress.tokens_per_second():,.0f} tokens/s", file=sys.stderr)
    return 0


def open_output(args: argparse.Namespace, source: Source, out_dir: Path, loaded: Tokenizer | None,
                settings: dict, val_range: range | None, meta: dict | None,
                command: str) -> tuple[Ledger, Tokenizer]:
    """The ledger and the tokenizer: a fresh start (meta is None) or the resumed run's."""
    if meta is None:
        # trained on the documents the shards will hold (the filters judge training alone here)
        doc_filter = DocumentFilter(args.min_chars, args.max_chars, args.dedup)
        training_documents = kept_documents(split_documents(source, "train", val_range), doc_filter)
        tokenizer = loaded or train_tokenizer(training_documents, args)
        check_tokenizer(tokenizer)
        # Only now, with the source and the tokenizer known to work, clear the folder (--overwrite, or the
        # tokenizer of a run stopped before its first shard).
        meta = new_meta(source, tokenizer, settings, command)
        with interrupts_deferred():
            start_fresh(out_dir, source.name, tokenizer, meta, args.overwrite)
    else:  # resume: the shards meta.json lists are complete; anything else is from the interrupted shard
        tokenizer = Tokenizer.load(out_dir / "tokenizer.bpe")
        with interrupts_deferred():
            for path in leftovers(out_dir, source.name, meta):
                path.unlink()
        print(f"resuming: {len(meta['shards'])} complete shards in {out_dir} "
              f"({meta['splits']['train']['tokens']:,} training tokens)", file=sys.stderr)
    return Ledger(out_dir, source.name, meta), tokenizer


def write_splits(args: argparse.Namespace, source: Source, val_range: range | None, tokenizer: Tokenizer,
                 ledger: Ledger, progress: Progress) -> str:
    """Both splits through write_split with a pool of workers: "done" or "interrupted" (Ctrl-C, SIGTERM)."""
    meta = ledger.meta
    # Validation first when it is the start of the source (or its own split), so shard numbers follow
    # source order and val is shard 0 as in llm.c; last when it is the end of the source.
    split_order = ["train", "val"] if val_range is not None and val_range.start > 0 else ["val", "train"]
    doc_filter = DocumentFilter(args.min_chars, args.max_chars, args.dedup)
    pool, interrupted = None, False
    try:
        with interrupts_deferred():  # a pool stopped while it starts could leave workers that nothing ends
            pool = EncodingPool(tokenizer, args.workers, args.chat)
        for i, split in enumerate(split_order):
            documents = split_documents(source, split, val_range)
            followed = i + 1 < len(split_order)
            write_filtered_split(args, split, documents, followed, doc_filter, pool, ledger, progress)
            if meta["splits"][split]["documents"] == 0:
                raise empty_split_error(split, source, meta["splits"][split]["dropped"], doc_filter)
    except KeyboardInterrupt:
        interrupted = True
    except OSError as error:  # a write into the open shard (a full disk) names no file: name it
        if error.errno is None or error.filename is not None or ledger.open_shard is None:
            raise
        raise OSError(error.errno, error.strerror, str(ledger.open_shard.path)) from None
    finally:
        # After a signal, a failed write or the last shard; a second signal (`timeout` sends SIGTERM to every
        # process of the group, then maybe SIGKILL) must not cut the clean-up short.
        with interrupts_deferred(then_raise=not interrupted):
            ledger.discard_open_shard()
            progress.end_line()
            if pool is not None:
                pool.close()
    return "interrupted" if interrupted else "done"


def write_filtered_split(args: argparse.Namespace, split: str, documents: Iterator[str], followed: bool,
                         doc_filter: DocumentFilter, pool: EncodingPool, ledger: Ledger,
                         progress: Progress) -> None:
    """One split through kept_documents and write_split, then its counts of dropped documents into
    meta.json. `followed`: another split comes after this one (with --dedup, it must see all of this one)."""
    totals = ledger.meta["splits"][split]
    budget = args.max_tokens if split == "train" else None
    finished = budget is not None and totals["tokens"] >= budget  # resuming after this split's last shard
    if finished and not doc_filter.reasons():
        return  # nothing to read, nothing dropped
    doc_filter.start_split()
    kept = kept_documents(documents, doc_filter)
    # Resuming: skip the documents that complete shards already hold. They are read and filtered again, in
    # the same order, which rebuilds the seen-set and the counts as the interrupted run had them.
    if finished:
        for _ in islice(kept, totals["documents"]):
            pass
    else:
        progress.start(split)
        write_split(split, islice(kept, totals["documents"], None), budget, args.shard_size, pool, ledger,
                    progress)
    stopped_at_budget = budget is not None and totals["tokens"] >= budget
    if doc_filter.seen is not None and followed and stopped_at_budget:
        progress.end_line()
        print(f"--dedup: reading the rest of the {split} split, so that no later document repeats any of it",
              file=sys.stderr)
        for _ in kept:  # see "The document filter"
            pass
    totals["dropped"] = doc_filter.dropped(totals["documents"] if stopped_at_budget else None)
    with interrupts_deferred():
        write_json(ledger.out_dir / "meta.json", ledger.meta)


def empty_split_error(split: str, source: Source, dropped: dict[str, int],
                      doc_filter: DocumentFilter) -> ValueError:
    if not any(dropped.values()):
        return ValueError(f"the {split} split of {source.describe()} has no documents")
    return ValueError(f"the {split} split of {source.describe()} has no documents left after the filters "
                      f"(dropped: {describe_drops(dropped, doc_filter.reasons())}); loosen --min_chars / "
                      "--max_chars, or give it more documents (--val_size)")


# The cause and the remedy of a file-system error, by errno.
FILE_SYSTEM_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another --out_dir"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another --out_dir"),
    errno.EFBIG: ("file too large for the file system or the process's file-size limit",
                  "choose another --out_dir or a smaller --shard_size"),
    errno.EROFS: ("read-only file system", "choose a writable --out_dir"),
    errno.EACCES: ("permission denied", "check its permissions or choose another --out_dir"),
    errno.EPERM: ("permission denied", "check its permissions or choose another --out_dir"),
    errno.ENOTDIR: ("not a folder", "give a folder"),
}


def error_line(error: Exception) -> str:
    """One line for an error that ends the run; OSErrors name their path and cause."""
    if not isinstance(error, OSError) or error.errno is None:
        return str(error)
    unknown = (error.strerror or type(error).__name__, "check the path")
    cause, remedy = FILE_SYSTEM_ERRORS.get(error.errno, unknown)
    return f"{error.filename or 'a file'}: {cause}; {remedy}"


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 failed (one line on stderr), 2 bad flag, 130 interrupted (Ctrl-C or SIGTERM)."""
    args = parse_flags(argv)
    command = shlex.join(["python", "prepare_fineweb.py", *(sys.argv[1:] if argv is None else argv)])
    # `kill` (SIGTERM) stops as cleanly as Ctrl-C
    previous_sigterm = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        return prepare(args, command)
    except KeyboardInterrupt:  # before the first shard (training a tokenizer, say): nothing is half-written
        print("\ninterrupted: rerun the same command to start again", file=sys.stderr)
        return 130
    except (ValueError, OSError, WorkerDied) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":  # required: "spawn" workers import this file, and must not run main() again
    os.environ.setdefault("USE_TORCH", "0")  # else datasets imports torch (slow) for a feature not used here
    sys.exit(main())

"""Token streams: text from a Hugging Face dataset (streamed) or local files, packed into fixed contexts.

`TokenStream` reads documents in a seeded shuffled order, tokenises them with the model's tokenizer, joins
them with EOS between documents and cuts the result into contexts of `context_length` tokens (the first one
the tokenizer's BOS when the recipe says `prepend_bos`). A document longer than a context continues into
the next one; no context is padded. Under torch.distributed each rank takes every `world_size`-th document
of the shuffled order, so the ranks read disjoint slices of one stream.

Held out: `holdout_documents` counts the documents at the head of the shuffled order that hold a run's
eval contexts; training streams skip them (`skip_documents`), evaluation reads them.

Position and resume: the stream's state is the number of documents consumed (of the shuffled order, all
ranks counted) plus the tokens tokenised but not yet packed. Resuming replays the seeded order from the
start, skipping the consumed documents without tokenising them, so a resumed stream yields exactly the
contexts the uninterrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dictionaries.errors import DatasetColumnError, MissingFileError
from dictionaries.recipe import DatasetSpec

# datasets builders for local files that are not plain text
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TOKENIZE_BATCH = 64  # documents per tokenizer call (the fast tokenizer batches in Rust)


def is_local(path: str) -> bool:
    """True when the dataset path names an existing local file or folder rather than a Hub dataset id."""
    return Path(path).expanduser().exists()


def check_dataset(spec: DatasetSpec) -> None:
    """MissingFileError for a dataset path that means a local file or folder (a path, or a name with a data file
    suffix) which does not exist; anything else is a Hub dataset id, looked up when it is opened."""
    path = spec.path
    looks_local = path.startswith(("/", "./", "../", "~")) or Path(path).suffix in (".txt", *_BUILDERS)
    if looks_local and not is_local(path):
        raise MissingFileError(path, "Pass an existing .txt, .jsonl, .json, .csv or .parquet file, a folder of .txt "
                                     "files, or a Hugging Face dataset id.")


def read_text_documents(path: str | Path) -> Iterator[str]:
    """Documents of a `.txt` file or a folder of `.txt` files (sorted): each file is cut at blank lines."""
    path = Path(path).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise MissingFileError(str(path / "*.txt"), "The dataset folder holds no .txt files.")
    for file in files:
        for paragraph in file.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if paragraph.strip():
                yield paragraph.strip()


def open_dataset(spec: DatasetSpec) -> Iterator[str]:
    """The raw documents of a dataset spec, in stored order; a missing column raises DatasetColumnError."""
    check_dataset(spec)
    path = str(Path(spec.path).expanduser()) if is_local(spec.path) else spec.path
    if is_local(path) and (Path(path).is_dir() or Path(path).suffix == ".txt"):
        return read_text_documents(path)
    from datasets import load_dataset

    if is_local(path):
        ds = load_dataset(_BUILDERS.get(Path(path).suffix, "text"), data_files=path, split=spec.split,
                          streaming=True)
    else:  # a Hub dataset: streamed, so a Pile-sized set needs no full download
        ds = load_dataset(path, spec.name, split=spec.split, streaming=True, revision=spec.revision)
    return _column(ds, spec)


def _column(ds: Any, spec: DatasetSpec) -> Iterator[str]:
    columns = ds.column_names
    first = None
    if columns is None:  # streamed sets without declared features: look at the first row
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    if spec.column not in columns:
        raise DatasetColumnError(spec.path, spec.column, columns)

    def documents() -> Iterator[str]:
        for row in ds:
            yield row[spec.column]

    return documents()


def shuffled(documents: Iterator[str], seed: int, buffer_size: int) -> Iterator[str]:
    """A seeded shuffle through a buffer of `buffer_size` documents (works on endless streams)."""
    rng = random.Random(seed)
    buffer: list[str] = []
    for doc in documents:
        if len(buffer) < buffer_size:
            buffer.append(doc)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = doc
    rng.shuffle(buffer)
    yield from buffer


class TokenStream:
    """Fixed-length token contexts from a dataset, seeded, resumable, sliced per rank.

    `next_contexts(n)` -> LongTensor (m, context_length), m <= n (m < n only when the data runs out).
    """

    SHUFFLE_BUFFER = 4096
    """Documents in the seeded shuffle's buffer."""

    def __init__(self, spec: DatasetSpec, tokenizer: Any, *, context_length: int, prepend_bos: bool = False,
                 seed: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER, rank: int = 0, world_size: int = 1,
                 skip_documents: int = 0):
        self.spec = spec
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.prepend_bos = prepend_bos
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.documents = skip_documents  # documents of the shuffled order consumed (all ranks counted)
        self.leftover: list[int] = []  # tokens tokenised but not yet packed into a context
        self.exhausted = False
        self._docs: Iterator[str] | None = None

    @property
    def name(self) -> str:
        return self.spec.path

    def _source(self) -> Iterator[str]:
        """The shuffled documents from position `self.documents` on (replaying and skipping the consumed ones)."""
        docs = shuffled(open_dataset(self.spec), self.seed, self.shuffle_buffer)
        for _ in range(self.documents):
            if next(docs, None) is None:
                break
        return docs

    def open(self) -> TokenStream:
        """Open the source now (a missing dataset or column fails here, before any training)."""
        if self._docs is None:
            self._docs = self._source()
        return self

    def _read_documents(self, n: int) -> list[str]:
        """Up to n documents for this rank, advancing the position."""
        self.open()
        mine = []
        while len(mine) < n:
            doc = next(self._docs, None)
            if doc is None:
                self.exhausted = True
                break
            if self.documents % self.world_size == self.rank:
                mine.append(doc)
            self.documents += 1
        return mine

    def _fill(self, needed: int) -> None:
        """Tokenise documents until `needed` tokens wait in `leftover` or the data ends."""
        while len(self.leftover) < needed and not self.exhausted:
            docs = self._read_documents(TOKENIZE_BATCH)
            if not docs:
                break
            ids = self.tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            for doc_ids in ids:
                self.leftover.extend(doc_ids)
                self.leftover.append(self.eos_id)

    def next_contexts(self, n: int) -> torch.Tensor:
        """Up to n contexts (n, context_length) of token ids; fewer (maybe 0) when the data has run out."""
        body = self.context_length - (1 if self.prepend_bos else 0)
        self._fill(n * body)
        m = min(n, len(self.leftover) // body)
        tokens = torch.tensor(self.leftover[: m * body], dtype=torch.long).view(m, body)
        del self.leftover[: m * body]
        if self.prepend_bos:
            tokens = torch.cat([torch.full((m, 1), self.bos_id, dtype=torch.long), tokens], dim=1)
        return tokens

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Contexts one at a time, (context_length,), until the data runs out."""
        while True:
            batch = self.next_contexts(1)
            if len(batch) == 0:
                return
            yield batch[0]

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position: documents consumed and the tokens waiting to be packed."""
        return {"documents": self.documents, "leftover": torch.tensor(self.leftover, dtype=torch.long),
                "exhausted": self.exhausted, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (the seeded order is replayed up to it on the next read)."""
        for key in ("seed", "world_size", "rank"):
            if state[key] != getattr(self, key):
                raise ValueError(f"stream state was saved with {key}={state[key]}, this stream has "
                                 f"{getattr(self, key)}")
        self.documents = int(state["documents"])
        self.leftover = [int(t) for t in state["leftover"].tolist()]
        self.exhausted = bool(state["exhausted"])
        self._docs = None


def holdout_documents(spec: DatasetSpec, tokenizer: Any, *, context_length: int, prepend_bos: bool, seed: int,
                      tokens: int) -> int:
    """How many documents of the seeded shuffled order hold the first ceil(tokens / context_length) contexts.

    Training skips that many documents (`TokenStream(skip_documents=...)`) and evaluation reads those first
    contexts from a fresh stream of the same spec and seed (contexts are packed in document order, so they
    come from these documents alone): the two never share a token.
    """
    if tokens <= 0:
        return 0
    body = context_length - (1 if prepend_bos else 0)
    needed = -(-tokens // context_length) * body
    have = count = 0
    for doc in shuffled(open_dataset(spec), seed, TokenStream.SHUFFLE_BUFFER):
        have += len(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]) + 1  # + EOS
        count += 1
        if have >= needed:
            break
    return count

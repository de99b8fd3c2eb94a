"""Token data: preparation (text -> memory-mapped token shards) and deterministic batch sampling.

Layout of a prepared data directory::

    meta.json                 tokenizer, vocab_size, dtype, token counts, shard lists, source hashes
    tokenizer/                a Hugging Face tokenizer directory (PreTrainedTokenizerFast)
    train_00000.bin ...       flat token ids, uint16 when vocab_size <= 65536, else uint32
    val_00000.bin ...

Documents are separated by the tokenizer's EOS token. Each document goes to the validation split
with probability ``val_fraction``, decided by a hash of its text (deterministic, and the split does
not depend on the order of the input files).

Sampling (:class:`TokenData`) is a pure function of ``(seed, step, micro_step)``: the windows of the
*global* batch are drawn from a generator seeded with those numbers and rank ``r`` of ``W`` takes
the ``r``-th slice. So a resumed run sees exactly the batches of an uninterrupted one, and W
processes with batch B see the same global batch as one process with batch W·B.

Command line::

    python -m model.data prepare --input FILES_OR_DIRS... --out DIR [--tokenizer HF_DIR | --vocab-size N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.outputs import ensure_writable_dir

META = "meta.json"
TOKENIZER_DIR = "tokenizer"
EOS_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
MIN_TRAINED_VOCAB = 257  # a trained byte-level BPE: 256 bytes + <|endoftext|>


class DataError(ValueError):
    """A user error in the data (missing directory, empty shards, vocab mismatch...): one line."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be > 0, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


# --------------------------------------------------------------------------------------------------
# Tokenizers


def train_tokenizer(documents: Iterable[str], vocab_size: int, show_progress: bool = False):
    """Train a byte-level BPE tokenizer (``tokenizers``) with EOS/BOS ``<|endoftext|>``.

    Returns:
        transformers.PreTrainedTokenizerFast with bos_token = eos_token = ``<|endoftext|>`` (id 0).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_TRAINED_VOCAB:
        raise DataError(f"--vocab-size must be >= {MIN_TRAINED_VOCAB} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN)


def load_tokenizer(path: str | Path):
    """A HF tokenizer from a local directory (never downloads)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {str(path)!r} not found")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {str(path)!r}: {str(e).splitlines()[0]}") from e


# --------------------------------------------------------------------------------------------------
# Preparation


def input_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Text files named directly, or found (sorted, recursively) in the given directories."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in directory {str(path)!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {str(path)!r} not found")
    return files


def _is_val(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


class _ShardWriter:
    """Appends token ids to ``{split}_{i:05d}.bin`` files of at most ``shard_tokens`` ids."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            self._file.write(chunk.astype(self.dtype).tobytes())
            self.shards[-1]["tokens"] += int(chunk.size)

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")  # noqa: SIM115 (closed in close())
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def prepare(
    documents: Iterable[str],
    out_dir: str | Path,
    tokenizer=None,
    vocab_size: int | None = None,
    val_fraction: float = 0.05,
    sources: list[dict] | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    description: str = "tokenizing",
) -> dict:
    """Tokenize documents into train/val token shards in ``out_dir`` and write ``meta.json``.

    Args:
        documents: texts; each ends with EOS in the token stream. Read twice when a tokenizer is trained.
        tokenizer: a HF tokenizer (or a path to a tokenizer directory); None trains a byte-level BPE
            of ``vocab_size`` on ``documents``.
        sources: recorded in meta.json (e.g. ``[{"path": ..., "sha256": ...}]``).
    Returns:
        the meta dict (also written to ``out_dir/meta.json``).

    Everything is checked first and written into a temporary sibling of ``out_dir``, then swapped in:
    a failure leaves an existing prepared ``out_dir`` unchanged. Files of other names there are kept.
    """
    if not 0 < val_fraction < 1:  # also refuses NaN
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be > 0, got {shard_tokens}")
    documents = list(documents)
    if not any(d.strip() for d in documents):
        raise DataError("no text to prepare: every input is empty")
    if tokenizer is None and vocab_size is None:
        raise DataError("give either a tokenizer directory or a vocab size to train one")
    if tokenizer is None and vocab_size < MIN_TRAINED_VOCAB:
        raise DataError(f"--vocab-size must be >= {MIN_TRAINED_VOCAB} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    out = Path(out_dir)
    ensure_writable_dir(out.parent, "the folder of the data directory", DataError)
    if out.exists():
        ensure_writable_dir(out, "data directory", DataError)
    # Everything is written into a temporary sibling and swapped in only when complete: an error (or a
    # kill) half-way leaves an already prepared directory exactly as it was.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.preparing-", dir=out.parent))
    try:
        meta = _prepare_into(
            documents, staging, tokenizer, vocab_size, val_fraction, sources, shard_tokens, progress, description
        )
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _swap_in(staging: Path, out: Path) -> None:
    """Move a complete prepared directory ``staging`` to ``out``, replacing only the prepared files there.

    Other files a user keeps in ``out`` stay. ``meta.json`` moves last: until then ``out`` is not
    a prepared directory (``read_meta`` refuses it) rather than a mix of old and new shards.
    """
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    try:
        previous = [out / META, out / TOKENIZER_DIR, *out.glob("train_*.bin"), *out.glob("val_*.bin")]
        for path in previous:
            if path.exists():
                os.replace(path, old / path.name)
        for path in staging.iterdir():
            if path.name != META:
                os.replace(path, out / path.name)
        os.replace(staging / META, out / META)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _prepare_into(
    documents: list[str],
    out: Path,
    tokenizer,
    vocab_size: int | None,
    val_fraction: float,
    sources: list[dict] | None,
    shard_tokens: int,
    progress: bool,
    description: str,
) -> dict:
    """:func:`prepare`'s work, into the empty directory ``out``."""
    from tqdm.auto import tqdm

    if tokenizer is None:
        tokenizer = train_tokenizer(documents, vocab_size)
        tokenizer_source = f"trained byte-level BPE (vocab {vocab_size})"
    elif isinstance(tokenizer, (str, Path)):
        tokenizer_source = str(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    else:
        tokenizer_source = getattr(tokenizer, "name_or_path", "") or "given"
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents; pick a tokenizer with one")
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    tok_vocab = len(tokenizer)
    dtype = dtype_for_vocab(tok_vocab)

    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    corpus_hash = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    batch = 64
    with tqdm(total=len(documents), desc=description, unit="doc", disable=not progress) as bar:
        for start in range(0, len(documents), batch):
            chunk = documents[start : start + batch]
            if backend is not None:  # the Rust tokenizer without special tokens, in parallel
                encoded = [e.ids for e in backend.encode_batch(chunk, add_special_tokens=False)]
            else:
                encoded = [tokenizer.encode(d, add_special_tokens=False) for d in chunk]
            for text, ids in zip(chunk, encoded):
                corpus_hash.update(text.encode("utf-8"))
                arr = np.concatenate([np.asarray(ids, dtype=np.int64), eos])
                if arr.max(initial=0) >= tok_vocab:
                    raise DataError(f"token id {int(arr.max())} >= tokenizer vocab size {tok_vocab}")
                writers["val" if _is_val(text, val_fraction) else "train"].write(arr)
            bar.update(len(chunk))
    for w in writers.values():
        w.close()
    # Tiny inputs may hash every document into one split: say so rather than train or validate on nothing.
    for split in ("train", "val"):
        if writers[split].tokens == 0:
            raise DataError(
                f"the {split} split is empty ({len(documents)} document(s), val_fraction={val_fraction}); "
                "give more documents or change --val-fraction"
            )
    meta = {
        "format": 1,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_source": tokenizer_source,
        "vocab_size": tok_vocab,
        "eos_token_id": int(tokenizer.eos_token_id),
        "bos_token_id": None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "documents": len(documents),
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_shards": writers["train"].shards,
        "val_shards": writers["val"].shards,
        "corpus_sha256": corpus_hash.hexdigest(),
        "sources": sources or [],
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_files(inputs: Iterable[str | Path], out_dir: str | Path, **kwargs) -> dict:
    """:func:`prepare` on text files / directories: one document per file, source hashes recorded."""
    files = input_files(inputs)
    documents, sources = [], []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {str(path)!r}: {e.strerror}") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # a binary file, or another encoding: tokenizing it would be noise
            raise DataError(
                f"input {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                "convert it (e.g. iconv -t utf-8) or leave it out"
            ) from None
        if "\x00" in text:
            raise DataError(f"input {str(path)!r} holds NUL bytes: a binary file, not text")
        documents.append(text)
        sources.append({"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)})
    return prepare(documents, out_dir, sources=sources, **kwargs)


def prepare_stdlib(out_dir: str | Path, vocab_size: int, val_fraction: float = 0.05, progress: bool = True) -> dict:
    """Prepare the embedded corpus (standard-library docstrings, ``model.corpus``) with a trained BPE."""
    import platform

    from model.corpus import stdlib_dir, stdlib_documents

    documents = stdlib_documents(progress=progress)
    sources = [{"corpus": "python-stdlib-docstrings", "python": platform.python_version(), "root": str(stdlib_dir())}]
    return prepare(
        documents,
        out_dir,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        sources=sources,
        progress=progress,
        description="preparing stdlib-docstring corpus",
    )


# --------------------------------------------------------------------------------------------------
# Loading and sampling


def read_meta(data_dir: str | Path) -> dict:
    """The ``meta.json`` of a prepared directory, checked. Raises DataError with a one-line message."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data_dir {str(data_dir)!r} not found (prepare it with: python -m model.data prepare ...)")
    meta_path = data_dir / META
    if not meta_path.is_file():
        raise DataError(f"{str(meta_path)!r} not found: {str(data_dir)!r} is not a prepared data directory")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{str(meta_path)!r} is not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{str(meta_path)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    _check_meta(meta, meta_path)
    return meta


def _check_meta(meta: object, meta_path: Path) -> None:
    """DataError naming the first key of ``meta.json`` that is missing or of the wrong type or value."""
    where = repr(str(meta_path))
    if not isinstance(meta, dict):
        raise DataError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    for key in ("vocab_size", "dtype", "train_shards", "val_shards"):
        if key not in meta:
            raise DataError(f"{where} has no {key!r}")
    vocab = meta["vocab_size"]
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise DataError(f"{where}: 'vocab_size' must be an integer >= 1, got {vocab!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f'{where}: \'dtype\' must be "uint16" or "uint32", got {meta["dtype"]!r}')
    for split in ("train_shards", "val_shards"):
        shards = meta[split]
        if not isinstance(shards, list):
            raise DataError(f"{where}: {split!r} must be a list of shards, got {type(shards).__name__}")
        for i, entry in enumerate(shards):
            name = entry.get("file") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise DataError(
                    f'{where}: {split}[{i}] must be {{"file": NAME, ...}} with a file name in the data '
                    f"directory, got {entry!r}"
                )


@dataclass
class _Split:
    shards: list[np.memmap]
    starts: np.ndarray  # cumulative count of valid window starts, per shard

    @property
    def windows(self) -> int:
        return int(self.starts[-1])

    def window(self, index: int, length: int) -> np.ndarray:
        """Tokens ``[length + 1]`` of the ``index``-th valid window (windows never cross a shard end)."""
        shard = int(np.searchsorted(self.starts, index, side="right"))
        offset = index - (int(self.starts[shard - 1]) if shard else 0)
        return self.shards[shard][offset : offset + length + 1]


class TokenData:
    """Memory-mapped train/val token shards with deterministic sampling.

    Args:
        data_dir: a prepared directory (``meta.json`` + shards).
        seq_len: tokens per sample T (windows are T + 1 tokens: inputs and shifted targets).
        vocab_size: the model's vocabulary; must equal the data's (else DataError).
    """

    def __init__(self, data_dir: str | Path, seq_len: int, vocab_size: int | None = None):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        self.seq_len = seq_len
        vocab = self.meta["vocab_size"]
        if vocab_size is not None and vocab_size != vocab:
            raise DataError(
                f"data in {str(self.dir)!r} was tokenized with vocab size {vocab} but model.vocab_size is "
                f"{vocab_size}; set model.vocab_size: {vocab} or prepare the data with the model's tokenizer"
            )
        self.vocab_size = vocab
        dtype = np.dtype(self.meta["dtype"])
        if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise DataError(f"unsupported token dtype {dtype.name!r} in meta.json (expected uint16 or uint32)")
        if vocab > np.iinfo(dtype).max + 1:
            raise DataError(f"vocab size {vocab} does not fit token dtype {dtype.name} (max {np.iinfo(dtype).max + 1})")
        self.dtype = dtype
        self.splits = {name: self._open(name) for name in ("train", "val")}

    def _open(self, split: str) -> _Split:
        shards, counts = [], []
        for entry in self.meta[f"{split}_shards"]:
            path = self.dir / entry["file"]
            if not path.is_file():
                raise DataError(f"shard {str(path)!r} listed in meta.json is missing")
            size = path.stat().st_size
            if size == 0:
                raise DataError(f"shard {str(path)!r} is empty")
            if size % self.dtype.itemsize:
                raise DataError(f"shard {str(path)!r} has {size} bytes, not a multiple of {self.dtype.name}")
            arr = np.memmap(path, dtype=self.dtype, mode="r")
            # One pass over the shard (memory bandwidth: ~0.1 s per GB): an id beyond the vocabulary would
            # otherwise index out of the embedding table at some later, random step.
            top = int(arr.max())
            if top >= self.vocab_size:
                raise DataError(
                    f"shard {str(path)!r} holds token id {top} >= vocab_size {self.vocab_size} of meta.json "
                    "(a shard of other data, or damaged): prepare the directory again"
                )
            if arr.size > self.seq_len:
                shards.append(arr)
                counts.append(arr.size - self.seq_len)
        if not shards:
            raise DataError(
                f"the {split} split of {str(self.dir)!r} has no shard longer than seq_len + 1 = {self.seq_len + 1} "
                "tokens (empty or too little data)"
            )
        return _Split(shards, np.cumsum(counts))

    def tokens(self, split: str) -> int:
        return sum(int(s.size) for s in self.splits[split].shards)

    def _stack(
        self, split: _Split, indices: Iterable[int], pin_memory: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([split.window(int(i), self.seq_len).astype(np.int64) for i in indices])
        batch = torch.from_numpy(rows)
        if not pin_memory:
            return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        # Page-locked from the start (no second host copy): a non_blocking .to("cuda") is then asynchronous.
        inputs = torch.empty((rows.shape[0], self.seq_len), dtype=torch.int64, pin_memory=True)
        targets = torch.empty((rows.shape[0], self.seq_len), dtype=torch.int64, pin_memory=True)
        return inputs.copy_(batch[:, :-1]), targets.copy_(batch[:, 1:])

    def train_batch(
        self,
        seed: int,
        step: int,
        micro_step: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch of optimizer step ``step``, micro-batch ``micro_step``.

        ``pin_memory`` (CUDA runs): the tensors are in page-locked host memory, for asynchronous copies.

        Returns:
            (inputs, targets): int64 [batch_size, seq_len] each, targets shifted by one token.
        """
        split = self.splits["train"]
        # A fresh generator per (seed, step, micro_step): sampling needs no state to save or restore.
        rng = np.random.Generator(np.random.PCG64([seed, step, micro_step]))
        starts = rng.integers(0, split.windows, size=batch_size * world_size)
        return self._stack(split, starts[rank * batch_size : (rank + 1) * batch_size], pin_memory)

    def val_batches(self, n_batches: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator:
        """Fixed validation windows (evenly spaced over the split), this rank's share of each batch.

        Yields ``n_batches`` pairs (inputs, targets) int64 [batch_size, seq_len]; the same on every call.
        """
        split = self.splits["val"]
        total = n_batches * batch_size * world_size
        # Non-overlapping when the split is long enough; otherwise evenly spaced overlapping windows.
        positions = np.linspace(0, split.windows - 1, num=total).round().astype(np.int64)
        for b in range(n_batches):
            chunk = positions[b * batch_size * world_size : (b + 1) * batch_size * world_size]
            yield self._stack(split, chunk[rank * batch_size : (rank + 1) * batch_size])

    def unigram_loss(self, max_tokens: int = 20_000_000) -> float:
        """Cross-entropy (nats/token) on val of the unigram distribution of train (add-one smoothed).

        The baseline a language model must beat: it knows token frequencies and nothing else.
        """
        counts = np.zeros(self.vocab_size, dtype=np.float64)
        seen = 0
        for shard in self.splits["train"].shards:
            take = shard[: max(0, max_tokens - seen)]
            counts += np.bincount(take, minlength=self.vocab_size)[: self.vocab_size]
            seen += take.size
        probs = (counts + 1) / (counts.sum() + self.vocab_size)
        logp = np.log(probs)
        total, n = 0.0, 0
        for shard in self.splits["val"].shards:
            val = np.asarray(shard[:max_tokens], dtype=np.int64)
            total += float(-logp[val].sum())
            n += val.size
        return total / max(n, 1)


def ensure_prepared(data_dir: str | Path, corpus: str | None, vocab_size: int, val_fraction: float) -> None:
    """Prepare the embedded corpus into ``data_dir`` if it is named and the directory is not prepared."""
    if corpus is None or (Path(data_dir) / META).is_file():
        return
    if corpus != "stdlib":
        raise DataError(f"unknown corpus {corpus!r}; valid: stdlib")
    print(f"[data] preparing the embedded stdlib-docstring corpus into {data_dir} (first use only)", flush=True)
    prepare_stdlib(data_dir, vocab_size=vocab_size, val_fraction=val_fraction)


# --------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.data",
        description="Prepare text for training: tokenize into memory-mapped uint16/uint32 token shards.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="text files or folders -> token shards + meta.json + tokenizer/")
    prep.add_argument("--input", nargs="+", default=[], help="text files, or folders searched for *.txt/*.md/*.rst")
    prep.add_argument("--corpus", choices=["stdlib"], help="use the embedded corpus (stdlib docstrings) as input")
    prep.add_argument("--out", required=True, help="output data directory (data_dir of the training config)")
    tok = prep.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="an existing Hugging Face tokenizer directory (local; never downloaded)")
    tok.add_argument("--vocab-size", type=int, help="train a byte-level BPE tokenizer of this size on the input")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for validation")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="max tokens per shard file")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m model.data prepare ...``: exit 0 on success, 2 on a user error."""
    args = _parser().parse_args(argv)
    try:
        if not args.input and not args.corpus:
            raise DataError("give --input FILES_OR_DIRS or --corpus stdlib")
        if args.input and args.corpus:
            raise DataError("give either --input or --corpus, not both")
        if args.tokenizer is None and args.vocab_size is None:
            raise DataError("give --tokenizer HF_DIR or --vocab-size N")
        if args.shard_tokens <= 0:
            raise DataError(f"--shard-tokens must be > 0, got {args.shard_tokens}")
        if args.vocab_size is not None and args.vocab_size < MIN_TRAINED_VOCAB:
            raise DataError(
                f"--vocab-size must be >= {MIN_TRAINED_VOCAB} (256 bytes + {EOS_TOKEN}), got {args.vocab_size}"
            )
        if not 0 < args.val_fraction < 1:
            raise DataError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
            raise DataError(f"--tokenizer {args.tokenizer!r} is not a directory (a local Hugging Face tokenizer)")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise DataError(f"--out {args.out!r} is a file, not a directory")
        if args.corpus:
            if args.vocab_size is None:
                raise DataError("--corpus stdlib trains its tokenizer: give --vocab-size N")
            meta = prepare_stdlib(args.out, args.vocab_size, args.val_fraction, progress=not args.no_progress)
        else:
            meta = prepare_files(
                args.input,
                args.out,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                val_fraction=args.val_fraction,
                shard_tokens=args.shard_tokens,
                progress=not args.no_progress,
            )
    except DataError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's, not the input's (disk full...): one line, the data directory unchanged
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the data directory is unchanged", file=sys.stderr)
        return 130
    print(
        f"prepared {args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), "
        f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens, "
        f"{meta['documents']} documents"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Task data for continual learning: loading, validation, tokenisation and batching.

A task is a directory in the TRACE layout (``train.json``, ``eval.json``, ``test.json``,
each a JSON array of ``{"prompt": str, "answer": str}`` records) or a JSON-lines file
(one record per line; an optional ``"split"`` field says which split a record belongs to,
default ``train``). Every bad record is reported with its file and line; nothing is
silently dropped.

Batches are left padded (what decoder-only generation needs) and the answer is the only
supervised part: prompt and padding labels are -100. Position ids are computed from the
attention mask so a sample gives the same result whatever its padding.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..seekr.batching import Encoded

SPLITS = ("train", "eval", "test")


class DataError(ValueError):
    """A task file or record that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One {"prompt", "answer"} record and where it came from (for error messages)."""
    prompt: str
    answer: str
    source: str = ""
    line: int = 0


@dataclass
class Task:
    """A named task with its splits (lists of :class:`Example`)."""
    name: str
    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)
    test: list = field(default_factory=list)
    metric: str = "exact_match"

    def split(self, name: str) -> list:
        if name not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


# --------------------------------------------------------------------------- loading

def _check_record(rec, path, line, errors):
    if not isinstance(rec, dict):
        errors.append(f"{path}:{line}: expected an object with 'prompt' and 'answer', "
                      f"got {type(rec).__name__}")
        return None
    bad = False
    for key in ("prompt", "answer"):
        if key not in rec:
            errors.append(f"{path}:{line}: missing key {key!r}")
            bad = True
        elif not isinstance(rec[key], str):
            errors.append(f"{path}:{line}: {key!r} must be a string, got {type(rec[key]).__name__}")
            bad = True
    if bad:
        return None
    if not rec["answer"].strip():
        errors.append(f"{path}:{line}: empty 'answer'")
        return None
    return Example(rec["prompt"], rec["answer"], path, line)


def _raise(errors, path):
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad record(s) in {path}:\n  {shown}{more}")


def _json_array_records(text, path):
    """Yield (record, line) for each element of a top-level JSON array, keeping line numbers."""
    dec = json.JSONDecoder()
    i, n = 0, len(text)

    def skip_ws(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    i = skip_ws(i)
    if i >= n or text[i] != "[":
        raise DataError(f"{path}:{line_of(i)}: expected a JSON array of records (or use a .jsonl file)")
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_of(e.pos)}: invalid JSON ({e.msg})") from None
        yield obj, line_of(i)
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip_ws(i + 1) != n:
                raise DataError(f"{path}:{line_of(i + 1)}: unexpected text after the JSON array")
            return
        raise DataError(f"{path}:{line_of(i)}: expected ',' or ']' in the JSON array")


def load_records(path: str) -> list:
    """Read one file of records (JSON array or JSON lines) into a list of :class:`Example`.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: invalid JSON or bad records, every problem listed with ``file:line``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    text = read_text(path)
    errors, out = [], []
    stripped = text.lstrip()
    if stripped.startswith("["):
        pairs = _json_array_records(text, path)
    else:
        pairs = _jsonl_records(text, path, errors)
    for rec, line in pairs:
        ex = _check_record(rec, path, line, errors)
        if ex is not None:
            out.append(ex)
    _raise(errors, path)
    return out


def read_text(path: str) -> str:
    """A data file's text; bytes that are not UTF-8 are a :class:`DataError` at ``file:line``."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}); "
                        "task files must be UTF-8 encoded") from None


def _jsonl_records(text, path, errors):
    for k, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw), k
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{k}: invalid JSON ({e.msg})")


def load_task(path: str, name: str | None = None, metric: str = "exact_match") -> Task:
    """Load a task from a TRACE directory or a JSON-lines file.

    A directory must hold ``train.json``; ``eval.json`` and ``test.json`` are optional
    (.jsonl variants are accepted too). In a JSON-lines file each record may carry
    ``"split": "train" | "eval" | "test"`` (default ``train``).
    """
    if name is None:
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    task = Task(name=name, metric=metric)
    if os.path.isdir(path):
        for split in SPLITS:
            for ext in (".json", ".jsonl"):
                p = os.path.join(path, split + ext)
                if os.path.isfile(p):
                    setattr(task, split, load_records(p))
                    if split == "train" and not task.train:
                        raise DataError(f"{p}: no training records (an empty list)")
                    break
            else:
                if split == "train":
                    raise FileNotFoundError(f"{path}: a task directory needs train.json (TRACE layout)")
        return task
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such task directory or file")
    text = read_text(path)
    errors = []
    for rec, line in _jsonl_records(text, path, errors):
        split = rec.get("split", "train") if isinstance(rec, dict) else "train"
        if split not in SPLITS:
            errors.append(f"{path}:{line}: 'split' must be one of {SPLITS}, got {split!r}")
            continue
        ex = _check_record(rec, path, line, errors)
        if ex is not None:
            task.split(split).append(ex)
    _raise(errors, path)
    if not task.train:
        raise DataError(f"{path}: no training records")
    return task


def write_records(path: str, examples: Iterable) -> None:
    """Write records as a TRACE-style JSON array (used by the demo and the tests)."""
    recs = [{"prompt": e.prompt, "answer": e.answer} if isinstance(e, Example) else dict(e)
            for e in examples]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n]\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tokenizers

class CharTokenizer:
    """A character-level tokenizer that needs no files: one id per character.

    Ids 0..3 are <pad>, <bos>, <eos>, <unk>. Characters outside the alphabet map to
    <unk> (and decode to nothing), so the vocabulary is fixed when the model is built.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, alphabet: str):
        chars = []
        for c in alphabet:
            if c not in chars:
                chars.append(c)
        self.alphabet = "".join(chars)
        self._id = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.alphabet)

    def __len__(self):
        return self.vocab_size

    def encode(self, text: str) -> list:
        return [self._id.get(c, self.unk_token_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.SPECIALS)
        return "".join(self.alphabet[i - n] for i in ids if n <= int(i) < self.vocab_size)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "seekr_tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump({"type": "char", "alphabet": self.alphabet}, f, ensure_ascii=False)

    @classmethod
    def load(cls, directory: str) -> "CharTokenizer":
        with open(os.path.join(directory, "seekr_tokenizer.json"), encoding="utf-8") as f:
            d = json.load(f)
        if d.get("type") != "char":
            raise ValueError(f"{directory}/seekr_tokenizer.json: unknown tokenizer type {d.get('type')!r}")
        return cls(d["alphabet"])


class HFTokenizer:
    """Adapter over a Hugging Face tokenizer loaded from a local directory (no downloads)."""

    def __init__(self, path_or_tokenizer):
        if isinstance(path_or_tokenizer, str):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(path_or_tokenizer, local_files_only=True)
        else:
            tok = path_or_tokenizer
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        if self.eos_token_id is None:
            raise ValueError("tokenizer: has no eos token; answers need one to end generation")
        # Llama tokenizers ship without a pad token; padding is masked out, eos is a safe filler.
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def __len__(self):
        return self.vocab_size

    def encode(self, text: str) -> list:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self.tok.save_pretrained(directory)


def load_tokenizer(path: str):
    """A tokenizer from a directory: the built-in char tokenizer if saved there, else HF."""
    if os.path.isfile(os.path.join(path, "seekr_tokenizer.json")):
        return CharTokenizer.load(path)
    return HFTokenizer(path)


# --------------------------------------------------------------------------- tokenisation


def encode_example(ex: Example, tokenizer, max_prompt_len: int, max_answer_len: int) -> Encoded:
    """Tokenise one example.

    The prompt keeps its *last* ``max_prompt_len`` tokens (bos included when it fits): the
    end of a prompt, next to the answer, matters most. The answer keeps its first
    ``max_answer_len - 1`` tokens followed by eos.
    """
    p = tokenizer.encode(ex.prompt)
    if tokenizer.bos_token_id is not None:
        p = [tokenizer.bos_token_id] + p
    p = p[-max_prompt_len:] if max_prompt_len > 0 else []
    a = tokenizer.encode(ex.answer)[: max(max_answer_len - 1, 0)] + [tokenizer.eos_token_id]
    return Encoded(p, a)


class EncodedDataset:
    """A task split tokenised once; items are :class:`Encoded`."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_prompt_len: int, max_answer_len: int):
        if max_prompt_len < 1 or max_answer_len < 1:
            raise ValueError("max_prompt_len and max_answer_len must be >= 1")
        self.examples = list(examples)
        self.items = [encode_example(e, tokenizer, max_prompt_len, max_answer_len) for e in self.examples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = False) -> list:
    """Index lists of the *global* batches of one epoch, the same on every rank."""
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out



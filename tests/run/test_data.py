"""Task data: TRACE / JSON-lines loading, bad records with file:line, tokenisation, batching."""
import json

import pytest

from seekr_kernels.seekr.config import ConfigError
from seekr_kernels.run.config import from_dict, load_config
from seekr_kernels.run.data import (CharTokenizer, DataError, Example, EncodedDataset, encode_example,
                                    epoch_batches, load_records, load_task, load_tokenizer, write_records)
from seekr_kernels.seekr.batching import collate, shard


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_trace_directory(tmp_path):
    d = tmp_path / "FOMC"
    write_records(str(d / "train.json"), [Example("p1", "a1"), Example("p2", "a2")])
    write_records(str(d / "test.json"), [Example("q", "b")])
    t = load_task(str(d))
    assert t.name == "FOMC"
    assert [(e.prompt, e.answer) for e in t.train] == [("p1", "a1"), ("p2", "a2")]
    assert t.eval == [] and len(t.test) == 1
    assert t.train[1].line == 3 and t.train[1].source.endswith("train.json")


def test_jsonl_with_splits(tmp_path):
    p = _write(tmp_path / "t.jsonl", "\n".join([
        json.dumps({"prompt": "a", "answer": "b"}),
        "",
        json.dumps({"prompt": "c", "answer": "d", "split": "test"}),
    ]))
    t = load_task(p)
    assert t.name == "t" and len(t.train) == 1 and len(t.test) == 1


@pytest.mark.parametrize("rec, msg", [
    ({"prompt": "a"}, "missing key 'answer'"),
    ({"answer": "a"}, "missing key 'prompt'"),
    ({"prompt": "a", "answer": "  "}, "empty 'answer'"),
    ({"prompt": 3, "answer": "a"}, "'prompt' must be a string"),
    ({"prompt": "a", "answer": ["x"]}, "'answer' must be a string"),
    (["a", "b"], "expected an object"),
])
def test_bad_record_names_file_and_line(tmp_path, rec, msg):
    good = json.dumps({"prompt": "p", "answer": "a"})
    p = _write(tmp_path / "train.jsonl", f"{good}\n{good}\n{json.dumps(rec)}\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    assert f"{p}:3: {msg}" in str(e.value)


def test_bad_record_in_json_array_line(tmp_path):
    p = _write(tmp_path / "x" / "train.json",
               '[\n  {"prompt": "p", "answer": "a"},\n  {"prompt": "p",\n   "answer": ""}\n]\n')
    with pytest.raises(DataError, match=r"train.json:3: empty 'answer'"):
        load_task(str(tmp_path / "x"))


def test_every_bad_record_reported(tmp_path):
    lines = [json.dumps({"prompt": "p"}), json.dumps({"prompt": "p", "answer": "a"}), json.dumps({"answer": "a"})]
    p = _write(tmp_path / "t.jsonl", "\n".join(lines))
    with pytest.raises(DataError) as e:
        load_records(p)
    assert "2 bad record(s)" in str(e.value) and ":1:" in str(e.value) and ":3:" in str(e.value)


def test_invalid_json(tmp_path):
    p = _write(tmp_path / "t.jsonl", '{"prompt": "p", "answer": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"t.jsonl:2: invalid JSON"):
        load_records(p)
    p = _write(tmp_path / "d" / "train.json", '[{"prompt": "p", "answer": "a"},\n {"prompt": ]')
    with pytest.raises(DataError, match=r"train.json:2: invalid JSON"):
        load_records(p)


def test_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.json"):
        load_task(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        load_task(str(tmp_path / "nope"))


def test_char_tokenizer_roundtrip(tmp_path):
    tok = CharTokenizer("abc:=")
    ids = tok.encode("ab:c?")
    assert ids[-1] == tok.unk_token_id and tok.decode(ids) == "ab:c"
    tok.save(str(tmp_path))
    tok2 = load_tokenizer(str(tmp_path))
    assert isinstance(tok2, CharTokenizer) and tok2.alphabet == tok.alphabet and tok2.vocab_size == 9


def test_encode_truncation_keeps_prompt_end():
    tok = CharTokenizer("abcdefgh")
    e = encode_example(Example("abcdefgh", "abcdef"), tok, max_prompt_len=4, max_answer_len=3)
    assert tok.decode(e.prompt_ids) == "efgh" and e.prompt_ids[0] != tok.bos_token_id
    assert e.answer_ids == tok.encode("ab") + [tok.eos_token_id]
    e = encode_example(Example("ab", "c"), tok, 8, 8)
    assert e.prompt_ids == [tok.bos_token_id] + tok.encode("ab")


def test_collate_left_padding_labels_positions():
    tok = CharTokenizer("abcd")
    ds = EncodedDataset([Example("ab", "c"), Example("abcd", "dd")], tok, 16, 16)
    b = collate([ds[0], ds[1]], tok.pad_token_id, pad_to_multiple_of=4)
    assert b["input_ids"].shape == (2, 8)
    # sample 0: bos a b c eos (5 tokens) left padded by 3
    assert b["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert b["position_ids"][0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert b["labels"][0].tolist() == [-100] * 6 + [tok.encode("c")[0], tok.eos_token_id]
    assert b["labels"][1].tolist()[-3:] == tok.encode("dd") + [tok.eos_token_id]
    p = collate([ds[0], ds[1]], tok.pad_token_id, with_answer=False)
    assert "labels" not in p and p["input_ids"].shape == (2, 5)
    assert p["input_ids"][0, -1].item() == tok.encode("b")[0]


def test_batches_and_shards_are_rank_consistent():
    a = epoch_batches(10, 4, seed=3, epoch=1)
    assert a == epoch_batches(10, 4, seed=3, epoch=1) and a != epoch_batches(10, 4, seed=3, epoch=2)
    assert sorted(sum(a, [])) == list(range(10)) and [len(x) for x in a] == [4, 4, 2]
    gb = [7, 1, 4, 9, 2]
    parts = [shard(gb, r, 2) for r in range(2)]
    assert parts[0] + parts[1] == gb


def test_config_errors_name_the_key(tmp_path):
    base = {"tasks": [{"path": "x"}]}
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown key"):
        from_dict({**base, "train": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"^train\.lr: expected a number"):
        from_dict({**base, "train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"^method: must be one of"):
        from_dict({**base, "method": "ewc"})
    with pytest.raises(ConfigError, match=r"^tasks\[0\]\.epochs: must be > 0"):
        from_dict({"tasks": [{"path": "x", "epochs": 0}]})
    with pytest.raises(ConfigError, match=r"^tasks\[1\]\.colour: unknown key"):
        from_dict({"tasks": [{"path": "x"}, {"path": "y", "colour": 1}]})
    with pytest.raises(ConfigError, match=r"^model\.arch\.hiden_size: unknown LlamaConfig field"):
        from_dict({**base, "model": {"arch": {"hiden_size": 8}}})
    with pytest.raises(ConfigError, match=r"^tasks: at least one task"):
        from_dict({})
    with pytest.raises(ConfigError, match=r"^replay\.ratio"):
        from_dict({**base, "replay": {"ratio": 0}})
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tasks: [data/a]\ntrain:\n  lr: 1e-4\n  batch_size: 4\n")
    (tmp_path / "data" / "a").mkdir(parents=True)
    c = load_config(str(cfg), {"replay.ratio": 0.5})
    assert c.train.lr == 1e-4 and c.replay.ratio == 0.5
    assert c.tasks[0].path == str(tmp_path / "data" / "a")
    cfg.write_text("tasks: [a]\ndistill:\n  attn_weigth: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: distill\.attn_weigth: unknown key"):
        load_config(str(cfg))

"""File formats unchanged by issue 19 (every digest, manifest and checksummed JSON moved
into utils/store.py): files written before the move (tests/data/legacy/store_4e026d2, made by
make_store.py there at 4e026d2) load and verify, and writing what they hold again gives the
same bytes."""
import json
import os
import shutil

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels.run import checkpoint as ck
from seekr_kernels.seekr.importance import Importance
from seekr_kernels.seekr.memory import ReplayMemory
from seekr_kernels.utils import store

OLD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "legacy", "store_4e026d2")


def files(d):
    out = {}
    for root, _, fs in os.walk(d):
        for f in fs:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def test_teacher_cache_v3_same_bytes(tmp_path):
    c = sk.TeacherCache.load(os.path.join(OLD, "cache_v3.safetensors"))
    assert c.meta["written_by"] == "4e026d2" and isinstance(c.logits, sk.SampledTeacher)
    c.save(tmp_path / "c.safetensors")
    assert (tmp_path / "c.safetensors").read_bytes() == open(os.path.join(OLD, "cache_v3.safetensors"), "rb").read()


def _without_positions(fs):
    """The files with the one intended change since that commit taken out: a manifest's
    layout now records which logits rows the memory holds (``logits_positions``, issue 21;
    an older manifest reads as ``predict``), which changes the manifests' seals and the
    index's digests of them. Data files must be the same bytes."""
    out = {}
    for name, raw in fs.items():
        if name.endswith(".json"):
            obj = json.loads(raw)
            obj.get("layout", {}).pop("logits_positions", None)
            obj.pop("sha256", None)
            obj.pop("manifest_sha256", None)
            for e in obj.get("tasks", []) if isinstance(obj.get("tasks"), list) else []:
                if isinstance(e, dict):
                    e.pop("manifest_sha256", None)
                    e.pop("sha256", None)
            raw = json.dumps(obj, sort_keys=True).encode()
        out[name] = raw
    return out


def test_replay_memory_same_bytes(tmp_path):
    mem = ReplayMemory.load(os.path.join(OLD, "memory"))
    assert [t.name for t in mem.tasks] == ["dense", "topk"]
    mem.save(str(tmp_path / "m"))
    old = _without_positions(files(os.path.join(OLD, "memory")))
    assert _without_positions(files(tmp_path / "m")) == old
    # one task at a time (the trainer's path): the same task files and index
    for i in range(len(mem.tasks)):
        mem.save_task(str(tmp_path / "t"), i)
    assert _without_positions(files(tmp_path / "t")) == old


def _safetensors_parts(raw):
    """(header JSON, data bytes): safetensors writes the metadata entries in hash order, so
    two writes of the same file agree in these, not always byte for byte."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_importance_same_bytes(tmp_path):
    imp = Importance.load(os.path.join(OLD, "importance.safetensors"))
    assert len(imp.history) == 2
    imp.save(str(tmp_path / "i.safetensors"))
    old = open(os.path.join(OLD, "importance.safetensors"), "rb").read()
    assert _safetensors_parts((tmp_path / "i.safetensors").read_bytes()) == _safetensors_parts(old)


def test_checkpoint_manifest_same_bytes(tmp_path):
    src = os.path.join(OLD, "checkpoint")
    man = ck.verify(src)
    meta = {k: v for k, v in man.items() if k not in ("format", "kind", "files", "sha256")}
    assert meta["global_step"] == 7

    def fill(tmp):
        for rel in man["files"]:
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(tmp, rel))
    assert ck.write(str(tmp_path / "ck"), fill, meta=meta) == man
    assert files(tmp_path / "ck") == files(src)


def test_sealed_run_state_digest():
    """state.json as the trainer seals it (canonical JSON without its ``sha256``)."""
    st = json.load(open(os.path.join(OLD, "state.json"), encoding="utf-8"))
    assert st["sha256"] == store.digest_json(st, skip="sha256")
    store.check_seal(st, "state.json", "run state")
    assert store.seal(dict(st))["sha256"] == st["sha256"]


def _tiny_recipe():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    cfg = {"method": "seekr", "seed": 3, "replay": {"ratio": 0.5},
           "distill": {"query_budget": 2, "layer_budget": 1, "head_budget": 2}}
    return sk.SeekrRecipe(cfg, model=model, pad_token_id=0)


def test_recipe_state_same_bytes(tmp_path):
    rc = _tiny_recipe().load(os.path.join(OLD, "recipe"))
    assert rc.task_names == ["first"] and rc.current is not None
    rc.save(str(tmp_path / "r"))
    new, old = files(tmp_path / "r"), files(os.path.join(OLD, "recipe"))
    # The intended changes since that commit: the config key `recipe` is spelled `preset`
    # (seekr/config.py KEY_ALIASES), issue 21 added distill keys (at their package values),
    # and the memory's manifests record their logits rows. Everything else is the same.
    added = {"logits_positions", "head_selection", "padded_rows"}
    metas = []
    for fs in (new, old):
        meta = json.loads(fs.pop("recipe.json"))
        cfg = meta["config"]
        if "recipe" in cfg:
            cfg["preset"] = cfg.pop("recipe")
        for k in added:
            cfg["distill"].pop(k, None)
        metas.append(meta)
    assert metas[0] == metas[1]
    assert _without_positions(new) == _without_positions(old)


@pytest.mark.parametrize("name", ["cache_v3.safetensors", "importance.safetensors"])
def test_damaged_old_files_are_refused(tmp_path, name):
    raw = bytearray(open(os.path.join(OLD, name), "rb").read())
    raw[-2] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        (sk.TeacherCache if name.startswith("cache") else Importance).load(str(tmp_path / name))

"""LoRA (PEFT): model.lora validated by key, adapters checkpointed and resumed mid-task
bit-identical, the final model merged or as an adapter, a PEFT model through the API."""
import importlib.util
import json
import os

import pytest
import torch

from seekr_kernels.run.checkpoint import is_peft_model
from seekr_kernels.seekr.config import ConfigError
from seekr_kernels.run.config import ModelConfig
from seekr_kernels.run.models import build_model
from seekr_kernels.run.trainer import ContinualTrainer

from test_checkpoint import _Crash, crash_at, tree_bytes  # noqa: E402  (same folder)
from tiny_runs import tiny_config, tiny_tasks  # noqa: E402

peft = pytest.importorskip("peft", reason="peft is needed for the LoRA path (pip install peft)")

LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_tasks(tmp_path_factory.mktemp("data"))[:2]


def lora_config(out, data, method, **over):
    return tiny_config(out, data, method, **{"model.lora": dict(LORA), "train.lr": 1e-2, **over})


def adapters(tr):
    return {n: p.detach().clone() for n, p in tr.base.named_parameters() if p.requires_grad}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_lora_keys_validated(tmp_path, data, monkeypatch):
    for val, msg in [({"rank": 4}, r"model.lora.rank: unknown key \(known: alpha, dropout, r, save, target_modules\)"),
                     ({"dropout": 1.5}, "model.lora.dropout: must lie in"),
                     ({"r": 0}, "model.lora.r: must be > 0"),
                     ({"target_modules": []}, "model.lora.target_modules: expected a non-empty list"),
                     ({"save": "both"}, "model.lora.save: must be one of"),
                     (True, "model.lora: expected a mapping")]:
        with pytest.raises(ConfigError, match=msg):
            tiny_config(tmp_path, data, "sft", **{"model.lora": val})
    with pytest.raises(ConfigError, match="model.lora.target_modules: .*nope"):
        ContinualTrainer(tiny_config(tmp_path, data, "sft", **{"model.lora": {"target_modules": ["nope"]}}),
                         quiet=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "peft" else real(n, *a))
    with pytest.raises(ConfigError, match=r"model.lora: needs the peft package: pip install peft"):
        tiny_config(tmp_path, data, "sft", **{"model.lora": {}})


@pytest.mark.parametrize("method", ["seekr", "replay+logits"])
def test_lora_run_killed_mid_task_resumes_bit_identical(tmp_path, data, monkeypatch, method):
    """Adapter checkpoints (no full model), dropout's RNG restored: the resumed run's
    adapters, results and final model equal the uninterrupted run's."""
    over = {"train.save_steps": 2}
    a = ContinualTrainer(lora_config(tmp_path / "a", data, method, **over), quiet=True)
    ra = a.run()
    assert all("lora_" in n for n in adapters(a)) and adapters(a)
    with monkeypatch.context() as mp:
        crash_at(mp, 6)                              # task 2 (steps 4-7), from the step-4 checkpoint
        with pytest.raises(_Crash):
            ContinualTrainer(lora_config(tmp_path / "b", data, method, **over), quiet=True).run()
    ckd = tmp_path / "b" / "checkpoints" / "step-000004"
    names = set(os.listdir(ckd))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)
    b = ContinualTrainer(lora_config(tmp_path / "b", data, method, **over), quiet=True)
    rb = b.run(resume=True)
    assert rb["matrix"] == ra["matrix"]
    pa, pb = adapters(a), adapters(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert tree_bytes(tmp_path / "a" / "final") == tree_bytes(tmp_path / "b" / "final")
    # final (model.lora.save: merged): a plain Hugging Face model, no PEFT needed
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "final"))
    assert json.loads((tmp_path / "a" / "final" / "config.json").read_text())["use_cache"] is True
    ids = torch.randint(4, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(m, ids), logits(a.base, ids), atol=1e-5, rtol=1e-5)


def test_peft_model_through_the_api_and_adapter_save(tmp_path, data):
    """A PEFT model built by the user trains its adapters (the recipe snapshots adapters,
    no class rebuilt); with save: adapter the final folder loads as base + adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from seekr_kernels.run.data import CharTokenizer
    cfg = tiny_config(tmp_path / "run", data, "seekr", **{"train.lr": 1e-2})
    tok = CharTokenizer(cfg.model.alphabet)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    tr = ContinualTrainer(cfg, model=model, tokenizer=tok, quiet=True)
    res = tr.run()
    assert res["complete"] and tr.lora and tr.base is model
    frozen = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters()
              if "lora_" not in n}
    assert frozen.keys() == before.keys() and all(torch.equal(p, before[n]) for n, p in frozen.items())
    final = tmp_path / "run" / "final"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(final))
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "run" / "base")
    loaded = build_model(ModelConfig(path=str(final)), tok)
    assert is_peft_model(loaded)
    ids = torch.randint(4, 20, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(loaded, ids), logits(tr.base, ids), atol=1e-6, rtol=1e-6)
    from seekr_kernels.cli import main
    assert main(["eval", "--model", str(final), "--task", data[0], "--max-prompt-len", "12",
                 "--max-answer-len", "6", "--out", str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["tasks"]["rev"]["score"] == pytest.approx(res["matrix"][-1][0])
    # a LoRA checkpoint refuses a full-model run (and vice versa), naming the file
    from seekr_kernels.run.checkpoint import CheckpointError
    full = ContinualTrainer(tiny_config(tmp_path / "run", data, "seekr", **{"train.lr": 1e-2}), quiet=True)
    with pytest.raises(CheckpointError, match="holds LoRA adapters, the run trains the full model"):
        full.run(resume=True, allow_config_change=["model"])


_SAVE_ADAPTER = r"""
import hashlib, sys, torch
import peft
from transformers import LlamaConfig, LlamaForCausalLM
from seekr_kernels.run.models import save_model
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=32, max_position_embeddings=16))
model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"]))
save_model(model, type("Tok", (), {"save": lambda self, d: None})(), sys.argv[1])
print(hashlib.sha256(open(sys.argv[1] + "/adapter_config.json", "rb").read()).hexdigest())
"""


def test_adapter_config_is_the_same_bytes_in_every_process(tmp_path):
    """PEFT writes target_modules (a set) in hash order, which PYTHONHASHSEED changes from
    process to process: the saved adapter_config.json must not (a run's final/ is
    byte-identical between an uninterrupted and a resumed run)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", _SAVE_ADAPTER, str(tmp_path / seed)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        digests.add(out.stdout.split()[-1])
    assert len(digests) == 1, digests
    cfg = json.loads((tmp_path / "1" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"])

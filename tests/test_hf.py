"""SEEKR inside the Hugging Face Trainer and TRL (seekr_kernels.hf), in one process: the
replay step equals the package's own trainer and the recipe, num_items_in_batch is
honoured, loss parts reach the Trainer's log, LoRA + gradient checkpointing, TRL's
SFTTrainer and its reference-model copy, the shipped examples."""
import copy
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers", reason="seekr_kernels.hf needs transformers")

import seekr_kernels as sk  # noqa: E402
from seekr_kernels.run.config import from_dict  # noqa: E402
from seekr_kernels.run.data import Example, Task  # noqa: E402
from seekr_kernels.run.trainer import ContinualTrainer  # noqa: E402
from seekr_kernels.hf import REPLAY_KEY, SeekrConfig, SeekrTrainer, task_samples  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tasks(n=16):
    rules = {"rev": lambda x: x[::-1], "rot": lambda x: x[1:] + x[:1]}
    xs = ["".join("abcdefgh"[(i * 7 + j * 3) % 8] for j in range(3)) for i in range(n)]
    return [Task(name, [Example(f"{name}:{x}=", rule(x)) for x in xs], test=[]) for name, rule in rules.items()]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """The package's trainer after one seekr task (its memory holds teachers)."""
    out = tmp_path_factory.mktemp("own")
    cfg = from_dict({
        "method": "seekr", "output_dir": str(out), "seed": 5, "device": "cpu",
        "model": {"arch": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32},
                  "alphabet": "abcdefghnorstvw:="},
        "tasks": [{"name": "rev", "path": "<rev>"}],
        "train": {"batch_size": 4, "grad_accum": 2, "lr": 3e-3, "max_prompt_len": 12, "max_answer_len": 6,
                  "pad_to_multiple_of": 1},
        "replay": {"ratio": 0.5},
        "distill": {"layer_budget": 2, "head_budget": 3, "query_budget": 4, "backend": "torch"},
        "eval": {"batch_size": 16}, "log": {"progress": False}})
    tr = ContinualTrainer(cfg, tasks=_tasks()[:1], quiet=True)
    tr.run()
    return tr


def _hf_trainer(own, tmp, **kw):
    """A SeekrTrainer on the own trainer's model, with a copy of its recipe state."""
    rc = sk.SeekrRecipe(own.cfg, model=own.base, pad_token_id=own.tokenizer.pad_token_id)
    rc.load_state_dict(own.recipe.state_dict())
    args = SeekrConfig(output_dir=str(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, **kw)
    return SeekrTrainer(model=own.base, args=args, recipe=rc)


def _replay_window(trainer, keys):
    """The replay micro-batches the Trainer's dataloader yields for a global replay batch."""
    from seekr_kernels.hf import _ReplayLoader
    loader = _ReplayLoader(trainer, [{"input_ids": torch.zeros(1, 1, dtype=torch.long)}] * 4)
    return list(loader._replay_batches(keys))


def test_replay_step_equals_own_trainer_and_recipe(own_run, tmp_path, own_replay_grads):
    tr = own_run
    model = tr.base
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                  # a student that has drifted from its teacher
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    keys = tr.memory.keys()[:4]
    # 1. the own trainer's replay step (grad_accum 2): gradients just before the optimiser step
    grads, rec = own_replay_grads(tr, keys)
    # 2. the HF path: the Trainer's batch count, then training_step per micro-batch
    hf = _hf_trainer(tr, tmp_path)
    window = _replay_window(hf, keys)
    assert len(window) == 2 and all(REPLAY_KEY in b for b in window)
    batches, n = hf.get_batch_samples(iter(window), 2, torch.device("cpu"))
    assert int(n) == hf.recipe.batch(keys)["num_items_in_batch"]
    hf.current_gradient_accumulation_steps = 2
    total = sum(float(hf.training_step(model, b, n)) for b in batches)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=0, msg=name)
    model.zero_grad(set_to_none=True)
    # 3. the recipe's replay_loss on the whole global batch gives the same objective
    whole, parts = hf.recipe.replay_loss(model, hf.recipe.batch(keys))
    assert total == pytest.approx(float(whole.detach()), rel=1e-6)
    assert set(parts) == {"ce", "logits_kl", "attn_kl"} and float(parts["attn_kl"]) > 0
    # the parts of the step reach the Trainer's log
    seen = []
    hf.callback_handler.callbacks.append(type("C", (sk.hf.TrainerCallback,), {
        "on_log": lambda self, args, state, control, logs=None, **kw: seen.append(dict(logs))})())
    hf.log({"loss": total})
    for k in ("ce", "logits_kl", "attn_kl"):
        assert seen[-1][f"replay_{k}"] == pytest.approx(rec[k], rel=1e-6, abs=1e-9)
    assert seen[-1]["replay_loss"] == pytest.approx(total, rel=1e-6)
    assert hf.state.log_history[-1]["replay_attn_kl"] == seen[-1]["replay_attn_kl"]


def test_num_items_in_batch_is_honoured(own_run, tmp_path):
    tr = own_run
    model = tr.base.eval()
    hf = _hf_trainer(tr, tmp_path)
    keys = tr.memory.keys()[:4]
    window = _replay_window(hf, keys)
    n = hf.recipe.batch(keys)["num_items_in_batch"]
    with torch.no_grad():
        a, pa = hf.compute_loss(model, window[0], return_outputs=True, num_items_in_batch=n)
        b, pb = hf.compute_loss(model, window[0], return_outputs=True, num_items_in_batch=2 * n)
        c, _ = hf.compute_loss(model, window[0], return_outputs=True)     # the batch's own global count
    torch.testing.assert_close(pb["ce"], pa["ce"] / 2)
    torch.testing.assert_close(pb["logits_kl"], pa["logits_kl"] / 2)
    torch.testing.assert_close(pb["attn_kl"], pa["attn_kl"])              # per sample, not per token
    torch.testing.assert_close(c, a)
    assert float(b) < float(a)
    # a train batch: the Trainer's own convention (token sum / num_items_in_batch)
    from seekr_kernels.hf import SeekrDataCollator
    rows = [{"prompt_ids": [1, 5, 6], "answer_ids": [7, 8, 2]}, {"prompt_ids": [1, 9], "answer_ids": [10, 2]}]
    batch = SeekrDataCollator(0, 1)(rows)
    with torch.no_grad():
        l1 = hf.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(4))
        l2 = hf.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(8))
        full = sk.seekr.losses.ce_sum(model(**batch).logits, batch["labels"])
    torch.testing.assert_close(l1, full / 4)
    torch.testing.assert_close(l2, full / 8)


def _rows(t, n=12):
    g = torch.Generator().manual_seed(t)
    out = []
    for _ in range(n):
        p = torch.randint(3, 40, (3,), generator=g).tolist()
        out.append({"prompt_ids": [1, t + 3] + p, "answer_ids": [(x * (t + 2)) % 37 + 3 for x in p[:2]] + [2]})
    return out


def _tiny_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=40,
                                        max_position_embeddings=32, pad_token_id=0, **config))


def test_lora_gradient_checkpointing_sequence_and_checkpoints(tmp_path):
    """A PEFT LoRA model with (non-reentrant) gradient checkpointing learns two tasks: the
    pre-task snapshot holds only adapters, the model stays a PeftModel, the base weights
    do not move, replay parts reach every log callback, checkpoints carry the recipe."""
    peft = pytest.importorskip("peft", reason="peft is needed for the LoRA path")
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               lora_alpha=8))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    args = SeekrConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                       learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=4, use_cpu=True,
                       report_to=[], disable_tqdm=True, gradient_checkpointing=True, replay_ratio=4,
                       replay_cycle=2, query_budget=3, layer_budget=2, head_budget=3, seekr_backend="torch",
                       replay_pad_to_multiple_of=1)
    trainer = SeekrTrainer(model=model, args=args)
    snaps, logs = [], []

    class Probe(sk.hf.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if trainer.recipe.current is not None:
                snaps.append(trainer.recipe.current.before)

        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))
    seen = logs
    trainer.add_callback(Probe())
    res = trainer.train_tasks([("a", _rows(0)), ("b", _rows(1))])
    assert res == {"tasks": ["a", "b"]}
    assert type(trainer.model).__name__.startswith("PeftModel") and sk.llama.is_patched(trainer.model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
    assert snaps and all(n.find("lora_") >= 0 for n in snaps[-1].tensors)
    for n, p in trainer.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    parts = [h for h in logs if "replay_attn_kl" in h]
    assert parts and all(h["replay_ce"] > 0 and h["replay_logits_kl"] > 0 for h in parts)
    assert len(trainer.recipe.memory.tasks) == 2 and trainer.recipe.memory.tasks[0].has_attention
    assert [h["name"] for h in trainer.seekr_history] == ["a", "b"] and trainer.seekr_history[0]["heads"]
    ck = sorted((c for c in os.listdir(tmp_path / "b") if c.startswith("checkpoint-")),
                key=lambda c: int(c.split("-")[1]))      # the task's checkpoints; final/ is its end
    assert ck and all(os.path.isdir(tmp_path / "b" / c / "seekr_recipe") for c in ck)
    saved = sk.SeekrRecipe(trainer.recipe.cfg, model=trainer.model).load(str(tmp_path / "b" / ck[-1] / "seekr_recipe"))
    assert saved.current is not None and saved.current.name == "b" and saved.num_tasks == 1
    # the task's end: the adapter and the recipe state after end_task
    final = tmp_path / "b" / "final"
    assert (final / "adapter_config.json").is_file() and sk.hf.verify_checkpoint(str(final))["task"] == "b"
    done = sk.SeekrRecipe(trainer.recipe.cfg, model=trainer.model).load(str(final / "seekr_recipe"))
    assert done.current is None and done.task_names == ["a", "b"]


def test_arguments_validate_and_parse(tmp_path):
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(SeekrConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--seekr_method", "replay+logits", "--replay_ratio", "0.5",
         "--seekr_recipe", "official", "--attn_log_eps", "0", "--use_cpu", "true"])
    rc = args.seekr_recipe_config()
    assert rc.method == "replay+logits" and rc.replay.ratio == 0.5
    assert rc.distill.attn_log_eps == 0.0 and rc.replay.subset == "first"       # explicit wins, preset fills
    assert args.remove_unused_columns is False
    with pytest.raises(ValueError, match="query_budget"):
        SeekrConfig(output_dir=str(tmp_path), query_budget=-1, use_cpu=True)
    with pytest.raises(ValueError, match="use_reentrant"):
        SeekrConfig(output_dir=str(tmp_path), gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": True}, use_cpu=True)
    from datasets import Dataset
    with pytest.raises(ValueError, match="remove_unused_columns"):
        SeekrTrainer(model=_tiny_llama(), train_dataset=Dataset.from_list(_rows(0)),
                     args=SeekrConfig(output_dir=str(tmp_path), remove_unused_columns=True, use_cpu=True,
                                      report_to=[]))
    ts = task_samples([{"input_ids": [1, 4, 5, 6], "completion_mask": [0, 0, 1, 1]}, {"input_ids": [1, 7, 8]}])
    assert (ts[0].prompt_ids, ts[0].answer_ids) == ([1, 4], [5, 6]) and ts[1].prompt_ids == []
    with pytest.raises(ValueError, match="suffix"):
        task_samples([{"input_ids": [1, 4, 5], "labels": [1, -100, 5]}])[0]


#: The argument fields (public API: names and the recipe keys they set).
ARGUMENT_KEYS = {
    "seekr_method": ("method",), "seekr_recipe": ("preset",), "replay_ratio": ("replay", "ratio"),
    "replay_cycle": ("replay", "cycle"), "replay_batch_size": ("replay", "batch_size"),
    "replay_subset": ("replay", "subset"), "replay_in_accumulation": ("replay", "in_accumulation"),
    "replay_order": ("replay", "order"), "replay_outnumbered": ("replay", "outnumbered"),
    "replay_pad_to_multiple_of": ("pad_to_multiple_of",), "logits_weight": ("distill", "logits_weight"),
    "attn_weight": ("distill", "attn_weight"), "layer_budget": ("distill", "layer_budget"),
    "head_budget": ("distill", "head_budget"), "query_budget": ("distill", "query_budget"),
    "query_sampling": ("distill", "query_sampling"), "sensitivity_region": ("distill", "sensitivity_region"),
    "sensitivity_batch_size": ("distill", "sensitivity_batch_size"),
    "sensitivity_padding": ("distill", "sensitivity_padding"), "padded_rows": ("distill", "padded_rows"),
    "forgettability_norm": ("distill", "forgettability_norm"), "teacher_logits": ("distill", "teacher_logits"),
    "teacher_logits_k": ("distill", "teacher_logits_k"), "teacher_logits_topk": ("distill", "teacher_logits_topk"),
    "logits_positions": ("distill", "logits_positions"), "head_selection": ("distill", "head_selection"),
    "fused_lm_head": ("distill", "fused_lm_head"), "attn_log_eps": ("distill", "attn_log_eps"),
    "seekr_backend": ("distill", "backend"), "capture_batch_size": ("capture_batch_size",),
}


def test_every_recipe_key_is_a_generated_argument_field(tmp_path):
    """A recipe key added to the config is a field of the arguments (help included) without
    an edit here; the names stay those of ARGUMENT_KEYS, and none shadows a field of
    TrainingArguments (or TRL's SFTConfig)."""
    import dataclasses

    from transformers import TrainingArguments

    from seekr_kernels.integrations import hf
    from seekr_kernels.seekr.config import RecipeConfig
    keys = set()
    for f in dataclasses.fields(RecipeConfig):
        if dataclasses.is_dataclass(f.default_factory):
            keys |= {(f.name, g.name) for g in dataclasses.fields(f.default_factory)}
        else:
            keys.add((f.name,))
    args = {f.name: f for f in dataclasses.fields(hf.SeekrArguments)}
    assert set(hf._FIELDS.values()) | {(k,) for k in hf._FROM_TRAINING_ARGS} == keys
    assert hf._FIELDS == ARGUMENT_KEYS and set(args) == set(ARGUMENT_KEYS)
    for name, f in args.items():
        assert len(f.metadata["help"]) > 10, name
        assert f.default is None or name in ("seekr_method", "seekr_recipe"), name
    assert (args["seekr_method"].default, args["seekr_recipe"].default) == ("seekr", "package")
    assert "'first' with seekr_recipe='official'" in args["replay_subset"].metadata["help"]
    assert not set(args) & {f.name for f in dataclasses.fields(TrainingArguments)}
    try:
        from trl import SFTConfig
    except ImportError:
        pass
    else:
        assert not set(args) & {f.name for f in dataclasses.fields(SFTConfig)}
    # the keys the training arguments give
    a = SeekrConfig(output_dir=str(tmp_path), seed=7, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                    use_cpu=True)
    rc = a.seekr_recipe_config()
    assert (rc.seed, rc.batch_size, rc.grad_accum) == (7, 3 * a.world_size * 2, 2)


def test_argument_errors_name_the_fields():
    from seekr_kernels.hf import SeekrArguments
    from seekr_kernels.seekr.config import ConfigError
    for kw, msg in [({"seekr_method": "x"}, "seekr_method: must be one of"),
                    ({"seekr_recipe": "paper"}, "seekr_recipe: must be one of"),
                    ({"layer_budget": 0}, "layer_budget: must be > 0"),
                    ({"replay_ratio": 1.5}, "replay_ratio: a count"),
                    ({"replay_pad_to_multiple_of": 0}, "replay_pad_to_multiple_of: must be > 0"),
                    ({"seekr_backend": "gpu"}, "seekr_backend: must be one of")]:
        with pytest.raises(ConfigError, match=f"^{msg}"):
            SeekrArguments(**kw)


def test_recipe_warnings_name_the_argument_fields(tmp_path):
    """A warning of the recipe about a key (teacher_logits_k above the vocabulary) names
    the argument field, as the errors do."""
    import warnings
    args = SeekrConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                       save_strategy="no", disable_tqdm=True, max_steps=1, seekr_method="replay+logits",
                       replay_ratio=2, teacher_logits="topk", teacher_logits_k=500, seekr_backend="torch")
    tr = SeekrTrainer(model=_tiny_llama(), args=args)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tr.train_task(_rows(0), "a")
    msgs = [str(w.message) for w in seen if "vocabulary" in str(w.message)]
    assert msgs and msgs[0].startswith("teacher_logits_k: 500 is more than the model's vocabulary (40 tokens)")


def test_argument_parser_round_trip(tmp_path):
    from transformers import HfArgumentParser
    values = {"seekr_recipe": "official", "replay_ratio": 0.25, "replay_in_accumulation": False, "layer_budget": 2,
              "teacher_logits": "sampled", "teacher_logits_k": 16, "fused_lm_head": "false",
              "seekr_backend": "torch", "attn_log_eps": 0.0, "replay_pad_to_multiple_of": 4}
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    argv += [x for k, v in values.items() for x in (f"--{k}", str(v))]
    (parsed,) = HfArgumentParser(SeekrConfig).parse_args_into_dataclasses(argv)
    built = SeekrConfig(output_dir=str(tmp_path), use_cpu=True, **values)
    assert {k: getattr(parsed, k) for k in values} == values
    assert parsed.seekr_dict() == built.seekr_dict() and parsed.replay_cycle is None
    rc = parsed.seekr_recipe_config()
    assert rc == built.seekr_recipe_config() and rc.preset == "official"
    assert (rc.replay.ratio, rc.replay.in_accumulation, rc.replay.subset) == (0.25, False, "first")
    assert (rc.distill.teacher_logits_k, rc.distill.backend, rc.pad_to_multiple_of) == (16, "torch", 4)
    assert rc.distill.query_budget == 0 and rc.distill.attn_log_eps == 0.0       # preset fills, explicit wins

def test_trl_config_pickles_under_both_module_names(tmp_path):
    """The Trainer torch.saves its arguments into every checkpoint: SeekrSFTConfig must be
    a class pickle can name (it is made when TRL is first needed)."""
    import pickle
    pytest.importorskip("trl", reason="TRL is needed for SeekrSFTConfig")
    from seekr_kernels.hf import SeekrSFTConfig, SeekrSFTTrainer
    from seekr_kernels.integrations import hf
    assert hf.SeekrSFTConfig is SeekrSFTConfig and hf.SeekrSFTTrainer is SeekrSFTTrainer
    args = SeekrSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], replay_ratio=3)
    back = pickle.loads(pickle.dumps(args))
    assert type(back) is SeekrSFTConfig and back.replay_ratio == 3
    assert pickle.loads(pickle.dumps(SeekrSFTTrainer)) is SeekrSFTTrainer
    # a fresh process (TRL not imported yet) finds the class through the module's __getattr__
    code = "import pickle, sys; a = pickle.loads(sys.stdin.buffer.read()); print(type(a).__name__, a.replay_ratio)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(args), env=env, capture_output=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.split() == [b"SeekrSFTConfig", b"3"], out.stderr[-2000:]


def test_trl_sft_trainer_and_reference_copy(tmp_path, monkeypatch):
    trl = pytest.importorskip("trl", reason="TRL is needed for SeekrSFTTrainer")
    from datasets import Dataset
    sys.path.insert(0, EXAMPLES)
    try:
        from tiny_tasks import make_tasks, tiny_llama, train_tokenizer
    finally:
        sys.path.remove(EXAMPLES)
    from seekr_kernels.hf import SeekrSFTConfig, SeekrSFTTrainer
    tasks = make_tasks(n_train=24, n_test=4)
    tok = train_tokenizer(tasks)
    model = tiny_llama(tok)
    args = SeekrSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                          logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, report_to=[],
                          disable_tqdm=True,
                          bf16=False, max_length=32, replay_ratio=4, replay_cycle=1, query_budget=3,
                          layer_budget=2, head_budget=3, seekr_backend="torch")
    data = {n: Dataset.from_list([{"prompt": tok.bos_token + p, "completion": c} for p, c in t["train"]])
            for n, t in list(tasks.items())[:2]}
    prepared = []
    orig = SeekrSFTTrainer._prepare_dataset

    def count(self, dataset, *a, **kw):
        prepared.append(dataset)
        return orig(self, dataset, *a, **kw)
    monkeypatch.setattr(SeekrSFTTrainer, "_prepare_dataset", count)
    trainer = SeekrSFTTrainer(model=model, args=args, processing_class=tok, train_dataset=data["rev"])
    trainer.train_tasks(data)
    # each task tokenised once: the constructor's dataset is not tokenised again by train_task
    assert [id(d) for d in prepared] == [id(d) for d in data.values()]
    # every checkpoint holds the pickled arguments (training_args.bin) and is complete
    for name in data:
        cks = sorted((tmp_path / name).glob("checkpoint-*"))
        assert cks, name
        for ck in cks:
            assert (ck / "seekr_recipe" / "recipe.json").is_file()
            saved = torch.load(ck / "training_args.bin", weights_only=False)
            assert type(saved) is SeekrSFTConfig and saved.replay_ratio == 4
    mem = trainer.recipe.memory.tasks
    s = mem[1].samples[0]
    # TRL's completion-only labels became the replay sample's answer: "cba" + eos after the prompt
    n_ans = int(s.answer_mask.sum())
    assert tok.decode(s.input_ids[s.answer_mask].tolist()[:-1]) in {c for _, c in tasks["rot"]["train"]}
    assert n_ans == 4 and s.input_ids[0] == tok.bos_token_id
    assert [h for h in trainer.state.log_history if "replay_attn_kl" in h]
    with pytest.raises(ValueError, match="packing"):
        SeekrSFTConfig(output_dir=str(tmp_path), packing=True, use_cpu=True)
    # TRL's reference-model copy of a patched model: an independent patched twin
    try:
        from trl.experimental.utils import create_reference_model
    except ImportError:          # older TRL
        from trl import create_reference_model
    ref = create_reference_model(trainer.model)
    assert sk.llama.is_patched(ref) and sk.llama._state_of(ref) is not sk.llama._state_of(trainer.model)
    assert all(not p.requires_grad for p in ref.parameters())
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, trainer.model(input_ids=ids).logits)
    twin = copy.deepcopy(trainer.model)
    assert sk.llama.is_patched(twin)


@pytest.mark.parametrize("script", ["hf_trainer_seekr.py", "trl_sft_seekr.py"])
def test_examples_run(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--out", str(tmp_path), "--epochs", "4"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    op = [x for x in lines if x.startswith("OP=")]
    assert op and "BWT=" in op[0]
    assert any(x.startswith("last replay log: replay_ce=") and "replay_attn_kl=" in x for x in lines)
    assert sum(1 for x in lines if x.startswith("  ") and ":" in x) == 3       # the 3 x 3 matrix rows
    for task in ("rev", "rot", "ilv"):                                          # checkpoints are saved
        assert [c.name for c in (tmp_path / task).glob("checkpoint-*")], task


@pytest.mark.parametrize("script", ["hf_trainer_seekr.py", "trl_sft_seekr.py"])
def test_examples_resume_a_killed_run(tmp_path, script):
    """Killed (SIGKILL) once its last task has started, the example run with --resume prints
    the uninterrupted run's matrix and OP/BWT."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(EXAMPLES, script), "--epochs", "4", "--out"]
    full = subprocess.run(cmd + [str(tmp_path / "full")], env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    out = tmp_path / "killed"
    p = subprocess.Popen(cmd + [str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (out / "ilv").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()
    again = subprocess.run(cmd + [str(out), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    tail = lambda res: [x for x in res.stdout.splitlines() if x.startswith(("  ", "OP="))]
    assert len(tail(full)) == 4 and tail(again) == tail(full)
    # it resumed: the tasks finished before the kill are not trained again
    assert full.stdout.count("'train_runtime'") == 3 and again.stdout.count("'train_runtime'") <= 1


@pytest.mark.parametrize("script", ["hf_trainer_seekr.py", "trl_sft_seekr.py"])
def test_examples_seed_before_building_the_model(script):
    """The Trainer seeds only when it is created; a model (and a PEFT model's LoRA weights)
    made before must be seeded by the script."""
    src = open(os.path.join(EXAMPLES, script)).read()
    main = src[src.index("def main("):]
    assert 0 <= main.index("set_seed(") < main.index("tiny_llama(tok)")


def test_resume_inside_a_task_ends_where_an_uninterrupted_run_ends(tmp_path):
    """A task resumed from a mid-task checkpoint in its second epoch ends bit for bit where
    the uninterrupted run ends (weights, importance, the teacher captured into memory):
    the replay loader skips the trained micro-batches (replay ones included), the replay
    schedule resumes its reshuffled order at that epoch, the Trainer restores the RNG
    (attention dropout) and its counters (a partial last accumulation window)."""
    def run(out, resume=None):
        # 12 rows / batch 4, accumulation 2, a replay window before the 2nd step: per
        # epoch the windows [t t] [r r] [t]; checkpoint-4 is the first window of epoch 2.
        args = SeekrConfig(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2,
                           gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="steps",
                           save_steps=4, use_cpu=True, report_to=[], disable_tqdm=True, replay_ratio=4,
                           replay_cycle=2, replay_order="reshuffle", query_budget=3, layer_budget=2,
                           head_budget=3, seekr_backend="torch", replay_pad_to_multiple_of=1, seed=1)
        tr = SeekrTrainer(model=_tiny_llama(attention_dropout=0.2), args=args)
        tr.train_task(_rows(0), "a")
        tr.train_task(_rows(1), "b", **({} if resume is None else {"resume_from_checkpoint": str(resume)}))
        return tr
    full = run(tmp_path / "full")
    ck = tmp_path / "full" / "b" / "checkpoint-4"
    assert (ck / "seekr_recipe" / "recipe.json").is_file()
    resumed = run(tmp_path / "resumed", resume=ck)
    assert (resumed.state.global_step, resumed.state.epoch) == (full.state.global_step, full.state.epoch) == (6, 2)
    assert [h["replay_loss"] for h in resumed.state.log_history if "replay_loss" in h]      # replay ran after resume
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert torch.equal(full.recipe.importance, resumed.recipe.importance)
    x, y = full.recipe.memory.tasks[1].samples[0], resumed.recipe.memory.tasks[1].samples[0]
    assert torch.equal(x.logits, y.logits)

"""SEEKR inside the Hugging Face Trainer on 2 CPU processes (gloo): DDP under a torchrun-style
launch, FSDP2 through accelerate, and DeepSpeed ZeRO-2 through the Trainer's ``deepspeed=``
path; each ends with the weights, importance, heads and replay logs of one process with
the same global batch.

FSDP: accelerate turns FSDP on only for GPU-type jobs (its state ignores an FSDP plugin on
a MULTI_CPU job), so on these CPU machines the worker lifts that one gate (sets the FSDP
plugin on the accelerator state) and accelerate's own FSDP2 preparation shards the model.
DeepSpeed: ZeRO-2 runs with DS_ACCELERATOR=cpu in one process; with two CPU processes
accelerate reports one process for a DeepSpeed job (its CPU bookkeeping), so DeepSpeed's
batch check fails before training (train_batch_size 2 != 2 x 1 x 2): the multi-process
DeepSpeed path needs GPUs.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="seekr_kernels.hf needs transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import json, os, sys, warnings, torch
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
if os.environ.get("DS_ACCELERATOR") == "cpu":
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # a CPU comm op that JIT-compiles for minutes


def run(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    from seekr_kernels.hf import SeekrConfig, SeekrTrainer
    cfg = dict(cfg)
    out, mode = cfg.pop("out"), cfg.pop("mode", "single")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=40,
                                         max_position_embeddings=32, pad_token_id=0))
    g = torch.Generator().manual_seed(1)

    def task(t, n=16):
        rows = []
        for i in range(n):
            p = torch.randint(3, 40, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
            rows.append({"prompt_ids": [1, t + 3] + p, "answer_ids": [(x * (t + 2)) % 37 + 3 for x in p[:2]] + [2]})
        return rows
    tasks = [(f"t{t}", task(t)) for t in range(2)]
    kw = dict(output_dir=out, learning_rate=1e-2, num_train_epochs=2, logging_steps=1, save_strategy="steps",
              save_steps=2,
              report_to=[], disable_tqdm=True, use_cpu=True, seed=3, replay_ratio=4, query_budget=3,
              layer_budget=2, head_budget=3, seekr_backend="torch", replay_pad_to_multiple_of=1,
              lr_scheduler_type="constant")
    kw.update(cfg)
    args = SeekrConfig(**kw)
    tr = SeekrTrainer(model=model, args=args)
    if mode == "fsdp":
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        st = tr.accelerator.state
        st.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        st.distributed_type = DistributedType.FSDP
        tr.is_fsdp_enabled = True
    kinds = []
    tr.add_callback(type("Probe", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, a, s, c, **k: kinds.append(type(tr.recipe.current.before).__name__)})())
    tr.train_tasks(tasks, resume=True)      # a relaunch after a kill continues the sequence
    from torch.distributed.fsdp import FSDPModule
    info = {"wrapped": type(tr.model_wrapped).__name__, "world": tr.recipe.dist.world_size,
            "fsdp": any(isinstance(m, FSDPModule) for m in tr.model.modules()), "snapshot": sorted(set(kinds))}
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = tr.model.state_dict()
    if args.process_index == 0:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items() if k != "lm_head.weight"},
                  os.path.join(out, "weights.safetensors"))
        with open(os.path.join(out, "res.json"), "w") as f:
            json.dump({"importance": tr.recipe.importance.tolist(), "heads": tr.seekr_history, "info": info,
                       "logs": [h for h in tr.state.log_history if "replay_ce" in h]}, f)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)   # skip interpreter teardown: gloo threads sometimes abort it
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, cfg, world=2, extra_env=None):
    """The worker on ``world`` processes, launched as torchrun would (env://)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
               **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _launch(tmp_path, cfg, world=2, extra_env=None, timeout=300):
    procs = _start(tmp_path, cfg, world, extra_env)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return _result(cfg["out"])


def _result(out):
    from safetensors.torch import load_file
    with open(os.path.join(out, "res.json")) as f:
        res = json.load(f)
    res["weights"] = load_file(os.path.join(out, "weights.safetensors"))
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, global batch 4 (run in this process)."""
    out = tmp_path_factory.mktemp("single")
    ns = {}
    exec(compile(WORKER, "worker", "exec"), ns)
    n = torch.get_num_threads()
    try:
        ns["run"]({"out": str(out), "per_device_train_batch_size": 4})
    finally:
        torch.set_num_threads(n)
    return _result(str(out))


def _assert_matches(got, ref):
    assert got["heads"] == ref["heads"]
    torch.testing.assert_close(torch.tensor(got["importance"]), torch.tensor(ref["importance"]), rtol=1e-4, atol=1e-7)
    assert len(got["logs"]) == len(ref["logs"]) > 0
    for a, b in zip(got["logs"], ref["logs"]):
        for k in ("replay_ce", "replay_logits_kl", "replay_attn_kl", "replay_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-3), k
    assert got["weights"].keys() == ref["weights"].keys()
    for k, v in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], v, rtol=0, atol=2e-3, msg=k)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Two DDP processes, uninterrupted."""
    tmp = tmp_path_factory.mktemp("ddp")
    return _launch(tmp, {"out": str(tmp / "out"), "per_device_train_batch_size": 2})


def test_ddp_two_processes_match_one(ddp, single):
    got = ddp
    assert got["info"]["wrapped"] == "DistributedDataParallel" and got["info"]["world"] == 2
    assert got["info"]["snapshot"] == ["PreTaskWeights"]
    _assert_matches(got, single)


def test_ddp_killed_mid_task_resumes_to_the_uninterrupted_run(tmp_path, ddp):
    """Both processes SIGKILLed once the second task has a complete checkpoint, then the
    same launch again (``train_tasks(..., resume=True)``): the first task is restored from
    its final/, the second resumes from its newest complete checkpoint (every process its
    own RNG state), and the job ends bit for bit where the uninterrupted one ends."""
    import glob
    import time
    out = tmp_path / "out"
    cfg = {"out": str(out), "per_device_train_batch_size": 2}
    procs = _start(tmp_path, cfg)
    t0 = time.monotonic()
    try:
        while not glob.glob(str(out / "t1" / "checkpoint-*" / "seekr_recipe" / "manifest.json")):
            assert all(p.poll() is None for p in procs), "a process ended before the kill:\n" + (
                procs[0].communicate()[0] or "")[-3000:]
            assert time.monotonic() - t0 < 300, "no checkpoint of the second task"
            time.sleep(0.01)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert not (out / "t1" / "final").exists() and (out / "t0" / "final").is_dir()      # killed mid-task
    got = _launch(tmp_path, cfg)
    assert got["heads"] == ddp["heads"]
    assert got["importance"] == ddp["importance"]
    assert got["weights"].keys() == ddp["weights"].keys()
    for k, v in ddp["weights"].items():
        torch.testing.assert_close(got["weights"][k], v, rtol=0, atol=0, msg=k)


def test_fsdp2_through_accelerate_matches_one(tmp_path, single):
    got = _launch(tmp_path, {"out": str(tmp_path / "out"), "mode": "fsdp", "per_device_train_batch_size": 2,
                             "fsdp": True, "fsdp_config": {"version": 2,
                                                           "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                           # the full state dict's gather fails on this CPU stand-in
                                                           "state_dict_type": "SHARDED_STATE_DICT"}})
    info = got["info"]
    assert info["fsdp"] and info["world"] == 2
    assert info["snapshot"] == ["list"]          # sharded parameters: the snapshot is head rows
    _assert_matches(got, single)


def test_deepspeed_zero2_matches_plain(tmp_path, single):
    pytest.importorskip("deepspeed", reason="DeepSpeed is needed for the deepspeed= path")
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}
    got = _launch(tmp_path, {"out": str(tmp_path / "out"), "per_device_train_batch_size": 4, "use_cpu": False,
                             "deepspeed": ds}, world=1,
                  extra_env={"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert got["info"]["wrapped"] == "DeepSpeedEngine"
    _assert_matches(got, single)

"""The recipe config (seekr_kernels.seekr.config): every key documented on its field, the
preset key (``preset:``, ``recipe:`` its older spelling, through the one alias table) and a
run saved under the older spelling resuming."""
import dataclasses
import json

import pytest

from seekr_kernels.run import checkpoint as ck
from seekr_kernels.run.checkpoint import ResumeError
from seekr_kernels.run.config import RunConfig, from_dict, load_config
from seekr_kernels.run.trainer import ContinualTrainer
from seekr_kernels.utils import store
from seekr_kernels.seekr.config import (KEY_ALIASES, ConfigError, DistillConfig, RecipeConfig, ReplayConfig,
                                        canonical_keys, recipe_from_dict, resolve_aliases)

from tiny_runs import tiny_config, tiny_tasks  # noqa: E402

BASE = {"tasks": [{"path": "x"}]}


@pytest.mark.parametrize("cls", [RecipeConfig, ReplayConfig, DistillConfig])
def test_every_recipe_key_has_its_help_on_the_field(cls):
    for f in dataclasses.fields(cls):
        h = f.metadata.get("help")
        assert isinstance(h, str) and len(h) > 10, f"{cls.__name__}.{f.name}: no help metadata"
    # the run config's recipe keys are the recipe's fields, not a second copy
    run = {f.name: f for f in dataclasses.fields(RunConfig)}
    for f in dataclasses.fields(RecipeConfig):
        if f.name in run and f.name not in ("replay", "distill"):
            assert run[f.name].metadata == f.metadata and run[f.name].default == f.default, f.name


def test_recipe_and_preset_give_the_same_config():
    for value in ("official", "package"):
        old, new = from_dict({**BASE, "recipe": value}), from_dict({**BASE, "preset": value})
        assert old == new and old.to_dict() == new.to_dict() and new.preset == value
        assert "preset" in new.to_dict() and "recipe" not in new.to_dict()
        assert recipe_from_dict({"recipe": value}) == recipe_from_dict({"preset": value})
        assert RunConfig(recipe=value, tasks=old.tasks) == RunConfig(preset=value, tasks=old.tasks)
        assert RecipeConfig(recipe=value).validate() == RecipeConfig(preset=value).validate()
    c = from_dict({**BASE, "recipe": "official"})
    assert c.recipe == c.preset == "official" and c.replay.subset == "first"
    c.recipe = "package"                          # the older attribute writes the field
    assert c.preset == "package"
    # the same value under both spellings is no contradiction
    assert from_dict({**BASE, "recipe": "official", "preset": "official"}).preset == "official"
    # a dict from to_dict() carries preset at its default: an older-spelling edit of it counts
    d = from_dict(BASE).to_dict()
    d["recipe"] = "official"
    assert from_dict(d).preset == "official"


def test_recipe_and_preset_that_differ_is_an_error_naming_both():
    both = "recipe: 'package' contradicts preset: 'official'"
    with pytest.raises(ConfigError, match=f"^{both}.*older spelling of preset"):
        from_dict({**BASE, "recipe": "package", "preset": "official"})
    with pytest.raises(ConfigError, match=f"^{both}"):
        recipe_from_dict({"recipe": "package", "preset": "official"})
    with pytest.raises(ConfigError, match=f"^{both}"):
        RunConfig(recipe="package", preset="official")
    # errors name the key as the config spells it
    with pytest.raises(ConfigError, match="^recipe: must be one of"):
        from_dict({**BASE, "recipe": "paper"})
    with pytest.raises(ConfigError, match="^preset: must be one of"):
        from_dict({**BASE, "preset": "paper"})
    with pytest.raises(ConfigError, match="^recipe: expected a string"):
        recipe_from_dict({"recipe": 1})
    with pytest.raises(ConfigError, match="^recipe: must be one of"):
        RunConfig(recipe="paper", tasks=from_dict(BASE).tasks).validate()


def test_alias_table_is_pure_renames_read_everywhere():
    for old, new in KEY_ALIASES.items():
        assert old != new and new not in KEY_ALIASES, "an alias must name a current key"
    data = {"recipe": "official", "replay": {"ratio": 2}}
    out, spelled = resolve_aliases(data)
    assert out == {"preset": "official", "replay": {"ratio": 2}} and spelled == {"preset": "recipe"}
    assert data == {"recipe": "official", "replay": {"ratio": 2}}          # the caller's dict stays
    assert canonical_keys({"method": "sft"}) == {"method": "sft"}


def test_set_override_wins_over_the_files_other_spelling(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps({**BASE, "recipe": "official"}))
    assert load_config(str(p)).preset == "official"
    assert load_config(str(p), {"preset": "package"}).preset == "package"
    p.write_text(json.dumps({**BASE, "preset": "official"}))
    assert load_config(str(p), {"recipe": "package"}).preset == "package"


def _as_older_version(ckpt):
    """The checkpoint's trainer state as a version that wrote ``recipe:`` wrote it (resealed)."""
    tsp = ckpt / ck.TRAINER_STATE
    ts = json.loads(tsp.read_text())
    cfg = ts["config"]
    ts["config"] = {("recipe" if k == "preset" else k): v for k, v in cfg.items()}
    tsp.write_text(json.dumps(ts))
    man = json.loads((ckpt / "manifest.json").read_text())
    man["files"][ck.TRAINER_STATE] = store.file_entry(str(tsp))
    store.seal(man)
    (ckpt / "manifest.json").write_text(json.dumps(man))
    return ts


def test_run_saved_with_recipe_key_resumes(tmp_path):
    data = tiny_tasks(tmp_path / "data")[:2]
    over = {"train.save_steps": 2, "train.max_steps": 4}
    ContinualTrainer(tiny_config(tmp_path / "run", data, "replay", **over), quiet=True).run()
    st = json.loads((tmp_path / "run" / "state.json").read_text())
    st["config"]["recipe"] = st["config"].pop("preset")
    store.seal(st)                                              # resealed: a genuine old file
    (tmp_path / "run" / "state.json").write_text(json.dumps(st))
    newest = tmp_path / "run" / st["checkpoint"]
    ts = _as_older_version(newest)
    assert ts["config"]["recipe"] == "package" and "preset" not in ts["config"]
    over["train.max_steps"] = 0
    res = ContinualTrainer(tiny_config(tmp_path / "run", data, "replay", **over), quiet=True).run(resume=True)
    assert res["complete"] and res["global_step"] > 4
    # the comparison reads recipe as preset: a saved official run is refused naming the key
    two = {**over, "train.max_steps": 2}
    ContinualTrainer(tiny_config(tmp_path / "b", data, "replay", **two), quiet=True).run()
    st = json.loads((tmp_path / "b" / "state.json").read_text())
    newest = tmp_path / "b" / st["checkpoint"]
    tsp = newest / ck.TRAINER_STATE
    ts = json.loads(tsp.read_text())
    ts["config"]["preset"] = "official"
    tsp.write_text(json.dumps(ts))
    _as_older_version(newest)
    with pytest.raises(ResumeError, match=r"differs from the run's in .*\bpreset\b.*'official' -> 'package'"):
        ContinualTrainer(tiny_config(tmp_path / "b", data, "replay", **two), quiet=True).run(resume=True)

"""Typed configs: YAML + key=value overrides, strict keys, clear errors, resolved save with config_version."""

import dataclasses

import pytest
import yaml
from spo_studio.backend.config import CONFIG_VERSION, help_texts, load_config, option, save_config
from spo_studio.backend.preference.train import SPMTrainConfig


@dataclasses.dataclass
class Toy:
    beta: float = option(10.0, "β of the loss")
    steps: int = option(20, "DDIM steps")
    name: str = option("x", "a name")
    flag: bool = option(False, "a flag")
    targets: list[str] = option(["to_q", "to_k"], "modules")
    limit: int | None = option(None, "optional")


def test_defaults_yaml_and_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("beta: 5\nsteps: 10\ntargets: [to_v]\n")
    cfg = load_config(Toy, preset, ["steps=12", "flag=true", "targets=to_q,to_out.0", "limit=3"])
    assert cfg == Toy(beta=5.0, steps=12, name="x", flag=True, targets=["to_q", "to_out.0"], limit=3)
    assert load_config(Toy, None, ["limit=none"]).limit is None
    assert help_texts(Toy)["beta"] == "β of the loss"


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['betta'\].*valid keys"):
        load_config(Toy, None, ["betta=1"])
    with pytest.raises(ValueError, match="steps: expected an integer, got '1.5'"):
        load_config(Toy, None, ["steps=1.5"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(Toy, None, ["steps"])
    with pytest.raises(FileNotFoundError, match="nope.yaml: no such config file"):
        load_config(Toy, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: invalid YAML"):
        load_config(Toy, bad)
    with pytest.raises(ValueError, match="t_min <= t_max"):
        load_config(SPMTrainConfig, None, ["t_min=600", "t_max=500"])


def test_saved_config_round_trips_with_version(tmp_path):
    cfg = load_config(Toy, None, ["beta=2.5"])
    save_config(cfg, tmp_path / "run" / "config.yaml", method="toy")
    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert data["config_version"] == CONFIG_VERSION and data["method"] == "toy"
    assert load_config(Toy, tmp_path / "run" / "config.yaml") == cfg


def test_every_field_of_shipped_configs_has_help_and_presets_load():
    from pathlib import Path

    for f in dataclasses.fields(SPMTrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
    root = Path(__file__).resolve().parents[1] / "configs"
    for preset in sorted(root.glob("*spm*.yaml")) + sorted(root.glob("*scorer*.yaml")):
        load_config(SPMTrainConfig, preset)


def test_every_training_preset_loads_into_its_method_config():
    from pathlib import Path

    from spo_studio.backend.train.methods import METHODS

    root = Path(__file__).resolve().parents[1] / "configs"
    import importlib

    seen = set()
    for family in ("pocket", "sd15", "sdxl"):
        for method, (module, cls_name, _, _) in METHODS.items():
            cls = getattr(importlib.import_module(f"spo_studio.backend.train.{module}"), cls_name)
            for f in dataclasses.fields(cls):
                assert f.metadata.get("help"), f"{cls_name}.{f.name} has no help text"
            preset = root / f"{family}_{method}.yaml"
            assert preset.exists(), f"missing preset {preset.name}"
            assert yaml.safe_load(preset.read_text())["method"] == method
            cfg = load_config(cls, preset)
            cfg.validate()
            seen.add(preset.name)
    assert len(seen) == 9


def test_one_prompt_reader_for_the_trainer_the_evaluation_and_the_page(tmp_path):
    """`sources.prompts` (trainer, evaluation) and `jobs.read_prompt_list` (the page) read with the same rules."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from spo_studio.backend import evaluation, jobs, sources

    txt = tmp_path / "p.txt"
    txt.write_text(" a red circle \n\n a blue square\n")
    js = tmp_path / "p.JSON"
    js.write_text('["a red circle", "  ", "a blue square"]')
    pa_file = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a red circle", None, "a blue square"]}), pa_file)
    for path in (txt, js, pa_file):
        assert sources.prompts(str(path)) == ["a red circle", "a blue square"]
        assert jobs.read_prompt_list(path) == evaluation.load_eval_prompts(str(path)) == sources.prompts(path)

    long = tmp_path / "long.txt"
    long.write_text("a" * (sources.MAX_PROMPT_CHARS + 1))
    with pytest.raises(ValueError, match="long.txt: prompt 1 is longer than"):
        sources.prompts(str(long))
    with pytest.raises(jobs.JobError, match="long.txt: prompt 1 is longer than"):
        jobs.read_prompt_list(long)
    with pytest.raises(FileNotFoundError, match="absent.txt: no such prompts file"):
        sources.prompts(str(tmp_path / "absent.txt"))
    with pytest.raises(jobs.JobError, match="absent.txt: no such prompts file"):
        jobs.read_prompt_list(tmp_path / "absent.txt")
    assert sources.prompts("pocket") == sources.prompts("pocket-train")
    assert not set(sources.prompts("pocket")) & set(sources.prompts("pocket-held-out"))

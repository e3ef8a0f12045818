"""Every GPU recipe's config composes with Hydra and passes teamtr-verl's and verl's validation on CPU (no
training), so a recipe cannot silently rot; the data converters turn hand-made rows into verl's layout."""

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from teamtr_verl.validation import validate_teamtr_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CASES = [
    ("gsm8k_solver_verifier", "config", ["Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct"], 1),
    ("math_team", "config_homogeneous", ["Qwen3-8B"], 8),
    ("math_team", "config_heterogeneous", ["Qwen3-1.7B", "Qwen3-8B", "Qwen3-14B"], 8),
]
# Where each recipe's prepare_data.py writes its data by default (--out ~/data/<name>)
DATA_DIRS = {"gsm8k_solver_verifier": "gsm8k", "math_team": "math_team"}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe, config_name, models, gpus", CASES)
def test_recipe_config_composes_and_validates(recipe, config_name, models, gpus, tmp_path, monkeypatch):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    for model in models:  # stand-ins for the downloaded models: the validation checks the directories
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    monkeypatch.setenv("TEAMTR_MODEL_DIR", str(tmp_path))
    # stand-ins for the prepared data, where prepare_data.py puts it: the validation checks that the files exist
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data" / DATA_DIRS[recipe]).mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "data" / DATA_DIRS[recipe] / f"{split}.parquet").touch()
    with initialize_config_dir(config_dir=str(RECIPES / recipe), version_base=None):
        config = compose(config_name=config_name)
    team = validate_teamtr_config(config)
    assert config.trainer.v1.trainer_mode == "teamtr" and config.trainer.n_gpus_per_node == gpus
    assert all(agent.model.startswith(str(tmp_path)) for agent in team.agents)
    # verl's own checks (batch sizes vs GPUs, micro batches); the teamtr hook ran inside it too
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    # the stale baseline is one flag away
    with initialize_config_dir(config_dir=str(RECIPES / recipe), version_base=None):
        stale = compose(config_name=config_name, overrides=["teamtr.schedule=stale"])
    assert validate_teamtr_config(stale).schedule == "stale"


def test_each_recipe_has_its_scripts_and_readme():
    for recipe in {case[0] for case in CASES}:
        folder = RECIPES / recipe
        assert (folder / "README.md").is_file() and (folder / "prepare_data.py").is_file()
        assert "teamtr.schedule=stale" in (folder / "run_stale.sh").read_text()
        assert "python -m verl.trainer.main_ppo" in (folder / "run_teamtr.sh").read_text()


def test_gsm8k_converter_by_hand():
    prepare = _load(RECIPES / "gsm8k_solver_verifier" / "prepare_data.py", "gsm8k_prepare")
    row = prepare.to_row({"question": "2 + 3?", "answer": "2 + 3 = 5\n#### 1,005"}, "train", 7)
    assert row["reward_model"] == {"style": "rule", "ground_truth": "1005"}
    assert row["data_source"] == "openai/gsm8k" and row["extra_info"] == {"split": "train", "index": 7}
    assert row["prompt"][0]["content"].startswith("2 + 3? Let's think step by step")


def test_math_converter_and_reward_by_hand():
    prepare = _load(RECIPES / "math_team" / "prepare_data.py", "math_prepare")
    rows = prepare.convert([{"Problem": " 1/2 + 1/2? ", "Answer": 1}], "aime24", "test",
                           problem_key="Problem", answer_key="Answer")
    assert rows[0]["prompt"][0]["content"] == "1/2 + 1/2? Let's think step by step and output the final answer within \\boxed{}."
    assert rows[0]["reward_model"]["ground_truth"] == "1"
    reward = _load(RECIPES / "math_team" / "reward.py", "math_reward_recipe")
    assert reward.compute_score("aime24", "so the answer is \\boxed{\\frac{1}{2}}", "\\frac12") == 1.0
    assert reward.compute_score("aime24", "so \\boxed{3}", "1") == 0.0
    assert reward.compute_score("aime24", "no box", "1") == 0.0

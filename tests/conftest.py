"""Shared fixtures: the tiny model and dataset, built once per session into a temporary directory."""

import os

import pytest

# Tests never reach a model hub or a tracking service.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_sessionstart(session):
    from teamtr_verl.env_check import find_problems

    problems = find_problems()
    if problems:
        pytest.exit("teamtr-verl environment is not usable:\n  " + "\n  ".join(problems), returncode=2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from teamtr_verl.fixtures import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    from teamtr_verl.fixtures import write_addition_dataset

    return write_addition_dataset(tmp_path_factory.mktemp("tiny_data") / "data")


@pytest.fixture(scope="session")
def tiny_team(tmp_path_factory):
    """Two tiny agents that differ in size and tokenizer: alice (hidden 128, seed 0) and bob (hidden 64 with one
    head, tokenizer trained on seed-1 text, same vocabulary size)."""
    from teamtr_verl.fixtures import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_team")
    return build_tiny_model(root / "alice", seed=0), build_tiny_model(root / "bob", seed=1, hidden_size=64, num_heads=1)

"""Scaling out: the shipped Accelerate configs parse and launch as intended, and
``train.global_batch_size`` derives the accumulation steps from the world size."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bert_recipes.errors import RecipeError
from bert_recipes.recipe import TrainConfig, load_recipe

from .conftest import REPO, TINY_RECIPE, tiny_overrides

CONFIGS = REPO / "recipes" / "accelerate"

# file -> (distributed_type, num_processes, num_machines, mixed_precision, use_cpu)
EXPECTED = {
    "single_gpu.yaml": ("NO", 1, 1, "bf16", False),
    "ddp.yaml": ("MULTI_GPU", 8, 1, "bf16", False),
    "fsdp.yaml": ("FSDP", 8, 1, "bf16", False),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1, "bf16", False),
    "multi_node.yaml": ("MULTI_GPU", 16, 2, "bf16", False),
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1, "no", True),
}


def test_every_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_parses(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = CONFIGS / name
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys are errors
    assert isinstance(config, ClusterConfig)
    kind, processes, machines, precision, cpu = EXPECTED[name]
    assert (config.distributed_type.value, config.num_processes, config.num_machines, config.mixed_precision,
            config.use_cpu) == (kind, processes, machines, precision, cpu)
    assert path.read_text().startswith("#")  # a comment saying what it is for and how to launch it
    # `accelerate launch --config_file` accepts it and picks the launcher we mean
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "bert_recipes", "pretrain", "r.yaml"])
    args, _defaults, _ = _validate_launch_command(args)
    assert args.num_processes == processes
    assert args.multi_gpu == (kind == "MULTI_GPU") and args.use_fsdp == (kind == "FSDP")
    assert args.use_deepspeed == (kind == "DEEPSPEED")


def test_fsdp_deepspeed_and_multi_node_settings():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # FULL_SHARD
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "BertLayer"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"

    zero2 = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    assert zero2["zero_stage"] == 2 and zero2["gradient_accumulation_steps"] == 1

    multi = (CONFIGS / "multi_node.yaml").read_text()
    node = yaml.safe_load(multi)
    assert node["machine_rank"] == 0 and node["main_process_ip"] and node["main_process_port"]
    for key in ("machine_rank:", "main_process_ip:", "main_process_port:"):
        line = next(line for line in multi.splitlines() if line.startswith(key))
        assert "#" in line, f"{key} needs a comment saying what to put there"


# --------------------------------------------------------------------------- global batch size


@pytest.mark.parametrize("global_batch, per_device, world, expected", [
    (256, 32, 8, 1),
    (256, 32, 1, 8),
    (256, 16, 2, 8),
    (4096, 64, 16, 4),
    (16, 4, 2, 2),
])
def test_accumulation_from_global_batch_size(global_batch, per_device, world, expected):
    train = TrainConfig(global_batch_size=global_batch, per_device_train_batch_size=per_device)
    assert train.accumulation_for(world) == expected
    assert expected * per_device * world == global_batch


def test_accumulation_without_global_batch_size_is_the_recipe_value():
    assert TrainConfig(gradient_accumulation_steps=3).accumulation_for(8) == 3


@pytest.mark.parametrize("global_batch, per_device, world", [(100, 32, 1), (256, 32, 3), (8, 16, 1)])
def test_indivisible_global_batch_size_is_one_line(global_batch, per_device, world):
    train = TrainConfig(global_batch_size=global_batch, per_device_train_batch_size=per_device)
    with pytest.raises(RecipeError) as err:
        train.accumulation_for(world)
    message = str(err.value)
    assert message.startswith("train.global_batch_size") and "\n" not in message
    assert str(per_device * world) in message


def test_global_batch_size_in_a_recipe(tmp_path, caplog):
    from bert_recipes.training.plan import resolve

    def resolve_batch_size(recipe, world_size):
        return resolve(recipe, world_size).recipe

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tmp_path, **{"train.global_batch_size": 32}))
    with caplog.at_level(logging.INFO, logger="bert_recipes"):
        resolved = resolve_batch_size(recipe, world_size=2)
    assert resolved.train.gradient_accumulation_steps == 4 and resolved.train.global_batch_size == 32
    assert recipe.train.gradient_accumulation_steps == 1  # the input is left alone
    assert "effective batch: 32 sequences per optimizer step = 4 per device x 2 process(es) x 4" in caplog.text
    with pytest.raises(RecipeError, match="global_batch_size"):
        resolve_batch_size(recipe, world_size=3)
    with pytest.raises(RecipeError, match="train.global_batch_size"):
        load_recipe(TINY_RECIPE, tiny_overrides(tmp_path, **{"train.global_batch_size": 0}))


# --------------------------------------------------------------------------- a real 2-process launch


@pytest.mark.slow
def test_cpu_2proc_config_gives_two_gloo_ranks(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml` alone (no
    ACCELERATE_USE_CPU in the environment) runs ONE training over two ranks."""
    run = tmp_path / "run"
    overrides = tiny_overrides(run, **{
        "train.max_steps": 2, "train.save_steps": 2, "train.global_batch_size": 16, "data.eval_files": "[]",
    })
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
           "-m", "bert_recipes", "pretrain", str(TINY_RECIPE), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "effective batch: 16 sequences per optimizer step = 4 per device x 2 process(es) x 2 accumulation" in log
    assert log.count("effective batch") == 1  # logged by the main process only
    ckpt = run / "checkpoints" / "checkpoint-00000002"
    for name in ("data_state_rank0.pt", "data_state_rank1.pt", "random_states_0.pkl", "random_states_1.pkl"):
        assert (ckpt / name).is_file(), name
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["gradient_accumulation_steps"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # one run, not two interleaved
    for record in records:
        assert (record["nsp_accuracy"] * 16) == pytest.approx(round(record["nsp_accuracy"] * 16))  # 16 sequences a step
    assert (run / "final" / "model.safetensors").is_file()

"""The shipped FSDP config (recipes/accelerate/fsdp.yaml: FSDP2, FULL_SHARD, one unit per
BertLayer) on two CPU ranks with gloo: pretraining and fine-tuning compute what DDP
computes, evaluations with an uneven split across ranks finish (every forward of a sharded
model is a collective), the gathered exports equal DDP's, and a run resumes from its
sharded-training checkpoint bit for bit. See tests/fsdp_cpu_launch.py for how FSDP runs
without GPUs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, SAMPLE_EVAL, TINY_RECIPE, tiny_overrides

pytestmark = pytest.mark.slow

CONFIGS = REPO / "recipes" / "accelerate"
SAMPLE_EVAL_FILE = Path(SAMPLE_EVAL[0])
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
COMMON = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(kind: str, args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the CLI on 2 CPU ranks: ``ddp`` (cpu_2proc.yaml) or ``fsdp``
    (the shipped fsdp.yaml, through tests/fsdp_cpu_launch.py)."""
    if kind == "fsdp":
        target = ["--config_file", str(CONFIGS / "fsdp.yaml"), *COMMON, str(REPO / "tests" / "fsdp_cpu_launch.py")]
    else:
        target = ["--config_file", str(CONFIGS / "cpu_2proc.yaml"), *COMMON, "-m", "bert_recipes"]
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *target, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    expected = "FSDP" if kind == "fsdp" else "MULTI_CPU"
    assert f"accelerate: {expected}, 2 process(es)" in done.stderr
    return done


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(got: list[dict], expected: list[dict], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for mine, theirs in zip(got, expected):
        keys = [k for k in theirs if isinstance(theirs[k], float) and not k.endswith(("_per_s", "runtime_s"))]
        assert keys
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], rel=rel, abs=1e-7), (mine["step"], key)


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp_pretraining_matches_ddp_with_uneven_evaluation_and_resumes_exactly(tmp_path, sample_tokenizer):
    tokenizer = tmp_path / "tokenizer"
    sample_tokenizer.save_pretrained(tokenizer)
    # documents are dealt to the ranks by index modulo 2: rank 0 gets the two long ones, rank 1
    # the two short ones, so with one sequence per batch rank 0 has many more eval batches
    held_out = (SAMPLE_EVAL_FILE.read_text(encoding="utf-8").split("\n\n"))
    long_text = " ".join(" ".join(held_out).split())
    half = len(long_text) // 2
    short = "The cat sat on the mat. It was warm there."
    eval_file = tmp_path / "uneven.txt"
    eval_file.write_text("\n\n".join([long_text[:half], short, long_text[half:], short]) + "\n", encoding="utf-8")
    extra = {"train.max_steps": 6, "train.save_steps": 3, "train.eval_steps": 3, "train.save_total_limit": 3,
             "tokenizer.name_or_path": str(tokenizer), "data.eval_files": f"[{eval_file}]",
             "data.max_eval_samples": "null", "train.per_device_eval_batch_size": 1}
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch("ddp", ["pretrain", str(TINY_RECIPE), *tiny_overrides(ddp, **extra)])
    launch("fsdp", ["pretrain", str(TINY_RECIPE), *tiny_overrides(fsdp, **extra)])

    expected, got = records(ddp), records(fsdp)
    evals = [r for r in got if "eval_mlm_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[0]["eval_sequences"] >= 6  # the long documents give rank 0 several batches, rank 1 two
    assert_same_records(got, expected, rel=1e-5)
    assert_same_weights(fsdp / "final", ddp / "final")  # the export gathers the shards

    from transformers import BertForPreTraining

    BertForPreTraining.from_pretrained(fsdp / "final")  # a plain, loadable export

    crashed = tmp_path / "crashed"  # a crash right after step 3's checkpoint
    crashed.mkdir()
    shutil.copytree(fsdp / "tokenizer", crashed / "tokenizer")
    shutil.copytree(fsdp / "checkpoints" / "checkpoint-00000003", crashed / "checkpoints" / "checkpoint-00000003")
    launch("fsdp", ["pretrain", str(TINY_RECIPE), *tiny_overrides(crashed, **extra), "resume_from=latest"])
    resumed = {r["step"]: r for r in records(crashed) if "loss" in r}
    reference = {r["step"]: r for r in got if "loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm"):
            assert resumed[step][key] == reference[step][key], (step, key)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_fsdp_finetuning_matches_ddp(tmp_path, checkpoint, packing):
    def run(kind: str) -> Path:
        out = tmp_path / kind
        launch(kind, ["finetune", str(REPO / "recipes" / "glue" / "sample.yaml"), f"model.name_or_path={checkpoint}",
                      f"output_dir={out}", "train.max_steps=4", "train.eval_steps=2", "train.logging_steps=1",
                      # 60 dev examples in batches of 7: 9 batches dealt 5 / 4 to the ranks
                      "train.per_device_eval_batch_size=7", "predict_test=true", f"data.packing={packing}",
                      "precision=no"])  # fp32: FSDP2's bf16 casts the parameters, not DDP's autocast
        return out

    ddp, fsdp = run("ddp"), run("fsdp")
    got, expected = records(fsdp), records(ddp)
    assert [r["step"] for r in got if "eval_accuracy" in r] == [2, 4]
    assert_same_records(got, expected, rel=1e-5)
    assert_same_weights(fsdp / "best", ddp / "best")
    predictions = [json.loads((run / "test_predictions.json").read_text()) for run in (fsdp, ddp)]
    assert predictions[0] == predictions[1]



def test_a_glue_sweep_runs_several_runs_on_two_ranks(tmp_path, checkpoint):
    """Each run ended with Accelerate's end_training, which destroys the process group: the
    next run of the same process (a sweep's task or cell, a seed) failed at its first
    collective on several ranks, and the sweep never ran there (found by a helper)."""
    out = tmp_path / "sweep"
    done = launch("ddp", ["glue", str(REPO / "recipes" / "glue" / "base.yaml"), "--tasks", "sst2",
                          f"model.name_or_path={checkpoint}", f"data.glue_dir={REPO / 'data' / 'sample' / 'glue'}",
                          f"output_dir={out}", "train.max_steps=2", "seeds=[1,2]", "precision=no"])
    assert "Traceback" not in done.stderr
    results = json.loads((out / "sst2" / "results.json").read_text())
    assert sorted(results["runs"]) == ["1", "2"]
    assert list(json.loads((out / "glue_results.json").read_text())["tasks"]) == ["sst2"]
    # the optimizer batch grows with the processes: said at the start, recorded in the results, report and card
    assert ("the optimizer batch is 64 on 2 processes, 32 on one: the learning rate (2e-05) was set for the recipe's "
            "batch; train.global_batch_size=32 keeps that") in done.stderr
    assert results["total_train_batch_size"] == 64
    assert "bs 64 (32 per device)" in (out / "glue_results.md").read_text()
    assert ("per_device_train_batch_size 32, gradient_accumulation_steps 1, 2 process(es): 64 sequences per optimizer "
            "step") in (Path(results["best"]) / "README.md").read_text()


def test_fsdp_version_1_is_refused_in_one_line():
    # Accelerate's FSDP1 plugin cannot even be built without a GPU, so the check is called directly
    from types import SimpleNamespace

    from bert_recipes.errors import UserError
    from bert_recipes.training.accelerator import check_fsdp_version

    with pytest.raises(UserError, match=r"^accelerate config: fsdp_config.fsdp_version 1 is not supported; use "
                                        r"fsdp_version: 2 \(as recipes/accelerate/fsdp.yaml does\)$"):
        check_fsdp_version(SimpleNamespace(distributed_type="FSDP", is_fsdp2=False))
    check_fsdp_version(SimpleNamespace(distributed_type="FSDP", is_fsdp2=True))
    check_fsdp_version(SimpleNamespace(distributed_type="MULTI_GPU", is_fsdp2=False))

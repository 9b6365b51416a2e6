"""End to end: the tiny recipe trains, logs, checkpoints, exports, resumes exactly,
stops cleanly on SIGTERM, and runs on two CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bert_recipes.cli import main

from .conftest import REPO, TINY_RECIPE, tiny_overrides

LOSS_KEYS = ("loss", "mlm_loss", "nsp_loss", "lr")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_records(run: Path) -> dict[int, dict]:
    """Last logged training record per step (a resumed run logs some steps twice)."""
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bert_recipes", *args], cwd=REPO, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    code = main(["pretrain", str(TINY_RECIPE), *tiny_overrides(out, **{"train.eval_steps": 3, "train.save_steps": 3})])
    assert code == 0
    return out


def test_tiny_run_logs_checkpoints_and_exports(tiny_run):
    records = read_metrics(tiny_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for record in train:
        for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "lr", "tokens_per_s", "sequences_per_s"):
            assert key in record, key
        assert record["loss"] == pytest.approx(record["mlm_loss"] + record["nsp_loss"])
        assert 0.0 <= record["mlm_accuracy"] <= 1.0
    # an untrained model's MLM loss is near ln(vocab)
    assert abs(train[0]["mlm_loss"] - torch.log(torch.tensor(500.0)).item()) < 1.0
    evals = [r for r in records if "eval_mlm_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_perplexity"] == pytest.approx(float(torch.exp(torch.tensor(evals[-1]["eval_mlm_loss"]))), rel=1e-6)
    ckpts = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-00000003", "checkpoint-00000006"]
    for name in ckpts:
        assert (tiny_run / "checkpoints" / name / "manifest.json").is_file()
    final = tiny_run / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "README.md"):
        assert (final / name).is_file(), name
    assert (tiny_run / "recipe.yaml").is_file()


def test_export_round_trip_identical_logits(tiny_run):
    from safetensors.torch import load_file
    from transformers import BertForPreTraining, pipeline

    final = tiny_run / "final"
    exported = BertForPreTraining.from_pretrained(final).eval()
    # the export equals the last checkpoint's weights (same step)
    fresh = BertForPreTraining(exported.config).eval()
    state = load_file(tiny_run / "checkpoints" / "checkpoint-00000006" / "model.safetensors")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # tied
    fresh.tie_weights()
    ids = torch.tensor([[2, 10, 11, 12, 4, 13, 3, 14, 15, 3]])
    with torch.no_grad():
        a, b = exported(input_ids=ids), fresh(input_ids=ids)
    for name, value in exported.state_dict().items():  # bit-identical weights
        assert torch.equal(value, fresh.state_dict()[name]), name
    # the same weights in two allocations may take different CPU kernel paths (alignment):
    # logits agree to float32 rounding, not always bit for bit
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.seq_relationship_logits, b.seq_relationship_logits, rtol=0, atol=1e-6)

    fill = pipeline("fill-mask", model=str(final), tokenizer=str(final))
    predictions = fill("the river runs to the [MASK] .")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory, sample_tokenizer) -> str:
    """A tokenizer folder shared by runs that must match bit for bit: WordPiece training in
    `tokenizers` breaks ties in hash-map order, so two processes may train different
    vocabularies from the same text (huggingface/tokenizers#1794)."""
    path = tmp_path_factory.mktemp("tokenizer")
    sample_tokenizer.save_pretrained(path)
    return str(path)


def test_exact_resume_after_sigkill(tmp_path, saved_tokenizer):
    """SIGKILL a run at an arbitrary step; resume_from=latest reproduces every following
    loss bit for bit (fp32, CPU, dropout on, 2 accumulation steps, 1 DataLoader worker)."""
    extra = {
        "train.max_steps": 10, "train.save_steps": 3, "train.gradient_accumulation_steps": 2,
        "data.dataloader_num_workers": 1, "tokenizer.name_or_path": saved_tokenizer,
    }
    reference = tmp_path / "reference"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(reference, **extra)]) == 0
    expected = train_records(reference)

    run = tmp_path / "killed"
    proc = cli("pretrain", str(TINY_RECIPE), *tiny_overrides(run, **extra))
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it was killed"

    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **extra), "resume_from=latest"]) == 0
    resumed = train_records(run)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        for key in LOSS_KEYS:
            assert resumed[step][key] == expected[step][key], (step, key)


def test_sigterm_saves_and_resumes(tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, **{"train.max_steps": 400, "train.save_steps": 0})
    proc = cli("pretrain", str(TINY_RECIPE), *overrides)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output  # stopped, not finished: 143 as a shell reports it
    assert "resume with resume_from=latest" in output
    ckpts = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 1 <= stopped_at < 400
    assert not (run / "final").exists()
    assert main(["pretrain", str(TINY_RECIPE), *overrides, "resume_from=latest", "train.max_steps=400"]) == 0
    assert max(train_records(run)) == 400
    assert (run / "final" / "model.safetensors").is_file()


def test_ctrl_c_to_the_process_group_with_dataloader_workers_stops_cleanly(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, DataLoader workers included:
    they ignore it, and the main process finishes its step, saves a checkpoint and exits 130
    (the workers used to die, and the run crashed without a checkpoint). The run then resumes."""
    run = tmp_path / "run"
    overrides = tiny_overrides(run, **{"train.max_steps": 400, "train.save_steps": 0, "data.dataloader_num_workers": 1})
    proc = cli("pretrain", str(TINY_RECIPE), *overrides, start_new_session=True)  # its own process group
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "Traceback" not in output and "resume with resume_from=latest" in output
    [ckpt] = (run / "checkpoints").glob("checkpoint-*")
    assert 1 <= int(ckpt.name.split("-")[1]) < 400
    assert main(["pretrain", str(TINY_RECIPE), *overrides, "resume_from=latest", "train.max_steps=400"]) == 0
    assert max(train_records(run)) == 400


def test_overwrite_replaces_the_runs_own_files_plots_included_and_nothing_else(tiny_run, tmp_path):
    """overwrite=true deletes the old run's artefacts, the plots of ``bert-recipes plot`` among
    them (they would show the old curves next to the new metrics), and keeps other files."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "plots").mkdir(exist_ok=True)
    (run / "plots" / "loss.png").write_bytes(b"old curve")
    (run / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "published"  # final/ as a link to a folder outside: the link goes, the folder stays
    shutil.move(run / "final", elsewhere)
    (run / "final").symlink_to(elsewhere, target_is_directory=True)
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run), "overwrite=true"]) == 0
    assert not (run / "plots").exists() and (run / "notes.txt").read_text() == "mine"
    assert (run / "final" / "model.safetensors").is_file() and not (run / "final").is_symlink()
    assert (elsewhere / "model.safetensors").is_file()


def test_refuses_to_overwrite_another_run(tiny_run, capsys):
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(tiny_run), "overwrite=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output_dir:") and "already holds a run" in err
    assert "\n" not in err
    assert (tiny_run / "final" / "model.safetensors").is_file()  # nothing was lost


def test_overwrite_never_deletes_the_model_it_reads_nor_a_run_of_another_kind(tiny_run, capsys, checkpoint):
    sample = REPO / "recipes" / "glue" / "sample.yaml"  # it sets overwrite: true
    before = sorted(p.name for p in tiny_run.iterdir())
    code = main(["finetune", str(sample), f"output_dir={tiny_run}", f"model.name_or_path={tiny_run / 'final'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"error: output_dir: '{tiny_run}' contains model.name_or_path '{tiny_run / 'final'}', which this "
                   "run reads; overwrite=true would delete it: choose another output_dir")
    code = main(["finetune", str(sample), f"output_dir={tiny_run}", f"model.name_or_path={checkpoint}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"error: output_dir: '{tiny_run}' holds a pretraining run; overwrite=true only replaces a "
                   "fine-tuning run: choose another output_dir")
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # nothing was lost
    assert (tiny_run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_cpu_processes(tmp_path):
    """Two real gloo ranks through accelerate launch; parameters stay identical."""
    run = tmp_path / "ddp"
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "bert_recipes", "pretrain", str(TINY_RECIPE),
        *tiny_overrides(run, **{"train.save_steps": 3, "train.eval_steps": 3}),
    ]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "checkpoint:" in done.stdout
    ckpt = run / "checkpoints" / "checkpoint-00000006"
    assert (ckpt / "data_state_rank0.pt").is_file() and (ckpt / "data_state_rank1.pt").is_file()
    records = train_records(run)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[6]["sequences_per_s"] > 0
    assert (run / "final" / "model.safetensors").is_file()


def test_continued_pretraining_records_the_checkpoints_architecture_and_applies_dropout(tmp_path, checkpoint, caplog):
    """model.config keys were silently ignored with model.name_or_path while recipe.yaml
    recorded them (a 2-layer export said 4 layers; found by a helper). Now the checkpoint's
    architecture is recorded, a differing key the recipe sets is named in one warning, and
    the dropout keys the recipe sets apply to the checkpoint."""
    from transformers import BertForPreTraining

    from bert_recipes.recipe import load_recipe

    run = tmp_path / "run"
    caplog.set_level("WARNING", logger="bert_recipes")
    overrides = tiny_overrides(run, **{"model.name_or_path": checkpoint, "train.max_steps": 2,
                                       "model.config.num_hidden_layers": 4, "model.config.hidden_dropout_prob": 0.0})
    assert main(["pretrain", str(TINY_RECIPE), *overrides]) == 0
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model.config: the checkpoint's")]
    assert len(warned) == 1 and "num_hidden_layers 4 -> 2" in warned[0] and "hidden_size 32 -> 32" not in warned[0]
    recorded = load_recipe(run / "recipe.yaml").model.config
    assert (recorded.num_hidden_layers, recorded.hidden_size, recorded.intermediate_size) == (2, 32, 64)
    assert recorded.hidden_dropout_prob == 0.0 and recorded.attention_probs_dropout_prob == 0.1  # set / the checkpoint's
    exported = BertForPreTraining.from_pretrained(run / "final").config
    assert exported.num_hidden_layers == 2 and exported.hidden_dropout_prob == 0.0
    assert exported.attention_probs_dropout_prob == 0.1
    caplog.clear()
    assert main(["pretrain", str(TINY_RECIPE), *overrides, "resume_from=latest", "train.max_steps=3"]) == 0  # resumes
    assert json.loads((run / "final" / "eval_results.json").read_text())["step"] == 3
    # a checkpoint of an older version recorded the recipe's (ignored) architecture: it resumes too (found by a helper)
    import yaml

    saved = run / "checkpoints" / "checkpoint-00000003" / "recipe.yaml"
    old = yaml.safe_load(saved.read_text())
    old["model"]["config"]["num_hidden_layers"] = 4
    saved.write_text(yaml.safe_dump(old))
    from bert_recipes.training.checkpoint import _write_manifest

    _write_manifest(saved.parent)  # still a complete checkpoint
    caplog.clear()
    caplog.set_level("INFO", logger="bert_recipes")
    assert main(["pretrain", str(TINY_RECIPE), *overrides, "resume_from=latest", "train.max_steps=4"]) == 0
    assert "resumed from" in caplog.text and "checkpoint-00000003 at step 3" in caplog.text
    assert json.loads((run / "final" / "eval_results.json").read_text())["step"] == 4

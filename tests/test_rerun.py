"""Issue 12: every command is safe to re-run. Finished runs extend, failed runs retry,
overrides mean what users type, errors name the key and the fix, nothing is lost.

Each case runs through the CLI as a user runs it (``main([...])`` -> exit code, stderr)
and checks the message, the exit code and that nothing already written changed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bert_recipes.pretrain as pretrain_module
from bert_recipes.cli import main
from bert_recipes.errors import DataError

from .conftest import REPO, SAMPLE_TRAIN, TINY_RECIPE, tiny_overrides

GLUE_RECIPES = REPO / "recipes" / "glue"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns), to prove nothing was touched."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def records(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def one_error(capsys, argv, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, sample_tokenizer) -> str:
    path = tmp_path_factory.mktemp("tok")
    sample_tokenizer.save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------- 1. finished runs extend


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer_dir) -> Path:
    """A 6-step run with save_steps=0: the end still leaves checkpoint-00000006."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir})]) == 0
    return run


def test_the_end_of_a_run_is_a_checkpoint(finished):
    assert [p.name for p in (finished / "checkpoints").iterdir()] == ["checkpoint-00000006"]
    assert (finished / "checkpoints" / "checkpoint-00000006" / "manifest.json").is_file()


def test_resume_a_complete_run_changes_nothing(finished, tokenizer_dir, caplog):
    before = snapshot(finished)
    with caplog.at_level(logging.INFO, logger="bert_recipes"):
        assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(finished, **{"tokenizer.name_or_path": tokenizer_dir}),
                     "resume_from=latest"]) == 0
    assert "the run is complete (step 6 = train.max_steps); nothing to do" in caplog.text
    assert snapshot(finished) == before


def test_extend_a_finished_run(finished, tmp_path, tokenizer_dir, caplog):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(finished, run)
    extra = {"tokenizer.name_or_path": tokenizer_dir}
    with caplog.at_level(logging.INFO, logger="bert_recipes"):
        assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **extra), "resume_from=latest",
                     "train.max_steps=8"]) == 0
    assert "resumed from" in caplog.text and "checkpoint-00000006" in caplog.text
    note = [r.getMessage() for r in caplog.records if "schedule is recomputed" in r.getMessage()]
    assert len(note) == 1 and "train.max_steps 6 -> 8" in note[0] and "\n" not in note[0]
    assert steps(run) == [1, 2, 3, 4, 5, 6, 7, 8]  # each step once
    assert json.loads((run / "final" / "eval_results.json").read_text())["step"] == 8
    # the schedule from step 6 on is the 8-step schedule (what a fresh 8-step run logs)
    reference = tmp_path / "reference"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(reference, **extra), "train.max_steps=8"]) == 0
    for step in (7, 8):
        assert records(run)[step]["lr"] == records(reference)[step]["lr"]


def test_resume_never_retrains_over_an_export(finished, tmp_path, tokenizer_dir, capsys):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")  # a run from before the end-of-run checkpoint
    before = snapshot(run)
    err = one_error(capsys, ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}),
                             "resume_from=latest", "train.max_steps=8", "overwrite=false"])  # tiny.yaml has true
    assert err == (f"error: resume_from: no complete checkpoint in {run / 'checkpoints'} to continue, and {run / 'final'} "
                   "holds an export: set overwrite=true to retrain from step 0 and replace it")
    assert snapshot(run) == before
    # ... and overwrite=true, as it says, retrains over it even with resume_from=latest (a job script's
    # constant key; the refusal used to repeat itself, found by a helper)
    (run / "notes.txt").write_text("mine")
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}),
                 "resume_from=latest", "train.max_steps=8", "overwrite=true"]) == 0
    assert steps(run) == list(range(1, 9))  # from step 0: the old run's metrics were replaced, not appended to
    assert json.loads((run / "final" / "eval_results.json").read_text())["step"] == 8
    assert (run / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- 4. schedule keys on resume


def test_a_changed_schedule_is_refused_without_opt_in(finished, tmp_path, tokenizer_dir, capsys, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}), "resume_from=latest"]
    before = snapshot(run)
    err = one_error(capsys, [*args, "train.max_steps=8", "train.learning_rate=0.0002"])
    assert err.startswith("error: train.learning_rate: 0.0002 differs from the value 0.001 of checkpoint ")
    assert "set train.learning_rate=0.001 to continue the same schedule, or train.reschedule_on_resume=true" in err
    err = one_error(capsys, [*args, "train.max_steps=4"])
    assert err.endswith("is below the step of checkpoint " f"{run / 'checkpoints' / 'checkpoint-00000006'} (6); "
                        "set train.max_steps=6 or more to continue that run")
    assert snapshot(run) == before
    with caplog.at_level(logging.INFO, logger="bert_recipes"):
        assert main([*args, "train.max_steps=8", "train.learning_rate=0.0002", "train.reschedule_on_resume=true"]) == 0
    assert "train.learning_rate 0.001 -> 0.0002" in caplog.text
    lr = records(run)
    # 1 warmup step (10% of 8), then linear decay to 0 at step 8 from the new base rate
    assert lr[7]["lr"] == pytest.approx(2e-4 * (8 - 7) / (8 - 1), rel=1e-9)


def test_a_resume_that_changes_the_model_tokenizer_or_data_is_refused(finished, tmp_path, tokenizer_dir, capsys):
    """Keys that say what the checkpoint is (architecture, dropout, tokenizer, batch size, the
    instances' shape) are refused in one line before anything is written: the weights would
    not load (a traceback before), or the change would be ignored or mixed into the run
    silently. A bookkeeping change (logging) still resumes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}), "resume_from=latest",
            "train.max_steps=8"]
    before = snapshot(run)
    checkpoint = run / "checkpoints" / "checkpoint-00000006"
    for change, key, old in (("model.config.hidden_size=64", "model.config.hidden_size", 32),
                             ("model.config.hidden_dropout_prob=0.3", "model.config.hidden_dropout_prob", 0.1),
                             ("tokenizer.vocab_size=600", "tokenizer.vocab_size", 500),
                             ("train.per_device_train_batch_size=2", "train.per_device_train_batch_size", 4),
                             ("data.max_seq_length=32", "data.max_seq_length", 64)):
        err = one_error(capsys, [*args, change])
        new = change.split("=")[1]
        assert err == (f"error: {key}: {new} differs from the value {old} of checkpoint {checkpoint}; a resume continues "
                       f"that run's model, tokenizer and data: set {key}={old} to resume it, or output_dir=DIR for a new "
                       "run (model.name_or_path=<its export> starts from its weights)"), err
    assert snapshot(run) == before
    assert main([*args, "train.logging_steps=2"]) == 0
    assert max(steps(run)) == 8


def test_a_resume_with_other_processes_or_workers_is_refused_before_anything_is_loaded(finished, tmp_path, tokenizer_dir,
                                                                                      capsys, caplog):
    """The data state's layout (one file per process, the DataLoader workers) is checked in the
    preflight: one line naming what differs, before any "resumed from" line (it used to come
    after the checkpoint was loaded and logged, naming the workers for a process count)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    checkpoint = run / "checkpoints" / "checkpoint-00000006"
    args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}), "resume_from=latest",
            "train.max_steps=8"]
    caplog.set_level(logging.INFO, logger="bert_recipes")
    before = snapshot(run)
    err = one_error(capsys, [*args, "data.dataloader_num_workers=1"])
    assert err == ("error: data.dataloader_num_workers: the saved data state is for 0 DataLoader worker(s), this run "
                   "has 1; resume with data.dataloader_num_workers=0")
    shutil.copy(checkpoint / "data_state_rank0.pt", checkpoint / "data_state_rank1.pt")  # as if saved by 2 processes
    err = one_error(capsys, args)
    assert err == (f"error: resume_from: {checkpoint} was saved by 2 process(es) and this launch has 1: resume with 2 "
                   "(accelerate launch --num_processes 2); each rank's data position is saved separately")
    assert "resumed from" not in caplog.text
    (checkpoint / "data_state_rank1.pt").unlink()
    assert snapshot(run) == before


def test_a_resume_that_changes_the_data_stream_is_refused_before_anything_is_written(finished, tmp_path, tokenizer_dir,
                                                                                     capsys, caplog):
    """The stream's own settings (interleaving, shuffle buffer, ...) are identity keys, and the
    saved data state is checked against the corpus, its access mode and the packing mode in the
    preflight: a helper found these accepted (another data stream, silently) or refused only
    after "resumed from", with the refused values already in the run's recipe.yaml."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}), "resume_from=latest",
            "train.max_steps=8"]
    caplog.set_level(logging.INFO, logger="bert_recipes")
    before = snapshot(run)
    for change, start in (("data.interleave_documents=4", "error: data.interleave_documents: 4 differs from the value 16"),
                          ("data.shuffle_buffer_size=10", "error: data.shuffle_buffer_size: 10 differs from the value 16"),
                          (f"data.train_files=[{SAMPLE_TRAIN[0]}]",
                           "error: data.train_files: the corpus differs from the one this data state was saved on"),
                          ("data.corpus_access=stream", "error: data.corpus_access: the saved data state was read with "
                                                        "corpus_access index, this run uses stream"),
                          ("data.packing=true", "error: data.packing: the saved data state was written with data.packing "
                                                "false or batch (instances), this run has true")):
        err = one_error(capsys, [*args, change])
        assert err.startswith(start), (change, err)
    assert "resumed from" not in caplog.text
    assert snapshot(run) == before  # recipe.yaml included
    assert main([*args, "data.packing=false", "data.max_eval_samples=8"]) == 0  # the same instances; evaluation may change


def test_a_resume_trains_with_the_recipes_optimizer_settings(finished, tmp_path, tokenizer_dir, caplog):
    """Loading the optimizer's state restored the checkpoint's weight decay, betas and epsilon
    over the recipe's, while recipe.yaml recorded the new values (found by a helper). The
    recipe's now apply from the resume step, logged; the learning rate stays the schedule's."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    caplog.set_level(logging.INFO, logger="bert_recipes")
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}),
                 "resume_from=latest", "train.max_steps=7", "train.weight_decay=0.5", "train.adam_epsilon=0.001",
                 "train.adam_beta2=0.98"]) == 0
    assert ("resume from step 6: the recipe's optimizer settings apply: weight_decay 0.01 -> 0.5, betas (0.9, 0.999) -> "
            "(0.9, 0.98), eps 1e-06 -> 0.001") in caplog.text
    groups = torch.load(run / "checkpoints" / "checkpoint-00000007" / "optimizer.bin", weights_only=False)["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups] == [(0.5, (0.9, 0.98), 0.001),
                                                                                  (0.0, (0.9, 0.98), 0.001)]
    caplog.clear()
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}),
                 "resume_from=latest", "train.max_steps=8", "train.weight_decay=0.5", "train.adam_epsilon=0.001",
                 "train.adam_beta2=0.98"]) == 0
    assert "optimizer settings apply" not in caplog.text  # the same settings: nothing to say
    from bert_recipes.training.checkpoint import _same_setting

    assert _same_setting([0.9, 0.999], (0.9, 0.999))  # FSDP's loaded state holds betas as a list


def test_a_finetune_resume_on_other_data_or_processes_is_refused(checkpoint, tmp_path, capsys, caplog):
    """A fine-tuning checkpoint's batch plan indexes its train split under its number of
    processes: another data.glue_dir (found by a helper: 67,349 examples where the checkpoint
    had 200) or another process count is refused in one line before anything is written."""
    import shutil

    run = tmp_path / "run"
    common = ["finetune", str(REPO / "recipes" / "glue" / "sst2.yaml"), f"model.name_or_path={checkpoint}",
              f"output_dir={run}", "train.max_steps=2", "train.per_device_train_batch_size=4", "data.max_eval_samples=4"]
    sample, fixtures = REPO / "data" / "sample" / "glue", REPO / "tests" / "fixtures" / "glue"
    assert main([*common, f"data.glue_dir={sample}"]) == 0
    (run / "results.json").unlink()  # as if stopped at its last checkpoint
    before = snapshot(run)
    saved = run / "checkpoints" / "checkpoint-00000002"
    err = one_error(capsys, [*common, f"data.glue_dir={fixtures}", "resume_from=latest"])
    assert err.startswith(f"error: data.glue_dir: the sst2 train split from {fixtures} (") and "\n" not in err
    assert f"is not the one checkpoint {saved} trained on (" in err
    shutil.copy(saved / "random_states_0.pkl", saved / "random_states_1.pkl")  # as if saved by 2 processes
    err = one_error(capsys, [*common, f"data.glue_dir={sample}", "resume_from=latest"])
    assert err == (f"error: resume_from: {saved} was saved by 2 process(es) and this launch has 1: resume with 2 "
                   "(accelerate launch --num_processes 2); each rank's random state and share of the batches is saved "
                   "separately")
    (saved / "random_states_1.pkl").unlink()
    err = one_error(capsys, [*common, f"data.glue_dir={sample}", "resume_from=latest", "model.hidden_dropout_prob=0.3"])
    assert "set model.hidden_dropout_prob=null to resume it" in err  # an override that parses (it said =None)
    err = one_error(capsys, [*common, f"data.glue_dir={sample}", "resume_from=latest", "data.max_eval_samples=8"])
    assert err.startswith("error: data.max_eval_samples: 8 differs from the value 4")  # the best so far was chosen on 4
    assert snapshot(run) == before
    copy = tmp_path / "copy"  # the same data in another folder resumes
    shutil.copytree(sample, copy)
    assert main([*common, f"data.glue_dir={copy}", "resume_from=latest"]) == 0


# --------------------------------------------------------------------------- 2. one history after a resume


def test_metrics_hold_each_step_once_after_resume(tmp_path, tokenizer_dir):
    import shutil

    from bert_recipes.plot import read_metrics

    run = tmp_path / "run"
    args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir,
                                                                     "train.save_steps": 3})]
    assert main(args) == 0
    # what a crash after step 6 was logged but before its checkpoint leaves behind
    shutil.rmtree(run / "checkpoints" / "checkpoint-00000006")
    shutil.rmtree(run / "final")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 1.0')  # and a half-written line
    assert main([*args, "resume_from=latest"]) == 0
    assert steps(run) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- 3. failed before training: retry


def test_a_run_that_failed_before_its_first_step_can_be_retried(tmp_path, tokenizer_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir})]

    def broken(*a, **k):
        raise DataError("data.train_files: something the user fixes")

    monkeypatch.setattr(pretrain_module, "build_pretraining_dataloader", broken)
    assert one_error(capsys, args) == "error: data.train_files: something the user fixes"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "tokenizer"]  # what it left (recipe.yaml comes with the data)
    monkeypatch.undo()
    assert main(args) == 0  # the same command again
    assert steps(run) == [1, 2, 3, 4, 5, 6]
    # once a run has trained, the same command is refused (nothing is lost)
    before = snapshot(run)
    assert "already holds a run" in one_error(capsys, [*args, "overwrite=false"])
    assert snapshot(run) == before


def test_empty_corpus_names_the_key_the_user_set(tmp_path, capsys):
    empty = tmp_path / "corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("\n\n  \n")
    run = tmp_path / "run"
    err = one_error(capsys, ["pretrain", str(TINY_RECIPE), f"output_dir={run}", f"data.train_files=[{empty}/*.txt]"])
    assert err == (f"error: data.train_files: '{empty / 'a.txt'}' and 1 more hold no text (only blank lines); "
                   "add text or point data.train_files at other files")
    assert not run.exists()


# --------------------------------------------------------------------------- 5. overrides


def string_keys(schema) -> list[str]:
    import typing

    from bert_recipes.recipe_files import valid_keys

    out = []
    for key in valid_keys(schema):
        model, field = schema, None
        for part in key.split("."):
            field = model.model_fields[part]
            model = field.annotation
        text = repr(field.annotation)
        if "str" in text or "Literal" in text or typing.get_origin(field.annotation) is typing.Literal:
            out.append(key)
    return out


@pytest.mark.parametrize("word", ["no", "off", "yes", "on", "No", "OFF"])
def test_yaml_11_booleans_stay_strings_in_every_string_key(word):
    from bert_recipes.errors import RecipeError
    from bert_recipes.glue.recipe import FinetuneRecipe
    from bert_recipes.recipe import PretrainRecipe, load_recipe

    for schema, recipe in ((PretrainRecipe, TINY_RECIPE), (FinetuneRecipe, GLUE_RECIPES / "rte.yaml")):
        keys = string_keys(schema)
        assert "precision" in keys and "train.optimizer" in keys
        for key in keys:
            try:
                load_recipe(recipe, [f"{key}={word}"], schema=schema)
            except RecipeError as exc:
                assert "(got True)" not in str(exc) and "(got False)" not in str(exc), (key, str(exc))


def test_precision_no_is_the_documented_value(capsys, tmp_path):
    assert main(["show", str(TINY_RECIPE), "precision=no", "overwrite=yes"]) == 0
    out = capsys.readouterr().out
    assert "precision: 'no'" in out and "overwrite: true" in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {TINY_RECIPE}\nprecision: no\nmodel:\n  sparse_mlm_head: off\n")
    assert main(["show", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "precision: 'no'" in out and "sparse_mlm_head: false" in out


def test_an_override_error_names_the_override(capsys):
    err = one_error(capsys, ["pretrain", str(TINY_RECIPE), "train.learnig_rate=1e-4"])
    assert err == ("error: override 'train.learnig_rate=1e-4': unknown key 'train.learnig_rate'; "
                   "did you mean 'train.learning_rate'?")
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "rte.yaml"), "train.max_steps=zero"])
    assert err.startswith("error: override 'train.max_steps=zero': key 'train.max_steps': ")
    err = one_error(capsys, ["pretrain", str(TINY_RECIPE), "precision=fp8"])
    assert err.startswith("error: override 'precision=fp8': key 'precision': Input should be")


@pytest.mark.parametrize("command,recipe", [("pretrain", TINY_RECIPE), ("finetune", GLUE_RECIPES / "rte.yaml")])
def test_recipe_errors_come_before_torch_is_imported(command, recipe):
    code = ("import sys, time; from bert_recipes.cli import main; t = time.perf_counter(); "
            f"rc = main([{command!r}, {str(recipe)!r}, 'train.learnig_rate=1']); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules, round(time.perf_counter() - t, 2))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    rc, torch_loaded, transformers_loaded, _seconds = done.stdout.split()
    assert (rc, torch_loaded, transformers_loaded) == ("2", "False", "False"), done.stderr
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: override 'train.learnig_rate=1'")


# --------------------------------------------------------------------------- 6. messages that name the key and the fix


def test_an_empty_folder_as_a_model_or_tokenizer(tmp_path, capsys, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_error(capsys, ["pretrain", str(TINY_RECIPE), f"output_dir={tmp_path}/o", f"model.name_or_path={empty}"])
    assert err.startswith(f"error: model.name_or_path: local folder '{empty}' is empty; expected a model folder "
                          "saved with save_pretrained")
    err = one_error(capsys, ["pretrain", str(TINY_RECIPE), f"output_dir={tmp_path}/o", f"tokenizer.name_or_path={empty}"])
    assert err.startswith(f"error: tokenizer.name_or_path: local folder '{empty}' is empty; expected a tokenizer folder")
    (empty / "notes.txt").write_text("x")
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "sample.yaml"), f"output_dir={tmp_path}/o",
                             f"model.name_or_path={empty}"])
    assert f"model.name_or_path: local folder '{empty}' has no config.json (it holds notes.txt)" in err
    assert not (tmp_path / "o").exists()


def test_glue_folder_messages(tmp_path, capsys, checkpoint):
    glue = tmp_path / "glue"
    (glue / "RTE_old").mkdir(parents=True)
    (glue / "SST-2").mkdir()
    out = tmp_path / "o"
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "rte.yaml"), f"model.name_or_path={checkpoint}",
                             f"data.glue_dir={glue}", f"output_dir={out}"])
    assert err == (f"error: data.glue_dir: no GLUE folder 'RTE' in {glue} (it holds RTE_old, SST-2); rename 'RTE_old' "
                   f"to 'RTE'; expected the original GLUE layout, e.g. {glue / 'RTE' / 'train.tsv'}")
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "rte.yaml"), f"model.name_or_path={checkpoint}",
                             f"data.glue_dir={tmp_path / 'nowhere'}", f"output_dir={out}"])
    assert err.startswith(f"error: data.glue_dir: folder '{tmp_path / 'nowhere'}' not found")
    assert not out.exists()


def test_no_glue_dir_and_no_hub_says_set_glue_dir(tmp_path, capsys, checkpoint, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "rte.yaml"), f"model.name_or_path={checkpoint}",
                             f"output_dir={tmp_path / 'o'}"])
    assert err.startswith("error: data.glue_dir: not set, and nyu-mll/glue (config 'rte', split 'train') cannot be loaded")
    assert err.endswith("set data.glue_dir=PATH to the GLUE TSV folders (e.g. PATH/RTE/train.tsv), or go online")
    assert not (tmp_path / "o").exists()


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    import socket

    import huggingface_hub.constants

    from bert_recipes import hub

    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(socket, "create_connection", no_network)
    started = time.perf_counter()
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "rte.yaml"), "model.name_or_path=someone/no-such-bert",
                             f"output_dir={tmp_path / 'o'}"])
    assert time.perf_counter() - started < 30
    assert err.startswith("error: model.name_or_path: cannot load Hub id (not in the local cache, and the Hub is offline "
                          "or unreachable) 'someone/no-such-bert'")
    assert len(calls) == 1 and os.environ["HF_HUB_OFFLINE"] == "1"


# --------------------------------------------------------------------------- 7. GLUE labels from the Hub


def fake_hub(monkeypatch, names: list[str], labels: list[int], task_columns=("premise", "hypothesis")):
    import datasets

    def load_dataset(name, config, split):
        features = datasets.Features({"idx": datasets.Value("int32"),
                                      **{c: datasets.Value("string") for c in task_columns},
                                      "label": datasets.ClassLabel(names=names)})
        rows = {"idx": list(range(len(labels))), **{c: [f"{c} {i}" for i in range(len(labels))] for c in task_columns},
                "label": labels}
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_labels_are_mapped_by_name(monkeypatch):
    from bert_recipes.glue.data import load_glue_split

    # MNLI's names are (entailment, neutral, contradiction); this split orders them otherwise
    fake_hub(monkeypatch, ["contradiction", "entailment", "neutral"], [0, 1, 2, -1])
    data = load_glue_split("mnli", "validation_matched")
    assert data.features["label"].names == ["entailment", "neutral", "contradiction"]
    assert data["label"] == [2, 0, 1, -1]  # contradiction, entailment, neutral, hidden


def test_hub_labels_with_other_names_are_refused(monkeypatch):
    from bert_recipes.glue.data import load_glue_split

    fake_hub(monkeypatch, ["yes", "maybe", "no"], [0, 1, 2])
    with pytest.raises(DataError, match=r"label names \(yes, maybe, no\) are not GLUE mnli's \(entailment, neutral, "
                                        r"contradiction\)"):
        load_glue_split("mnli", "validation_matched")


def test_hidden_train_labels_are_refused_in_one_line(monkeypatch, capsys, checkpoint, tmp_path):
    fake_hub(monkeypatch, ["entailment", "not_entailment"], [-1, -1, -1], task_columns=("sentence1", "sentence2"))
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "rte.yaml"), f"model.name_or_path={checkpoint}",
                             f"output_dir={tmp_path / 'o'}"])
    assert err == ("error: nyu-mll/glue (config 'rte'): every label of the rte train split is hidden (-1); fine-tuning "
                   "needs labelled training data (the GLUE TSVs of data.glue_dir, or a dataset with labels)")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 8. saved artefacts


def test_saved_tokenizers_truncate(tmp_path, finished, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", *SAMPLE_TRAIN, "--out", str(out), "--vocab-size", "500"]) == 0
    assert AutoTokenizer.from_pretrained(out).model_max_length == 512
    assert main(["tokenizer", "train", *SAMPLE_TRAIN, "--out", str(out), "--vocab-size", "500",
                 "--model-max-length", "128", "--overwrite"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 128
    assert len(tokenizer("word " * 1000, truncation=True)["input_ids"]) == 128
    run = tmp_path / "run"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"train.max_steps": 1})]) == 0
    assert AutoTokenizer.from_pretrained(run / "tokenizer").model_max_length == 64  # model.config.max_position_embeddings
    assert "Writing model shards" not in "".join(capsys.readouterr())


def test_weights_are_world_readable(finished):
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    for path in [finished / "final" / "model.safetensors",
                 *(finished / "checkpoints" / "checkpoint-00000006").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_an_occupied_glue_folder_says_how_to_choose_another(tmp_path, capsys, checkpoint):
    out = tmp_path / "rte"
    (out / "checkpoints").mkdir(parents=True)
    before = snapshot(out)
    err = one_error(capsys, ["finetune", str(GLUE_RECIPES / "sample.yaml"), f"model.name_or_path={checkpoint}",
                             f"output_dir={out}", "overwrite=false"])
    assert err == (f"error: output_dir: '{out}' already holds a run (checkpoints); set resume_from=latest to continue it, "
                   "overwrite=true to replace it, or output_dir=DIR for a new run")
    assert snapshot(out) == before


def test_make_finetune_with_an_unknown_task_lists_the_tasks():
    """...and suggests the lower-case name; GLUE_DIR needs TASK."""
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-s", "finetune", "TASK=sst3"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 2
    assert "error: TASK=sst3: no recipe recipes/glue/sst3.yaml; tasks: cola mnli mrpc qnli qqp rte sst2 stsb wnli" \
        in done.stderr

    def make(*args):
        return subprocess.run(["make", "-s", "finetune", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MAKEFLAGS": ""})

    done = make("TASK=SST-2")
    assert done.returncode == 2 and "no recipe recipes/glue/SST-2.yaml (did you mean TASK=sst2?); tasks: cola" in done.stderr
    # GLUE_DIR without TASK ran the demo recipe (lr 1e-3, overwrite: true) on the real SST-2 (found by a helper)
    done = make("GLUE_DIR=../shared/data/glue", "MODEL=runs/tiny/final")
    assert done.returncode == 2 and "error: GLUE_DIR=../shared/data/glue needs TASK=NAME (e.g. TASK=sst2)" in done.stderr


def test_predict_test_with_some_tasks_warns(capsys):
    from bert_recipes.glue.cli import warn_incomplete_submission

    warn_incomplete_submission(["cola", "rte"])
    err = capsys.readouterr().err.strip()
    assert err == ("warning: --predict-test with 2 of the 9 GLUE tasks (missing sst2,mrpc,stsb,qqp,mnli,qnli,wnli): the "
                   "zip is not a complete leaderboard submission; run all tasks (no --tasks) for one")
    warn_incomplete_submission(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- SIGKILL three times


@pytest.mark.slow
def test_three_sigkills_piece_together_bit_for_bit(tmp_path, tokenizer_dir):
    """SIGKILL one run at three random steps, resuming each time (2 accumulation steps,
    2 DataLoader workers); the per-step losses of the pieces equal an uninterrupted run."""
    extra = {"train.max_steps": 14, "train.save_steps": 2, "train.gradient_accumulation_steps": 2,
             "data.dataloader_num_workers": 2, "tokenizer.name_or_path": tokenizer_dir, "train.save_total_limit": 20}
    reference = tmp_path / "reference"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(reference, **extra)]) == 0
    expected = records(reference)

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "bert_recipes", "pretrain", str(TINY_RECIPE), *tiny_overrides(run, **extra)]
    kill_at = sorted(random.Random(int(time.time())).sample(range(2, 13), 3))
    for attempt, target in enumerate(kill_at):
        proc = subprocess.Popen([*args, *(["resume_from=latest"] if attempt else [])], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and max(steps(run) or [0]) >= target:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "final").exists(), f"the run finished before kill {attempt + 1} (step {target})"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **extra), "resume_from=latest"]) == 0
    assert steps(run) == list(range(1, 15))  # each step once
    resumed = records(run)
    for step in range(1, 15):
        for key in ("loss", "mlm_loss", "nsp_loss", "lr"):
            assert resumed[step][key] == expected[step][key], (kill_at, step, key)


def test_a_full_disk_is_one_line_and_loses_nothing(finished, tmp_path, tokenizer_dir, capsys, monkeypatch):
    """Disk full while writing the export ended in safetensors' or torch's traceback and left
    the half-written folder filling the disk (found by a helper). Now one line naming the
    folder and what to do, the earlier export and checkpoints intact, no temporary folder;
    the same command then finishes."""
    import shutil

    from transformers import PreTrainedModel

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p.relative_to(run): p.read_bytes() for p in (run / "final").rglob("*") if p.is_file()}
    real = PreTrainedModel.save_pretrained

    def full(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)  # most of it written, then the device is full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2304 vs 2240")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    monkeypatch.setattr("bert_recipes.atomic._nearly_full", lambda path, margin=0: True)
    args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}),
            "resume_from=latest", "train.max_steps=8"]
    capsys.readouterr()
    assert main(args) == 2
    assert one_line_error(capsys) == (f"error: {run}: No space left on device (free some space; a run resumes from its "
                                      "last complete checkpoint with resume_from=latest)")
    assert {p.relative_to(run): p.read_bytes() for p in (run / "final").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]  # no half-written folder
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-00000006", "checkpoint-00000008"]
    monkeypatch.undo()
    assert main(args) == 0
    assert json.loads((run / "final" / "eval_results.json").read_text())["step"] == 8


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_FSIZE on Linux")
def test_a_file_size_limit_is_one_line_and_loses_nothing(tmp_path, tokenizer_dir):
    """A file size limit (ulimit -f; a quota reads the same) hit while safetensors wrote a
    checkpoint ended in its traceback, "I/O error: File too large (os error 27)" (found by a
    helper). Now one line naming the folder, no temporary folder left."""
    import resource

    run = tmp_path / "run"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 17, 1 << 17))  # noqa: E731
    done = subprocess.run([sys.executable, "-m", "bert_recipes", "pretrain", str(TINY_RECIPE),
                           *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir, "train.max_steps": 4,
                                                   "train.save_steps": 2})],
                          cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {run / 'checkpoints'}: File too large (a file size limit (ulimit -f) or the filesystem's largest file "
        "was reached; a run resumes from its last complete checkpoint with resume_from=latest)")
    assert "Traceback" not in done.stderr
    assert list((run / "checkpoints").iterdir()) == []  # the half-written checkpoint removed
    # torch.save (the optimizer) reports the same limit only as "unexpected pos": one line too
    from bert_recipes.atomic import building

    with pytest.raises(OSError) as err, mock_limit():
        with building(tmp_path / ".tmp-x"):
            (tmp_path / ".tmp-x").mkdir()
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4079040 vs 4078932")
    assert err.value.errno == errno.EFBIG and not (tmp_path / ".tmp-x").exists()


@contextlib.contextmanager
def mock_limit():
    import resource

    real = resource.getrlimit
    resource.getrlimit = lambda which: (1 << 20, 1 << 20) if which == resource.RLIMIT_FSIZE else real(which)
    try:
        yield
    finally:
        resource.getrlimit = real


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_second_run_into_a_folder_in_use_is_refused(finished, tmp_path, tokenizer_dir, capsys):
    """The same job started twice: the second run deleted the first's checkpoints and both
    wrote metrics.jsonl (found by a helper). The folder's lock refuses it in one line, before
    anything is deleted; once the holder is gone (even killed) the folder is free again."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with holding_lock(run) as holder:
        args = ["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"tokenizer.name_or_path": tokenizer_dir}),
                "overwrite=true"]
        capsys.readouterr()
        assert main(args) == 2
        assert one_line_error(capsys) == (f"error: output_dir: '{run}' is in use by another run (process {holder.pid} "
                                          f"holds {run / '.lock'}); wait for it to finish or choose another output_dir")
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert main(args) == 0  # the lock died with its process
    assert main(args) == 0  # and a run in this process gives its own back when it ends


def test_a_sweeps_overwrite_never_deletes_a_folder_in_use(tmp_path):
    """overwrite=true on a GLUE sweep deleted the cells of a sweep still training there (found
    by a helper): check_unlocked refuses while a process holds a cell's lock."""
    from bert_recipes.errors import UserError
    from bert_recipes.training.outdir import check_unlocked

    cell = tmp_path / "sweep" / "rte" / "lr1e-05" / "seed-1"
    cell.mkdir(parents=True)
    check_unlocked([tmp_path / "sweep" / "rte"])  # nobody holds it
    with holding_lock(cell) as holder:
        with pytest.raises(UserError, match=f"'{cell}' is in use by another run \\(process {holder.pid}\\)"):
            check_unlocked([tmp_path / "sweep" / "rte"])
    check_unlocked([tmp_path / "sweep" / "rte"])


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """NFS without lockd answers ENOLCK: that is not 'in use by another run' (every run was
    refused; found by a helper)."""
    import errno
    import fcntl

    from bert_recipes.training import outdir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    caplog.set_level("WARNING", logger="bert_recipes")
    outdir.lock_output_dir(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"output_dir: {tmp_path} cannot be locked (No locks available): nothing stops a second run from writing there"]
    assert str(tmp_path.resolve()) not in outdir._HELD


@contextlib.contextmanager
def holding_lock(folder: Path):
    """Another process holding ``folder``'s run lock (``lock_output_dir``) until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path; "
                               "from bert_recipes.training.outdir import lock_output_dir; "
                               f"lock_output_dir(Path({str(folder)!r})); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()

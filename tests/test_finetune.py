"""GLUE fine-tuning end to end on a tiny random BERT: every task's format, the metrics log,
the best export in a pipeline, label-set checks, seeds, resume after SIGTERM, batching,
one-line errors, and test labels that are never used."""

from __future__ import annotations

import json
import logging
import os
import signal
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bert_recipes.cli import main
from bert_recipes.errors import UserError
from bert_recipes.glue import batching as batching_module
from bert_recipes.glue import evaluation as evaluation_module
from bert_recipes.glue import finetune as finetune_module
from bert_recipes.glue.batching import BatchPlan
from bert_recipes.glue.classifier import build_classifier
from bert_recipes.glue.recipe import FinetuneRecipe, load_finetune_recipe
from bert_recipes.glue.tasks import TASKS, get_task
from bert_recipes.training.precision import resolve_precision

from .conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "glue"
SAMPLE_GLUE = REPO / "data" / "sample" / "glue"
GLUE_RECIPES = REPO / "recipes" / "glue"
TRAINABLE = [name for name, task in TASKS.items() if task.dev_splits]


def overrides(checkpoint, output_dir, **extra) -> list[str]:
    values = {
        "model.name_or_path": str(checkpoint),
        "data.glue_dir": str(FIXTURES),
        "output_dir": str(output_dir),
        "train.max_steps": 3,
        "train.per_device_train_batch_size": 2,
        "train.per_device_eval_batch_size": 2,
        "train.logging_steps": 1,
        "train.learning_rate": 1e-3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fixture_idx(task, split) -> list[int]:
    from bert_recipes.glue.data import load_glue_split

    return list(load_glue_split(task, split, FIXTURES)["idx"])


@pytest.fixture(scope="module", params=["false", "true"], ids=["padded", "packed"])
def task_runs(checkpoint, tmp_path_factory, request) -> dict[str, Path]:
    """Each of the 9 tasks fine-tuned for 3 steps on its fixture, with test predictions;
    with padded batches (the default) and with ``data.packing: true``."""
    root = tmp_path_factory.mktemp(f"tasks-packing-{request.param}")
    runs = {}
    for name in TRAINABLE:
        out = root / name
        code = main(["finetune", str(GLUE_RECIPES / f"{name}.yaml"),
                     *overrides(checkpoint, out, predict_test="true", **{"data.packing": request.param})])
        assert code == 0, name
        runs[name] = out
    return runs


# --------------------------------------------------------------------------- every task


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_task_trains_evaluates_and_exports(task_runs, name):
    task = get_task(name)
    out = task_runs[name]
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        assert {"loss", "lr", "grad_norm", "epoch", "samples_per_s", "padding_fraction"} <= set(record)
        assert np.isfinite(record["loss"])
    evals = [r for r in records if "eval_loss" in r]
    assert evals and evals[-1]["step"] == 3
    for record in evals:
        assert {f"eval_{key}" for key in task.metrics} <= set(record), record
    if name == "mnli":  # both dev sets, under their own keys
        assert {"eval_accuracy_m", "eval_accuracy_mm"} <= set(evals[-1])
    if name == "stsb":
        assert {"eval_pearson", "eval_spearmanr"} <= set(evals[-1])
    assert not any("test" in key for record in records for key in record)

    results = json.loads((out / "results.json").read_text())
    assert set(results["dev"]) == set(task.metrics)
    assert results["precision"] == resolve_precision("auto", "cpu")  # the GLUE default, resolved here
    best = [r for r in evals if r["step"] == results["best_step"]][0]
    assert results["dev"][task.main_metric] == pytest.approx(best[f"eval_{task.main_metric}"])
    assert results["dev"][task.main_metric] == max(r[f"eval_{task.main_metric}"] for r in evals)

    config = json.loads((out / "best" / "config.json").read_text())
    assert len(config["id2label"]) == task.num_labels
    assert config["problem_type"] == ("regression" if task.is_regression else "single_label_classification")
    if not task.is_regression:
        assert list(config["id2label"].values()) == list(task.label_names)
    for name_ in ("model.safetensors", "tokenizer.json", "recipe.yaml", "README.md", "eval_results.json",
                  "dev_predictions.json"):
        assert (out / "best" / name_).is_file(), name_
    # the best model's dev predictions give back its reported metrics
    from bert_recipes.glue.metrics import compute_metrics

    predictions = json.loads((out / "best" / "dev_predictions.json").read_text())
    assert set(predictions) == set(task.dev_splits)
    recomputed = {}
    for split, values in predictions.items():
        assert values["idx"] == fixture_idx(name, split) and len(values["label"]) == len(values["prediction"])
        outputs = np.asarray(values["prediction"] if task.is_regression else values["logits"])
        if not task.is_regression:
            assert values["prediction"] == outputs.argmax(-1).tolist()
        recomputed.update(compute_metrics(task, outputs, np.asarray(values["label"]), split=split))
    assert recomputed == pytest.approx(results["dev"])
    card = (out / "best" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and f"GLUE {task.glue_folder}" in card
    assert f"precision {results['precision']} (recipe: auto)," in card  # what auto resolved to


@pytest.mark.parametrize("name", TRAINABLE)
def test_test_splits_are_predicted_without_labels(task_runs, name):
    task = get_task(name)
    predictions = json.loads((task_runs[name] / "test_predictions.json").read_text())
    expected = {"mnli": {"mnli-m", "mnli-mm", "ax"}}.get(name, {name})
    assert set(predictions) == expected
    for entry, values in predictions.items():
        split = {"mnli-m": "test_matched", "mnli-mm": "test_mismatched"}.get(entry, "test")
        source = "ax" if entry == "ax" else name
        assert values["idx"] == fixture_idx(source, split)
        assert len(values["prediction"]) == len(values["idx"])
        if task.is_regression:
            assert all(isinstance(v, float) for v in values["prediction"])
            if resolve_precision("auto", "cpu") == "bf16":  # the head's float32 scores, not bf16-rounded
                assert not all(torch.tensor(v).bfloat16().item() == v for v in values["prediction"])
        else:
            assert set(values["prediction"]) <= set(range(task.num_labels))
    tsvs = sorted(p.name for p in (task_runs[name] / "predictions").glob("*.tsv"))
    assert tsvs == (["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"] if name == "mnli" else [task.leaderboard_files["test"]])


@pytest.mark.parametrize("name", ["sst2", "mnli", "stsb", "mrpc"])
def test_best_export_works_in_a_text_classification_pipeline(task_runs, name):
    from transformers import pipeline

    task = get_task(name)
    classify = pipeline("text-classification", model=str(task_runs[name] / "best"), device="cpu")
    inputs = {"text": "The cat sat on the mat.", "text_pair": "A cat is sitting."} if task.is_pair else "a warm film"
    out = classify(inputs)
    out = out[0] if isinstance(out, list) else out
    if task.is_regression:
        assert out["label"] == "LABEL_0" and isinstance(out["score"], float)
    else:
        assert out["label"] in task.label_names


def test_metrics_never_see_test_labels(checkpoint, tmp_path, monkeypatch):
    """References given to the metrics are the dev labels only (never -1), and the test
    split is featurised without a labels column."""
    seen = []
    real = evaluation_module.compute_metrics

    def spy(task, predictions, references, split=None):
        seen.append((split, list(references)))
        return real(task, predictions, references, split=split)

    monkeypatch.setattr(evaluation_module, "compute_metrics", spy)
    loaded = {}
    real_tokenize = batching_module.tokenize_glue

    def tokenize_spy(dataset, task, tokenizer, max_seq_length):
        out = real_tokenize(dataset, task, tokenizer, max_seq_length)
        loaded[len(loaded)] = (list(dataset["label"]), out.column_names)
        return out

    monkeypatch.setattr(batching_module, "tokenize_glue", tokenize_spy)
    assert main(["finetune", str(GLUE_RECIPES / "rte.yaml"), *overrides(checkpoint, tmp_path / "run", predict_test="true")]) == 0
    dev_labels = [0]  # RTE fixture dev: one "entailment" pair
    assert seen and all(split == "validation" and refs == dev_labels for split, refs in seen)
    hidden = [columns for labels, columns in loaded.values() if set(labels) == {-1}]
    assert hidden and all("labels" not in columns for columns in hidden)


# --------------------------------------------------------------------------- model loading


def test_pretraining_checkpoint_loads_with_only_the_fresh_head_reported(checkpoint, caplog, capfd):
    recipe = load_finetune_recipe(GLUE_RECIPES / "mnli.yaml", [f"model.name_or_path={checkpoint}"])
    with caplog.at_level(logging.INFO, logger="bert_recipes"):
        model = build_classifier(recipe, get_task("mnli"))
    err = capfd.readouterr().err
    assert "UNEXPECTED" not in err and "MISSING" not in err  # transformers' load report is replaced
    messages = [r.getMessage() for r in caplog.records if r.name == "bert_recipes"]
    assert any("classifier head initialised fresh" in m for m in messages)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert model.config.num_labels == 3 and model.config.id2label[2] == "contradiction"


def test_dropout_is_the_checkpoints_unless_the_recipe_sets_it(checkpoint, caplog):
    """model.hidden_dropout_prob / attention_probs_dropout_prob / classifier_dropout set the
    fine-tuning dropout (a checkpoint pretrained without dropout); unset, the checkpoint's
    stays. The log says which."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    caplog.set_level(logging.INFO, logger="bert_recipes")
    recipe = load_finetune_recipe(GLUE_RECIPES / "rte.yaml", [f"model.name_or_path={checkpoint}"])
    model = build_classifier(recipe, get_task("rte"))
    assert (model.config.hidden_dropout_prob, model.config.attention_probs_dropout_prob) == (0.1, 0.1)
    assert "dropout: hidden 0.1, attention 0.1, classifier 0.1 (the checkpoint's)" in caplog.text
    caplog.clear()
    recipe = load_finetune_recipe(GLUE_RECIPES / "rte.yaml", [f"model.name_or_path={checkpoint}", "model.hidden_dropout_prob=0.2",
                                                              "model.attention_probs_dropout_prob=0", "model.classifier_dropout=0.3"])
    model = build_classifier(recipe, get_task("rte"))
    assert (model.config.hidden_dropout_prob, model.config.attention_probs_dropout_prob, model.config.classifier_dropout) \
        == (0.2, 0.0, 0.3)
    assert {m.dropout.p for m in model.modules() if isinstance(m, BertSelfAttention)} == {0.0}
    assert model.dropout.p == 0.3 and model.bert.embeddings.dropout.p == 0.2
    assert ("dropout: hidden 0.2, attention 0, classifier 0.3 (model.hidden_dropout_prob, "
            "model.attention_probs_dropout_prob, model.classifier_dropout from the recipe)") in caplog.text
    with pytest.raises(UserError, match="model.hidden_dropout_prob"):
        load_finetune_recipe(GLUE_RECIPES / "rte.yaml", [f"model.name_or_path={checkpoint}", "model.hidden_dropout_prob=1.5"])


def test_the_classifier_output_layer_computes_in_float32_under_bf16(checkpoint):
    """Under bf16 autocast the encoder runs in bf16 but the head's output layer in float32: an
    STS-B score is the float32 product of the pooled features (it was rounded to bf16, steps of
    2**-6 on scores in [2, 4)), with the same parameters and state dict as a plain Linear."""
    from transformers import BertForSequenceClassification

    recipe = load_finetune_recipe(GLUE_RECIPES / "stsb.yaml", [f"model.name_or_path={checkpoint}"])
    model = build_classifier(recipe, get_task("stsb")).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)
        model.classifier.bias.fill_(3.0)  # scores around 3, where bf16's step is 2**-6
        ids = torch.randint(5, model.config.vocab_size, (64, 12), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, output_hidden_states=True)
            pooled = model.bert.pooler(out.hidden_states[-1])
        assert pooled.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
        expected = torch.nn.functional.linear(pooled.float(), model.classifier.weight, model.classifier.bias)
        assert torch.equal(out.logits, expected)
        assert (out.logits.bfloat16().float() != out.logits).float().mean() > 0.9  # not bf16 values
    plain = BertForSequenceClassification(model.config)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())  # strict: the same keys and shapes


def test_label_mapping_refuses_conflicting_label_sets(task_runs, capsys, tmp_path):
    sst2_model = task_runs["sst2"] / "best"  # id2label: negative, positive
    for task in ("mnli", "stsb", "rte"):
        code = main(["finetune", str(GLUE_RECIPES / f"{task}.yaml"),
                     *overrides(sst2_model, tmp_path / task)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert "checkpoint labels (negative, positive)" in err
        assert not (tmp_path / task / "best").exists()


def test_a_head_with_the_task_labels_in_another_order_is_reordered_by_name(task_runs, tmp_path):
    from transformers import BertForSequenceClassification

    source = BertForSequenceClassification.from_pretrained(task_runs["rte"] / "best")
    source.config.id2label = {0: "not_entailment", 1: "entailment"}
    source.config.label2id = {"not_entailment": 0, "entailment": 1}
    source.save_pretrained(tmp_path / "swapped")
    recipe = load_finetune_recipe(GLUE_RECIPES / "rte.yaml", [f"model.name_or_path={tmp_path / 'swapped'}"])
    model = build_classifier(recipe, get_task("rte"))
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert torch.equal(model.classifier.weight[0], source.classifier.weight[1])
    assert torch.equal(model.classifier.bias[1], source.classifier.bias[0])


# --------------------------------------------------------------------------- seeds, resume


def test_several_seeds_give_mean_and_std(checkpoint, tmp_path):
    out = tmp_path / "seeds"
    assert main(["finetune", str(GLUE_RECIPES / "mrpc.yaml"), *overrides(checkpoint, out, seeds="[1,2,3]")]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text())["dev"] for s in (1, 2, 3)]
    assert results["seeds"] == [1, 2, 3] and set(results["runs"]) == {"1", "2", "3"}
    for key in ("f1", "accuracy"):
        values = [r[key] for r in runs]
        assert results["dev"][key] == pytest.approx(np.mean(values))
        assert results["dev_std"][key] == pytest.approx(np.std(values, ddof=1))
    assert results["best"] == str(out / f"seed-{results['best_seed']}" / "best")


class _SigtermAt:
    """A Reporter that sends this process SIGTERM after the given number of steps."""

    def __init__(self, real, at: int):
        self.real, self.at, self.steps = real, at, 0

    def __call__(self, *args, **kwargs):
        reporter = self.real(*args, **kwargs)
        advance = reporter.advance

        def counting(n=1, **postfix):
            advance(n, **postfix)
            self.steps += n
            if self.steps == self.at:
                os.kill(os.getpid(), signal.SIGTERM)

        reporter.advance = counting
        return reporter


def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(checkpoint, tmp_path, monkeypatch):
    args = ["train.max_steps=8", "data.max_train_samples=48", "train.per_device_train_batch_size=8",
            "train.eval_steps=4", "data.max_eval_samples=16"]
    base = ["finetune", str(GLUE_RECIPES / "sst2.yaml")]
    assert main([*base, *overrides(checkpoint, tmp_path / "full", **{"data.glue_dir": SAMPLE_GLUE}), *args]) == 0

    monkeypatch.setattr(finetune_module, "Reporter", _SigtermAt(finetune_module.Reporter, at=3))
    run = tmp_path / "stopped"
    assert main([*base, *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE}), *args]) == 128 + signal.SIGTERM
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-00000004"]
    assert not (run / "results.json").exists()
    monkeypatch.undo()
    # an occupied directory is refused without resume_from / overwrite
    assert main([*base, *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE}), *args]) == 2
    assert main([*base, *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE}), *args, "resume_from=latest"]) == 0

    def by_step(path, key):
        return {r["step"]: r[key] for r in read_jsonl(path / "metrics.jsonl") if key in r}

    full, resumed = by_step(tmp_path / "full", "loss"), by_step(run, "loss")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    assert by_step(run, "eval_accuracy") == pytest.approx(by_step(tmp_path / "full", "eval_accuracy"))
    first = json.loads((tmp_path / "full" / "results.json").read_text())
    again = json.loads((run / "results.json").read_text())
    assert again["dev"] == pytest.approx(first["dev"]) and again["best_step"] == first["best_step"]


@pytest.mark.parametrize("saves", [[], ["train.save_steps=3"]], ids=["end-of-run save", "last save step"])
def test_a_signal_during_the_last_checkpoint_waits_for_it_and_the_run_resumes(checkpoint, tmp_path, monkeypatch, request,
                                                                             saves):
    """A SIGTERM while the end-of-run checkpoint was being written killed the save half-way:
    best/ existed, no complete checkpoint, and resume_from=latest was refused (found by a
    helper). The save now finishes first, the run stops (143) with its checkpoint, and the
    resume writes the results."""
    from bert_recipes.training import loop as loop_module

    real = loop_module.save_checkpoint

    def signalled(accelerator, model, scheduler, folder, state, *args, **kwargs):
        if state.step == 6:  # the last save: at the end of the run, or at a save step (ignored there: a helper)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(accelerator, model, scheduler, folder, state, *args, **kwargs)

    def unhandled(*_):  # outside the run's handler the signal killed the process (here: fails the test)
        raise AssertionError("SIGTERM reached the process outside the run's handler")

    monkeypatch.setattr(loop_module, "save_checkpoint", signalled)
    previous = signal.signal(signal.SIGTERM, unhandled)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    run = tmp_path / "run"
    argv = ["finetune", str(GLUE_RECIPES / "sst2.yaml"), *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE}),
            "train.max_steps=6", "data.max_train_samples=48", "train.per_device_train_batch_size=8",
            "train.eval_steps=4", "data.max_eval_samples=16", *saves]
    assert main(argv) == 128 + signal.SIGTERM
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "checkpoint-00000006"
    assert (run / "checkpoints" / "checkpoint-00000006" / "trainer_state.json").is_file()
    assert (run / "best").is_dir() and not (run / "results.json").exists()
    monkeypatch.undo()
    assert main([*argv, "resume_from=latest"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 6


# --------------------------------------------------------------------------- batching


def test_batch_plan_covers_every_example_once_per_epoch_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000).tolist()
    plan = BatchPlan(lengths, batch_size=16, accumulation=1, seed=7, group_by_length=True)
    batches = plan.epoch_batches(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    assert [b.tolist() for b in plan.epoch_batches(0)] == [b.tolist() for b in BatchPlan(
        lengths, 16, 1, 7, True).epoch_batches(0)]  # a pure function of (seed, epoch)
    assert [b.tolist() for b in plan.epoch_batches(1)] != [b.tolist() for b in batches]

    def padding(plan_):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan_.epoch_batches(0))

    assert padding(plan) < 0.2 * padding(BatchPlan(lengths, 16, 1, 7, False))


def test_batch_plan_shards_ranks_evenly_with_accumulation():
    lengths = list(range(1, 101))  # 100 examples, batches of 8 -> 13 batches, padded to 14 for 2 ranks
    ranks = [BatchPlan(lengths, 8, 3, 1, True, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 3  # 7 batches per rank: 3 + 3 + 1
    seen = []
    for step in range(3):
        windows = [plan.window(step) for plan in ranks]
        assert len(windows[0]) == len(windows[1])
        seen += [i for window in windows for batch in window for i in batch.tolist()]
    assert set(seen) == set(range(100))
    assert [b.tolist() for b in ranks[0].window(3)] != [b.tolist() for b in ranks[0].window(0)]  # epoch 2 reshuffled


# --------------------------------------------------------------------------- errors


def run_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_recipes_are_one_line_errors(checkpoint, tmp_path, capsys):
    recipe = str(GLUE_RECIPES / "rte.yaml")
    args = overrides(checkpoint, tmp_path / "o")
    err = run_error(capsys, ["finetune", recipe, *args, "train.learning_rat=1e-5"])
    assert "unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?" in err
    assert "unknown GLUE task 'rtee'" in run_error(capsys, ["finetune", recipe, *args, "task=rtee"])
    assert "predicted with the mnli model" in run_error(capsys, ["finetune", recipe, *args, "task=ax"])
    assert "data.max_seq_length" in run_error(capsys, ["finetune", recipe, *args, "data.max_seq_length=4"])
    err = run_error(capsys, ["finetune", recipe, *args, "data.max_seq_length=512"])
    assert "exceeds the checkpoint's max_position_embeddings (128)" in err
    no_model = tmp_path / "no-model.yaml"
    no_model.write_text("task: rte\n")
    assert "model.name_or_path is required" in run_error(capsys, ["finetune", str(no_model)])
    err = run_error(capsys, ["finetune", recipe, *args, f"model.name_or_path={tmp_path}/runs/tiny/final"])
    assert "not found" in err and "make pretrain" in err
    err = run_error(capsys, ["finetune", recipe, *args, f"data.glue_dir={tmp_path}/nowhere"])
    assert f"data.glue_dir: folder '{tmp_path}/nowhere' not found" in err
    (tmp_path / "glue").mkdir()
    err = run_error(capsys, ["finetune", recipe, *args, f"data.glue_dir={tmp_path}/glue"])
    assert f"data.glue_dir: no GLUE folder 'RTE' in {tmp_path}/glue (it holds no folders)" in err
    assert not (tmp_path / "o" / "best").exists()


def test_a_checkpoint_that_is_not_bert_is_refused(checkpoint, tmp_path, capsys):
    """A DistilBERT, RoBERTa or GPT-2 folder was built as a BERT of default size with every
    encoder weight fresh, trained, and exported as 'fine-tuned' (found by a helper)."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    distil = tmp_path / "distil"
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=1, n_heads=2)).save_pretrained(distil)
    shutil.copytree(checkpoint, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    capsys.readouterr()  # transformers' "Writing model shards"
    err = run_error(capsys, ["finetune", str(GLUE_RECIPES / "rte.yaml"), *overrides(distil, tmp_path / "o"),
                             f"tokenizer_name_or_path={tmp_path / 'tok'}"])
    assert err == (f"error: model.name_or_path: '{distil}' is a 'distilbert' model (model_type in its config.json), "
                   "not BERT; this project trains BERT checkpoints (model_type 'bert')")
    assert not (tmp_path / "o").exists()
    assert main(["pretrain", str(REPO / "recipes" / "pretrain" / "tiny.yaml"), f"model.name_or_path={distil}",
                 f"tokenizer.name_or_path={tmp_path / 'tok'}", f"output_dir={tmp_path / 'p'}"]) == 2
    assert "is a 'distilbert' model" in capsys.readouterr().err


def test_sample_recipe_and_show_use_the_finetune_schema(capsys):
    recipe = load_finetune_recipe(GLUE_RECIPES / "sample.yaml")
    assert isinstance(recipe, FinetuneRecipe) and recipe.model.name_or_path == "runs/tiny/final"
    assert recipe.data.glue_dir == "data/sample/glue" and recipe.task == "sst2"
    base = load_finetune_recipe(GLUE_RECIPES / "cola.yaml")
    assert (base.train.per_device_train_batch_size, base.train.learning_rate, base.train.num_train_epochs,
            base.train.warmup_ratio, base.train.weight_decay) == (32, 2e-5, 3.0, 0.1, 0.01)
    assert base.data.packing is False  # padded, length-grouped batches (packing measured slower on SST-2)
    for value, packing in (("batch", True), ("false", False), ("true", True)):  # "batch": pretraining's name
        assert load_finetune_recipe(GLUE_RECIPES / "cola.yaml", [f"data.packing={value}"]).data.packing is packing
    with pytest.raises(UserError, match="data.packing"):
        load_finetune_recipe(GLUE_RECIPES / "cola.yaml", ["data.packing=rows"])
    assert main(["show", str(GLUE_RECIPES / "stsb.yaml")]) == 0
    assert "task: stsb" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for name in (*TRAINABLE, "base", "sample"):
        assert f"glue/{name}.yaml" in listed


def test_preflight_refuses_before_an_old_run_is_deleted(task_runs, capsys, tmp_path):
    """overwrite=true with a checkpoint whose labels conflict (or whose positions are too
    few): the one-line error comes before anything of the old run is deleted."""
    old = tmp_path / "old"
    shutil.copytree(task_runs["rte"], old)
    before = sorted(p.name for p in old.iterdir())
    sst2_model = task_runs["sst2"] / "best"  # id2label: negative, positive
    for extra in ({}, {"model.name_or_path": str(task_runs["rte"] / "best"), "data.max_seq_length": 4096}):
        code = main(["finetune", str(GLUE_RECIPES / "rte.yaml"), *overrides(sst2_model, old, overwrite="true", **extra)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert sorted(p.name for p in old.iterdir()) == before


def test_a_finished_finetune_extends_with_more_steps_and_is_left_alone_otherwise(checkpoint, tmp_path):
    base = ["finetune", str(GLUE_RECIPES / "sst2.yaml")]
    args = ["data.max_train_samples=24", "train.per_device_train_batch_size=4", "data.max_eval_samples=8"]
    run = tmp_path / "run"
    common = [*base, *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE, "train.max_steps": 4}), *args]
    assert main(common) == 0
    seed_dir = next(p for p in run.iterdir() if p.name.startswith("seed-")) if not (run / "metrics.jsonl").exists() else run
    before = (seed_dir / "metrics.jsonl").read_text()
    assert main([*common, "resume_from=latest"]) == 0  # the same schedule: complete, nothing trained
    assert (seed_dir / "metrics.jsonl").read_text() == before
    assert main([*common, "resume_from=latest", "train.max_steps=6"]) == 0  # more steps: continues
    steps = sorted({r["step"] for r in read_jsonl(seed_dir / "metrics.jsonl") if "loss" in r})
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((seed_dir / "results.json").read_text())["steps"] == 6


def test_keep_final_checkpoint_false_deletes_a_finished_runs_checkpoints_only(checkpoint, tmp_path, capsys):
    """train.keep_final_checkpoint=false: the finished run keeps best/ and results.json, not
    checkpoints/; a resume still reuses its results (the key is bookkeeping), and extending it
    is refused in one line (there is nothing to continue from)."""
    base = ["finetune", str(GLUE_RECIPES / "sst2.yaml")]
    args = ["data.max_train_samples=24", "train.per_device_train_batch_size=4", "data.max_eval_samples=8"]
    run = tmp_path / "run"
    common = [*base, *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE, "train.max_steps": 2}), *args]
    assert main([*common, "train.keep_final_checkpoint=false"]) == 0
    assert not (run / "checkpoints").exists()
    assert (run / "best" / "model.safetensors").is_file() and (run / "results.json").is_file()
    before = (run / "results.json").read_text()
    assert main([*common, "resume_from=latest"]) == 0  # the default again: still the same run
    assert (run / "results.json").read_text() == before
    (run / "checkpoints" / "checkpoint-00000002").mkdir(parents=True)  # a kill after results.json, before the delete
    assert main([*common, "resume_from=latest", "train.keep_final_checkpoint=false"]) == 0
    assert not (run / "checkpoints").exists() and (run / "results.json").read_text() == before
    capsys.readouterr()
    assert main([*common, "resume_from=latest", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: resume_from: no complete checkpoint") and "\n" not in err, err
    assert "train.keep_final_checkpoint: false keeps none, so it cannot be extended" in err
    assert (run / "results.json").read_text() == before
    capsys.readouterr()  # another run's key with both keys set: the way out is not "set overwrite=true" again
    assert main([*common, "resume_from=latest", "train.weight_decay=0.5", "overwrite=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "of the finished run in" in err and err.endswith("remove resume_from to retrain it (overwrite=true is set; "
                                                           "resume_from reuses a finished run)"), err
    # with overwrite=true as well (a job script's constant resume_from=latest) it retrains from step 0
    assert main([*common, "resume_from=latest", "train.max_steps=4", "overwrite=true"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    kept = tmp_path / "kept"
    assert main([*base, *overrides(checkpoint, kept, **{"data.glue_dir": SAMPLE_GLUE, "train.max_steps": 2}), *args]) == 0
    assert [p.name for p in (kept / "checkpoints").iterdir()] == ["checkpoint-00000002"]  # the default keeps it


def test_a_run_on_part_of_the_data_says_so_in_its_summary_and_model_card(checkpoint, tmp_path, capsys):
    """data.max_train_samples / max_eval_samples: the finetune summary says the scores are not
    GLUE's, and the card names the subsets, its model-index split too (``validation[:8]``)."""
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    assert main(["finetune", str(GLUE_RECIPES / "sst2.yaml"), *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE}),
                 "data.max_train_samples=24", "data.max_eval_samples=8"]) == 0
    out = capsys.readouterr().out
    assert ("Part of the data: trained on at most 24 examples (data.max_train_samples); dev metrics on at most the "
            "first 8 dev examples (data.max_eval_samples): not comparable with full GLUE results.") in out
    card = (run / "best" / "README.md").read_text()
    assert ", the first 24 training examples (data.max_train_samples)" in card
    assert "## Evaluation (GLUE dev, the first 8 examples (data.max_eval_samples))" in card
    [result] = ModelCard.load(run / "best" / "README.md").data.eval_results[:1]
    assert result.dataset_split == "validation[:8]"
    full = tmp_path / "full"
    assert main(["finetune", str(GLUE_RECIPES / "sst2.yaml"), *overrides(checkpoint, full, **{"data.glue_dir": SAMPLE_GLUE}),
                 "predict_test=true", "data.max_train_samples=100000", "data.max_eval_samples=100000"]) == 0  # cut nothing
    printed = capsys.readouterr()
    assert "Part of the data" not in printed.out
    assert "warning: predict_test with 1 of the" in printed.err and "not a complete leaderboard submission" in printed.err
    assert "## Evaluation (GLUE dev)" in (full / "best" / "README.md").read_text()


def test_a_finished_finetune_is_reused_only_for_the_same_recipe(checkpoint, tmp_path, capsys):
    """resume_from=latest on a finished run reuses its results only when nothing that changes
    them differs (logging does not): another precision, model or training-set size is refused
    in one line naming the key; another learning rate meets the resume's schedule check."""
    base = ["finetune", str(GLUE_RECIPES / "sst2.yaml")]
    args = ["data.max_train_samples=24", "train.per_device_train_batch_size=4", "data.max_eval_samples=8"]
    run = tmp_path / "run"
    common = [*base, *overrides(checkpoint, run, **{"data.glue_dir": SAMPLE_GLUE, "train.max_steps": 2}), *args]
    assert main([*common, "precision=no"]) == 0
    before = (run / "metrics.jsonl").read_text()
    assert main([*common, "precision=no", "resume_from=latest", "train.logging_steps=5"]) == 0  # bookkeeping only
    capsys.readouterr()
    for extra, key in ((["precision=bf16"], "precision"), (["data.max_train_samples=12"], "data.max_train_samples"),
                       ([f"model.name_or_path={tmp_path}"], "model.name_or_path")):
        assert main([*common, "precision=no", "resume_from=latest", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {key}: ") and "of the finished run in" in err and "\n" not in err, err
    assert main([*common, "precision=no", "resume_from=latest", "train.learning_rate=0.5"]) == 2
    assert "train.learning_rate: 0.5 differs from the value 0.001 of checkpoint" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before


def test_a_finished_run_resumed_with_predict_test_writes_its_test_predictions(checkpoint, tmp_path, caplog):
    """A run trained without ``predict_test``, resumed with it: nothing is trained, and its
    export predicts the test split, as a run with ``predict_test`` from the start does."""
    base = ["finetune", str(GLUE_RECIPES / "sst2.yaml")]
    args = ["data.max_train_samples=24", "train.per_device_train_batch_size=4", "data.max_eval_samples=8", "precision=no"]
    later, direct = tmp_path / "later", tmp_path / "direct"
    common = {"data.glue_dir": SAMPLE_GLUE, "train.max_steps": 2}
    assert main([*base, *overrides(checkpoint, later, **common), *args]) == 0
    assert not (later / "test_predictions.json").exists()
    assert json.loads((later / "results.json").read_text())["test_predictions"] is None
    before = (later / "metrics.jsonl").read_text()
    caplog.set_level(logging.INFO, logger="bert_recipes")
    assert main([*base, *overrides(checkpoint, later, predict_test="true", resume_from="latest", **common), *args]) == 0
    assert (later / "metrics.jsonl").read_text() == before  # reused, not retrained
    results = json.loads((later / "results.json").read_text())
    assert results["test_predictions"] == str(later / "test_predictions.json")
    assert main([*base, *overrides(checkpoint, direct, predict_test="true", **common), *args]) == 0
    assert (later / "test_predictions.json").read_text() == (direct / "test_predictions.json").read_text()
    assert sorted(p.name for p in (later / "predictions").iterdir()) == sorted(p.name for p in (direct / "predictions").iterdir())
    assert (later / "predictions" / "SST-2.tsv").read_text() == (direct / "predictions" / "SST-2.tsv").read_text()
    caplog.clear()
    assert main([*base, *overrides(checkpoint, later, predict_test="true", resume_from="latest", **common), *args]) == 0
    assert not [r for r in caplog.records if "predicting the test split" in r.getMessage()]  # already there
    (later / "predictions" / "SST-2.tsv").unlink()  # a deleted leaderboard file is predicted again
    assert main([*base, *overrides(checkpoint, later, predict_test="true", resume_from="latest", **common), *args]) == 0
    assert (later / "predictions" / "SST-2.tsv").read_text() == (direct / "predictions" / "SST-2.tsv").read_text()
    (later / "predictions" / "SST-2.tsv").write_text("")  # an emptied one too
    assert main([*base, *overrides(checkpoint, later, predict_test="true", resume_from="latest", **common), *args]) == 0
    assert (later / "predictions" / "SST-2.tsv").read_text() == (direct / "predictions" / "SST-2.tsv").read_text()
    copy = tmp_path / "copy"  # a run folder copied without its predictions: its own are written
    shutil.copytree(direct, copy)
    (copy / "test_predictions.json").unlink()
    assert main([*base, *overrides(checkpoint, copy, predict_test="true", resume_from="latest", **common), *args]) == 0
    assert json.loads((copy / "results.json").read_text())["test_predictions"] == str(copy / "test_predictions.json")
    assert (copy / "test_predictions.json").read_text() == (direct / "test_predictions.json").read_text()


def test_packed_finetuning_trains_like_padded_without_dropout(checkpoint, tmp_path, monkeypatch, caplog):
    """``data.packing: true`` (padded is the default) runs the same examples per step through
    the CLI: with dropout off, the same losses, gradient norms and dev metrics as padded
    batches. The SST-2 sample in rows of 32 tokens gives several rows per batch (training and
    evaluation), so an instance read from the wrong row would show."""
    from transformers import BertForPreTraining

    nodrop = tmp_path / "nodrop"
    shutil.copytree(checkpoint, nodrop)
    BertForPreTraining.from_pretrained(checkpoint, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) \
        .save_pretrained(nodrop)
    caplog.set_level(logging.INFO, logger="bert_recipes")
    rows = []  # (examples, rows) of each packed batch

    class Recording(finetune_module.PackedFeatureCollator):
        def __call__(self, features):
            out = super().__call__(features)
            rows.append((len(features), out["input_ids"].shape[0]))
            return out

    monkeypatch.setattr(finetune_module, "PackedFeatureCollator", Recording)
    records = {}
    for packing in ("false", "true"):
        out = tmp_path / f"packing-{packing}"
        assert main(["finetune", str(GLUE_RECIPES / "sst2.yaml"),
                     *overrides(nodrop, out, **{"data.glue_dir": SAMPLE_GLUE, "data.packing": packing,
                                                "data.max_seq_length": 32, "train.per_device_train_batch_size": 16,
                                                "train.per_device_eval_batch_size": 30, "train.max_steps": 4,
                                                "precision": "no"})]) == 0
        records[packing] = read_jsonl(out / "metrics.jsonl")
    train = {p: [r for r in rs if "loss" in r] for p, rs in records.items()}
    assert [r["step"] for r in train["true"]] == [r["step"] for r in train["false"]] == [1, 2, 3, 4]
    assert "batches: padded to each batch's longest example, a multiple of 8, grouped by length" in caplog.text
    assert "batches: each batch's examples packed into rows of up to 32 tokens (data.packing: true)" in caplog.text
    train_rows, dev_rows = rows[:4], rows[4:]  # 4 training batches of 16, then the 60 dev sentences in 30s
    assert [n for n, _ in train_rows] == [16] * 4 and [n for n, _ in dev_rows] == [30, 30]
    assert any(1 < r < n for n, r in train_rows) and any(1 < r < n for n, r in dev_rows)  # several rows, packed
    for padded, packed in zip(train["false"], train["true"]):
        assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    evals = {p: [r for r in rs if "eval_loss" in r][-1] for p, rs in records.items()}
    assert evals["true"]["eval_loss"] == pytest.approx(evals["false"]["eval_loss"], abs=1e-5)
    assert evals["true"]["eval_accuracy"] == evals["false"]["eval_accuracy"]

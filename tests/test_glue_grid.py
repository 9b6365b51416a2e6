"""``bert-recipes glue`` sweeps on a tiny random BERT: the grid cell with the best dev mean is
chosen, statistics over seeds, resume cell by cell, intermediate-task initialisation, early
stopping, the WNLI options and the fixed protocol."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bert_recipes.cli import main
from bert_recipes.errors import UserError
from bert_recipes.glue import finetune as finetune_module
from bert_recipes.glue.grid import cell_name, cell_summary, choose, seed_stats
from bert_recipes.glue.recipe import FinetuneRecipe, load_finetune_recipe
from bert_recipes.glue.sweep import summarise
from bert_recipes.glue.tasks import get_task

from .test_finetune import FIXTURES, GLUE_RECIPES, overrides, read_jsonl

GRID = ["sweep.grid.learning_rate=[1.0e-3,1.0e-5]", "seeds=[1,2]"]


def glue(checkpoint, out, tasks, *extra, recipe=GLUE_RECIPES / "base.yaml", steps=2) -> int:
    return main(["glue", str(recipe), "--tasks", tasks, *overrides(checkpoint, out, **{"train.max_steps": steps}),
                 *extra])


# --------------------------------------------------------------------------- statistics and choice


def test_seed_stats_are_mean_median_and_sample_std():
    stats = seed_stats([0.6, 0.7, 0.9])
    assert stats["mean"] == pytest.approx(2.2 / 3)
    assert stats["median"] == pytest.approx(0.7)
    # deviations -0.1333, -0.0333, 0.1667: squares sum to 0.046667, / (3 - 1) = 0.023333
    assert stats["std"] == pytest.approx(math.sqrt(0.0233333), rel=1e-4)
    two = seed_stats([0.5, 0.8])
    assert (two["median"], two["std"]) == (pytest.approx(0.65), pytest.approx(0.3 / math.sqrt(2)))
    assert seed_stats([0.4])["std"] == 0.0
    assert math.isnan(seed_stats([0.4, float("nan")])["mean"])


def test_the_cell_with_the_best_dev_mean_is_chosen_not_the_best_seed():
    task = get_task("rte")

    def result(*accuracies):
        return {"dev": {"accuracy": sum(accuracies) / len(accuracies)}, "seeds": list(range(len(accuracies))),
                "runs": {str(i): {"accuracy": a} for i, a in enumerate(accuracies)}}

    cells = [cell_summary(task, {"learning_rate": lr}, r) for lr, r in (
        (5e-5, result(0.90, 0.50, 0.52)),  # the best single seed, mean 0.64
        (3e-5, result(0.66, 0.68, 0.70)),  # the best mean: 0.68
        (2e-5, result(0.68, 0.68, 0.68)),  # same mean: the first one wins the tie
        (1e-5, result(float("nan"), 0.9, 0.9)),  # nan ranks last
    )]
    assert choose(cells) == 1
    assert cells[1]["name"] == "lr3e-05" and cells[1]["main"]["median"] == pytest.approx(0.68)
    assert cells[0]["main"]["std"] == pytest.approx(seed_stats([0.9, 0.5, 0.52])["std"])
    assert cell_name({"learning_rate": 2e-5, "per_device_train_batch_size": 16, "num_train_epochs": 3.0}) == "lr2e-05_bs16_ep3"


def test_grid_keys_and_values_are_checked_in_one_line(checkpoint, tmp_path, capsys):
    for bad, message in (("sweep.grid.learnin_rate=[1.0e-3]", "sweep.grid: 'learnin_rate' is not a train key"),
                         ("sweep.grid.learning_rate=[-1.0]", "sweep.grid gives a bad train value"),
                         ("sweep.protocol=best", "sweep.protocol")):
        code = glue(checkpoint, tmp_path / "o", "rte", bad)
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and message in err, err
    # the error names the override, not the recipe file, says sweep.grid once and suggests the key (found by a helper)
    assert glue(checkpoint, tmp_path / "o", "rte", "sweep.grid.learnin_rate=[1.0e-3]") == 2
    assert capsys.readouterr().err.strip() == ("error: override 'sweep.grid.learnin_rate=[1.0e-3]': sweep.grid: "
                                               "'learnin_rate' is not a train key (did you mean 'learning_rate'?)")
    assert glue(checkpoint, tmp_path / "o", "rte", "sweep.grid.learning_rate=1e-4") == 2
    assert capsys.readouterr().err.strip() == ("error: override 'sweep.grid.learning_rate=1e-4': "
                                               "sweep.grid.learning_rate: Input should be a valid list")
    assert glue(checkpoint, tmp_path / "o", "rte", "init_from_task=rte") == 2
    assert capsys.readouterr().err.strip().startswith("error: override 'init_from_task=rte': init_from_task: 'rte' "
                                                      "cannot start from itself")
    # a task file as the base recipe: its task was replaced too
    assert glue(checkpoint, tmp_path / "o", "rte,mrpc", recipe=GLUE_RECIPES / "rte.yaml") == 2
    assert capsys.readouterr().err.strip() == (f"error: {GLUE_RECIPES / 'rte.yaml'}: sets task: rte, and the sweep runs "
                                               "mrpc,rte: pass --tasks rte, or give a base recipe without task "
                                               "(recipes/glue/base.yaml) for several tasks")
    alias = tmp_path / "sst-2.yaml"  # a task file naming its task as GLUE's folder does: the same task
    alias.write_text(f"base: {GLUE_RECIPES / 'base.yaml'}\ntask: SST-2\n")
    assert glue(checkpoint, tmp_path / "alias", "SST-2", recipe=alias) == 0
    capsys.readouterr()
    # task= was replaced by each task's name: every task of --tasks (by default all nine) ran
    assert glue(checkpoint, tmp_path / "o", "rte,mrpc", "task=rte") == 2
    assert capsys.readouterr().err.strip() == ("error: override 'task=rte': the sweep sets task for each of its tasks; "
                                               "choose them with --tasks rte, or fine-tune one with `bert-recipes finetune`")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- a grid sweep


@pytest.fixture(scope="module")
def grid_sweep(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "sweep"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert glue(checkpoint, out, "rte", *GRID, "--predict-test") == 0
    return out, buffer.getvalue()


def test_every_cell_runs_every_seed_and_the_best_mean_is_chosen(grid_sweep):
    out, stdout = grid_sweep
    task_dir = out / "rte"
    cells = ["lr0.001", "lr1e-05"]
    means = []
    for name in cells:
        result = json.loads((task_dir / name / "results.json").read_text())
        assert result["seeds"] == [1, 2] and (task_dir / name / "seed-1" / "best").is_dir()
        assert result["runtime_s"] > 0 and result["train_examples"] == 2 * 2 * 2  # seeds x steps x batch
        means.append(sum(r["accuracy"] for r in result["runs"].values()) / 2)
    summary = json.loads((out / "glue_results.json").read_text())
    row = summary["tasks"]["rte"]
    chosen = max(range(2), key=lambda i: (means[i], -i))
    assert row["chosen_index"] == chosen and row["grid"][chosen]["name"] == cells[chosen]
    assert row["metrics"]["accuracy"] == pytest.approx(means[chosen])
    assert row["config"]["learning_rate"] == [1e-3, 1e-5][chosen]
    assert [c["main"]["mean"] for c in row["grid"]] == pytest.approx(means)
    # test predictions from the chosen cell's best seed
    chosen_result = json.loads((task_dir / cells[chosen] / "results.json").read_text())
    best_seed = chosen_result["best_seed"]
    assert summary["tasks"]["rte"]["best"] == str(task_dir / cells[chosen] / f"seed-{best_seed}" / "best")
    assert (task_dir / cells[chosen] / f"seed-{best_seed}" / "test_predictions.json").is_file()
    assert Path(summary["submission"]).is_file()
    text = (out / "glue_results.md").read_text()
    assert "### RTE: every cell" in text and "**chosen**" in text and "Protocol: select (per task" in text
    assert (out / "glue_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep estimate: about" in stdout and "4 run(s)" in stdout and summary["estimate_s"] > 0


def test_an_interrupted_sweep_resumes_cell_by_cell(grid_sweep, checkpoint, tmp_path, caplog):
    out, _ = grid_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    first = copy / "rte" / "lr0.001"
    before = {seed: (first / f"seed-{seed}" / "metrics.jsonl").read_text() for seed in (1, 2)}
    # interrupted in the second cell: no results for it, nor for the task or the sweep
    shutil.rmtree(copy / "rte" / "lr1e-05")
    for stale in (copy / "rte" / "results.json", copy / "glue_results.json"):
        stale.unlink()
    caplog.set_level("INFO", logger="bert_recipes")
    assert glue(checkpoint, copy, "rte", *GRID, "resume_from=latest") == 0
    assert {seed: (first / f"seed-{seed}" / "metrics.jsonl").read_text() for seed in (1, 2)} == before
    assert "rte lr0.001: finished; skipped" in caplog.text
    assert (copy / "rte" / "lr1e-05" / "results.json").is_file()
    assert len(json.loads((copy / "glue_results.json").read_text())["tasks"]["rte"]["grid"]) == 2
    # without resume_from the finished sweep is not silently redone
    assert glue(checkpoint, copy, "rte", *GRID) == 2


def test_a_moved_sweep_predicts_with_and_into_its_own_folders(grid_sweep, checkpoint, tmp_path):
    """results.json files name the export and predictions of the folder a run trained in; a
    copied or moved sweep resumed with --predict-test predicted with the original's export and
    wrote there, or failed once the original was gone (found by a helper)."""
    out, _ = grid_sweep
    first, moved = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(out, first)
    shutil.move(first, moved)  # "first", where its results.json files point, is gone
    for stale in [*moved.rglob("test_predictions.json"), *moved.rglob("predictions")]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert glue(checkpoint, moved, "rte", *GRID, "resume_from=latest", "--predict-test") == 0
    result = json.loads((moved / "rte" / "results.json").read_text())
    assert result["best"].startswith(str(moved / "rte")) and Path(result["best"]).is_dir()
    assert result["test_predictions"].startswith(str(moved / "rte")) and Path(result["test_predictions"]).is_file()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # the original: untouched


def test_only_a_sweeps_own_encoder_counts_as_the_same_model_when_moved(tmp_path):
    from bert_recipes.training.resume import same_value

    key, now = "model.name_or_path", str(tmp_path / "moved" / "encoders" / "rte")
    cell = tmp_path / "moved" / "mrpc" / "lr2e-05" / "seed-1"
    assert same_value(key, "/then/sweep/encoders/rte", now, cell)  # the sweep moved
    assert not same_value(key, "/then/sweep/encoders/rte", now, tmp_path / "elsewhere" / "run")  # not its sweep's
    assert not same_value(key, "/then/sweep/encoders/mnli", now, cell)  # another source task
    assert not same_value("tokenizer_name_or_path", "/then/sweep/encoders/rte", now, cell)


def test_init_from_task_finds_a_moved_sweeps_chosen_encoder(tmp_path):
    from bert_recipes.glue.sweep import finished_best

    root = tmp_path / "now"
    (root / "mnli" / "lr2e-05" / "seed-1" / "best").mkdir(parents=True)
    (root / "mnli" / "results.json").write_text(json.dumps({"best": str(tmp_path / "then" / "mnli" / "lr2e-05" / "seed-1" / "best")}))
    assert finished_best(root, "mnli") == str(root / "mnli" / "lr2e-05" / "seed-1" / "best")


def test_overwrite_replaces_a_sweeps_own_results_only(grid_sweep, checkpoint, tmp_path):
    """overwrite=true on a sweep deletes the earlier sweep's cells, report and submission for
    its tasks before training (its stale submission.zip and cells used to stay beside the new
    results), and keeps other files."""
    out, _ = grid_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    assert (copy / "submission" / "submission.zip").is_file() and (copy / "rte" / "lr1e-05").is_dir()
    (copy / "notes.txt").write_text("mine")
    (copy / "rte" / "notes.txt").write_text("mine too")
    inside = copy / "rte" / "lr0.001" / "seed-1" / "best"  # a model it would delete: refused, nothing deleted
    assert glue(inside, copy, "rte", "sweep.grid.learning_rate=[1.0e-4]", "seeds=[3]", "overwrite=true") == 2
    assert (copy / "submission" / "submission.zip").is_file() and inside.is_dir()
    # a task's own check (positions) fails: refused before anything is deleted (found by a helper)
    assert glue(checkpoint, copy, "rte", "data.max_seq_length=4096", "overwrite=true") == 2
    assert glue(checkpoint, copy, "rte", *GRID, "train.global_batch_size=3", "overwrite=true") == 2  # a batch plan
    assert (copy / "submission" / "submission.zip").is_file() and (copy / "rte" / "lr1e-05").is_dir()
    assert glue(checkpoint, copy, "rte", "sweep.grid.learning_rate=[1.0e-4]", "seeds=[3]", "overwrite=true") == 0
    assert sorted(p.name for p in (copy / "rte").iterdir() if p.is_dir()) == ["lr0.0001"]
    assert not (copy / "submission").exists()
    assert (copy / "notes.txt").read_text() == "mine" and (copy / "rte" / "notes.txt").read_text() == "mine too"
    assert list(json.loads((copy / "glue_results.json").read_text())["tasks"]) == ["rte"]


def test_a_rerun_into_an_earlier_sweep_is_refused_before_any_task_trains(grid_sweep, checkpoint, tmp_path, capsys,
                                                                        caplog):
    """Without resume_from / overwrite, a task folder holding an earlier sweep's runs was refused
    at that task's turn, after the tasks before it had trained (found by a helper)."""
    out, _ = grid_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    assert glue(checkpoint, copy, "mrpc,rte", *GRID) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: output_dir: '{copy / 'rte'}' already holds a run (") and "\n" not in err, err
    assert "lr0.001" in err and err.endswith("set resume_from=latest to continue the sweep, overwrite=true to replace "
                                              "it, or output_dir=DIR for a new sweep")
    assert not (copy / "mrpc").exists()
    # another task beside it runs; the report it replaces listed rte: said
    caplog.set_level("WARNING", logger="bert_recipes")
    assert glue(checkpoint, copy, "mrpc") == 0
    assert any(f"{copy / 'glue_results.json'} lists rte from an earlier sweep: this sweep's report replaces it with "
               "mrpc only" in r.getMessage() for r in caplog.records)
    assert list(json.loads((copy / "glue_results.json").read_text())["tasks"]) == ["mrpc"]


def test_a_finished_sweep_with_a_global_batch_size_is_reused(checkpoint, tmp_path, capsys):
    """With train.global_batch_size the saved recipe holds the accumulation resolved at launch:
    the same command with resume_from=latest was refused ("gradient_accumulation_steps: 1
    differs from 4", found by a helper; the multi-rank warning recommends the key)."""
    args = ["train.global_batch_size=8", "train.per_device_train_batch_size=2", "resume_from=latest"]
    assert glue(checkpoint, tmp_path / "o", "rte", *args) == 0
    before = (tmp_path / "o" / "rte" / "results.json").read_text()
    assert glue(checkpoint, tmp_path / "o", "rte", *args) == 0
    assert (tmp_path / "o" / "rte" / "results.json").read_text() == before


def test_a_finished_sweep_with_a_larger_grid_or_more_seeds_trains_only_what_is_new(grid_sweep, checkpoint, tmp_path,
                                                                                 caplog, capsys):
    """resume_from=latest after the grid gained a learning rate and the seeds a third seed: the
    finished seeds' runs are reused, the new cell and the new seed train, and the report has
    three cells; a finished sweep resumed with another model is refused in one line."""
    out, _ = grid_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    first = copy / "rte" / "lr0.001"
    before = (first / "seed-1" / "metrics.jsonl").read_text()
    caplog.set_level("INFO", logger="bert_recipes")
    assert glue(checkpoint, copy, "rte", "sweep.grid.learning_rate=[1.0e-3,1.0e-5,1.0e-4]", "seeds=[1,2,3]",
                "resume_from=latest") == 0
    assert "for 5 run(s)" in capsys.readouterr().out  # seed 3 of two cells, three seeds of the new one (said 3)
    assert (first / "seed-1" / "metrics.jsonl").read_text() == before
    assert (first / "seed-3" / "results.json").is_file() and (copy / "rte" / "lr0.0001" / "results.json").is_file()
    row = json.loads((copy / "glue_results.json").read_text())["tasks"]["rte"]
    assert len(row["grid"]) == 3 and sorted(json.loads((first / "results.json").read_text())["runs"]) == ["1", "2", "3"]
    capsys.readouterr()
    assert glue(checkpoint, copy, "rte", *GRID, "resume_from=latest", f"model.name_or_path={tmp_path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.name_or_path: ") and "of the finished run in" in err and "\n" not in err, err


# --------------------------------------------------------------------------- intermediate task


def _recipes_with(tmp_path, **task_files) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(GLUE_RECIPES / "base.yaml", folder / "base.yaml")
    for name, text in task_files.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder / "base.yaml"


def test_init_from_task_runs_the_source_first_and_loads_its_encoder(checkpoint, tmp_path, caplog):
    from transformers import BertForSequenceClassification

    base = _recipes_with(tmp_path, mrpc="task: mrpc\ninit_from_task: rte\n")
    out = tmp_path / "out"
    caplog.set_level("INFO", logger="bert_recipes")
    assert glue(checkpoint, out, "mrpc,rte", recipe=base) == 0
    assert caplog.text.index("GLUE rte ->") < caplog.text.index("GLUE mrpc ->")  # the source first
    encoder = out / "encoders" / "rte"
    ran = load_finetune_recipe(out / "mrpc" / "recipe.yaml")
    assert ran.model.name_or_path == str(encoder) and ran.init_from_task is None
    source = BertForSequenceClassification.from_pretrained(out / "rte" / "best")
    model = finetune_module.build_classifier(ran.model_copy(update={"resume_from": None}), get_task("mrpc"))
    for key, value in source.bert.state_dict().items():
        assert torch.equal(model.bert.state_dict()[key], value), key
    assert not torch.equal(model.classifier.weight, source.classifier.weight)  # the head is dropped: fresh
    summary = json.loads((out / "glue_results.json").read_text())
    assert list(summary["tasks"]) == ["mrpc", "rte"] and summary["tasks"]["mrpc"]["init_from"] == "rte"
    assert "from rte" in (out / "glue_results.md").read_text()
    # moved, the sweep resumes: mrpc's recipe names the old <sweep>/encoders/rte (found by a helper)
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    caplog.clear()
    assert glue(checkpoint, moved, "mrpc,rte", "resume_from=latest", recipe=base) == 0
    assert "the run is complete (same recipe)" in caplog.text and "training examples" not in caplog.text


def test_init_from_task_refuses_a_mismatched_architecture_or_a_missing_source(checkpoint, tmp_path, capsys):
    from transformers import BertConfig, BertForPreTraining

    wide = tmp_path / "wide"
    BertForPreTraining(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)).save_pretrained(wide)
    shutil.copy(checkpoint / "tokenizer.json", wide)
    base = _recipes_with(tmp_path, mrpc=f"task: mrpc\ninit_from_task: rte\nmodel: {{name_or_path: {wide}}}\n")
    base.write_text(f"base: {GLUE_RECIPES / 'base.yaml'}\nmodel: {{name_or_path: {checkpoint}}}\n")
    out = tmp_path / "out"
    code = main(["glue", str(base), "--tasks", "mrpc,rte", f"data.glue_dir={FIXTURES}", f"output_dir={out}",
                 "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "init_from_task 'rte' has a different architecture" in err, err
    assert "hidden_size 32 vs 64" in err and not out.exists()
    code = glue(checkpoint, out, "mrpc", "init_from_task=rte")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "add rte to --tasks" in err, err
    code = main(["finetune", str(GLUE_RECIPES / "mrpc.yaml"), *overrides(checkpoint, out), "init_from_task=rte"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is read by `bert-recipes glue`" in err


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_at_the_patience_and_keeps_the_best(checkpoint, tmp_path, monkeypatch):
    scores = iter([0.50, 0.75, 0.70, 0.75, 0.90, 0.95])  # best at step 2, then 2 evaluations without better
    real = finetune_module.evaluate

    def scripted(*args, **kwargs):
        results, record, predictions = real(*args, **kwargs)
        results["accuracy"] = record["eval_accuracy"] = next(scores)
        return results, record, predictions

    monkeypatch.setattr(finetune_module, "evaluate", scripted)
    out = tmp_path / "run"
    recipe = load_finetune_recipe(GLUE_RECIPES / "rte.yaml", overrides(checkpoint, out, **{
        "train.max_steps": 6, "train.eval_steps": 1, "train.early_stopping_patience": 2}))
    result = finetune_module.finetune(recipe)
    assert (result["steps"], result["best_step"], result["stopped_early"]) == (4, 2, True)
    assert result["train_examples"] == 4 * 2  # 4 steps of batch 2 (the fixture's 2 examples per epoch)
    assert result["dev"]["accuracy"] == 0.75
    assert json.loads((out / "best" / "eval_results.json").read_text())["step"] == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "eval_accuracy" in r] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- WNLI and the score


def _wnli_glue_dir(tmp_path) -> Path:
    """The fixtures with a WNLI whose training majority is entailment (1): dev accuracy 3/4."""
    glue_dir = tmp_path / "glue"
    shutil.copytree(FIXTURES, glue_dir)
    rows = lambda labels: "index\tsentence1\tsentence2\tlabel\n" + "".join(  # noqa: E731
        f"{i}\tThe cat sat on mat {i}.\tIt sat.\t{label}\n" for i, label in enumerate(labels))
    (glue_dir / "WNLI" / "train.tsv").write_text(rows([1, 1, 0]))
    (glue_dir / "WNLI" / "dev.tsv").write_text(rows([1, 0, 1, 1]))
    return glue_dir


def test_wnli_options_change_the_score_as_stated(checkpoint, tmp_path):
    glue_dir = _wnli_glue_dir(tmp_path)
    scores, texts, rows = {}, {}, {}
    for option in ("include", "exclude", "majority"):
        out = tmp_path / option
        extra = [f"sweep.wnli={option}", f"data.glue_dir={glue_dir}"] + (["--predict-test"] if option == "majority" else [])
        assert glue(checkpoint, out, "rte,wnli", *extra) == 0
        summary = json.loads((out / "glue_results.json").read_text())
        scores[option], texts[option], rows[option] = summary["glue_score"], (out / "glue_results.md").read_text(), summary
    rte = rows["include"]["tasks"]["rte"]["entries"]["RTE"]  # same seed and data: the same RTE every time
    wnli_trained = rows["include"]["tasks"]["wnli"]["entries"]["WNLI"]
    assert scores["include"] == pytest.approx((rte + wnli_trained) / 2)
    assert scores["exclude"] == pytest.approx(rte) and "wnli" not in rows["exclude"]["tasks"]
    assert scores["majority"] == pytest.approx((rte + 0.75) / 2)
    assert rows["majority"]["tasks"]["wnli"]["majority_class"] == "entailment"
    assert "average of 2 entries (RTE, WNLI)" in texts["include"]
    assert "average of 1 entry (RTE); WNLI left out" in texts["exclude"]
    assert "average of 2 entries (RTE, WNLI); WNLI = majority class" in texts["majority"]
    assert "majority class (entailment), no training" in texts["majority"]
    assert not (tmp_path / "majority" / "wnli" / "seed-42").exists() and not (tmp_path / "majority" / "wnli" / "best").exists()
    predictions = json.loads((tmp_path / "majority" / "wnli" / "test_predictions.json").read_text())
    assert set(predictions["wnli"]["prediction"]) == {1}


def test_summarise_states_the_averaged_entries():
    results = {"rte": {"dev": {"accuracy": 0.6}, "best": "b"}, "wnli": {"dev": {"accuracy": 0.4}, "best": "c"}}
    summary = summarise(results, wnli="include")
    assert summary["glue_score"] == pytest.approx(0.5) and summary["score_entries"] == ["RTE", "WNLI"]


# --------------------------------------------------------------------------- fixed protocol


def test_fixed_protocol_runs_one_configuration_and_says_so(checkpoint, tmp_path, capsys):
    out = tmp_path / "fixed"
    assert glue(checkpoint, out, "rte,mrpc", "sweep.protocol=fixed", "seeds=[1,2]") == 0
    text = (out / "glue_results.md").read_text()
    assert "Protocol: fixed (one configuration for every task, mean of 2 seed(s), no selection on dev" in text
    assert json.loads((out / "glue_results.json").read_text())["protocol"] == "fixed"
    capsys.readouterr()
    assert glue(checkpoint, tmp_path / "o", "rte", "sweep.protocol=fixed", *GRID) == 2
    err = capsys.readouterr().err.strip()
    assert "sweep.protocol=fixed runs one configuration" in err and "\n" not in err
    base = _recipes_with(tmp_path, mrpc="task: mrpc\ntrain: {weight_decay: 0.1}\n")
    assert glue(checkpoint, tmp_path / "o", "rte,mrpc", "sweep.protocol=fixed", recipe=base) == 2
    err = capsys.readouterr().err.strip()
    assert "mrpc and rte differ (train.weight_decay 0.1 vs 0.01)" in err and "\n" not in err


def test_fixed_protocol_accepts_the_shipped_task_files():
    """SST-2 logs at its own cadence: bookkeeping, not training, so recipes/glue/fixed.yaml runs
    over the shipped files of the five shared tasks; a training key still differs. (MNLI, QNLI
    and QQP also evaluate more often, which changes the checkpoint kept: that one is refused.)"""
    from bert_recipes.glue.sweep import check_fixed, task_recipe

    tasks = ["cola", "sst2", "mrpc", "stsb", "rte"]
    recipes = {t: task_recipe(GLUE_RECIPES / "fixed.yaml", t, ["model.name_or_path=x"], Path("r"), False) for t in tasks}
    assert recipes["sst2"].train.logging_steps != recipes["mrpc"].train.logging_steps
    check_fixed(recipes, {t: [{}] for t in tasks})  # no error
    changed = {**recipes, "rte": recipes["rte"].model_copy(update={"train": recipes["rte"].train.model_copy(
        update={"warmup_ratio": 0.2})})}
    with pytest.raises(UserError, match="differ \\(train.warmup_ratio"):
        check_fixed(changed, {t: [{}] for t in tasks})
    qqp = task_recipe(GLUE_RECIPES / "fixed.yaml", "qqp", ["model.name_or_path=x"], Path("r"), False)
    with pytest.raises(UserError, match="differ \\(train.eval_steps 0 vs 5000\\)"):
        check_fixed({**recipes, "qqp": qqp}, {t: [{}] for t in [*tasks, "qqp"]})


def test_shipped_sweep_recipes_validate():
    from bert_recipes.glue.sweep import sweep_settings, task_recipe
    from bert_recipes.recipe_files import load_raw

    paper = task_recipe(GLUE_RECIPES / "paper-sweep.yaml", "rte", ["model.name_or_path=x"], Path("r"), False)
    assert len(paper.sweep.cells(paper.train)) == 8
    assert {c["learning_rate"] for c in paper.sweep.cells(paper.train)} == {5e-5, 4e-5, 3e-5, 2e-5}
    budget = task_recipe(GLUE_RECIPES / "budget-sweep.yaml", "rte", ["model.name_or_path=x"], Path("r"), False)
    assert 1 < len(budget.sweep.cells(budget.train)) <= 4 and budget.seeds
    fixed = sweep_settings(load_raw(GLUE_RECIPES / "fixed.yaml"), "fixed.yaml")
    assert fixed.protocol == "fixed"
    assert isinstance(FinetuneRecipe.model_fields["sweep"].default.grid, dict)


def test_overwrite_checks_do_not_hold_an_init_from_task_run_to_the_base_models_labels(checkpoint, tmp_path):
    """A sweep's overwrite checks each task's inputs before deleting; a task that starts from
    another task's encoder (its head dropped, generic labels) is not refused for the base
    model's label names (an MNLI-trained base, RTE from MNLI: it used to be)."""
    from bert_recipes.glue.overwrite import check_runs

    base = tmp_path / "mnli-base"
    shutil.copytree(checkpoint, base)
    config = json.loads((base / "config.json").read_text())
    config["id2label"] = {"0": "contradiction", "1": "entailment", "2": "neutral"}
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    (base / "config.json").write_text(json.dumps(config))
    recipe = FinetuneRecipe(task="rte", output_dir=str(tmp_path / "out"), data={"glue_dir": str(FIXTURES)},
                            model={"name_or_path": str(base)})
    cells = {"rte": [{}]}
    with pytest.raises(UserError, match="label"):
        check_runs({"rte": recipe}, cells)  # RTE on the base model itself: its labels conflict
    check_runs({"rte": recipe.model_copy(update={"init_from_task": "mnli"})}, cells)

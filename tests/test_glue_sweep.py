"""``bert-recipes glue``: all nine tasks from one base recipe, the results json / md / png,
the GLUE score, the leaderboard zip (with AX), per-task recipe layering and CLI errors."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from bert_recipes.cli import main
from bert_recipes.errors import UserError
from bert_recipes.glue.data import load_glue_split
from bert_recipes.glue.sweep import parse_tasks, task_recipe
from bert_recipes.glue.tasks import TASKS, get_task

from .conftest import REPO
from .test_finetune import FIXTURES, GLUE_RECIPES, overrides

ALL = "cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli"
LEADERBOARD_FILES = {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
                     "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"}


@pytest.fixture(scope="module")
def sweep(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glue") / "sweep"
    # options after the overrides work too
    code = main(["glue", str(GLUE_RECIPES / "base.yaml"), *overrides(checkpoint, out, **{"train.max_steps": 2}),
                 "--tasks", ALL, "--predict-test"])
    assert code == 0
    return out


def test_results_json_md_and_png(sweep):
    summary = json.loads((sweep / "glue_results.json").read_text())
    assert list(summary["tasks"]) == ALL.split(",")
    for name, row in summary["tasks"].items():
        own = json.loads((sweep / name / "results.json").read_text())
        assert row["metrics"] == own["dev"] and row["best"] == str(sweep / name / "best")
        assert row["runtime_s"] > 0
    m = {name: row["metrics"] for name, row in summary["tasks"].items()}
    entries = [
        m["cola"]["matthews_correlation"],
        m["sst2"]["accuracy"],
        (m["mrpc"]["f1"] + m["mrpc"]["accuracy"]) / 2,
        (m["stsb"]["pearson"] + m["stsb"]["spearmanr"]) / 2,
        (m["qqp"]["f1"] + m["qqp"]["accuracy"]) / 2,
        m["mnli"]["accuracy_m"],
        m["mnli"]["accuracy_mm"],
        m["qnli"]["accuracy"],
        m["rte"]["accuracy"],
        m["wnli"]["accuracy"],
    ]
    assert summary["num_entries"] == 10
    assert summary["glue_score"] == pytest.approx(sum(entries) / len(entries))

    text = (sweep / "glue_results.md").read_text()
    table = text.split("\n\n")[0].strip().splitlines()  # the main table; the protocol follows
    assert table[0].startswith("| task |") and len(table) == 2 + 9 + 1
    assert "Protocol: select over one configuration per task (no grid)" in text
    assert "average of 10 entries (CoLA, SST-2, MRPC, STS-B, QQP, MNLI-m, MNLI-mm, QNLI, RTE, WNLI)" in rows_of(text)
    rows = table[2:]
    for row, name in zip(rows, ALL.split(",")):
        assert row.startswith(f"| {' / '.join(summary['tasks'][name]['entries'])} |")
    assert rows[-1].startswith("| **GLUE score** |") and f"**{100 * summary['glue_score']:.1f}**" in rows[-1]
    assert "MNLI-m / MNLI-mm" in (sweep / "glue_results.md").read_text()
    assert (sweep / "glue_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["subsampled"] == {} and "Part of the data" not in text  # the whole fixture data

    from bert_recipes.glue.report import results_markdown  # a sweep on part of the data says so

    part = results_markdown({**summary, "subsampled": {"max_train_samples": 500, "max_eval_samples": 100}})
    assert ("**Part of the data**: trained on at most 500 examples per task (data.max_train_samples); dev metrics on "
            "at most the first 100 dev examples per task (data.max_eval_samples): not comparable with full GLUE "
            "results.") in part


def rows_of(text: str) -> str:
    return text.split("\n\n")[0]


def test_submission_zip_has_every_leaderboard_file_with_index_and_prediction(sweep):
    summary = json.loads((sweep / "glue_results.json").read_text())
    archive = zipfile.ZipFile(summary["submission"])
    assert set(archive.namelist()) == LEADERBOARD_FILES
    sources = {"MNLI-m.tsv": ("mnli", "test_matched"), "MNLI-mm.tsv": ("mnli", "test_mismatched"),
               "AX.tsv": ("ax", "test")}
    for task in TASKS.values():
        if task.name not in ("mnli", "ax"):
            sources[task.leaderboard_files["test"]] = (task.name, "test")
    for file_name, (name, split) in sources.items():
        rows = list(csv.reader(archive.read(file_name).decode().splitlines(), delimiter="\t"))
        assert rows[0] == ["index", "prediction"], file_name
        indices = [int(r[0]) for r in rows[1:]]
        assert indices == sorted(load_glue_split(name, split, FIXTURES)["idx"]), file_name
        task = get_task(name)
        for _, value in rows[1:]:
            if task.is_regression:
                assert 0.0 <= float(value) <= 5.0
            else:
                assert value in task.tsv_labels, (file_name, value)


def test_finished_tasks_are_reused_on_resume(sweep, checkpoint, capsys, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    before = (copy / "rte" / "metrics.jsonl").read_text()
    code = main(["glue", str(GLUE_RECIPES / "base.yaml"), "--tasks", "rte,cola",
                 *overrides(checkpoint, copy, **{"train.max_steps": 2}), "resume_from=latest"])
    assert code == 0
    assert (copy / "rte" / "metrics.jsonl").read_text() == before  # not trained again
    out = capsys.readouterr().out
    assert "| CoLA |" in out and "| RTE |" in out and "GLUE score" in out
    summary = json.loads((copy / "glue_results.json").read_text())
    assert list(summary["tasks"]) == ["cola", "rte"] and "submission" not in summary


def test_per_task_files_layer_on_the_base_recipe(tmp_path):
    (tmp_path / "base.yaml").write_text("# base\noutput_dir: runs/x\nmodel: {name_or_path: some/bert}\n"
                                        "train: {learning_rate: 3.0e-5, num_train_epochs: 2}\n")
    (tmp_path / "rte.yaml").write_text("# rte\nbase: elsewhere.yaml\ntask: rte\noutput_dir: ignored\n"
                                       "train: {learning_rate: 5.0e-5}\n")
    root = Path("runs/x")
    rte = task_recipe(tmp_path / "base.yaml", "rte", ["train.num_train_epochs=4"], root, predict_test=True)
    assert (rte.train.learning_rate, rte.train.num_train_epochs) == (5e-5, 4)
    assert rte.output_dir == str(root / "rte") and rte.predict_test and rte.model.name_or_path == "some/bert"
    cola = task_recipe(tmp_path / "base.yaml", "cola", [], root, predict_test=False)
    assert (cola.task, cola.train.learning_rate, cola.train.num_train_epochs) == ("cola", 3e-5, 2)


def test_task_list_errors(capsys, tmp_path, checkpoint):
    assert parse_tasks(None) == list(ALL.split(","))  # no --tasks: all nine
    with pytest.raises(UserError, match="expected a comma-separated list"):
        parse_tasks("")  # --tasks "$TASKS" with TASKS unset: not all nine (found by a helper)
    assert parse_tasks("RTE,SST-2,cola") == ["cola", "sst2", "rte"]
    for bad, message in (("rte,ax", "predicted with the mnli model"), ("rte,rte", "listed twice"),
                         ("colaa", "unknown GLUE task 'colaa'")):
        with pytest.raises(UserError, match=message):
            parse_tasks(bad)
    code = main(["glue", str(GLUE_RECIPES / "base.yaml"), "--tasks", "rte,qnli",
                 *overrides(checkpoint, tmp_path / "o", **{"data.glue_dir": str(REPO / "data" / "sample" / "glue")})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "no GLUE folder 'QNLI'" in err
    assert not (tmp_path / "o").exists()  # checked before any training


def test_the_report_says_part_of_the_data_only_where_a_split_was_cut():
    """A sweep's "Part of the data" comes from what cut each task's splits (results.json
    "subsampled"), not from the recipe's sizes, which may exceed every split."""
    from types import SimpleNamespace

    from bert_recipes.glue.report import what_cut

    data = SimpleNamespace(max_train_samples=100000, max_eval_samples=None)
    results = {"rte": {"subsampled": {}}, "sst2": {"subsampled": {}}, "wnli": {"majority_class": "not_entailment"}}
    assert what_cut(results, data) == {}
    results["sst2"]["subsampled"] = {"max_train_samples": 500}  # one task's split was cut
    assert what_cut(results, data) == {"max_train_samples": 500}
    del results["rte"]["subsampled"]  # results written before runs recorded it: the recipe's sizes
    assert what_cut(results, data) == {"max_train_samples": 100000}

"""The GLUE task registry: names, aliases, labels, splits and leaderboard files."""

import pytest

from bert_recipes.errors import UserError
from bert_recipes.glue.tasks import TASKS, get_task, leaderboard_entry


def test_registry_holds_the_nine_tasks_and_ax():
    assert list(TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"]
    folders = {name: task.glue_folder for name, task in TASKS.items()}
    assert folders == {
        "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
        "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "ax": "diagnostic",
    }
    files = sorted(f for task in TASKS.values() for f in task.leaderboard_files.values())
    assert files == sorted([
        "CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
        "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv",
    ])
    assert all(task.hub_config == name for name, task in TASKS.items())


def test_label_conventions_follow_nyu_mll_glue():
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("ax").label_names == get_task("mnli").label_names
    assert get_task("ax").predicted_with == "mnli"
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert get_task("qnli").tsv_labels == ("entailment", "not_entailment")
    # WNLI is written 0/1 in the TSVs; 1 means entailment.
    wnli = get_task("wnli")
    assert wnli.tsv_labels == ("0", "1") and wnli.label_names == ("not_entailment", "entailment")
    assert get_task("cola").id2label == {0: "unacceptable", 1: "acceptable"}
    assert get_task("sst2").label2id == {"negative": 0, "positive": 1}


def test_num_labels_metrics_and_splits():
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metrics == ("pearson", "spearmanr")
    assert get_task("mnli").num_labels == 3 and get_task("rte").num_labels == 2
    assert get_task("mrpc").metrics == ("f1", "accuracy") and get_task("qqp").main_metric == "f1"
    assert get_task("cola").metrics == ("matthews_correlation",)
    mnli = get_task("mnli")
    assert mnli.dev_splits == ("validation_matched", "validation_mismatched")
    assert mnli.test_splits == ("test_matched", "test_mismatched")
    assert mnli.split_files["validation_mismatched"] == "dev_mismatched.tsv"
    assert mnli.metrics == ("accuracy_m", "accuracy_mm")
    ax = get_task("ax")
    assert ax.splits == ("test",) and ax.dev_splits == ()
    assert get_task("sst2").is_pair is False and get_task("qnli").text_columns == ("question", "sentence")


@pytest.mark.parametrize("name", ["SST-2", "sst-2", "sst2", "SST2", "sst_2", " Sst-2 ", "sst"])
def test_aliases_for_sst2(name):
    assert get_task(name).name == "sst2"


@pytest.mark.parametrize(
    "name, expected",
    [("STS-B", "stsb"), ("CoLA", "cola"), ("MNLI-m", "mnli"), ("mnli_mismatched", "mnli"),
     ("diagnostic", "ax"), ("AX", "ax"), ("QQP", "qqp"), ("MultiNLI", "mnli")],
)
def test_other_aliases(name, expected):
    assert get_task(name).name == expected


@pytest.mark.parametrize("name, closest", [("sst3", "sst2"), ("mrcp", "mrpc"), ("colaa", "cola"), ("qnlii", "qnli")])
def test_unknown_task_names_the_closest(name, closest):
    with pytest.raises(UserError, match=f"unknown GLUE task '{name}'; did you mean '{closest}'") as err:
        get_task(name)
    assert "\n" not in str(err.value)


def test_split_names():
    assert get_task("sst2").canonical_split("dev") == "validation"
    assert get_task("sst2").canonical_split("Validation") == "validation"
    assert get_task("mnli").canonical_split("dev_matched") == "validation_matched"
    assert get_task("mnli").canonical_split("test-mismatched") == "test_mismatched"
    with pytest.raises(UserError, match="has no split 'validation'; expected one of: train, validation_matched"):
        get_task("mnli").canonical_split("validation")
    with pytest.raises(UserError, match="'ax' has no split 'train'"):
        get_task("ax").canonical_split("train")


def test_leaderboard_entries():
    task, split = leaderboard_entry("mnli-m")
    assert (task.name, split, task.leaderboard_files[split]) == ("mnli", "test_matched", "MNLI-m.tsv")
    task, split = leaderboard_entry("MNLI_mismatched")
    assert (task.name, split, task.leaderboard_files[split]) == ("mnli", "test_mismatched", "MNLI-mm.tsv")
    task, split = leaderboard_entry("RTE")
    assert (task.name, split, task.leaderboard_files[split]) == ("rte", "test", "RTE.tsv")
    assert leaderboard_entry("ax")[0].leaderboard_files["test"] == "AX.tsv"
    with pytest.raises(UserError, match="'mnli-m' \\(matched\\) and 'mnli-mm'"):
        leaderboard_entry("mnli")

"""GLUE leaderboard files: names, header, columns, label strings, zip."""

import zipfile
from pathlib import Path

import numpy as np
import pytest

from bert_recipes.errors import DataError, UserError
from bert_recipes.glue.data import load_glue_split
from bert_recipes.glue.submission import write_submission

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "glue"


def read_zip(path: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name).decode("utf-8").splitlines() for name in archive.namelist()}


def test_all_leaderboard_files(tmp_path):
    predictions = {
        "cola": ([0, 1], [1, 0]),
        "SST-2": ([0, 1, 2], [[0.2, 0.9], [1.5, -1.0], [0.0, 0.3]]),  # logits -> 1 0 1
        "mrpc": ([0, 1], [0, 1]),
        "stsb": ([0, 1, 2, 3], [-0.3, 5.7, 2.3456, 4.0]),  # clipped to [0, 5], 3 decimals
        "qqp": ([0, 1], [1, 1]),
        "mnli-m": ([0, 1, 2], [0, 1, 2]),
        "mnli-mm": ([0, 1], np.array([2, 0])),
        "qnli": ([0, 1], [1, 0]),
        "rte": ([0, 1], [0, 1]),
        "wnli": ([0, 1], [1, 0]),
        "ax": ([0, 1, 2], [2, 1, 0]),  # predicted by the MNLI model: MNLI's labels
    }
    path = write_submission(predictions, tmp_path / "out")
    assert path == tmp_path / "out" / "submission.zip"
    files = read_zip(path)
    assert sorted(files) == sorted([
        "CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
        "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv",
    ])
    assert all(lines[0] == "index\tprediction" for lines in files.values())
    rows = {name: [line.split("\t") for line in lines[1:]] for name, lines in files.items()}
    assert rows["CoLA.tsv"] == [["0", "1"], ["1", "0"]]
    assert rows["SST-2.tsv"] == [["0", "1"], ["1", "0"], ["2", "1"]]
    assert rows["MRPC.tsv"] == [["0", "0"], ["1", "1"]]
    assert rows["STS-B.tsv"] == [["0", "0.000"], ["1", "5.000"], ["2", "2.346"], ["3", "4.000"]]
    assert rows["QQP.tsv"] == [["0", "1"], ["1", "1"]]
    assert rows["MNLI-m.tsv"] == [["0", "entailment"], ["1", "neutral"], ["2", "contradiction"]]
    assert rows["MNLI-mm.tsv"] == [["0", "contradiction"], ["1", "entailment"]]
    assert rows["QNLI.tsv"] == [["0", "not_entailment"], ["1", "entailment"]]
    assert rows["RTE.tsv"] == [["0", "entailment"], ["1", "not_entailment"]]
    assert rows["WNLI.tsv"] == [["0", "1"], ["1", "0"]]
    assert rows["AX.tsv"] == [["0", "contradiction"], ["1", "neutral"], ["2", "entailment"]]
    # the TSVs are also left next to the zip
    assert (tmp_path / "out" / "RTE.tsv").read_text().splitlines() == files["RTE.tsv"]


def test_rows_are_sorted_by_index(tmp_path):
    files = read_zip(write_submission({"rte": ([2, 0, 1], [1, 0, 0])}, tmp_path))
    assert files == {"RTE.tsv": ["index\tprediction", "0\tentailment", "1\tentailment", "2\tnot_entailment"]}


def test_sample_test_split_round_trip(tmp_path):
    test = load_glue_split("sst2", "test", SAMPLE)
    files = read_zip(write_submission({"sst2": (test["idx"], [i % 2 for i in range(len(test))])}, tmp_path))
    lines = files["SST-2.tsv"]
    assert len(lines) == 41 and lines[1] == "0\t0" and lines[40] == "39\t1"


@pytest.mark.parametrize(
    "predictions, error, match",
    [
        ({"mnli": ([0], [0])}, UserError, "name them 'mnli-m' \\(matched\\) and 'mnli-mm'"),
        ({"mnli-m": ([0], [0]), "mnli_matched": ([0], [1])}, UserError, "writes MNLI-m.tsv, already written"),
        ({"rte": ([0, 1], [0])}, DataError, "2 indices but 1 predictions"),
        ({"rte": ([0, 0], [0, 1])}, DataError, "repeated index"),
        ({"rte": ([0], [2])}, DataError, "class id 2"),
        ({"rte": ([0.5], [1])}, DataError, "indices must be integers"),
        ({"stsb": ([0], [float("nan")])}, DataError, "non-finite"),
        ({"rte": ([], [])}, DataError, "no predictions"),
        ({"rte": [0, 1, 2]}, UserError, "expected a pair"),
        ({"sst3": ([0], [1])}, UserError, "did you mean 'sst2'"),
        ({}, UserError, "no predictions"),
    ],
)
def test_errors(tmp_path, predictions, error, match):
    with pytest.raises(error, match=match):
        write_submission(predictions, tmp_path)

"""GLUE metrics against hand-computed values, degenerate inputs, the GLUE score and the
offline evaluate module."""

import math

import numpy as np
import pytest

from bert_recipes.errors import DataError, UserError
from bert_recipes.glue import GLUE_METRIC_PATH
from bert_recipes.glue.metrics import compute_metrics, glue_score, task_score
from bert_recipes.glue.tasks import get_task


# --------------------------------------------------------------------------- hand-computed values


def test_sst2_accuracy_from_ids_and_logits():
    # preds 1 0 1 1 vs refs 1 0 0 1: 3 of 4 right -> 0.75
    refs = [1, 0, 0, 1]
    assert compute_metrics("sst2", [1, 0, 1, 1], refs) == {"accuracy": 0.75}
    logits = [[-1.0, 2.0], [3.0, 0.5], [0.0, 0.1], [-2.0, -1.0]]  # argmax 1 0 1 1
    assert compute_metrics("SST-2", logits, refs) == {"accuracy": 0.75}
    assert compute_metrics("sst2", np.array(logits, dtype=np.float32), np.array(refs)) == {"accuracy": 0.75}


def test_mrpc_f1_of_class_1_and_accuracy():
    # preds 1 1 0 1 0 0, refs 1 0 0 1 1 0: TP = 2 (pos 0, 3), FP = 1 (pos 1), FN = 1 (pos 4)
    # F1 = 2*2 / (2*2 + 1 + 1) = 4/6; accuracy: right at 0, 2, 3, 5 -> 4/6
    out = compute_metrics("mrpc", [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0])
    assert out == {"f1": pytest.approx(4 / 6), "accuracy": pytest.approx(4 / 6)}
    # F1 is of class 1, not class 0: preds 0 0 0 1, refs 0 0 1 1: TP 1, FP 0, FN 1 -> 2/3
    # (class-0 F1 would be 2*2/(4+1) = 0.8); accuracy 3/4
    assert compute_metrics("qqp", [0, 0, 0, 1], [0, 0, 1, 1]) == {"f1": pytest.approx(2 / 3), "accuracy": 0.75}


def test_cola_matthews_correlation():
    # preds 1 1 0 0 1, refs 1 0 0 1 1: TP 2, FP 1, TN 1, FN 1
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    out = compute_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert out == {"matthews_correlation": pytest.approx(1 / 6)}
    assert compute_metrics("cola", [1, 0, 1], [1, 0, 1])["matthews_correlation"] == pytest.approx(1.0)
    assert compute_metrics("cola", [0, 1, 0], [1, 0, 1])["matthews_correlation"] == pytest.approx(-1.0)


def test_ax_three_class_matthews_correlation():
    # preds 0 1 2 0, refs 0 1 1 2. Confusion C[ref][pred]: (0,0) (1,1) (1,2) (2,0).
    # t (ref counts) = 1 2 1, p (pred counts) = 2 1 1, trace c = 2, s = 4
    # MCC = (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (8 - 5) / sqrt((16 - 6)(16 - 6)) = 3/10
    out = compute_metrics("ax", [0, 1, 2, 0], [0, 1, 1, 2])
    assert out == {"matthews_correlation": pytest.approx(0.3)}


def test_stsb_pearson_and_spearman():
    # preds 1 2 3, refs 1 3 2: deviations (-1, 0, 1) and (-1, 1, 0); sum of products 1,
    # sums of squares 2 and 2 -> r = 1/2; ranks equal the values -> rho = 1/2
    assert compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == {
        "pearson": pytest.approx(0.5), "spearmanr": pytest.approx(0.5)
    }
    # preds 0.5 1 4 (mean 11/6), refs 1 2 3 (mean 2): deviations (-4/3, -5/6, 13/6), (-1, 0, 1)
    # products sum 4/3 + 13/6 = 3.5; squares 16/9 + 25/36 + 169/36 = 43/6 and 2
    # r = 3.5 / sqrt(43/6 * 2) = 0.924473...; monotone -> rho = 1
    out = compute_metrics("sts-b", np.array([[0.5], [1.0], [4.0]]), [1.0, 2.0, 3.0])  # [N, 1] is accepted
    assert out["pearson"] == pytest.approx(3.5 / math.sqrt(43 / 3)) and out["spearmanr"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(0.924473, abs=1e-6)


def test_mnli_matched_and_mismatched_keys():
    # 2 of 3 right -> 2/3 under the key of the split
    preds, refs = [0, 1, 2], [0, 1, 1]
    assert compute_metrics("mnli", preds, refs, split="validation_matched") == {"accuracy_m": pytest.approx(2 / 3)}
    assert compute_metrics("mnli", preds, refs, split="dev_mismatched") == {"accuracy_mm": pytest.approx(2 / 3)}
    assert compute_metrics("mnli", preds, refs, split="mm") == {"accuracy_mm": pytest.approx(2 / 3)}
    assert compute_metrics("mnli", preds, refs) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(UserError, match="matched or mismatched split"):
        compute_metrics("mnli", preds, refs, split="train")


def test_torch_inputs():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]], dtype=torch.bfloat16)
    assert compute_metrics("rte", logits, torch.tensor([1, 1])) == {"accuracy": 0.5}


def test_main_metric():
    assert [get_task(t).main_metric for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "rte")] == [
        "matthews_correlation", "accuracy", "f1", "pearson", "f1", "accuracy_m", "accuracy",
    ]


# --------------------------------------------------------------------------- degenerate inputs


def test_degenerate_inputs_do_not_crash():
    # all predictions in one class: MCC's denominator is 0 -> 0.0
    assert compute_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0]) == {"matthews_correlation": 0.0}
    # one class everywhere (even all right): still 0.0
    assert compute_metrics("cola", [1, 1], [1, 1]) == {"matthews_correlation": 0.0}
    # no positives predicted or present: F1 = 0/0 -> 0.0, accuracy 1.0
    assert compute_metrics("mrpc", [0, 0, 0], [0, 0, 0]) == {"f1": 0.0, "accuracy": 1.0}
    # constant STS-B predictions (or references): correlation defined as 0.0, not nan
    assert compute_metrics("stsb", [2.5, 2.5, 2.5], [1.0, 3.0, 5.0]) == {"pearson": 0.0, "spearmanr": 0.0}
    assert compute_metrics("stsb", [1.0, 2.0], [3.0, 3.0]) == {"pearson": 0.0, "spearmanr": 0.0}
    assert compute_metrics("stsb", [1.0], [3.0]) == {"pearson": 0.0, "spearmanr": 0.0}
    out = compute_metrics("stsb", [1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(out["pearson"]) and math.isnan(out["spearmanr"])


def test_against_scikit_learn_on_random_labels():
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    for _ in range(5):
        refs, preds = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
        assert compute_metrics("ax", preds, refs)["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs, preds))
        refs2, preds2 = refs % 2, preds % 2
        assert compute_metrics("qqp", preds2, refs2)["f1"] == pytest.approx(f1_score(refs2, preds2))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "task, preds, refs, match",
    [
        ("rte", [0, 1], [0, -1], "hidden test labels"),
        ("stsb", [1.0, 2.0], [-1.0, -1.0], "hidden test labels"),
        ("sst2", [0, 1, 1], [0, 1], "3 predictions but 2 references"),
        ("sst2", [0, 2], [0, 1], "class id 2; expected ids in \\[0, 1\\]"),
        ("mnli", [[0.1, 0.9]], [0], "expected logits \\[N, 3\\] or class ids \\[N\\]"),
        ("sst2", [0.5, 1.0], [0, 1], "integer class ids"),
        ("sst2", [], [], "no examples"),
        ("sst2", ["1"], [1], "integer class ids"),
    ],
)
def test_bad_inputs(task, preds, refs, match):
    with pytest.raises(DataError, match=match):
        compute_metrics(task, preds, refs)


# --------------------------------------------------------------------------- GLUE score


def test_glue_score_hand_computed():
    results = {
        "mnli": {"accuracy_m": 0.84, "accuracy_mm": 0.83},  # two entries
        "mrpc": {"f1": 0.9, "accuracy": 0.8},  # one entry: (0.9 + 0.8) / 2 = 0.85
        "SST-2": {"accuracy": 0.93},
        "stsb": {"pearson": 0.88, "spearmanr": 0.86},  # (0.88 + 0.86) / 2 = 0.87
        "ax": {"matthews_correlation": 0.3},  # diagnostic: left out
    }
    # (0.84 + 0.83 + 0.85 + 0.93 + 0.87) / 5 = 4.32 / 5 = 0.864
    assert glue_score(results) == pytest.approx(0.864)
    assert task_score("qqp", {"f1": 0.7, "accuracy": 0.9}) == [pytest.approx(0.8)]


def test_glue_score_errors():
    with pytest.raises(UserError, match="'mnli' lack 'accuracy_mm'"):
        glue_score({"mnli": {"accuracy_m": 0.8}})
    with pytest.raises(UserError, match="twice"):
        glue_score({"sst2": {"accuracy": 0.9}, "SST-2": {"accuracy": 0.9}})
    with pytest.raises(UserError, match="no scored task"):
        glue_score({"ax": {"matthews_correlation": 0.1}})
    assert math.isnan(glue_score({"stsb": {"pearson": float("nan"), "spearmanr": 0.5}}))


# --------------------------------------------------------------------------- evaluate module


def test_evaluate_module_loads_offline_and_agrees(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    cases = [
        ("sst2", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75}),
        ("MRPC", [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], {"f1": 4 / 6, "accuracy": 4 / 6}),
        ("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1], {"matthews_correlation": 1 / 6}),
        ("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0], {"pearson": 0.5, "spearmanr": 0.5}),
        ("mnli_mismatched", [0, 1, 2], [0, 1, 1], {"accuracy_mm": 2 / 3}),
    ]
    for config, preds, refs, expected in cases:
        metric = evaluate.load(GLUE_METRIC_PATH, config, cache_dir=str(tmp_path / "cache"), keep_in_memory=True)
        out = metric.compute(predictions=preds, references=refs)
        assert out == {key: pytest.approx(value) for key, value in expected.items()}, config
    with pytest.raises(KeyError, match="unknown GLUE task 'sst3'"):
        evaluate.load(GLUE_METRIC_PATH, "sst3", keep_in_memory=True)

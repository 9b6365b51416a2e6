"""GLUE metrics as a local ``evaluate`` module (works offline).

Usage::

    import evaluate
    from bert_recipes.glue import GLUE_METRIC_PATH
    metric = evaluate.load(GLUE_METRIC_PATH, "sst2")      # or "SST-2", "mnli_matched", ...
    metric.compute(predictions=[1, 0], references=[1, 1])  # {"accuracy": 0.5}

The config name is a GLUE task (any alias ``bert_recipes.glue.get_task`` accepts); MNLI's
matched / mismatched dev sets are the configs ``mnli_matched`` (key ``accuracy_m``) and
``mnli_mismatched`` (``accuracy_mm``); plain ``mnli`` gives ``accuracy``. Predictions are
class ids (STS-B: float scores). The values are those of
``bert_recipes.glue.metrics.compute_metrics``, whose definitions follow GLUE
(Wang et al. 2019).
"""

import datasets
import evaluate

from bert_recipes.glue.metrics import compute_metrics
from bert_recipes.glue.tasks import get_task

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = "GLUE metrics (offline): accuracy, F1 of class 1, Matthews correlation, Pearson and Spearman."

_KWARGS_DESCRIPTION = """
Args:
    predictions: class ids [N] (STS-B: float scores [N]).
    references: gold class ids [N] (STS-B: gold scores [N]); never -1.
Returns:
    cola, ax: matthews_correlation; sst2, qnli, rte, wnli: accuracy; mrpc, qqp: f1 and
    accuracy; stsb: pearson and spearmanr; mnli_matched: accuracy_m; mnli_mismatched:
    accuracy_mm; mnli: accuracy.
"""

_MNLI_SPLITS = {"mnli_matched": "validation_matched", "mnli_mismatched": "validation_mismatched"}


def _resolve(config_name):
    key = (config_name or "").strip().lower().replace("-", "_")
    if key in _MNLI_SPLITS:
        return get_task("mnli"), _MNLI_SPLITS[key]
    return get_task(config_name or ""), None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    """GLUE metrics for one task (the config name)."""

    def _info(self):
        try:
            task, _ = _resolve(self.config_name)
        except Exception as exc:  # evaluate expects a KeyError for a bad config name
            raise KeyError(str(exc)) from None
        value = datasets.Value("float32" if task.is_regression else "int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
            format="numpy",
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions, references):
        task, split = _resolve(self.config_name)
        return compute_metrics(task, predictions, references, split=split)

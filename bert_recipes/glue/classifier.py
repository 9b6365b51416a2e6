"""Model and head surgery for fine-tuning: a ``BertForSequenceClassification`` on any BERT
checkpoint, its classifier head kept (reordered by label name) or made fresh."""

from __future__ import annotations

import logging

import torch

from ..attention import runtime_attention
from ..dropout import use_bits_dropout
from ..modeling import load_config, load_pretrained
from .data import label_mapping
from .tasks import GlueTask

logger = logging.getLogger("bert_recipes")


def build_classifier(recipe: FinetuneRecipe, task: GlueTask):
    """A ``BertForSequenceClassification`` for ``task`` on ``model.name_or_path``.

    The checkpoint's encoder (and pooler) are loaded; the classifier head is new unless the
    checkpoint has one for the same label names (reordered by name if needed, see
    :func:`~bert_recipes.glue.data.label_mapping`). Heads of pretraining (``cls.*``) are
    dropped silently; any other missing or unexpected weight is a warning. Its dropout draws
    from raw bits on a CPU (:func:`~bert_recipes.dropout.use_bits_dropout`), and its output
    layer computes in float32 under any precision (:class:`Float32Head`).

    Raises:
        UserError: unloadable checkpoint, or its labels conflict with the task's.
    """
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    spec = recipe.model
    config = load_config(spec.name_or_path, spec.trust_remote_code)
    mapping = label_mapping(task, config)  # refuses conflicting label sets
    keep_head = mapping is not None or (not _generic_labels(config) and len(config.id2label) == task.num_labels)
    labels = {} if mapping is not None else {"num_labels": task.num_labels, "id2label": task.id2label,
                                             "label2id": task.label2id}
    dropout = spec.dropout_overrides()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report: replaced by the lines below
    try:
        model, info = load_pretrained(
            BertForSequenceClassification, spec.name_or_path, trust_remote_code=spec.trust_remote_code,
            attn_implementation=runtime_attention(spec.attn_implementation), output_loading_info=True,
            ignore_mismatched_sizes=not keep_head, **labels, **dropout,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if mapping is not None:
        _reorder_head(model, mapping)
    model.config.id2label, model.config.label2id = task.id2label, task.label2id
    model.config.problem_type = "regression" if task.is_regression else "single_label_classification"
    model.config.finetuning_task = task.name
    _report_loading(info, spec.name_or_path, resuming=bool(recipe.resume_from))
    cfg = model.config
    classifier = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
    logger.info("dropout: hidden %g, attention %g, classifier %g (%s)", cfg.hidden_dropout_prob,
                cfg.attention_probs_dropout_prob, classifier,
                "the checkpoint's" if not dropout else "model." + ", model.".join(dropout) + " from the recipe")
    return use_bits_dropout(use_float32_head(model))


def use_float32_head(model):
    """Make the output layer of ``model`` (a ``BertForSequenceClassification``) a
    :class:`Float32Head`, in place (its class is swapped: the same parameters). Returns ``model``."""
    model.classifier.__class__ = Float32Head
    return model


class Float32Head(torch.nn.Linear):
    """The classifier's output layer (``[N, hidden] -> [N, num_labels]``), computed in float32
    under any autocast (bf16, fp16) and with bf16 weights (DeepSpeed): the logits, and STS-B's
    regression score, are not rounded to the training precision. In bf16 a score in [2, 4)
    moves in steps of 2**-6 = 0.0156 (a helper counted 225 distinct values among 1,379 STS-B
    test predictions), and the loss's gradient sees the same rounding. The encoder still runs
    in the recipe's precision; this layer costs ``hidden x num_labels`` multiply-adds an
    example. Same parameters and state-dict keys as the ``torch.nn.Linear`` it replaces (its
    class is swapped in place), so exports load as a plain ``BertForSequenceClassification``."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def _generic_labels(config) -> bool:
    names = [str(v).lower() for v in (config.id2label or {}).values()]
    return all(name.startswith("label_") for name in names)


def _reorder_head(model, mapping: dict[int, int]) -> None:
    """Permute the classifier's outputs so that output i is the task's class i."""
    order = torch.tensor([mapping[i] for i in range(len(mapping))])
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[order].clone())
        model.classifier.bias.copy_(model.classifier.bias[order].clone())
    logger.info("checkpoint classifier reordered to the task's label order by name")


def _report_loading(info: dict, name_or_path: str, resuming: bool = False) -> None:
    fresh = sorted(k for k in info["missing_keys"] if k.startswith("classifier."))
    fresh += sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))
    other_missing = sorted(k for k in info["missing_keys"] if not k.startswith("classifier."))
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("cls."))
    if fresh:
        logger.info("classifier head initialised fresh (%s)%s", ", ".join(sorted(set(fresh))),
                    "; a resumed run then loads its checkpoint's" if resuming else "")
    if other_missing:
        logger.warning("%s lacks %d weight(s), initialised fresh: %s", name_or_path, len(other_missing),
                       ", ".join(other_missing[:8]))
    if unexpected:
        logger.warning("%s has %d weight(s) a BertForSequenceClassification does not use: %s", name_or_path,
                       len(unexpected), ", ".join(unexpected[:8]))

"""Intermediate-task initialisation (``init_from_task: mnli``): a task starts from another
task's chosen fine-tuned encoder with its classifier head dropped, as MosaicBERT and
ModernBERT start RTE, MRPC and STS-B from their MNLI model.

:func:`check_architectures` refuses, before any training, a source whose checkpoint is a
different architecture from the target's ``model.name_or_path``; :func:`export_encoder`
writes the source's encoder (embeddings, layers, pooler) and tokenizer as a plain BERT
folder without labels, which :func:`~bert_recipes.glue.classifier.build_classifier` then
loads with a fresh head.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..modeling import load_config

logger = logging.getLogger("bert_recipes")

ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "hidden_act")


def architecture(config) -> dict:
    """The keys of a model config that must agree for an encoder to be reused."""
    return {key: getattr(config, key, None) for key in ARCHITECTURE_KEYS}


def check_architectures(target: str, source: str, target_model: str, source_model: str, trust_remote_code=False) -> None:
    """Refuse (one line) when ``source_model`` and ``target_model`` differ in architecture.

    Raises:
        UserError: names the first differing keys of both checkpoints.
    """
    a = architecture(load_config(target_model, trust_remote_code))
    b = architecture(load_config(source_model, trust_remote_code))
    diff = [key for key in ARCHITECTURE_KEYS if a[key] != b[key]]
    if diff:
        shown = ", ".join(f"{key} {b[key]} vs {a[key]}" for key in diff[:4])
        raise UserError(f"{target}: init_from_task '{source}' has a different architecture from model.name_or_path "
                        f"'{target_model}' ({shown}); give both tasks the same model.name_or_path")


def export_encoder(best: str | Path, dest: str | Path) -> Path:
    """Write the encoder of the fine-tuned export ``best`` (a ``BertForSequenceClassification``
    folder) to ``dest`` as a ``BertModel`` with generic labels, plus its tokenizer.

    Returns:
        ``dest``. Rewritten each call (the source may have been re-chosen).

    Raises:
        UserError: ``best`` is not a loadable fine-tuned export.
    """
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    import shutil

    from ..modeling import load_pretrained

    best, dest = Path(best), Path(dest)
    model = load_pretrained(BertForSequenceClassification, str(best), key="init_from_task")
    config = BertModel.config_class.from_dict(model.config.to_dict())
    config.id2label, config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    config.problem_type = config.finetuning_task = None
    config.architectures = ["BertModel"]
    encoder = model.bert
    encoder.config = config
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(best)).save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # a reader sees no half-written folder under dest's name
    logger.info("encoder of %s (head dropped) -> %s", best, dest)
    return dest


__all__ = ["architecture", "check_architectures", "export_encoder"]

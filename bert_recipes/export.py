"""Hub-ready exports: ``save_pretrained`` weights (safetensors), config, tokenizer, the
resolved recipe and a model card (README.md with YAML metadata).

An export folder loads with ``BertForPreTraining`` / ``AutoModelForMaskedLM`` /
``AutoModelForSequenceClassification.from_pretrained(folder)`` and works in
``pipeline("fill-mask")``. It is written to a temporary folder and renamed into place, so
an interrupted export never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from .atomic import building, make_readable, swap_in, write_json, write_text
from .recipe_files import save_recipe


def _model_card(metadata: dict, title: str, body: list[str]) -> str:
    front = yaml.safe_dump(metadata, sort_keys=False).strip()
    return f"---\n{front}\n---\n\n# {title}\n\n" + "\n".join(body) + "\n"


def _results_table(results: dict) -> list[str]:
    if not results:
        return ["No evaluation was run."]
    lines = ["| metric | value |", "|---|---|"]
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return lines


def _evaluation_and_use(data: str, results: dict, usage: list[str]) -> list[str]:
    """The card's last sections: the results table on ``data`` and a ``pipeline`` example."""
    return ["", f"## Evaluation ({data})", "", *_results_table(results), "", "## Use", "", "```python",
            "from transformers import pipeline", *usage, "```"]


def _precision(recipe, resolved: str | None) -> str:
    """The card's precision: what the run trained in, and the recipe's value when it differs
    (``precision: auto``)."""
    if resolved is None or resolved == recipe.precision:
        return f"precision {recipe.precision}"
    return f"precision {resolved} (recipe: {recipe.precision})"


def _batch(train) -> str:
    """The optimizer batch of a run with ``train`` (accumulation resolved for this launch):
    its parts and its size, which grows with the number of processes (found by a helper:
    cards said ``per_device_train_batch_size 32`` of a run that stepped on 64)."""
    from .training.accelerator import launch_state

    processes = launch_state().num_processes
    per_step = train.per_device_train_batch_size * processes * train.gradient_accumulation_steps
    return (f"per_device_train_batch_size {train.per_device_train_batch_size}, gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps}, {processes} process(es): {per_step} sequences per optimizer step")


def pretraining_card(recipe, results: dict, steps: int, precision: str | None = None) -> str:
    """The model card of a pretraining export; ``precision``: the mixed precision the run
    trained in (Accelerate's ``mixed_precision``: ``precision: auto`` resolved)."""
    data = recipe.data
    sources = data.train_files or [data.dataset_name]
    arch = recipe.model.config
    base = recipe.model.name_or_path
    metrics = [
        {"type": key, "value": round(float(value), 6)}
        for key, value in results.items()
        if isinstance(value, (int, float)) and key != "eval_sequences"
    ]
    held_out = data.eval_files or [f"{data.dataset_name} ({data.eval_dataset_split or data.dataset_split})"]
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "tags": ["bert", "fill-mask", "bert-recipes", "pretraining"],
        **({"base_model": base} if base and not os.path.exists(os.path.expanduser(base)) else {}),
        **({"datasets": [data.dataset_name]} if data.dataset_name else {}),
    }
    if metrics:  # the Hub's model-index needs task, dataset and metrics in every result
        metadata["model-index"] = [
            {
                "name": Path(recipe.output_dir).name,
                "results": [
                    {
                        "task": {"type": "fill-mask", "name": "Masked language modeling"},
                        "dataset": {"name": ", ".join(str(s) for s in held_out), "type": data.dataset_name or "text"},
                        "metrics": metrics,
                    }
                ],
            }
        ]
    body = [
        "A BERT pretrained with masked language modelling and next-sentence prediction by "
        "bert-recipes from the recipe stored next to this card (`recipe.yaml`).",
        "",
        "## Training",
        "",
        f"- architecture: {'from ' + recipe.model.name_or_path if recipe.model.name_or_path else f'{arch.num_hidden_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} heads, intermediate {arch.intermediate_size}'}",
        f"- data: {', '.join(str(s) for s in sources)}",
        f"- max_seq_length {data.max_seq_length}, masked_lm_prob {data.masked_lm_prob}, "
        f"max_predictions_per_seq {data.max_predictions_per_seq}, whole_word_mask {data.whole_word_mask}",
        f"- steps: {steps}, {_batch(recipe.train)}, learning_rate {recipe.train.learning_rate}, "
        f"{_precision(recipe, precision)}, seed {recipe.seed}",
        *_evaluation_and_use("held-out files", results, ['fill = pipeline("fill-mask", model="PATH_OR_REPO")',
                                                          'fill("The capital of France is [MASK].")']),
    ]
    return _model_card(metadata, "BERT pretrained with bert-recipes", body)


def _write_export(model, tokenizer, recipe, directory: str | os.PathLike, card: str, eval_results: dict,
                  state_dict: dict | None = None, extra_json: dict | None = None) -> Path:
    """Weights (safetensors), config, tokenizer, recipe.yaml, README.md, eval_results.json and
    ``extra_json`` (``{file name: content}``), written next to ``directory`` and renamed into place."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with building(tmp):
        model.config.architectures = [type(model).__name__]
        if state_dict is not None:
            # a state dict gathered from shards has separate copies of tied weights (the MLM
            # decoder is the word embedding): leave them out, as save_pretrained does for a model
            tied = getattr(model, "all_tied_weights_keys", None) or {}
            state_dict = {key: value for key, value in state_dict.items() if key not in tied}
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        # a trained WordPiece tokenizer has no length limit; truncation=True must stop at the model's
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and (tokenizer.model_max_length is None or tokenizer.model_max_length > limit):
            tokenizer.model_max_length = limit
        tokenizer.save_pretrained(str(tmp))
        save_recipe(recipe, tmp)
        write_text(tmp / "README.md", card)
        write_json(tmp / "eval_results.json", eval_results)
        for name, content in (extra_json or {}).items():
            write_json(tmp / name, content)
        make_readable(tmp)
    return swap_in(tmp, directory)


def export_pretrained(model, tokenizer, recipe, directory: str | os.PathLike, results: dict, steps: int,
                      state_dict: dict | None = None, precision: str | None = None) -> Path:
    """Write the Hub-ready export of a pretrained ``BertForPreTraining`` to ``directory``.

    ``state_dict`` (optional) is the full state gathered from all ranks
    (``accelerator.get_state_dict``), needed when the weights are sharded (FSDP, DeepSpeed);
    ``precision``: the one the run trained in, for the model card.
    """
    return _write_export(model, tokenizer, recipe, directory, pretraining_card(recipe, results, steps, precision),
                         {"step": steps, **results}, state_dict)


def finetuning_card(recipe, task, results: dict, steps: int, precision: str | None = None,
                    subsampled: dict | None = None) -> str:
    """The model card of a GLUE fine-tuning export (``task`` is a :class:`GlueTask`);
    ``precision`` as :func:`pretraining_card`'s; ``subsampled``: the ``max_train_samples`` /
    ``max_eval_samples`` that cut a split (``glue.batching.load_splits``; None: none did)."""
    base = recipe.model.name_or_path
    on_hub = not os.path.exists(os.path.expanduser(base))
    subsampled = subsampled or {}
    sample = subsampled.get("max_eval_samples")  # dev metrics on the first N examples of each dev split
    metrics = [
        {"type": key, "value": round(float(value), 6), "name": f"{task.glue_folder} {key}"}
        for key, value in results.items()
        if key in task.metrics and isinstance(value, (int, float))
    ]
    splits = ", ".join(f"{split}[:{sample}]" if sample else split for split in task.dev_splits)
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["bert", "text-classification", "glue", task.name, "bert-recipes"],
        "datasets": [task.hub_name],
        **({"base_model": base} if on_hub else {}),
        "model-index": [_glue_result(f"{Path(base).name}-{task.name}", task, splits, metrics)],
    }
    train = recipe.train
    part = (f", the first {subsampled['max_train_samples']} training examples (data.max_train_samples)"
            if subsampled.get("max_train_samples") else "")
    dev = f"GLUE dev, the first {sample} examples (data.max_eval_samples)" if sample else "GLUE dev"
    labels = ", ".join(task.label_names) if task.label_names else "one similarity score in [0, 5] (regression)"
    example = ", ".join('"..."' for _ in task.text_columns)
    body = [
        f"`{base}` fine-tuned on GLUE {task.glue_folder} by bert-recipes from the recipe "
        "stored next to this card (`recipe.yaml`). This is the checkpoint with the best dev "
        f"`{task.main_metric}` of the run.",
        "",
        "## Training",
        "",
        f"- task: {task.name} ({' + '.join(task.text_columns)}); labels: {labels}",
        f"- data: {recipe.data.glue_dir or task.hub_name}{part}, max_seq_length {recipe.data.max_seq_length}",
        f"- steps: {steps}, {_batch(train)}, learning_rate {train.learning_rate}, "
        f"warmup_ratio {train.warmup_ratio}, weight_decay {train.weight_decay}, {_precision(recipe, precision)}, "
        f"seed {recipe.seed}",
        *_evaluation_and_use(dev, results, [
            'classify = pipeline("text-classification", model="PATH_OR_REPO")',
            f"classify({example})" if not task.is_pair else 'classify({"text": "...", "text_pair": "..."})',
        ]),
    ]
    return _model_card(metadata, f"BERT fine-tuned on GLUE {task.glue_folder}", body)


def _glue_result(name: str, task, splits: str, metrics: list[dict]) -> dict:
    """One model-index entry: ``metrics`` measured on ``splits`` of GLUE ``task``."""
    return {
        "name": name,
        "results": [{
            "task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": {"name": f"GLUE {task.glue_folder}", "type": task.hub_name, "config": task.hub_config,
                        "split": splits},
            "metrics": metrics,
        }],
    }


def export_finetuned(model, tokenizer, recipe, task, directory: str | os.PathLike, results: dict, steps: int,
                     state_dict: dict | None = None, precision: str | None = None,
                     extra_json: dict | None = None, subsampled: dict | None = None) -> Path:
    """Write the Hub-ready export of a fine-tuned ``BertForSequenceClassification``.

    The folder holds the weights, config (``id2label`` with the task's label names),
    tokenizer, ``recipe.yaml``, ``README.md`` (model card with the dev results),
    ``eval_results.json`` and ``extra_json`` (the run's ``dev_predictions.json``); it is
    written next to ``directory`` and renamed into place. ``state_dict`` and ``precision`` as
    in :func:`export_pretrained`, ``subsampled`` as in :func:`finetuning_card`.
    """
    card = finetuning_card(recipe, task, results, steps, precision, subsampled)
    return _write_export(model, tokenizer, recipe, directory, card, {"task": task.name, "step": steps, **results},
                         state_dict, extra_json)

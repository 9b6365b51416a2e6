"""Shared fixtures: paths to the sample corpus and the read-only real data, a small
WordPiece tokenizer trained once per session on the sample corpus, and a tiny random BERT
export to fine-tune."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: no spinning on shared cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="bert-recipes-trackio-"))  # not ~/.cache
os.environ.setdefault("BERT_RECIPES_CACHE", tempfile.mkdtemp(prefix="bert-recipes-cache-"))  # document indexes

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SAMPLE_TRAIN = sorted(str(p) for p in (SAMPLE / "train").glob("*.txt"))
SAMPLE_EVAL = sorted(str(p) for p in (SAMPLE / "eval").glob("*.txt"))
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_RECIPE = REPO / "recipes" / "pretrain" / "tiny.yaml"


def require_shared(*parts: str) -> Path:
    """The path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives in ../shared/data next to the repo)")
    return path


@pytest.fixture(scope="session")
def sample_tokenizer():
    """A 2,000-token uncased WordPiece tokenizer trained on the sample corpus."""
    from bert_recipes.tokenizer import train_wordpiece

    return train_wordpiece(SAMPLE_TRAIN, vocab_size=2000, min_frequency=2)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, sample_tokenizer) -> Path:
    """A tiny random ``BertForPreTraining`` + WordPiece tokenizer, as a pretraining export."""
    import torch
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(sample_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    model = BertForPreTraining(config)
    model.config.architectures = ["BertForPreTraining"]
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-bert"
    model.save_pretrained(path)
    sample_tokenizer.save_pretrained(path)
    return path


def tiny_overrides(output_dir, **extra) -> list[str]:
    """Overrides that make tiny.yaml a few-second run writing into ``output_dir``."""
    values = {
        "output_dir": str(output_dir),
        "train.max_steps": 6,
        "train.logging_steps": 1,
        "train.eval_steps": 0,
        "train.save_steps": 0,
        "train.per_device_train_batch_size": 4,
        "data.max_seq_length": 64,
        "data.max_predictions_per_seq": 10,
        "data.max_eval_samples": 16,
        "data.shuffle_buffer_size": 16,
        "model.config.hidden_size": 32,
        "model.config.intermediate_size": 64,
        "model.config.max_position_embeddings": 64,
        "tokenizer.vocab_size": 500,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def fp32_accelerator():
    """A CPU ``Accelerator`` at fp32 whatever an earlier in-process run set (Accelerate keeps one
    precision per process: the GLUE recipes' ``auto`` leaves bf16 on a bf16 CPU)."""
    from accelerate import Accelerator

    from bert_recipes.training.accelerator import _allow_precision

    _allow_precision("no")
    return Accelerator(cpu=True, mixed_precision="no")

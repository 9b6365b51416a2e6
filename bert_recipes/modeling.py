"""The model: a stock ``BertForPreTraining`` and the pretraining objective around it.

:class:`BertPreTrainingObjective` runs the encoder of an unmodified
``transformers.BertForPreTraining`` and applies its MLM head only at the masked positions
(the "sparse" head, as in NVIDIA's and MosaicBERT's recipes): the 30k-vocab decoder is the
largest matmul of a small BERT, and only ~15% of positions have a label. The module owns
no weights of its own, so state dicts, checkpoints and ``save_pretrained`` exports are
exactly ``BertForPreTraining``'s.

It returns loss SUMS and counts rather than means, so the training loop can normalise the
MLM loss over all masked tokens of an accumulation window (and of all ranks), which is what
one large batch would compute.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .attention import runtime_attention
from .dropout import use_bits_dropout

logger = logging.getLogger("bert_recipes")


def bert_config(recipe, vocab_size: int):
    """A ``BertConfig`` from ``recipe.model.config`` and the tokenizer's vocabulary size, with
    the attention implementation the recipe's runs on (:func:`~bert_recipes.attention.runtime_attention`)."""
    from transformers import BertConfig

    arch = recipe.model.config.model_dump()
    return BertConfig(vocab_size=vocab_size, attn_implementation=runtime_attention(recipe.model.attn_implementation),
                      **arch)


def load_pretrained(cls, name_or_path: str, *, key: str = "model.name_or_path", trust_remote_code: bool = False, **kwargs):
    """``cls.from_pretrained`` from a local folder or a Hub id, in float32.

    Raises:
        UserError: one line when the checkpoint cannot be loaded.
    """
    from .hub import load_local_or_hub

    return load_local_or_hub(
        cls.from_pretrained, name_or_path, key,
        dtype=torch.float32,  # from_pretrained keeps the checkpoint dtype otherwise
        trust_remote_code=trust_remote_code, **kwargs,
    )


def load_config(name_or_path: str, trust_remote_code: bool = False, key: str = "model.name_or_path"):
    """A checkpoint's config (``AutoConfig``) from a local folder or a Hub id: cheap, for preflights.

    Raises:
        UserError: one line when the config cannot be loaded, or when it is not a BERT's
            (``model_type`` other than ``bert``: ``BertFor*.from_pretrained`` would build a
            BERT of default size with every encoder weight fresh, and train it without error).
    """
    from transformers import AutoConfig

    from .errors import UserError
    from .hub import load_local_or_hub

    config = load_local_or_hub(AutoConfig.from_pretrained, name_or_path, key, trust_remote_code=trust_remote_code)
    if config.model_type != "bert":  # found by a helper: DistilBERT, RoBERTa, GPT-2 trained as random BERTs
        raise UserError(f"{key}: '{name_or_path}' is a '{config.model_type}' model (model_type in its config.json), "
                        "not BERT; this project trains BERT checkpoints (model_type 'bert')")
    return config


def build_pretraining_model(recipe, tokenizer):
    """A ``BertForPreTraining`` for the recipe: from ``model.name_or_path`` or a fresh config,
    with its dropout drawn from raw bits on a CPU (:func:`~bert_recipes.dropout.use_bits_dropout`).

    A checkpoint's embeddings are resized when the tokenizer has more tokens than its vocab.
    """
    from transformers import BertForPreTraining

    if recipe.model.name_or_path:
        arch = recipe.model.config  # the checkpoint's, dropout the recipe's (pretrain.with_checkpoint_architecture)
        model = load_pretrained(
            BertForPreTraining,
            recipe.model.name_or_path,
            trust_remote_code=recipe.model.trust_remote_code,
            attn_implementation=runtime_attention(recipe.model.attn_implementation),
            hidden_dropout_prob=arch.hidden_dropout_prob,
            attention_probs_dropout_prob=arch.attention_probs_dropout_prob,
        )
        if len(tokenizer) > model.config.vocab_size:
            logger.warning("the tokenizer has %d tokens, the checkpoint's embeddings %d: resized, the new rows start "
                           "random (a tokenizer other than the checkpoint's own maps its ids to other words)",
                           len(tokenizer), model.config.vocab_size)
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = BertForPreTraining(bert_config(recipe, len(tokenizer)))
    return use_bits_dropout(model)


def device_count(n: int, device) -> torch.Tensor:
    """``n`` as a 0-d int64 tensor made on ``device`` by a fill kernel: ``torch.tensor(n,
    device=...)`` copies from the host instead, which on a GPU waits for the queued work."""
    return torch.full((), n, dtype=torch.long, device=device)


#: Attention implementations that take packed rows as one flattened sequence with
#: ``cu_seq_lens`` (flash-attn's variable-length kernel through transformers' attention
#: interface) instead of a block-diagonal mask; see :func:`register_varlen_attention`.
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3"}


def is_varlen_attention(attn_implementation: str) -> bool:
    """True for flash-attn implementations (``flash_attention_2/3`` and Hub kernels such as
    ``kernels-community/flash-attn2``) and those added by :func:`register_varlen_attention`."""
    return attn_implementation in VARLEN_ATTENTION or "flash" in attn_implementation


def register_varlen_attention(name: str, function) -> None:
    """Register ``function`` with transformers' ``AttentionInterface`` under ``name`` and
    treat it as variable-length: it receives ``attention_mask=None`` and the keyword
    arguments ``cu_seq_lens_q/k`` (int32 ``[S + 1]``) and ``max_length_q/k`` (int), as
    transformers' flash-attn integration does (``DataCollatorWithFlattening``). Unpacked
    batches give it flash-attn's padding mask (``[B, L]`` boolean, or None without padding:
    transformers' ``flash_attention_mask``, registered with ``AttentionMaskInterface`` under
    ``name``; without one transformers would pass no mask at all)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, flash_attention_mask)
    VARLEN_ATTENTION.add(name)


def cu_seq_lens(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment boundaries ``[S + 1]`` (int32) of packed rows ``segment_ids`` ``[R, L]``
    read as one flattened sequence of ``R * L`` tokens: every instance is a segment, and so
    is each row's padding tail, so no kernel ever attends across instances or rows."""
    flat = segment_ids.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: segment_ids.shape[1]] = True  # a row always starts a segment
    bounds = torch.cat([starts.nonzero().squeeze(1), torch.tensor([flat.numel()], device=flat.device)])
    return bounds.to(torch.int32)


def block_diagonal_mask(segment_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Attention confined to each packed instance: ``[R, 1, L, L]`` from ``segment_ids`` ``[R, L]``.

    Query i may attend to key j when both carry the same segment id; padding (segment 0)
    attends to padding only, so no query row is empty (an all-masked row would make SDPA
    return NaN). Boolean (True = attend) for SDPA; additive (0 or the dtype's minimum) for
    the eager implementation.
    """
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if attn_implementation == "eager":
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)
    return same


def packed_attention_mask(bert: nn.Module, segment_ids: torch.Tensor) -> torch.Tensor:
    """:func:`block_diagonal_mask` for a ``BertModel``'s attention implementation and dtype."""
    return block_diagonal_mask(segment_ids, bert.config._attn_implementation, bert.embeddings.word_embeddings.weight.dtype)


def packed_inputs(bert: nn.Module, input_ids, token_type_ids, position_ids, segment_ids,
                  cu_seqlens: torch.Tensor | None = None) -> dict:
    """Keyword arguments of a ``BertModel`` (or a model around one) forward for packed rows
    ``[R, L]``.

    With a variable-length attention (:func:`is_varlen_attention`: flash-attn on a GPU) the
    rows are flattened into one sequence ``[1, R * L]`` with ``cu_seq_lens`` (the collator's,
    else :func:`cu_seq_lens` on the device, a host sync) and no mask, so attention costs the
    instances' own lengths; otherwise the rows go as they are with the block-diagonal mask.
    Either way the model's hidden states flatten to the same ``R * L`` positions.
    """
    if not is_varlen_attention(bert.config._attn_implementation):
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids,
                "attention_mask": packed_attention_mask(bert, segment_ids)}
    cu = cu_seq_lens(segment_ids) if cu_seqlens is None else cu_seqlens.to(torch.int32)
    width = int(input_ids.shape[1])  # an upper bound of every segment's length: no host read
    return {"input_ids": input_ids.reshape(1, -1), "token_type_ids": token_type_ids.reshape(1, -1),
            "position_ids": position_ids.reshape(1, -1), "attention_mask": None,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}


def encode(model: nn.Module, input_ids, token_type_ids, attention_mask, position_ids=None, segment_ids=None,
           cls_index=None, cu_seq_lens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder outputs of a ``BertForPreTraining`` / ``BertForSequenceClassification``:
    ``(sequence_output [R, L, H], pooled_output [N, H])``.

    A plain batch (one instance per row, N = R) goes through ``model.bert`` as it is. A
    packed batch (``segment_ids``, ``position_ids``, ``cls_index`` and ``cu_seq_lens`` from
    :class:`~bert_recipes.data.packing.PackedCollator`) runs the same modules with positions
    restarting per instance and attention confined to each instance (:func:`packed_inputs`:
    a block-diagonal mask, or flash-attn's variable-length kernel), and applies the model's
    own pooler (dense + tanh) to each instance's [CLS] vector.
    """
    bert = model.bert
    if segment_ids is None:
        out = bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output
    out = bert(**packed_inputs(bert, input_ids, token_type_ids, position_ids, segment_ids, cu_seq_lens),
               return_dict=True)
    hidden = out.last_hidden_state.reshape(*input_ids.shape, -1)
    cls = hidden.flatten(0, 1)[cls_index]
    return hidden, bert.pooler.activation(bert.pooler.dense(cls))


def classification_logits(model: nn.Module, batch: dict, unwrap=lambda m: m) -> torch.Tensor:
    """Logits ``[N, C]`` of a ``BertForSequenceClassification`` for a plain batch (N = rows)
    or a packed one (:class:`~bert_recipes.data.packing.PackedFeatureCollator`).

    A packed batch runs through ``model`` itself (so a DDP wrapper sees the forward) with
    :func:`packed_inputs` (restarting positions; a block-diagonal mask or the
    variable-length kernel); the pooler, dropout and classifier of the unwrapped model
    (``unwrap(model)``) are then applied at each example's [CLS].
    """
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if "segment_ids" not in inputs:
        return model(**inputs).logits
    core = unwrap(model)
    out = model(**packed_inputs(core.bert, inputs["input_ids"], inputs["token_type_ids"], inputs["position_ids"],
                                inputs["segment_ids"], inputs.get("cu_seq_lens")), output_hidden_states=True)
    cls = out.hidden_states[-1].flatten(0, 1)[inputs["cls_index"]]
    pooled = core.bert.pooler.activation(core.bert.pooler.dense(cls))
    return core.classifier(core.dropout(pooled))


class BertPreTrainingObjective(nn.Module):
    """MLM + NSP losses of a ``BertForPreTraining``, as sums for exact normalisation.

    Args:
        model: a ``transformers.BertForPreTraining``; its weights are used as they are.
        sparse_mlm_head: apply the MLM head only where ``labels != -100`` (same values as
            the dense head at those positions, far less compute).

    ``forward`` takes the collator's batch (all ``torch.long``): ``input_ids``,
    ``token_type_ids``, ``attention_mask``, ``labels`` of shape [B, L] and
    ``next_sentence_label`` of shape [B], or a packed batch (``position_ids``,
    ``segment_ids`` [R, L], ``cls_index`` [N], ``cu_seq_lens`` [S + 1]; see :func:`encode`), and optionally
    ``masked_lm_positions`` [M] (the flat indices of ``labels != -100``, which the collators
    give; without it the head finds them on the device, a host sync). It returns a dict of 0-d tensors:
    ``mlm_loss_sum`` (sum of token cross-entropies in nats over the M masked tokens),
    ``nsp_loss_sum`` (sum over the B sequences), ``num_masked`` (M), ``num_sequences`` (B),
    ``mlm_correct`` and ``nsp_correct`` (argmax hits).
    """

    def __init__(self, model: nn.Module, sparse_mlm_head: bool = True):
        super().__init__()
        self.model = model
        self.sparse_mlm_head = sparse_mlm_head

    def forward(self, input_ids, token_type_ids, attention_mask, labels, next_sentence_label, position_ids=None,
                segment_ids=None, cls_index=None, masked_lm_positions=None, cu_seq_lens=None, **_unused):
        sequence_output, pooled_output = encode(self.model, input_ids, token_type_ids, attention_mask, position_ids,
                                                segment_ids, cls_index, cu_seq_lens)
        heads = self.model.cls
        if self.sparse_mlm_head:
            positions = masked_lm_positions  # [M], row-major, from the collator: no host sync
            if positions is None:
                positions = (labels.flatten() != -100).nonzero().squeeze(1)  # a host sync (M is a shape)
            mlm_logits = heads.predictions(sequence_output.flatten(0, 1).index_select(0, positions))  # [M, V]
            mlm_targets = labels.flatten().index_select(0, positions)  # [M]
        else:
            mlm_logits = heads.predictions(sequence_output).flatten(0, 1)  # [B*L, V]
            mlm_targets = labels.flatten()
        nsp_logits = heads.seq_relationship(pooled_output)  # [B, 2]
        mlm_loss_sum = F.cross_entropy(mlm_logits.float(), mlm_targets, ignore_index=-100, reduction="sum")
        nsp_loss_sum = F.cross_entropy(nsp_logits.float(), next_sentence_label, reduction="sum")
        with torch.no_grad():  # max().indices: the first maximum, as argmax, but 3-5x faster on a CPU
            valid = mlm_targets != -100
            mlm_correct = ((mlm_logits.max(-1).indices == mlm_targets) & valid).sum()
            nsp_correct = (nsp_logits.argmax(-1) == next_sentence_label).sum()
        return {
            "mlm_loss_sum": mlm_loss_sum,
            "nsp_loss_sum": nsp_loss_sum,
            "num_masked": valid.sum(),
            "num_sequences": device_count(next_sentence_label.numel(), input_ids.device),
            "mlm_correct": mlm_correct,
            "nsp_correct": nsp_correct,
        }


def training_flops_per_token(config, seq_len: int, predictions_per_token: float = 1.0) -> float:
    """Model FLOPs to TRAIN on one token (forward + backward = 3x forward).

    Formula (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1;
    the same accounting as PaLM's MFU, Chowdhery et al. 2022, Appendix B), with
    h = hidden_size, i = intermediate_size, n = num_hidden_layers, s = seq_len,
    V = vocab_size:

        forward per token = 2 * n * (4*h*h + 2*h*i)      # QKV + output projections, FFN
                          + 2 * n * 2 * s * h            # attention scores QK^T and AV
                          + p * 2 * (h*h + h*V)          # MLM head (transform + decoder)
        training          = 3 * forward

    ``p`` (``predictions_per_token``) is the fraction of positions where the MLM head runs:
    1.0 for a dense head, ``num_masked / num_tokens`` for the sparse head. Embedding
    look-ups, layer norms, biases, softmax and the tiny NSP/pooler heads are ignored.
    """
    h, i, n, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    forward = 2 * n * (4 * h * h + 2 * h * i) + 2 * n * 2 * seq_len * h + predictions_per_token * 2 * (h * h + h * vocab)
    return 3.0 * forward


__all__ = ["VARLEN_ATTENTION", "BertPreTrainingObjective", "bert_config", "block_diagonal_mask", "build_pretraining_model",
           "classification_logits", "cu_seq_lens", "encode", "is_varlen_attention", "load_config", "load_pretrained",
           "packed_inputs", "register_varlen_attention", "training_flops_per_token"]

"""The task heads on top of ``Glm4Model``: causal LM, sequence and token classification, with the
losses computed as transformers computes them."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .config import Glm4Config
from .generate import generate, load_generation_config
from .loading import TensorSpec, base_model_specs
from .model import Glm4Model, Glm4PreTrainedModel, Linear, make_linear
from .quant import QuantLinear
from .outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast, TokenClassifierOutput

IGNORE_INDEX = -100


# ---- losses (float64 internally, returned as a float32 scalar array) ---------------------------

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Mean cross-entropy of ``logits [n, C]`` against int ``labels [n]``, skipping ``ignore_index``.

    Raises:
        ValueError: a label outside ``[0, C)`` that is not ``ignore_index``.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"class labels must be integers, got dtype {labels.dtype}")
    keep = labels != ignore_index
    n_classes = logits.shape[-1]
    if np.any((labels[keep] < 0) | (labels[keep] >= n_classes)):
        raise ValueError(f"labels must be in [0, {n_classes}) or {ignore_index}")
    if not keep.any():
        return np.array(np.nan, dtype=np.float32)  # torch: mean over zero items is nan
    logp = _log_softmax(logits.reshape(-1, n_classes)[keep])
    return np.array(-logp[np.arange(logp.shape[0]), labels[keep]].mean(), dtype=np.float32)


def mse_loss(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean squared error."""
    diff = pred.astype(np.float64) - np.asarray(target, dtype=np.float64)
    return np.array(np.mean(diff * diff), dtype=np.float32)


def bce_with_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy on logits (multi-label classification), numerically stable."""
    z = logits.astype(np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if y.shape != z.shape:
        raise ValueError(f"multi-label targets must have the logits' shape {z.shape}, got {y.shape}")
    return np.array(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))), dtype=np.float32)


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Next-token loss: position t predicts ``labels[t + 1]``; -100 labels are skipped."""
    labels = np.asarray(labels)
    shifted = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    shifted[..., :-1] = labels[..., 1:]
    if shifted.shape != logits.shape[:-1]:
        raise ValueError(f"labels {labels.shape} do not match the logits' positions {logits.shape[:-1]}")
    return cross_entropy(logits, shifted)


def _input_shape(input_ids: Any, inputs_embeds: Any) -> tuple[int, int] | None:
    """``(batch, seq)`` of the given input, or None when it is missing or has too few dimensions
    (the decoder then raises the error that names the problem)."""
    src = input_ids if input_ids is not None else inputs_embeds
    return tuple(np.shape(src)[:2]) if src is not None and np.ndim(src) >= 2 else None


class Glm4ForCausalLM(Glm4PreTrainedModel):
    """``Glm4Model`` + ``lm_head``: next-token logits (``CausalLMOutputWithPast``).

    The lm_head (``[vocab, H]``, no bias) is the embedding matrix when ``tie_word_embeddings``.
    """

    has_lm_head = True

    @classmethod
    def tensor_specs(cls, config: Glm4Config) -> dict[str, TensorSpec]:
        specs = base_model_specs(config)
        if not config.tie_word_embeddings:
            specs["lm_head.weight"] = TensorSpec((config.vocab_size, config.hidden_size), "matrix")
        return specs

    def _build(self, tensors: dict[str, np.ndarray]) -> None:
        self.model = Glm4Model(self.config, tensors=tensors)
        if "lm_head.qweight" in tensors:
            self.lm_head = make_linear(tensors, "lm_head", self.config, self.config.vocab_size,
                                        self.config.hidden_size)
        else:
            self.lm_head = Linear(self.model.embed_tokens if self.config.tie_word_embeddings
                                  else tensors["lm_head.weight"])

    @property
    def generation_config(self) -> dict[str, Any]:
        """Generation defaults: the checkpoint's ``generation_config.json`` (a dict, editable)."""
        if not hasattr(self, "_generation_config"):
            self._generation_config = load_generation_config(self.checkpoint_dir)
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: dict[str, Any]) -> None:
        self._generation_config = dict(value)

    def generate(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> np.ndarray:
        """Generate token ids like transformers' ``generate``; see ``glm4rt.generate.generate``."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, tokenizer, input_ids: Any, attention_mask: Any = None, **kwargs: Any):
        """Generate for one prompt and yield the reply as text pieces (never a broken UTF-8
        character); see ``glm4rt.generate.stream_text``."""
        from .generate import stream_text

        return stream_text(self, tokenizer, input_ids, attention_mask, **kwargs)

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Every weight under its checkpoint name."""
        out = self.model.named_parameters()
        if isinstance(self.lm_head, QuantLinear) or not self.config.tie_word_embeddings:
            out.update(self.lm_head.parameters("lm_head"))
        return out

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, inputs_embeds: Any = None, labels: Any = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, cache_position: Any = None,
                logits_to_keep: int | np.ndarray = 0, return_dict: Optional[bool] = None,
                cache: Any = None) -> CausalLMOutputWithPast | tuple:
        """Logits for the next token at every kept position.

        Args:
            (as ``Glm4Model.forward``), plus
            labels: int ``[batch, seq]``; the loss is the mean cross-entropy of position t against
                ``labels[t + 1]``, skipping -100.
            logits_to_keep: int k keeps the last k positions (0 = all); an index array keeps those.
        Returns:
            ``CausalLMOutputWithPast`` with ``logits [batch, kept, vocab]`` float32 (or a tuple).
        """
        T = (_input_shape(input_ids, inputs_embeds) or (0, 0))[1]
        if isinstance(logits_to_keep, (int, np.integer)):
            if logits_to_keep < 0:
                raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
            keep = np.arange(max(T - logits_to_keep, 0) if logits_to_keep else 0, T)  # [K]
        else:
            keep = np.asarray(logits_to_keep).reshape(-1)
            if keep.dtype.kind not in "iu":
                raise ValueError(f"logits_to_keep indices must be integers, got dtype {keep.dtype}")
            if keep.size and (keep.min() < -T or keep.max() >= T):
                raise ValueError(f"logits_to_keep indices must be in [-{T}, {T}), got {keep}")
            keep = keep % max(T, 1)
        # The decoder's last layer then computes the kept positions only (ascending, distinct ones:
        # any other index array is taken from the full output).
        ascending = keep.size > 0 and bool(np.all(np.diff(keep) > 0))
        base = self.model.forward(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            cache_position=cache_position, cache=cache, keep_positions=keep if ascending else None)
        hidden = base.last_hidden_state  # [B, K, H] when the decoder kept them, else [B, T, H]
        kept = hidden if ascending else hidden[:, keep]
        B, K, H = kept.shape
        logits = self.lm_head(np.ascontiguousarray(kept).reshape(B * K, H)).reshape(B, K, -1)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=base.past_key_values,
                                     hidden_states=base.hidden_states, attentions=base.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()


class _Glm4Classifier(Glm4PreTrainedModel):
    """``Glm4Model`` + a ``score`` projection ``[num_labels, H]`` (with a bias when ``_score_bias``)."""

    _score_bias = False

    @classmethod
    def tensor_specs(cls, config: Glm4Config) -> dict[str, TensorSpec]:
        specs = base_model_specs(config)
        specs["score.weight"] = TensorSpec((config.num_labels, config.hidden_size), "matrix")
        if cls._score_bias:
            specs["score.bias"] = TensorSpec((config.num_labels,), "bias")
        return specs

    def _build(self, tensors: dict[str, np.ndarray]) -> None:
        self.model = Glm4Model(self.config, tensors=tensors)
        self.score = Linear(tensors["score.weight"], tensors.get("score.bias"))

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Every weight under its checkpoint name."""
        out = self.model.named_parameters()
        out["score.weight"] = self.score.weight
        if self.score.bias is not None:
            out["score.bias"] = self.score.bias
        return out


class Glm4ForSequenceClassification(_Glm4Classifier):
    """``Glm4Model`` + ``score`` (``[num_labels, H]``, no bias), pooled at each row's rightmost
    token that is not ``pad_token_id`` (left or right padding both work)."""

    _score_bias = False
    newly_initialisable = ("score.weight",)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, inputs_embeds: Any = None, labels: Any = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, cache_position: Any = None,
                return_dict: Optional[bool] = None, cache: Any = None,
                ) -> SequenceClassifierOutputWithPast | tuple:
        """Pooled classification logits ``[batch, num_labels]``.

        Args:
            (as ``Glm4Model.forward``), plus
            labels: float ``[batch]`` (regression, num_labels == 1), int ``[batch]`` (single-label)
                or float/int ``[batch, num_labels]`` multi-hot (multi-label). The loss follows
                ``config.problem_type``, inferred from these as transformers does when unset.
        Raises:
            ValueError: batch > 1 without a ``pad_token_id`` to find each row's last token.
        """
        config = self.config
        shape = _input_shape(input_ids, inputs_embeds)
        if shape is not None:
            B, T = shape
            if config.pad_token_id is None or input_ids is None:
                last = np.full(B, T - 1)
            else:
                non_pad = np.asarray(input_ids) != config.pad_token_id
                last = (np.arange(T) * non_pad).argmax(-1)  # rightmost non-pad (0 for an all-pad row)
            keep = np.unique(last)  # the decoder's last layer computes these positions only
        else:
            last = keep = None
        base = self.model.forward(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            cache_position=cache_position, cache=cache, keep_positions=keep)
        hidden = base.last_hidden_state  # [B, K, H]: the kept positions
        if config.pad_token_id is None and B != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        pooled = self.score(hidden[np.arange(B), np.searchsorted(keep, last)])  # [B, num_labels]

        loss = None
        if labels is not None:
            labels = np.asarray(labels)
            if config.problem_type is None:  # inferred once and stored, as transformers does
                if config.num_labels == 1:
                    config.problem_type = "regression"
                elif labels.dtype.kind in "iu":
                    config.problem_type = "single_label_classification"
                else:
                    config.problem_type = "multi_label_classification"
            if config.problem_type == "regression":
                loss = (mse_loss(pooled.squeeze(), labels.squeeze()) if config.num_labels == 1
                        else mse_loss(pooled, labels))
            elif config.problem_type == "single_label_classification":
                loss = cross_entropy(pooled, labels)
            else:
                loss = bce_with_logits(pooled, labels)
        out = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=base.past_key_values,
                                               hidden_states=base.hidden_states, attentions=base.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()


class Glm4ForTokenClassification(_Glm4Classifier):
    """``Glm4Model`` + ``score`` (``[num_labels, H]`` with bias): per-token logits. Dropout is
    inactive at inference, so none is applied."""

    _score_bias = True
    newly_initialisable = ("score.weight", "score.bias")

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, inputs_embeds: Any = None, labels: Any = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, cache_position: Any = None,
                return_dict: Optional[bool] = None, cache: Any = None) -> TokenClassifierOutput | tuple:
        """Per-token logits ``[batch, seq, num_labels]``; ``labels`` int ``[batch, seq]`` (-100 skipped)
        give the mean cross-entropy."""
        base = self.model.forward(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            cache_position=cache_position, cache=cache, keep_positions=None)
        hidden = base.last_hidden_state
        B, T, H = hidden.shape
        logits = self.score(hidden.reshape(B * T, H)).reshape(B, T, -1)
        loss = cross_entropy(logits, labels) if labels is not None else None
        out = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=base.hidden_states,
                                    attentions=base.attentions)
        return out if return_dict is None or return_dict else out.to_tuple()

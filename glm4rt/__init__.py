"""glm4rt: a CPU-first inference runtime for GLM-4 (``Glm4ForCausalLM``) models.

The classes mirror transformers' Glm4 API with NumPy arrays in and out::

    from glm4rt import Glm4ForCausalLM
    model = Glm4ForCausalLM.from_pretrained("path/to/GLM-4-9B-0414")
    logits = model(input_ids).logits
"""
from .chat import ChatSession, ContextFullError, split_thinking
from .config import Glm4Config
from .errors import CheckpointError, ConfigError, Glm4rtError
from .hub import DEMO_MODEL
from .heads import Glm4ForCausalLM, Glm4ForSequenceClassification, Glm4ForTokenClassification
from .kv_cache import Glm4Cache
from .model import Glm4Model, Glm4PreTrainedModel
from .ops import batch_invariant_mode as batch_invariant
from .ops import cpu_isa, get_num_threads, set_isa, set_num_threads, supported_isas
from .tokenizer import Glm4Tokenizer, StreamDecoder, TokenizerError
from .generate import stream_text
from .outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                      SequenceClassifierOutputWithPast, TokenClassifierOutput)

__version__ = "0.1.0"

__all__ = [
    "Glm4Config", "Glm4Model", "Glm4PreTrainedModel", "Glm4ForCausalLM",
    "Glm4ForSequenceClassification", "Glm4ForTokenClassification", "Glm4Cache",
    "BaseModelOutputWithPast", "CausalLMOutputWithPast", "SequenceClassifierOutputWithPast",
    "TokenClassifierOutput", "CheckpointError", "ConfigError", "Glm4rtError",
    "batch_invariant", "cpu_isa", "supported_isas", "set_isa", "set_num_threads", "get_num_threads",
    "Glm4Tokenizer", "StreamDecoder", "TokenizerError", "ChatSession", "ContextFullError",
    "split_thinking", "stream_text", "DEMO_MODEL",
]

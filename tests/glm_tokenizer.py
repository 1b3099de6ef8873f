"""A small GLM-4-style tokenizer for the tests: ``build_glm_tokenizer(directory, template=...)``.

Built with the ``tokenizers`` package in well under a second: byte-level BPE behind the GPT-4-style
split regex GLM-4 uses (regex split, then ByteLevel without its own regex), trained on a small mixed
corpus (English, Chinese, emoji, code) so that real merges exist, and the GLM special tokens at
their real ids 151329..151342. The trained vocabulary stays small (under 1k entries): the special
tokens are entries of the BPE vocabulary at their real ids, with a gap below them. `tokenizers`
keeps those ids when it loads the file (an added token found in the model vocabulary takes the
model's id; one that is not gets the next free id, which is why they must be in the vocabulary),
and transformers' ``PreTrainedTokenizerFast`` loads the same file to the same ids, as the tests
check. The post-processor prepends ``[gMASK]<sop>`` when special tokens are added, as GLM-4's
tokenizers do (the original ChatGLM4Tokenizer adds them as prefix tokens; the HF tokenizer.json
files carry them as a TemplateProcessing post-processor, to the best of our knowledge), which is why
chat prompts are tokenized without special tokens.

Chat templates (where they came from, and how much to trust them):

- ``template="z1"``: tests/data/glm-z1-0414.jinja, a byte-for-byte copy of the project's
  /work/shared/data/chat_templates/glm-z1-0414.jinja, the reconstruction of the
  ``chat_template.jinja`` published with GLM-Z1-9B-0414 / GLM-Z1-32B-0414 (the revision with
  ``<think>``). Public copies of the very same text were found (the ``GLM4Z1_CHAT_TEMPLATE``
  constant embedded in third-party launchers), so confidence is high.
- ``template="glm4"``: tests/data/glm-4-0414.jinja, reconstructed for GLM-4-9B-0414 /
  GLM-4-32B-0414; the published file itself was not reachable from here. Sources: (a) the Z1
  file above, minus its ``</think>`` stripping and the ``<think>`` after the generation prompt
  (the project note says GLM-4-0414 has the same structure); (b) the single-line
  GLM-Z1-Rumination-32B-0414 template printed by llama.cpp's converter (same ``metadata`` /
  ``observation`` handling); (c) ms-swift's GLM4-0414 agent template, which
  writes the tool list without the "ChatGLM" preamble of the Z1 file, as "# 可用工具" + two
  newlines + the tools joined by one newline; this template renders exactly that; (d) the
  project note that the GLM-4-0414 generation prompt is "<|assistant|>" + newline.
  Confidence: medium. Roles, tags, the tool JSON and the observation turns are right; whitespace
  around the tool list and the newline after the generation prompt may differ between
  revisions of the published file. The tests compare glm4rt with transformers rendering the same
  file, so parity does not depend on it.
"""
from __future__ import annotations

import json
import os

from tokenizers import pre_tokenizers, trainers

from glm4rt.tokenizer_build import GLM4_SPECIAL_TOKENS, glm4_bpe, glm4_tokenizer_config, glm4_tokenizer_spec

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = {
    "glm4": os.path.join(HERE, "data", "glm-4-0414.jinja"),
    "z1": os.path.join(HERE, "data", "glm-z1-0414.jinja"),
}

# id -> token, as in GLM-4's tokenizer_config.json (added_tokens_decoder).
SPECIAL_TOKENS = {151329 + i: t for i, t in enumerate(GLM4_SPECIAL_TOKENS)}


_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a test, isn't it? We'll see what they've done.",
    "Hello world! How are you today? I'm fine, thanks. The weather in Beijing is sunny and warm.",
    "Tokenizers split text into pieces; byte-level BPE never needs an unknown token.",
    "今天天气很好，我们去公园散步吧。北京的天气怎么样？明天会下雨吗？",
    "你好，我是一个人工智能助手。很高兴为你提供帮助。请问有什么可以帮你的吗？",
    "机器学习和深度学习是人工智能的重要分支。语言模型可以生成文本、回答问题。",
    "查询城市的天气情况，返回温度和湿度。调用工具时请使用 Json 格式表示参数。",
    "Emoji time 😀😃😄 🎉🎉 👍 🚀 ❤️ 🐍 — fun!",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(f\"{i}: {add(i, 1)}\")\n",
    "class Foo:\n    def __init__(self, x: int) -> None:\n        self.x = x  # store\n",
    "if (x == 0) { return -1; } else { x += 1; }\n// C++ comment\nint main() { return 0; }\n",
    '{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}',
    "Numbers: 12345 67 890 3.14159 2025-04-14",
]


def build_glm_tokenizer(directory: str, template: str = "glm4") -> str:
    """Build and save a GLM-style tokenizer (tokenizer.json + tokenizer_config.json).

    Args:
        directory: where to write the files (created if missing).
        template: ``"glm4"`` (GLM-4-0414 chat template) or ``"z1"`` (GLM-Z1-0414 template).
    Returns:
        The directory.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    os.makedirs(directory, exist_ok=True)

    tok = glm4_bpe()
    trainer = trainers.BpeTrainer(vocab_size=1500, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    assert tok.get_vocab_size() < min(SPECIAL_TOKENS), "trained vocab reaches the special ids"
    special_ids = {content: idx for idx, content in SPECIAL_TOKENS.items()}
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(glm4_tokenizer_spec(tok, special_ids), f, ensure_ascii=False)
    with open(TEMPLATES[template], encoding="utf-8") as f:
        chat_template = f.read()
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(glm4_tokenizer_config(special_ids, chat_template, 128000), f, ensure_ascii=False, indent=2)
    return directory

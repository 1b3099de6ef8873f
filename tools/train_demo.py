"""Train glm4rt's demo model: a small GLM-4 (transformers' ``Glm4ForCausalLM``) trained with
transformers + torch on the King James Bible and on classical Chinese poems, both from Debian
packages, so that glm4rt runs out of the box without the model hub.

    apt-get install bible-kjv fortunes-zh        # the texts (and the program that reads the Bible's)
    python tools/train_demo.py --out glm4rt/demo_model  # ~50 min on 2 cores (--steps, --threads)
    python tools/train_demo.py --steps 20 --out /tmp/demo-smoke   # a quick functional check

The sources and their licences: ``glm4rt/demo_model/SOURCES.md``. Everything is seeded (``--seed``): the
split, the tokenizer, the initial weights and the batches; only torch's kernels may differ between
machines in the last bits.

What it makes (in ``--out``):
- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE (``tokenizers``, GLM-4's split
  regex) of ``--vocab`` entries trained on the training split, then the GLM-4 special tokens
  (``<|endoftext|>``, ``[gMASK]``, ``<sop>``, ``<|user|>``, ``<|assistant|>``, ``<|observation|>`` ...)
  after it, ``[gMASK]<sop>`` prepended to encoded text as GLM-4's tokenizer does, and the GLM-4-0414
  chat template (``tests/data/glm-4-0414.jinja``).
- ``model.safetensors`` (bf16) / ``config.json`` / ``generation_config.json``: GQA (8 query heads,
  2 key/value heads), partial rotary 0.5, q/k/v biases, GLM-4's sandwich norms, untied lm_head.
- ``training.json``: the settings, the loss curve and the held-out perplexity of the saved bf16
  weights (all of the held-out text, and each language's part).
- ``calibration.txt``: 40 chapters and 40 poems of the training split, the calibration text of
  ``glm4rt quantize --format q4k --calibration`` for this model (also alone: ``--calibration-only``).

The text is the Bible one chapter per document (its title, then one verse per line, without verse
numbers) and the poems one per document (title, author, lines). One chapter in 25 and one poem in
25 are held out. Chat turns rendered with the chat template are mixed in (a verse reference or a
poem's title from the user, its text from the assistant), so ``glm4rt chat`` answers in the same
manner.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np

from glm4rt.tokenizer_build import GLM4_SPECIAL_TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "tests", "data", "glm-4-0414.jinja")
POEMS = ["/usr/share/games/fortunes/tang300", "/usr/share/games/fortunes/song100"]
HELD_OUT_EVERY = 25  # one document in 25 is held out (the 13th of each 25)

# GLM-4's special tokens, in GLM-4's order (ids 151329.. there; here right after the BPE vocab).
SPECIAL_TOKENS = list(GLM4_SPECIAL_TOKENS)


# ---- the texts -----------------------------------------------------------------------------------

def bible_chapters() -> list[dict]:
    """Every chapter of the King James Bible: {"title": "Genesis 1", "verses": [...]}."""
    try:
        out = subprocess.run(["bible", "-l10000", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                             text=True).stdout
    except FileNotFoundError:
        sys.exit("the `bible` program is missing: apt-get install bible-kjv")
    chapters = []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            chapters[-1]["verses"].append(m.group(2).strip())
        else:
            chapters.append({"title": line.strip(), "verses": []})
    if len(chapters) != 1189 or sum(len(c["verses"]) for c in chapters) != 31102:
        sys.exit(f"unexpected Bible text: {len(chapters)} chapters")
    return chapters


def poems() -> list[dict]:
    """The Tang and Song poems of fortunes-zh: {"title", "author", "lines"}."""
    result = []
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    for path in POEMS:
        if not os.path.isfile(path):
            sys.exit(f"{path} is missing: apt-get install fortunes-zh")
        with open(path, encoding="utf-8") as f:
            entries = f.read().split("\n%\n")
        for entry in entries:
            lines = [ansi.sub("", x).strip() for x in entry.strip("%\n").splitlines()]
            lines = [x for x in lines if x]
            # tang300: 《title》 / 作者：name; song100: 题目:《title》 / 作者:name（dates）
            if len(lines) < 3:
                continue
            title = lines[0].removeprefix("题目:").removeprefix("题目：")
            m = re.match(r"^作者[:：](.+)$", lines[1])
            if not title.startswith("《") or not m:
                continue
            result.append({"title": title, "author": m.group(1), "lines": lines[2:]})
    return result


def chapter_text(c: dict) -> str:
    return c["title"] + "\n" + "\n".join(c["verses"]) + "\n"


def poem_text(p: dict) -> str:
    return f"{p['title']}\n作者：{p['author']}\n" + "\n".join(p["lines"]) + "\n"


def split(docs: list) -> tuple[list, list]:
    test = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY // 2]
    return train, test


# ---- the tokenizer -------------------------------------------------------------------------------

def build_tokenizer(out: str, texts: list[str], vocab: int) -> None:
    from tokenizers import pre_tokenizers, trainers

    from glm4rt.tokenizer_build import glm4_bpe, glm4_tokenizer_config, glm4_tokenizer_spec

    tok = glm4_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    first = tok.get_vocab_size()
    ids = {t: first + i for i, t in enumerate(SPECIAL_TOKENS)}
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(glm4_tokenizer_spec(tok, ids), f, ensure_ascii=False)
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(glm4_tokenizer_config(ids, template, 1024), f, ensure_ascii=False, indent=2)


# ---- training ------------------------------------------------------------------------------------

def chat_examples(chapters: list[dict], ps: list[dict], rng, n_verses: int) -> list[list[dict]]:
    """Conversations: a verse reference -> the verse; a poem's title -> the poem."""
    verses = [(c["title"], i, v) for c in chapters for i, v in enumerate(c["verses"])]
    chats = []
    for k in rng.choice(len(verses), size=min(n_verses, len(verses)), replace=False):
        title, i, verse = verses[k]
        chats.append([{"role": "user", "content": f"{title}:{i + 1}"}, {"role": "assistant", "content": verse}])
    for p in ps:
        chats.append([{"role": "user", "content": p["title"]},
                      {"role": "assistant", "content": poem_text(p)[len(p["title"]) + 1:].rstrip("\n")}])
    return chats


def encode_docs(tok, texts: list[str], chats: list[list[dict]], eos: int, user: int) -> list[list[int]]:
    docs = [tok.encode(t, add_special_tokens=True) + [eos] for t in texts]
    for messages in chats:
        ids = tok.apply_chat_template(messages)["input_ids"][0]
        docs.append(list(ids) + [user])  # the answer ends where the next user turn would begin
    return docs


def evaluate(model, docs: list[list[int]], seq: int) -> float:
    """Perplexity over every token of docs (each document on its own, in windows of seq)."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            for s in range(0, len(d) - 1, seq):
                window = torch.tensor(d[s:s + seq + 1])[None]
                logits = model(input_ids=window[:, :-1]).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
                n += window.shape[1] - 1
    return math.exp(nll / n)


CALIBRATION_DOCS = 40  # chapters and poems each, in calibration.txt


def calibration_text(seed: int = 0) -> str:
    """Calibration text for quantization (``glm4rt quantize --calibration``): CALIBRATION_DOCS
    chapters and as many poems of the training split, drawn with ``seed``, interleaved."""
    train_ch, _ = split(bible_chapters())
    train_ps, _ = split(poems())
    rng = np.random.default_rng(seed)
    ch = [chapter_text(train_ch[i]) for i in sorted(rng.choice(len(train_ch), CALIBRATION_DOCS, replace=False))]
    ps = [poem_text(train_ps[i]) for i in sorted(rng.choice(len(train_ps), CALIBRATION_DOCS, replace=False))]
    return "\n\n".join(d for pair in zip(ch, ps) for d in pair) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--calibration-only", action="store_true",
                   help="write only calibration.txt (training-split text for `glm4rt quantize --calibration`)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--eval-every", type=int, default=450, help="steps between held-out evaluations")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024,
                   help="tokens per sequence (the model's whole context: it does not generalise past the "
                        "positions it was trained on)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab", type=int, default=6128, help="BPE entries (the special tokens follow)")
    p.add_argument("--chat-verses", type=int, default=4000, help="verse-reference chats mixed in")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.calibration_only:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "calibration.txt"), "w", encoding="utf-8") as f:
            f.write(calibration_text(args.seed))
        return 0

    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    import glm4rt

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()

    chapters, ps = bible_chapters(), poems()
    train_ch, test_ch = split(chapters)
    train_ps, test_ps = split(ps)
    train_texts = [chapter_text(c) for c in train_ch] + [poem_text(x) for x in train_ps]
    build_tokenizer(args.out, train_texts, args.vocab)
    tok = glm4rt.Glm4Tokenizer.from_pretrained(args.out)
    eos, user = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|user|>")
    observation = tok.convert_tokens_to_ids("<|observation|>")
    vocab_size = 64 * math.ceil((args.vocab + len(SPECIAL_TOKENS)) / 64)  # rows past the tokens stay unused

    train = encode_docs(tok, train_texts, chat_examples(train_ch, train_ps, rng, args.chat_verses), eos, user)
    test_en = encode_docs(tok, [chapter_text(c) for c in test_ch], [], eos, user)
    test_zh = encode_docs(tok, [poem_text(x) for x in test_ps], [], eos, user)
    stream = np.concatenate([np.array(d, dtype=np.int64) for d in train])
    print(f"train: {len(train)} documents, {len(stream)} tokens; held out: {len(test_en)} chapters "
          f"({sum(map(len, test_en))} tokens), {len(test_zh)} poems ({sum(map(len, test_zh))} tokens)", flush=True)

    config = Glm4Config(vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5,
                        attention_bias=True, max_position_embeddings=args.seq, rms_norm_eps=1e-5, rope_theta=10000.0,
                        tie_word_embeddings=False, pad_token_id=eos, eos_token_id=[eos, user, observation],
                        bos_token_id=None)
    model = Glm4ForCausalLM(config)
    n_params = sum(t.numel() for t in model.parameters())
    decay = [t for n, t in model.named_parameters() if t.ndim == 2]
    no_decay = [t for n, t in model.named_parameters() if t.ndim != 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to a tenth
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    log = []
    model.train()
    for step in range(args.steps):
        starts = rng.integers(0, len(stream) - args.seq - 1, args.batch)
        batch = torch.from_numpy(np.stack([stream[s:s + args.seq + 1] for s in starts]))
        for g in optim.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss
        # transformers shifts the labels itself: labels == input_ids predicts each next token.
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "minutes": round((time.time() - start) / 60, 2)})
            if step % args.eval_every == 0 or step == args.steps - 1:  # to see over-fitting, if any
                model.eval()
                log[-1]["held_out_perplexity"] = round(evaluate(model, test_en + test_zh, args.seq), 3)
                model.train()
            print(json.dumps(log[-1]), flush=True)

    model.eval()
    model = model.to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eos, user, observation], "pad_token_id": eos, "do_sample": True,
                   "temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_length": 1024}, f, indent=2)
    # The shipped (bf16) weights, computed in fp32: what glm4rt's quantized formats are compared with.
    model = model.float()
    ppl_en, ppl_zh = evaluate(model, test_en, args.seq), evaluate(model, test_zh, args.seq)
    n_en, n_zh = sum(len(d) - 1 for d in test_en), sum(len(d) - 1 for d in test_zh)
    ppl = math.exp((n_en * math.log(ppl_en) + n_zh * math.log(ppl_zh)) / (n_en + n_zh))
    report = {"settings": vars(args), "parameters": n_params, "train_tokens": int(len(stream)),
              "tokens_seen": args.steps * args.batch * args.seq, "minutes": round((time.time() - start) / 60, 1),
              "torch": torch.__version__, "held_out_perplexity": round(ppl, 3),
              "held_out_perplexity_english": round(ppl_en, 3), "held_out_perplexity_chinese": round(ppl_zh, 3),
              "held_out_tokens": {"english": n_en, "chinese": n_zh}, "loss_curve": log}
    with open(os.path.join(args.out, "calibration.txt"), "w", encoding="utf-8") as f:
        f.write(calibration_text(args.seed))
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

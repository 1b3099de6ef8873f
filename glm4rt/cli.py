"""The ``glm4rt`` command line.

    glm4rt info --model DIR              config summary, parameters, memory, CPU path, threads,
                                         and a timed forward pass as a smoke test
    glm4rt generate --model DIR "text"   one reply (or a raw completion with --raw), streamed
    glm4rt chat --model DIR              interactive multi-turn chat; Ctrl-C stops the current
                                         reply, Ctrl-D or /exit leaves, /reset starts over
    glm4rt quantize SRC DST --format int4  write a quantized checkpoint (int4, int8 or q4k;
                                           q4k with --calibration TEXT: rounded by GPTQ)
    glm4rt export-gguf SRC DST.gguf        write a checkpoint as GGUF (llama.cpp, Ollama)
    glm4rt batch --model DIR --input IN.parquet --output OUT.parquet --task classify|score|generate
                                         a table of texts through a model, resumable, on Ray with
                                         --ray-address

DIR is a checkpoint directory or a Hugging Face hub id. Without --model, the commands run the demo
model shipped inside the package (``glm4rt.DEMO_MODEL``), which needs no network.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from . import ops
from .heads import Glm4ForCausalLM


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


DEMO_NOTICE = ("glm4rt: no --model given: using the demo model, a 7M-parameter GLM-4 trained on the King "
               "James Bible and Tang / Song poems (it writes in their manner and knows nothing else). For a "
               "real model pass --model with a checkpoint directory or a hub id, e.g. "
               "--model zai-org/GLM-4-9B-0414.")


def _resolve_model(args: argparse.Namespace) -> None:
    """``--model`` left out: the demo model, said on stderr."""
    if args.model is None:
        from .hub import DEMO_MODEL

        print(DEMO_NOTICE, file=sys.stderr)
        args.model, args.demo = DEMO_MODEL, True
    else:
        args.demo = False


def _load(args: argparse.Namespace):
    model = Glm4ForCausalLM.from_pretrained(args.model, dtype=args.dtype, quantization=args.quantization)
    from .tokenizer import Glm4Tokenizer

    tokenizer = Glm4Tokenizer.from_pretrained(model.checkpoint_dir)
    return model, tokenizer


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that were given; the rest come from the checkpoint's generation_config.json."""
    kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
          "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
          "seed": args.seed}
    if args.greedy:
        kw["do_sample"] = False
    elif args.sample:
        kw["do_sample"] = True
    return {k: v for k, v in kw.items() if v is not None}


class _ReplyPrinter:
    """Prints a streamed reply; GLM-Z1 thinking (up to ``</think>``) is shown apart from the answer."""

    def __init__(self, out, thinking: bool) -> None:
        self.out, self.thinking, self.pending = out, thinking, ""
        self.color = out.isatty()
        self.started = False  # the "[thinking]" header waits for the reply, which may never come

    def _start(self) -> None:
        if not self.started and self.thinking:
            self._write("[thinking]\n", dim=True)
        self.started = True

    def _write(self, text: str, dim: bool = False) -> None:
        if dim and self.color:
            text = f"\033[2m{text}\033[0m"
        self.out.write(text)
        self.out.flush()

    def put(self, piece: str) -> None:
        self._start()
        if not self.thinking:
            self._write(piece)
            return
        self.pending += piece
        if "</think>" in self.pending:
            before, after = self.pending.split("</think>", 1)
            self._write(before, dim=True)
            self._write("\n[/thinking]\n", dim=True)
            self.thinking, self.pending = False, ""
            self._write(after.lstrip("\n"))
        elif len(self.pending) > 8:  # keep a tail that might be the start of "</think>"
            self._write(self.pending[:-8], dim=True)
            self.pending = self.pending[-8:]

    def end(self) -> None:
        self._start()
        if self.pending:
            self._write(self.pending, dim=self.thinking)
        self._write("\n")


def cmd_info(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = Glm4ForCausalLM.from_pretrained(args.model, dtype=args.dtype, quantization=args.quantization)
    load_s = time.perf_counter() - t0
    c = model.config
    params = model.named_parameters()
    # Counted from the checkpoint tensors a Glm4ForCausalLM has (not the packed bytes it may hold).
    n_params = sum(int(np.prod(spec.shape)) for spec in Glm4ForCausalLM.tensor_specs(c).values())
    n_bytes = sum(a.nbytes for a in params.values())
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    quant = (getattr(c, "quantization_config", None) or {}).get("format")
    formats = sorted({"bf16" if a.dtype == np.uint16 else (quant or "uint8") if a.dtype == np.uint8
                      else str(a.dtype) for a in params.values()})
    print(f"model           {args.model}" + (" (the demo model)" if args.demo else ""))
    print(f"geometry        {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate "
          f"{c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads} kv, "
          f"head_dim {c.head_dim} (rotary {c.rotary_dim}), vocab {c.vocab_size}")
    print(f"context         {c.max_position_embeddings} positions, rope_theta {c.rope_theta}")
    print(f"parameters      {n_params:,} = {n_params / 1e9:.2f} B ({', '.join(formats)} weights, "
          f"{'tied' if c.tie_word_embeddings else 'untied'} lm_head)")
    print(f"memory          weights {_gib(n_bytes)}; KV cache {kv_per_token / 1024:.1f} KiB/token, "
          f"{_gib(kv_per_token * c.max_position_embeddings)} at full context")
    print(f"cpu             {ops.cpu_isa()} kernels (supported: {', '.join(ops.supported_isas())}), "
          f"{ops.get_num_threads()} threads")
    print(f"load time       {load_s:.2f} s")
    ids = np.array([[min(i, c.vocab_size - 1) for i in (151331, 151333, 151336)]])
    t0 = time.perf_counter()
    logits = model(ids, use_cache=False, logits_to_keep=1).logits
    print(f"smoke test      forward of {ids.shape[1]} tokens in {time.perf_counter() - t0:.3f} s, "
          f"next token {int(logits[0, -1].argmax())}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    model, tokenizer = _load(args)
    kwargs = _sampling_kwargs(args)
    prompt = _readable(args.prompt, sys.getfilesystemencoding(), "the prompt")
    if args.raw or tokenizer.chat_template is None:
        ids = np.array([tokenizer.encode(prompt)])
        printer = _ReplyPrinter(sys.stdout, thinking=False)
        pieces = model.stream(tokenizer, ids, **kwargs)
    else:
        session = ChatSession(model, tokenizer, system=_system_prompt(args), **kwargs)
        printer = _ReplyPrinter(sys.stdout, thinking=_opens_thinking(tokenizer, session, prompt))
        pieces = session.send(prompt)
    try:
        for piece in pieces:
            printer.put(piece)
    except KeyboardInterrupt:
        pass
    printer.end()
    return 0


def _readable(text: str, encoding: str, what: str) -> str:
    """``text`` from the command line or stdin with its undecodable bytes as U+FFFD, and a warning.

    Python keeps bytes that are not valid ``encoding`` as lone surrogates (``surrogateescape``),
    which no tokenizer can encode; replacing them lets the session go on with what could be read.
    """
    try:
        text.encode(encoding)
        return text
    except UnicodeEncodeError:
        pass
    print(f"glm4rt: warning: {what} is not valid {encoding}; undecodable bytes were replaced with U+FFFD",
          file=sys.stderr)
    return text.encode(encoding, "surrogateescape").decode(encoding, "replace")


def _system_prompt(args: argparse.Namespace) -> str | None:
    return None if args.system is None else _readable(args.system, sys.getfilesystemencoding(), "--system")


def _opens_thinking(tokenizer, session, message: str) -> bool:
    """Whether the prompt for ``message`` ends with ``<think>`` (GLM-Z1): the reply starts thinking."""
    messages = session.messages + [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(messages, tools=session.tools, add_generation_prompt=True, tokenize=False)
    return text.rstrip().endswith("<think>")


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    model, tokenizer = _load(args)
    system = _system_prompt(args)
    session = ChatSession(model, tokenizer, system=system, max_context=args.max_context, **_sampling_kwargs(args))
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes as surrogates, for _readable to replace
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"glm4rt chat ({args.model}, {ops.cpu_isa()}, {ops.get_num_threads()} threads). "
              "Ctrl-C stops a reply; /reset starts over; /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        line = _readable(line, sys.stdin.encoding or "utf-8", "an input line").strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset(system=system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        printer = _ReplyPrinter(sys.stdout, thinking=_opens_thinking(tokenizer, session, line))
        try:
            for piece in session.send(line):
                printer.put(piece)
        except KeyboardInterrupt:  # stop this reply, keep the session
            printer.end()
            print("(stopped)", file=sys.stderr)
            continue
        except ValueError as e:  # the message is refused (context full, ...); the session goes on
            if printer.started:
                printer.end()
            print(f"glm4rt: {e}", file=sys.stderr)
            continue
        printer.end()
    return 0


def _is_side_file(name: str) -> bool:
    """Files ``quantize`` copies from the source checkpoint: tokenizer, chat template, generation config."""
    return name.startswith("tokenizer") or name in ("generation_config.json", "chat_template.jinja",
                                                    "special_tokens_map.json")


def _prepare_output_dir(src: str, dst: str, force: bool) -> None:
    """Refuse to write over the source or, unless ``force``, into a non-empty directory; with
    ``force``, remove the files a stale checkpoint there would be read from instead of the new one
    (the loader prefers an index and its shards to ``model.safetensors``).

    Raises:
        FileExistsError: ``dst`` is a file, or a non-empty directory without ``force``.
        ValueError: ``dst`` is the source checkpoint.
    """
    import os

    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise FileExistsError(f"output {dst!r} exists and is not a directory")
    if os.path.isdir(src) and os.path.samefile(src, dst):
        raise ValueError(f"output directory {dst!r} is the source checkpoint: quantize into another directory")
    names = os.listdir(dst)
    if names and not force:
        raise FileExistsError(f"output directory {dst!r} is not empty ({len(names)} entries): pass --force to "
                              "write into it (its weights, config and tokenizer files are replaced)")
    for name in names:
        if name.endswith((".safetensors", ".safetensors.index.json")) or name == "config.json" or _is_side_file(name):
            os.remove(os.path.join(dst, name))


def cmd_quantize(args: argparse.Namespace) -> int:
    import os
    import shutil

    t0 = time.perf_counter()
    _prepare_output_dir(args.src, args.dst, args.force)
    if args.calibration is not None:
        from . import calibrate

        if args.format != "q4k":
            raise ValueError(f"--calibration rounds q4k weights (GPTQ); --format is {args.format}")
        with open(args.calibration, encoding="utf-8") as f:
            text = f.read()
        model = calibrate.quantize_gptq(args.src, text, max_tokens=args.calibration_tokens,
                                        log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
        # progress=None: a progress bar on a terminal only, never in a log or a pipe
        model = Glm4ForCausalLM.from_pretrained(args.src, quantization=args.format, progress=None)
    model.save_pretrained(args.dst)
    src_dir = model.checkpoint_dir
    for name in os.listdir(src_dir):
        if _is_side_file(name):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(args.dst, name))
    size = sum(os.path.getsize(os.path.join(args.dst, f)) for f in os.listdir(args.dst))
    print(f"quantized {args.src} -> {args.dst} ({args.format}, {size / 2**30:.2f} GiB) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from . import gguf_io
    from .tokenizer import Glm4Tokenizer

    t0 = time.perf_counter()
    if os.path.exists(args.dst) and not args.force:
        raise FileExistsError(f"{args.dst!r} exists: pass --force to replace it")
    if not args.dst.endswith(".gguf"):
        raise ValueError(f"the output {args.dst!r} must be a .gguf file name")
    model = Glm4ForCausalLM.from_pretrained(args.src, quantization=args.quantization, progress=None)
    tokenizer = Glm4Tokenizer.from_pretrained(model.checkpoint_dir)
    gguf_io.export_gguf(model, tokenizer, args.dst, name=os.path.basename(os.path.normpath(args.src)))
    print(f"exported {args.src} -> {args.dst} ({os.path.getsize(args.dst) / 2**30:.2f} GiB) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import run_server
    except ImportError as e:
        print(f"glm4rt: error: the server needs the 'server' extra (pip install 'glm4rt[server]'): {e}",
              file=sys.stderr)
        return 2
    from .engine import Glm4Engine

    model, tokenizer = _load(args)
    engine = Glm4Engine(model, tokenizer, parallel=args.parallel, ctx=args.ctx, prefill_chunk=args.prefill_chunk,
                        max_stall=args.max_stall, max_waiting=args.max_waiting)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"glm4rt: warning: listening on {args.host} without --api-key", file=sys.stderr)
    try:
        from .hub import DEMO_NAME

        name = args.served_model_name or (DEMO_NAME if args.demo else args.model)
        run_server(engine, tokenizer, name, host=args.host, port=args.port,
                   api_key=args.api_key)
    except KeyboardInterrupt:  # uvicorn passes Ctrl-C on after its clean shutdown
        pass
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_job

    if args.demo and args.task in ("classify", "token-classify"):
        raise ValueError(f"--task {args.task} needs --model: a checkpoint with a classification head")
    options = {"model": args.model, "text_column": args.text_column, "dtype": args.dtype,
               "quantization": args.quantization, "max_length": args.max_length,
               "max_batch_tokens": args.max_batch_tokens, "batch_invariant": not args.fast}
    if args.task == "generate":
        options.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, chat=not args.raw, parallel=args.parallel)
    if importlib.util.find_spec("pyarrow") is None:
        print("glm4rt: error: batch needs pyarrow (pip install 'glm4rt[batch]')", file=sys.stderr)
        return 2
    run_blocks = None
    if args.ray_address is not None:
        try:
            import ray

            from .integrations.ray import block_runner
        except ImportError as e:
            print(f"glm4rt: error: --ray-address needs the 'ray' extra (pip install 'glm4rt[ray]'): {e}",
                  file=sys.stderr)
            return 2
        if os.path.exists(args.model):  # the actors' working directory is not this one
            options["model"] = os.path.abspath(args.model)
        here = os.getcwd()
        # Ray puts the driver's working directory first on its workers' sys.path: a glm4rt source
        # checkout there (uncompiled) would shadow the installed package in every actor.
        os.chdir(tempfile.gettempdir())
        try:
            ray.init(address=None if args.ray_address == "local" else args.ray_address, log_to_driver=False)
        finally:
            os.chdir(here)
        run_blocks = block_runner(actors=args.actors, cpus_per_actor=args.cpus_per_actor)
    summary = run_job(args.input, args.output, args.task, options, block_rows=args.block_rows,
                      run_blocks=run_blocks, log=lambda s: print(f"glm4rt: {s}", file=sys.stderr, flush=True))
    print(f"{summary.rows} rows ({summary.blocks} blocks, {summary.blocks_done_before} done before) -> "
          f"{args.output} in {summary.seconds:.1f} s ({summary.rows / max(summary.seconds, 1e-9):.1f} rows/s)")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or Hugging Face hub id (default: the demo model in the package)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight format in memory: auto (default) keeps the checkpoint's, float32 / bfloat16 "
                        "force one; bf16 weights multiply bf16-rounded activations with fp32 sums, "
                        "float32 computes exactly in fp32")
    p.add_argument("--quantization", default=None, choices=["int4", "int8", "q4k"],
                   help="quantize while loading (a checkpoint saved quantized needs no flag)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit (default: 1024)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always take the most likely token")
    mode.add_argument("--sample", action="store_true", help="sample (default: generation_config.json)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same reply)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4rt", description="GLM-4 inference on the CPU")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe a checkpoint and run a smoke-test forward pass")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate a reply to one prompt")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (reads stdin)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--max-context", type=int, default=None, help="conversation length limit in tokens")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the 'server' extra)")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    serve.add_argument("--parallel", type=int, default=4, help="requests decoded together (default 4)")
    serve.add_argument("--ctx", type=int, default=None,
                       help="tokens per request, prompt and answer (default: the model's, at most 4096)")
    serve.add_argument("--prefill-chunk", type=int, default=512,
                       help="prompt tokens per step at most (default 512); while other requests decode, "
                            "chunks are sized so that their steps take at most --max-stall times longer")
    serve.add_argument("--max-stall", type=float, default=2.5,
                       help="how much slower running streams may get while a new prompt is read (default 2.5)")
    serve.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429 (default 64)")
    serve.add_argument("--served-model-name", default=None, help="model id in the API (default: --model)")
    serve.set_defaults(func=cmd_serve)

    batch = sub.add_parser("batch", help="run a Parquet file of texts through a model (resumable; Ray optional)")
    _add_model_args(batch)
    batch.add_argument("--input", required=True, help="Parquet file with a text column")
    batch.add_argument("--output", required=True,
                       help="Parquet file to write: the input's columns and the results, in input order")
    batch.add_argument("--task", required=True, choices=["classify", "token-classify", "score", "generate"],
                       help="classify: label and probabilities (a sequence-classification checkpoint); "
                            "token-classify: a label per token; score: log-likelihood and perplexity of "
                            "each text (causal LM); generate: a reply to each text")
    batch.add_argument("--text-column", default="text", help="the column of texts (default: text)")
    batch.add_argument("--block-rows", type=int, default=1024,
                       help="rows per block (default 1024); finished blocks are kept in OUTPUT.parts/ and "
                            "not redone when a stopped job is run again")
    batch.add_argument("--max-length", type=int, default=None,
                       help="cut texts to this many tokens (default: refuse texts longer than the model's context)")
    batch.add_argument("--max-batch-tokens", type=int, default=2048,
                       help="padded tokens per forward pass (rows are grouped by length)")
    batch.add_argument("--fast", action="store_true",
                       help="leave batch-invariant mode: faster prompts on AMX CPUs, but a row's last bits "
                            "then depend on the rows batched with it")
    batch.add_argument("--max-new-tokens", type=int, default=256, help="generate: reply length limit (default 256)")
    batch.add_argument("--temperature", type=float, default=0.0, help="generate: 0 (default) is greedy")
    batch.add_argument("--top-p", type=float, default=1.0)
    batch.add_argument("--seed", type=int, default=None, help="generate: sampling seed (mixed with each text)")
    batch.add_argument("--raw", action="store_true", help="generate: continue the raw text, no chat template")
    batch.add_argument("--parallel", type=int, default=8, help="generate: sequences decoded together (default 8)")
    batch.add_argument("--ray-address", default=None,
                       help="run on Ray: 'auto' (the running cluster), 'local' (start one here) or an address")
    batch.add_argument("--actors", type=int, default=1, help="Ray: model actors (default 1)")
    batch.add_argument("--cpus-per-actor", type=float, default=1,
                       help="Ray: CPUs each actor reserves and runs kernel threads on (default 1)")
    batch.set_defaults(func=cmd_batch)

    quant = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (loads by memory map)")
    quant.add_argument("src", help="checkpoint directory or Hugging Face hub id (bf16 / fp32)")
    quant.add_argument("dst", help="output directory")
    quant.add_argument("--format", default="int4", choices=["int4", "int8", "q4k"],
                       help="int4 (4.5 bits/weight, as Q4_0), int8 (8.5, as Q8_0), q4k (4.625, Q4_K's "
                            "structure; best 4-bit quality with --calibration)")
    quant.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                       help="q4k: round with GPTQ on this UTF-8 text (a few thousand tokens or more, like what "
                            "the model will read; the demo model ships glm4rt/demo_model/calibration.txt)")
    quant.add_argument("--calibration-tokens", type=int, default=32768, help="tokens of the text used")
    quant.add_argument("--force", action="store_true",
                       help="write into a non-empty output directory, replacing its checkpoint files")
    quant.set_defaults(func=cmd_quantize)

    export = sub.add_parser("export-gguf", help="write a checkpoint as a GGUF file for llama.cpp / Ollama")
    export.add_argument("src", help="checkpoint directory or hub id (float, or quantized by glm4rt)")
    export.add_argument("dst", help="output .gguf file")
    export.add_argument("--quantization", default=None, choices=["int4", "int8", "q4k"],
                        help="quantize a float checkpoint first: int8 -> Q8_0, int4 -> Q4_0 (exact), q4k -> "
                             "Q4_K (sub-scales rounded to 6 bits); default: as stored (float -> F32 / BF16)")
    export.add_argument("--force", action="store_true", help="replace an existing output file")
    export.set_defaults(func=cmd_export_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``glm4rt`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", "unset") is None:
        args.max_new_tokens = 1024
    if hasattr(sys.stdout, "reconfigure"):  # a reply a non-UTF-8 terminal cannot show must not end the session
        sys.stdout.reconfigure(errors="replace")
    try:
        if args.threads is not None:
            ops.set_num_threads(args.threads)
        if hasattr(args, "model"):
            _resolve_model(args)
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`glm4rt info ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 1
    except (OSError, ValueError) as e:  # bad path, corrupt checkpoint, unsupported config, bad flag
        print(f"glm4rt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

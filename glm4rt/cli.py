"""The ``glm4rt`` command line.

    glm4rt info --model DIR_OR_HUB_ID    config summary, parameters, memory, CPU path, threads,
                                         and a timed forward pass as a smoke test
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import ops
from .heads import Glm4ForCausalLM


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = Glm4ForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    c = model.config
    params = model.named_parameters()
    n_params = sum(a.size for a in params.values())
    n_bytes = sum(a.nbytes for a in params.values())
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    formats = sorted({"bf16" if a.dtype == np.uint16 else str(a.dtype) for a in params.values()})
    print(f"model           {args.model}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4rt", description="GLM-4 inference on the CPU")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a checkpoint and run a smoke-test forward pass")
    info.add_argument("--model", required=True, help="checkpoint directory or Hugging Face hub id")
    info.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``glm4rt`` console script."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        ops.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (OSError, ValueError) as e:  # bad path, corrupt checkpoint, unsupported config
        print(f"glm4rt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

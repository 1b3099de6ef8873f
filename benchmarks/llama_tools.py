"""llama.cpp's own tools, from the llama.cpp sources that the llama-cpp-python sdist vendors: the
Hugging Face -> GGUF converter (``convert_hf_to_gguf.py``) and the built programs (``llama-server``,
``llama-quantize``), fetched and built once into ``benchmarks/cache/``.

    python benchmarks/llama_tools.py convert CKPT OUT.gguf --outtype f32|f16|bf16|q8_0
    python benchmarks/llama_tools.py quantize IN.gguf OUT.gguf Q4_K_M

The converter recognises a tokenizer's pre-tokenizer (which split regex llama.cpp applies before
BPE) by the hash of its output on a fixed text, and knows only published tokenizers. The demo
model's and the tests' tokenizers split with GLM-4's own regex but have other vocabularies, so the
converter is told "glm4" for them; ``convert`` checks first that the tokenizer's split regex is
GLM-4's, and glm4rt's tests compare llama.cpp's tokens with the Hugging Face tokenizer's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

from glm4rt.tokenizer import GLM4_SPLIT_REGEX

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
WORK = os.path.join(CACHE, "llama-server")  # the sdist, its sources and the build (first used by serve.py)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama_cpp_sources() -> str:
    """The vendored llama.cpp directory of the llama-cpp-python sdist (downloaded once)."""
    os.makedirs(WORK, exist_ok=True)
    found = [os.path.join(WORK, d, "vendor", "llama.cpp") for d in sorted(os.listdir(WORK))
             if os.path.isdir(os.path.join(WORK, d, "vendor", "llama.cpp"))]
    if found:
        return found[0]
    say(f"downloading the {LLAMA_CPP_PYTHON} sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--no-build-isolation", LLAMA_CPP_PYTHON, "-d", WORK], check=True)
    sdist = next(os.path.join(WORK, f) for f in os.listdir(WORK) if f.endswith(".tar.gz"))
    with tarfile.open(sdist) as t:
        t.extractall(WORK, filter="data")
    return llama_cpp_sources()


def build_program(name: str) -> str:
    """A llama.cpp program (``llama-server``, ``llama-quantize``) built for this CPU, cached in
    ``benchmarks/cache/llama-server/bin`` with the shared libraries it needs."""
    out = os.path.join(WORK, "bin", name)
    if os.path.isfile(out):
        return out
    src, build = llama_cpp_sources(), os.path.join(WORK, "build")
    say(f"building {name} (the first program takes ~10 min on 2 cores)")
    subprocess.run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DGGML_NATIVE=ON"], check=True)
    subprocess.run(["cmake", "--build", build, "--target", name, "-j", str(os.cpu_count() or 2)], check=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copy(os.path.join(build, "bin", name), out)
    for lib in os.listdir(os.path.join(build, "bin")):  # the shared ggml / llama libraries
        if ".so" in lib:
            shutil.copy(os.path.join(build, "bin", lib), os.path.dirname(out))
    return out


def open_llama(path: str, **kwargs):
    """``llama_cpp.Llama(path, **kwargs)`` without llama.cpp's "extra buffer types" (the AMX and
    repacked CPU weight layouts): on a Xeon with AMX (Sapphire Rapids class), llama.cpp 0.3.36's AMX
    buffer crashes the process (SIGSEGV) on the demo model's Q8_0 weights at the first eval; the
    plain CPU path computes the same products."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(path, **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


def run_program(name: str, *args: str) -> None:
    binary = build_program(name)
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(binary))
    subprocess.run([binary, *args], check=True, env=env)


# Run inside the converter's process: its pre-tokenizer lookup answers "glm4" (see the docstring).
_CONVERT = """
import sys
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(ckpt: str, out: str, outtype: str = "f32") -> str:
    """``convert_hf_to_gguf.py ckpt --outfile out --outtype outtype`` (llama.cpp's converter)."""
    with open(os.path.join(ckpt, "tokenizer.json"), encoding="utf-8") as f:
        pre = json.load(f).get("pre_tokenizer") or {}
    regexes = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre])]
    if GLM4_SPLIT_REGEX not in regexes:
        raise ValueError(f"{ckpt}: the tokenizer does not split with GLM-4's regex; llama.cpp's glm4 "
                         "pre-tokenizer would not match it")
    script = os.path.join(llama_cpp_sources(), "convert_hf_to_gguf.py")
    subprocess.run([sys.executable, "-c", _CONVERT, script, ckpt, "--outfile", out, "--outtype", outtype],
                   check=True, cwd=os.path.dirname(script))
    return out


def quantize(src: str, dst: str, qtype: str) -> str:
    """``llama-quantize src dst qtype`` (e.g. Q4_0, Q4_K_M, IQ4_NL, Q8_0)."""
    run_program("llama-quantize", src, dst, qtype)
    return dst


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("ckpt")
    c.add_argument("out")
    c.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("qtype")
    args = p.parse_args(argv)
    if args.cmd == "convert":
        convert(args.ckpt, args.out, args.outtype)
    else:
        quantize(args.src, args.dst, args.qtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's checkpoint and GGUF writers (benchmarks/synth.py) on a tiny geometry: glm4rt
loads the checkpoint, the GGUF holds the same weights under llama.cpp's glm4 names, and (when
llama-cpp-python is installed) llama.cpp computes glm4rt's logits from it."""
import json
import os
import statistics
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import synth  # noqa: E402

import glm4rt  # noqa: E402

TINY = synth.Geometry(num_hidden_layers=2, hidden_size=128, intermediate_size=320, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=151552)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bench") / "ckpt")
    synth.write_checkpoint(d, TINY, seed=3, max_shard_bytes=20_000_000, log=lambda *_: None)
    return d


def _ids(n=24):
    return np.random.default_rng(0).integers(0, 151329, size=(1, n))


def test_checkpoint_is_sharded_official_dialect_and_loads(tiny_ckpt):
    files = os.listdir(tiny_ckpt)
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    with open(os.path.join(tiny_ckpt, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["rope_theta"] == 10000.0 and cfg["partial_rotary_factor"] == 0.5  # top level, as published
    assert "rope_parameters" not in cfg
    model = glm4rt.Glm4ForCausalLM.from_pretrained(tiny_ckpt, dtype="float32", progress=False)
    assert model.config.rotary_dim == 16 and model.config.rms_norm_eps == 1e-5
    # the stored values are the generator's, bit for bit
    plan = synth.tensor_plan(TINY)
    idx = [n for n, *_ in plan].index("model.layers.1.mlp.down_proj.weight")
    _, shape, _, mean, std = plan[idx]
    expected = np.concatenate(list(synth._generate_bf16(shape, mean, std, 3, idx))).reshape(shape)
    got = model.named_parameters()["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(synth.f32_to_bf16(got), expected)
    logits = model(_ids()).logits
    assert np.isfinite(logits).all()
    assert 2.0 < logits.std(axis=-1).mean() < 8.0  # the peaked distribution the quality report relies on


def test_gguf_names_types_and_values(tiny_ckpt, tmp_path):
    gguf = pytest.importorskip("gguf", reason="benchmark peer tools: pip install .[bench]")
    expected_names = {synth.gguf_name(n) for n, *_ in synth.tensor_plan(TINY)}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_up.weight",
            "blk.0.attn_q.bias", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= expected_names
    ckpt = glm4rt.weights.Checkpoint(tiny_ckpt)
    for fmt, qtype, tol in (("bf16", "BF16", 0.0), ("int8", "Q8_0", 0.01), ("int4", "Q4_0", 0.2)):
        path = synth.write_gguf(tiny_ckpt, fmt, str(tmp_path / f"{fmt}.gguf"), log=lambda *_: None)
        r = gguf.GGUFReader(path)
        tensors = {t.name: t for t in r.tensors}
        assert set(tensors) == expected_names
        assert tensors["blk.0.ffn_up.weight"].tensor_type.name == qtype
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        # ggml order: ne0 = row length
        assert list(tensors["blk.0.ffn_up.weight"].shape) == [TINY.hidden_size, 2 * TINY.intermediate_size]
        w = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, tensors["blk.0.ffn_up.weight"].tensor_type)
        ref = ckpt.load("model.layers.0.mlp.gate_up_proj.weight", "float32")
        err = np.abs(w.reshape(ref.shape) - ref).max() / np.abs(ref).max()
        assert err <= tol, (fmt, err)
        fields = r.fields
        assert int(fields["glm4.rope.dimension_count"].parts[-1][0]) == TINY.rotary_dim
        assert int(fields["glm4.block_count"].parts[-1][0]) == TINY.num_hidden_layers
        tok = fields["tokenizer.ggml.tokens"]
        assert bytes(tok.parts[tok.data[151331]]).decode() == "[gMASK]"
        assert bytes(tok.parts[tok.data[151329]]).decode() == "<|endoftext|>"
        assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 151329


def test_llama_cpp_computes_glm4rt_logits(tiny_ckpt, tmp_path):
    pytest.importorskip("gguf", reason="benchmark peer tools: pip install .[bench]")
    llama_cpp = pytest.importorskip("llama_cpp", reason="benchmark peer: pip install .[bench]")
    ids = _ids()
    ref = glm4rt.Glm4ForCausalLM.from_pretrained(tiny_ckpt, dtype="float32", progress=False)(ids).logits[0]
    path = synth.write_gguf(tiny_ckpt, "f32", str(tmp_path / "f32.gguf"), log=lambda *_: None)
    llm = llama_cpp.Llama(path, n_ctx=64, n_threads=1, logits_all=True, flash_attn=True, verbose=False)
    assert llm.n_vocab() == TINY.vocab_size
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[: ids.shape[1]])
    rel = np.sqrt(((got - ref) ** 2).mean() / (ref ** 2).mean())
    # f32 weights: only llama.cpp's f16 KV cache separates the two (biases, sandwich norms, partial
    # interleaved rotary or the fused gate_up mapped wrongly would give errors of 10% and more)
    assert rel < 5e-3, rel
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_serve_worker_times_prefill_and_decodes_greedily(tiny_ckpt):
    """The benchmark's lockstep worker (workers.py --serve): loads, answers commands, and its decode
    from a prepared depth is glm4rt's own greedy continuation."""
    import bench

    n_ids = 40
    spec = {"engine": "glm4rt", "format": "fp32", "checkpoint": tiny_ckpt, "threads": [1],
            "capacity": 64, "n_ids": n_ids}
    server = bench.Server(spec, timeout=300)
    try:
        hello = server.hello()
        assert hello["status"] == "ok", hello
        assert hello["weight_bytes"] > 0
        assert server.call(op="threads", n=1)["first_call"] is True
        early = server.call(op="decode", depth=0, steps=1, resume=True)
        assert early["status"] == "error" and "resume before any decode" in early["reason"]
        assert server.call(op="prefill", n=16)["s"] > 0
        prep = server.call(op="prepare_depth", depth=20)
        dec = server.call(op="decode", depth=20, steps=5)
        again = server.call(op="decode", depth=20, steps=5)
        first = server.call(op="decode", depth=20, steps=2)  # the same 5 steps in two slices
        rest = server.call(op="decode", depth=20, steps=3, resume=True)
        bad = server.call(op="nonsense")
        fin = server.call(op="finish")
    finally:
        server.close()
    assert bad["status"] == "error" and "nonsense" in bad["reason"]
    assert fin["peak_rss_bytes"] > 0
    assert dec["tokens"] == again["tokens"]  # the cache was rewound to the prepared depth
    assert first["tokens"] + rest["tokens"] == dec["tokens"]  # resume went on from the 2nd token
    assert bench.merge_slices([first, rest]) == {"status": "ok", "s": first["s"] + rest["s"],
                                                 "tokens": dec["tokens"]}

    from workers import prompt_ids
    model = glm4rt.Glm4ForCausalLM.from_pretrained(tiny_ckpt, dtype="float32", progress=False)
    seq = list(prompt_ids(n_ids)[:20])
    for _ in range(6):
        seq.append(int(model(np.array([seq])).logits[0, -1].argmax()))
    assert [prep["first"]] + dec["tokens"] == seq[20:]


def test_paired_ratios_and_bandwidth_share():
    import bench

    assert bench.split_steps(64, 8) == [8] * 8
    assert bench.split_steps(10, 4) == [3, 3, 2, 2]
    assert bench.split_steps(5, 1) == [5]
    # glm4rt 2x as fast in the first pair, 1.5x in the second: the median of the pair ratios
    assert bench.per_rep_ratios([1.0, 2.0], [2.0, 3.0]) == [2.0, 1.5]
    run = {"weight_bytes": 2e9,
           "threads": {"2": {"decode_s": {"0": [1.0, 0.5]}, "probe_gb_s": {"decode 0": [40.0, 50.0]}}}}
    # 10 tok/s x 2 GB = 20 GB/s of 40 -> 0.5; 20 tok/s x 2 GB = 40 GB/s of 50 -> 0.8
    assert bench.bw_fraction(run, "2", 0, steps=10) == pytest.approx(0.65)


def test_gemv_benchmark_engines_compute_the_same_products(monkeypatch):
    """benchmarks/gemv.py times what it claims: every engine's one-token products of the same
    matrices (small shapes here) agree with float64 on the bf16 values (int8/int4 to their
    quantization error)."""
    import gemv

    monkeypatch.setattr(gemv, "SHAPES", [(48, 64), (40, 96)])
    bf16 = gemv._bf16_matrices(2, seed=5)
    try:
        import torch  # noqa: F401
        with_torch = True
    except ImportError:
        with_torch = False
    engines = gemv._engines(bf16, with_torch)
    assert set(engines) >= {"glm4rt bf16", "glm4rt int8", "glm4rt int4"}
    assert engines["glm4rt bf16"][0] == sum(w.nbytes for w in bf16) == 2 * 2 * (48 * 64 + 40 * 96)
    assert engines["glm4rt int4"][0] < engines["glm4rt int8"][0] < engines["glm4rt bf16"][0]
    xs = gemv._inputs()
    refs = [glm4rt.ops.bf16_to_f32(w).astype(np.float64) @ xs[w.shape[1]][0].astype(np.float64) for w in bf16]
    tol = {"glm4rt bf16": 0.006, "torch bf16": 0.006, "glm4rt int8": 0.02, "glm4rt int4": 0.15}
    for name, (_, run) in engines.items():
        outs = run()
        for y, ref in zip(outs, refs):
            y = np.asarray(y.float() if hasattr(y, "float") else y, dtype=np.float64).reshape(-1)
            err = np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref ** 2))
            assert err < tol[name], (name, err)


def _fake_run(engine, fmt, label, decode_s):
    """A measured run as bench.run_group stores it: decode times (64 steps) per setting."""
    threads = {setting: {"prefill_s": {}, "decode_s": {"0": times}, "prefill_tok_s": {},
                         "decode_tok_s": {"0": 64 / statistics.median(times)}, "probe_gb_s": {"decode 0": [40.0] * len(times)}}
               for setting, times in decode_s.items()}
    return {"engine": engine, "format": fmt, "label": label, "group": 0, "status": "ok", "load_s": 1.0,
            "peak_rss_bytes": 2**30, "weight_bytes": 2e9, "threads": threads}


def test_load_table_compares_busy_settings():
    import bench

    settings = {"threads": [1, 2], "load": ["idle", "busy"], "prompt_lengths": [], "depth": 0, "decode_steps": 64,
                "decode_slices": 1, "reps": 2, "formats": ["int4"], "tf_formats": [], "quick": False,
                "geometry": TINY.__dict__, "checkpoint": ROOT, "llama_flash_attn": True}
    runs = [_fake_run("glm4rt", "int4", "int4", {"1": [4.0, 4.0], "2": [2.0, 2.0], "1 busy": [4.0, 4.0],
                                                 "2 busy": [8.0, 8.0]}),
            _fake_run("llama", "int4", "Q4_0", {"1": [6.0, 6.0], "2": [4.0, 4.0], "1 busy": [6.0, 6.0],
                                                "2 busy": [16.0, 16.0]})]
    md = bench.render_markdown({"settings": settings, "machine": {}, "date": "d", "command": "c", "runs": runs})
    table = md.split("## Under load")[1].split("\n## ")[0]
    # glm4rt: 16 / 32 / 16 / 8 tok/s; 2 threads under load reach half of the best (1 thread)
    assert "| glm4rt | int4 | decode d0 | 16.00 | 32.00 | 16.00 | 8.00 | 0.50x |" in table
    assert "| llama.cpp | Q4_0 | decode d0 | 10.67 | 16.00 | 10.67 | 4.00 | 0.38x |" in table
    ratios = md.split("## Speed ratios")[1].split("\n## ")[0]
    assert "| glm4rt int4 / llama.cpp Q4_0 | 2 busy | 2.00x |" in ratios
    assert bench.setting_label(2, "idle") == "2" and bench.setting_label(2, "busy") == "2 busy"
    assert sorted(["2 busy", "1", "2", "1 busy"], key=bench.setting_order) == ["1", "2", "1 busy", "2 busy"]


def test_busy_core_burns_cpu_and_stops():
    import time

    import bench

    def cpu_s(pid):
        with open(f"/proc/{pid}/stat") as f:
            return sum(int(x) for x in f.read().split(")")[1].split()[11:13]) / os.sysconf("SC_CLK_TCK")

    with bench.BusyCore(True, limit_s=30) as busy:
        start, t0 = cpu_s(busy.proc.pid), time.monotonic()
        while cpu_s(busy.proc.pid) - start < 0.3 and time.monotonic() - t0 < 10:  # a loaded machine shares
            time.sleep(0.1)
        assert cpu_s(busy.proc.pid) - start >= 0.3  # it computes, it does not sleep
    assert busy.proc.poll() is not None  # killed on exit
    with bench.BusyCore(False, limit_s=30) as idle:
        assert idle.proc is None


def test_llama_convert_tells_the_converter_glm4_only_for_glm4s_split_regex(tmp_path):
    """benchmarks/llama_tools.py answers the converter's pre-tokenizer lookup with "glm4": only for a
    tokenizer that splits with GLM-4's regex (the demo model's), never for another."""
    import llama_tools

    with open(os.path.join(glm4rt.DEMO_MODEL, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    regexes = [p["pattern"]["Regex"] for p in spec["pre_tokenizer"]["pretokenizers"] if "pattern" in p]
    assert regexes == [glm4rt.tokenizer.GLM4_SPLIT_REGEX]
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="GLM-4's regex"):
        llama_tools.convert(str(tmp_path), str(tmp_path / "out.gguf"))

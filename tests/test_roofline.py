"""The roofline tool: model/step formulas against hand-computed Llama-3-8B numbers, bound selection, the CLI."""
import json
import sys

import pytest

from llmkern import cpu, measure, perf, roofline
from llmkern.bench import common
from llmkern.cli import main
from llmkern.models import MODELS, get_model

L3 = get_model("llama-3-8b")

# Llama-3-8B by hand (config.json: hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab
# 128256, untied):
EMB = 128256 * 4096                                        # 525,336,576 (embedding; the LM head is as big)
ATTN = 4096 * 4096 * 2 + 2 * 4096 * 1024                   # q, o + k, v = 41,943,040
MLP = 3 * 4096 * 14336                                     # 176,160,768
LINEAR = 32 * (ATTN + MLP)                                 # 6,979,321,856
NORMS = 32 * 2 * 4096 + 4096                               # two per layer + the final one
PARAMS = LINEAR + NORMS + 2 * EMB                          # 8,030,261,248: Meta's "8.03B"
KV_TOKEN = 2 * 32 * 8 * 128 * 2                            # K and V, 32 layers, 8 heads x 128, bf16 = 131,072


def test_llama3_8b_sizes():
    assert L3.param_count() == PARAMS == 8_030_261_248
    assert roofline.weight_bytes(L3) == 2 * PARAMS          # ~16.06e9 in bf16
    assert roofline.kv_bytes_per_token(L3) == KV_TOKEN
    assert roofline.kv_cache_bytes(L3, 16, 4096) == 16 * 4096 * KV_TOKEN


def test_llama3_8b_decode_step():
    b, ctx = 16, 4096
    step = roofline.decode_step(L3, b, ctx)
    lin = 2 * (LINEAR * b + EMB * b)                       # every linear + the LM head, per sequence
    attn = 4 * 32 * 128 * ctx * 32 * b                     # QK^T and PV: 4 FLOPs/pair/head_dim, 32 heads, 32 layers
    assert step.flops == pytest.approx(lin + attn, rel=1e-12)
    weights = 2 * (LINEAR + NORMS + EMB + b * 4096)        # LM head whole, embedding only the 16 rows looked up
    kv = b * ctx * KV_TOKEN + b * KV_TOKEN                 # read the cache, write the new token's K/V
    assert step.bytes == pytest.approx(weights + kv, rel=1e-12)
    h100 = perf.resolve_device("h100")
    bound = roofline.bound(step, h100)
    assert bound["bound"] == "memory"
    assert bound["time_s"] == pytest.approx((weights + kv) / 3350e9, rel=1e-12)
    assert bound["tokens_per_s"] == pytest.approx(b / bound["time_s"])


def test_fp8_kv_cache_bill():
    """An fp8 cache (one byte per element) halves the KV bytes of both steps; decode at batch 64, context 8k is
    mostly cache, so its memory-bound time drops by most of that."""
    b, ctx = 64, 8192
    bf16, fp8 = roofline.decode_step(L3, b, ctx), roofline.decode_step(L3, b, ctx, kv_elem=1)
    assert fp8.kv_bytes == bf16.kv_bytes / 2 == (b * ctx + b) * KV_TOKEN / 2
    assert fp8.weight_bytes == bf16.weight_bytes and fp8.flops == bf16.flops
    assert roofline.prefill_step(L3, 2, 1024, kv_elem=1).kv_bytes == 2 * 1024 * KV_TOKEN / 2
    h100 = perf.resolve_device("h100")
    speedup = roofline.bound(bf16, h100)["time_s"] / roofline.bound(fp8, h100)["time_s"]
    assert speedup == pytest.approx(bf16.bytes / fp8.bytes) and 1.6 < speedup < 1.8


def test_llama3_8b_prefill_step():
    b, ctx = 2, 1024
    step = roofline.prefill_step(L3, b, ctx)
    lin = 2 * (LINEAR * b * ctx + EMB * b)                 # the LM head only for each prompt's last token
    attn = 4 * 32 * 128 * (ctx * (ctx + 1) // 2) * 32 * b  # causal pairs
    assert step.flops == pytest.approx(lin + attn, rel=1e-12)
    assert step.bytes == pytest.approx(2 * (LINEAR + NORMS + EMB + b * ctx * 4096) + b * ctx * KV_TOKEN, rel=1e-12)
    assert roofline.bound(step, perf.resolve_device("h100"))["bound"] == "compute"


def test_bound_selection_and_ridge():
    h100 = perf.DEVICES["h100-sxm"]
    assert roofline.ridge_point(h100) == pytest.approx(989.5e12 / 3350e9)
    # Decode intensity grows ~ batch FLOP/byte (2 FLOPs per 2-byte weight per sequence): past the ridge (~295)
    # a huge batch over a short context becomes compute-bound; int4 weights quarter the bytes, so they get there
    # sooner.
    assert roofline.bound(roofline.decode_step(L3, 64, 128), h100)["bound"] == "memory"
    assert roofline.bound(roofline.decode_step(L3, 1024, 16), h100)["bound"] == "compute"
    s16, s4 = roofline.decode_step(L3, 128, 16), roofline.decode_step(L3, 128, 16, bits=4)
    assert s4.intensity > 3 * s16.intensity
    # A long context makes decode KV-bound: the cache dwarfs the weights, and the step's intensity tends to the
    # attention's own: 4 * heads * head_dim FLOPs per 2 * kv_heads * head_dim * 2 bytes = heads / kv_heads = 4.
    long = roofline.decode_step(L3, 64, 32768)
    assert long.kv_bytes > 10 * long.weight_bytes
    assert long.attention_flops / long.kv_bytes == pytest.approx(4.0, rel=1e-3)
    assert 4.0 < long.intensity < 8.0


def test_int4_weight_bytes():
    # Packed 4-bit weights, a bf16 scale and a 4-bit zero point per group of 128 inputs, per output column.
    per_weight = 0.5 + (2 + 0.5) / 128
    assert roofline.linear_weight_bytes(L3, bits=4) == pytest.approx(LINEAR * per_weight, rel=1e-12)
    assert roofline.weight_bytes(L3, bits=4) == pytest.approx(LINEAR * per_weight + 2 * (NORMS + 2 * EMB))


def test_other_models():
    gemma = get_model("gemma-2-9b")
    # Tied embeddings: stored once, and a step reads the whole table (it is the LM head).
    assert gemma.lm_head_params() == 0
    assert roofline.step_weight_bytes(gemma, 1) - roofline.linear_weight_bytes(gemma) == pytest.approx(
        2 * (256000 * 3584 + 42 * 4 * 3584 + 3584))
    # Gemma-2-9B has 9.24B parameters (its model card).
    assert gemma.param_count() == pytest.approx(9.24e9, rel=0.005)
    # Mistral's sliding window caps every layer's cache at 4096 tokens.
    mistral = get_model("mistral")
    assert roofline.kv_cache_bytes(mistral, 1, 8192) == roofline.kv_cache_bytes(mistral, 1, 4096)
    # Published sizes (model cards): Llama-3-70B 70.6B, Mistral-7B 7.24B, Qwen2.5-7B 7.61B.
    for name, n in (("llama-3-70b", 70.55e9), ("mistral-7b", 7.24e9), ("qwen2.5-7b", 7.62e9)):
        assert MODELS[name].param_count() == pytest.approx(n, rel=0.005), name
    with pytest.raises(ValueError, match="unknown model"):
        get_model("gpt-5")


def test_moe_models():
    """Mixtral-8x7B and Qwen3-30B-A3B: total and active parameters as published, and the decode bill by batch."""
    mixtral, qwen3 = get_model("mixtral-8x7b"), get_model("qwen3-30b-a3b")
    # "46.7B total, 12.9B active" (Mistral AI); "30.5B total, 3.3B activated" (the Qwen3 model card)
    assert mixtral.param_count() == pytest.approx(46.7e9, rel=0.002)
    assert mixtral.active_param_count() == pytest.approx(12.9e9, rel=0.005)
    assert qwen3.param_count() == pytest.approx(30.5e9, rel=0.002)
    assert qwen3.active_param_count() == pytest.approx(3.3e9, rel=0.02)
    # Mixtral by hand: attention 41,943,040 per layer as Llama-3-8B's; an expert 3 x 4096 x 14336; the router 8 x 4096
    expert, router = 3 * 4096 * 14336, 8 * 4096
    assert roofline.experts_touched(mixtral, 1) == pytest.approx(2.0)
    assert roofline.experts_touched(mixtral, 16) == pytest.approx(8 * (1 - 0.75 ** 16))
    assert roofline.experts_touched(mixtral, 4096) == pytest.approx(8.0)
    one = roofline.decode_step(mixtral, 1, 1)
    norms = 32 * (2 * 4096 + router) + 4096
    # bf16: two experts per layer, the LM head whole, one embedding row
    assert one.weight_bytes == pytest.approx(2 * (32 * (ATTN + 2 * expert) + norms + 32000 * 4096 + 4096), rel=1e-12)
    assert one.linear_flops == pytest.approx(2 * (32 * (ATTN + 2 * expert + router) + 32000 * 4096), rel=1e-12)
    # the weight bytes per step grow with the batch; FLOPs per token do not
    b16 = roofline.decode_step(mixtral, 16, 1)
    assert b16.weight_bytes / one.weight_bytes > 3.5 and b16.linear_flops == pytest.approx(16 * one.linear_flops)
    assert roofline.weight_bytes(mixtral) == pytest.approx(2 * mixtral.param_count(), rel=1e-12)



def test_deepseek_v3_mla():
    """DeepSeek-V3 (config.json; MLA, 3 dense layers then MoE with one shared expert): "671B total parameters with
    37B activated for each token" (arXiv 2412.19437), the issue's cache bill (512 + 64) x 2 bytes x 61 layers, and
    the absorbed decode's attention FLOPs by hand."""
    ds = get_model("deepseek-v3")
    assert ds.param_count() == pytest.approx(671e9, rel=0.001)
    assert ds.active_param_count() == pytest.approx(37e9, rel=0.02)
    # attention by hand: q_a 7168x1536, q_b 1536x(128x192), kv_a 7168x576, kv_b 512x(128x256), o (128x128)x7168
    attn = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert ds.attn_params() == attn == 187_105_280
    assert roofline.kv_bytes_per_token(ds) == (512 + 64) * 2 * 61 == 70_272
    assert roofline.mha_kv_bytes_per_token(ds) == 61 * 128 * (192 + 128) * 2
    b, ctx = 4, 4096
    step = roofline.decode_step(ds, b, ctx)
    assert step.kv_bytes == pytest.approx(b * (ctx + 1) * 70_272)
    # absorbed: per pair, head and layer 2 x (512 + 64) for the scores and 2 x 512 for the output
    assert step.attention_flops == pytest.approx(b * ctx * 61 * 128 * 2 * (2 * 512 + 64))
    expert, dense = 3 * 7168 * 2048, 3 * 7168 * 18432
    active = 61 * attn + 3 * dense + 58 * (9 * expert + 256 * 7168)
    assert step.linear_flops == pytest.approx(2 * b * (active + 129280 * 7168))
    # prefill decompresses K (192) and V (128) per head
    pre = roofline.prefill_step(ds, 1, 16)
    assert pre.attention_flops == pytest.approx(16 * 17 / 2 * 61 * 128 * 2 * (192 + 128))
    assert roofline.weight_bytes(ds) == pytest.approx(2 * ds.param_count(), rel=1e-12)

def test_causal_pairs_closed_form_matches_perf():
    for seqlen, window in ((1, None), (17, None), (17, 5), (9, 9), (9, 20)):
        lw = -1 if window is None else window - 1
        assert roofline._causal_pairs(seqlen, window) == perf.attention_pairs(seqlen, seqlen, causal=True,
                                                                                window=(lw, 0))


def test_resolve_device():
    assert perf.resolve_device("h100") is perf.DEVICES["h100-sxm"]
    assert perf.resolve_device("A100") is perf.DEVICES["a100-80gb"]
    assert perf.resolve_device("h200") is perf.DEVICES["h200"]
    with pytest.raises(ValueError, match="unknown device"):
        perf.resolve_device("tpu-v5")


def test_cli(capsys):
    assert main(["roofline", "--model", "llama-3-8b", "--device", "h100", "--batch", "16", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "16.06 GB" in out and "131.07 kB" in out and "8.59 GB" in out
    prefill = next(line for line in out.splitlines() if line.strip().startswith("prefill"))
    decode = next(line for line in out.splitlines() if line.strip().startswith("decode"))
    assert "compute" in prefill and "memory" in decode
    assert main(["roofline", "--model", "llama-3-8b", "--device", "h100", "--bits", "4"]) == 0
    assert "int4" in capsys.readouterr().out
    assert main(["roofline", "--model", "mixtral", "--device", "h100", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "12.88 B active per token" in out and "MoE saves compute, not memory" in out and "<- --batch" in out
    assert main(["roofline", "--model", "deepseek-v3", "--device", "h200", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "70.27 kB" in out and "MLA latent 512 + rope 64" in out and "71x less" in out
    assert main(["roofline", "--model", "llama-3-8b", "--device", "h100", "--kv-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "KV cache fp8" in out and "65.54 kB, fp8" in out and "4.29 GB" in out    # half of bf16's 131.07 kB, 8.59 GB
    assert main(["roofline", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    # the group sizes quantize_weight supports (-1: per output channel), and only with --bits 4/8
    assert main(["roofline", "--bits", "4", "--group-size", "-1"]) == 0
    assert "int4 (group -1)" in capsys.readouterr().out
    for bad in ("7", "1"):
        with pytest.raises(SystemExit) as e:
            main(["roofline", "--bits", "4", "--group-size", bad])
        assert e.value.code == 2 and "--group-size" in capsys.readouterr().err
    assert main(["roofline", "--group-size", "64"]) == 2
    assert "--group-size needs --bits" in capsys.readouterr().err


def _records():
    return [
        {"op": "matmul", "impl": "llmkern", "shape": {}, "device": "NVIDIA H100 80GB HBM3", "median_ms": 1.0,
         "flops": 2e11, "bytes": 1e9},
        {"op": "decode", "impl": "llmkern", "shape": {}, "device": "NVIDIA H100 80GB HBM3", "median_ms": 1.0,
         "flops": 1e9, "bytes": 2e9},
        {"op": "sample", "impl": "llmkern", "shape": {}, "device": "CPU (x86_64, 2 threads)", "median_ms": 0.5,
         "flops": 0.0, "bytes": 1e6},
    ]


def test_summary_table():
    lines = common.summary_table(_records()).splitlines()
    assert len(lines) == 5
    matmul, decode, sample = lines[2:]
    # 2e11 FLOPs / 989.5 TFLOP/s = 0.2021 ms < 1e9 B / 3350 GB/s = 0.2985 ms: memory binds, 29.85% of 1 ms.
    assert "memory" in matmul and "0.2985" in matmul and "29.9%" in matmul
    assert "memory" in decode and "0.5970" in decode
    assert sample.split()[-2:] == ["-", "-"]          # CPU record: no peak, no roofline columns
    # A fixed device overrides the records' names.
    assert "memory" in common.summary_table(_records()[2:], device="h100").splitlines()[2]


def test_plot_needs_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # as if not installed
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        roofline.plot(str(tmp_path / "r.png"), perf.DEVICES["h100-sxm"])


def test_plot_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot is optional; pip install matplotlib to test it")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"environment": {}, "suites": ["x"], "records": _records()}))
    png = tmp_path / "roof.png"
    rc = main(["roofline", "--model", "qwen2.5-7b", "--device", "h100", "--plot", str(png),
               "--bench-json", str(bench)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "2 measured points" in out and "1 records without FLOPs" in out


@pytest.mark.parametrize("case", ["missing", "not-bench", "no-folder", "no-plot"])
def test_plot_cli_bad_inputs(tmp_path, capsys, case):
    """A bad --plot / --bench-json is a one-line error and exit code 2, before the report (no traceback)."""
    not_bench = tmp_path / "x.json"
    not_bench.write_text(json.dumps({"records": 5}))
    png = str(tmp_path / "r.png")
    argv = {"missing": ["--plot", png, "--bench-json", str(tmp_path / "none.json")],
            "not-bench": ["--plot", png, "--bench-json", str(not_bench)],
            "no-folder": ["--plot", str(tmp_path / "no" / "r.png")],
            "no-plot": ["--bench-json", str(not_bench)]}[case]
    assert main(["roofline", "--model", "qwen2.5-7b", "--device", "h100", *argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("llmkern roofline: --") and err.count("\n") == 1 and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("argv", [["bench", "layers", "--json", "{missing}/r.json"],
                                  ["bench", "layers", "--tuned-configs", "{missing}/t.json"],
                                  ["check-compile", "--json", "{missing}/c.json"]])
def test_output_path_in_a_missing_folder_fails_before_running(tmp_path, capsys, monkeypatch, argv):
    """An output file whose folder does not exist is a one-line error and exit code 2 before any suite or compile
    runs (it used to surface as a FileNotFoundError after the whole run, losing its results)."""
    from llmkern.bench import layers
    from llmkern import compile_check
    ran = []
    monkeypatch.setattr(layers, "cases", lambda *a: ran.append("bench") or [])
    monkeypatch.setattr(compile_check, "run", lambda *a, **k: ran.append("compile") or [])
    assert main([a.format(missing=tmp_path / "no") for a in argv]) == 2
    out, err = capsys.readouterr()
    assert ran == [] and err.startswith(f"llmkern {argv[0]}: --") and "does not exist" in err
    assert "Traceback" not in err


# Small sizes: these check the plumbing, not the figures (a 2-core machine shared with other jobs).
_QUICK = {"copy_bytes": 4 << 20, "matmul_n": 128, "reps": 2}


def test_cpu_measured_roof_is_stream(monkeypatch):
    """On CPU the memory roof is the C++ STREAM read rate; without the C++ backend, a torch copy."""
    roof = measure.measure_roofs("cpu", **_QUICK)
    assert roof.read_gbps > 0 and roof.triad_gbps > 0 and roof.copy_gbps > 0 and roof.matmul_dtype == "float32"
    assert roof.as_peak().hbm_gbps == roof.read_gbps and "STREAM" in roof.method
    assert measure.MeasuredRoof.from_dict(roof.to_dict()) == roof
    monkeypatch.setenv(cpu.BACKEND_ENV, "reference")
    copied = measure.measure_roofs("cpu", **_QUICK)
    assert copied.read_gbps is None and copied.as_peak().hbm_gbps == copied.copy_gbps and "copies" in copied.method


def test_cli_measure(monkeypatch, capsys):
    real = measure.measure_roofs
    monkeypatch.setattr(measure, "measure_roofs", lambda device=None: real("cpu", **_QUICK))
    assert main(["roofline", "--measure", "--model", "llama-3-8b", "--batch", "1", "--context", "512"]) == 0
    out = capsys.readouterr().out
    assert "measured roofs: CPU" in out and "STREAM read" in out and "datasheet: none" in out
    assert "on CPU" in out and "(measured)" in out
    assert main(["roofline", "--measure", "--device", "h200", "--model", "llama-3-8b"]) == 0
    assert "datasheet: NVIDIA H200 SXM: 4800 GB/s" in capsys.readouterr().out

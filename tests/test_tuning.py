"""Tuned configs: bucketed tuning keys, shipped JSON files (load, lookup, errors), the winners `llmkern bench` writes,
and the compile specs check-compile builds from a file. A small hand-written file stands in for a GPU's."""
import json

import pytest
import torch
import triton

from llmkern import tuning
from llmkern.kernels.attention import attention_fwd_kernel

ATTN, GEMM = tuning.KERNELS["attention_fwd"], tuning.KERNELS["quant_gemm"]

GPU = "NVIDIA Test GPU"
ATTN_KEY = {"head_dim": 128, "dtype": "bfloat16", "varlen": False, "softcap": False, "lse": False, "alibi": False,
            "sinks": False, "seqlen_q": 1024}
GEMM_KEY = {"dtype": "float16", "bits": 4, "n": 4096, "k": 4096, "m": 64}
ATTN_CFG = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
GEMM_CFG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _write(path, kernels, device=GPU, arch="sm_90"):
    path.write_text(json.dumps({"device": device, "arch": arch, "triton": triton.__version__, "kernels": kernels}))
    return str(path)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A fresh table holding one hand-written file, and fresh autotuner caches for the two tuned kernels."""
    table = tuning.TunedConfigs()
    table.load([_write(tmp_path / "gpu.json", {"attention_fwd": [{"key": ATTN_KEY, "config": ATTN_CFG}],
                                                "quant_gemm": [{"key": GEMM_KEY, "config": GEMM_CFG}]})])
    monkeypatch.setattr(tuning, "SHIPPED", table)
    for tuned in (ATTN, GEMM):
        monkeypatch.setattr(tuned, "tuners", {})
    return table


def _attn(seqlen_q, device=GPU, head_dim=128):
    return ATTN.get_for(device, head_dim=head_dim, dtype=torch.bfloat16, varlen=False, softcap=False,
                        lse=False, alibi=False, sinks=False, seqlen_q=seqlen_q)


def test_bucket():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 100, 128, 129, 5000)] == [1, 1, 2, 4, 128, 128, 256, 8192]
    assert tuning.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"


def test_shipped_config_replaces_autotuning_for_its_key(shipped):
    tuner = _attn(700)                                       # 700 tokens: the 1024 bucket of the file's entry
    assert [tuning.config_to_json(c) for c in tuner.llmkern_configs] == [ATTN_CFG]
    assert _attn(1024) is tuner                              # one autotuner per key, made once
    full = ATTN.configs({"head_dim": 128, "dtype": torch.bfloat16})
    assert _attn(1025).llmkern_configs == full               # the next bucket autotunes over the whole list
    assert _attn(700, device="NVIDIA Other GPU").llmkern_configs == full
    assert _attn(700, head_dim=64).llmkern_configs == ATTN.configs({"head_dim": 64, "dtype": torch.bfloat16})
    assert len(full) > 1 and full != ATTN.configs({"head_dim": 64, "dtype": torch.bfloat16})
    gemm = GEMM.get_for(GPU, dtype=torch.float16, bits=4, n=4096, k=4096, m=33)   # M 33 -> bucket 64
    assert [tuning.config_to_json(c) for c in gemm.llmkern_configs] == [GEMM_CFG]
    all_gemm = GEMM.configs({})
    assert len(all_gemm) > 1
    assert GEMM.get_for(GPU, dtype=torch.float16, bits=4, n=4096, k=4096, m=65).llmkern_configs == all_gemm
    tuning.use_shipped(False)                                # what `llmkern bench --tuned-configs` does
    try:
        assert _attn(700).llmkern_configs == full
    finally:
        tuning.use_shipped(True)


def test_check_compile_builds_every_shipped_entry(shipped):
    specs = list(tuning.compile_specs())
    assert len(specs) == 2 and all(s.archs == (90,) for s in specs)
    attn = next(s for s in specs if s.name == "attention_fwd")
    assert attn.kernel is attention_fwd_kernel and "tuned:NVIDIA_Test_GPU" in attn.config
    assert {k: attn.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "HEAD_DIM")} == {"BLOCK_M": 128, "BLOCK_N": 32,
                                                                                   "HEAD_DIM": 128}
    assert attn.num_warps == 8 and attn.num_stages == 3 and attn.signature["Q"] == "*bf16:16"
    gemm = next(s for s in specs if s.name == "quant_gemm")
    assert gemm.constexprs["BLOCK_M"] == 128 and gemm.signature["x_ptr"] == "*fp16:16"


def test_winners_round_trip(shipped, tmp_path):
    """What bench writes is what a later import reads back; a second run merges into the same file."""
    tuner = _attn(3000)                                      # bucket 4096: no shipped entry, a real autotuner
    chosen = ATTN.configs({"head_dim": 128, "dtype": torch.bfloat16})[1]
    tuner.cache = {("torch.bfloat16",): chosen}              # as triton's Autotuner records its winner
    out = tmp_path / "out"
    out.mkdir()
    path, count = tuning.save_winners(str(out), GPU, "sm_90")
    assert count == 1 and path == str(out / "NVIDIA_Test_GPU.json")
    gemm = GEMM.get_for(GPU, dtype=torch.float16, bits=8, n=256, k=512, m=300)
    gemm.cache = {("torch.float16",): GEMM.configs({})[0]}
    assert tuning.save_winners(path, GPU, "sm_90") == (path, 2)
    table = tuning.TunedConfigs()
    table.load([path])
    key = {**ATTN_KEY, "dtype": torch.bfloat16, "seqlen_q": 4096}
    assert tuning.config_to_json(table.lookup(GPU, "attention_fwd", key).config) == tuning.config_to_json(chosen)
    gkey = {"dtype": torch.float16, "bits": 8, "n": 256, "k": 512, "m": 512}
    assert table.lookup(GPU, "quant_gemm", gkey) is not None and table.arch[GPU] == 90


def test_bad_files(tmp_path, shipped):
    table = tuning.TunedConfigs()
    with pytest.raises(ValueError, match="arch"):
        table.load_file(_write(tmp_path / "a.json", {}, arch="90"))
    with pytest.raises(ValueError, match="dtype"):
        table.load_file(_write(tmp_path / "b.json", {"attention_fwd": [{"key": {**ATTN_KEY, "dtype": "f16"},
                                                                         "config": ATTN_CFG}]}))
    with pytest.raises(ValueError, match="config"):
        table.load_file(_write(tmp_path / "c.json", {"attention_fwd": [{"key": ATTN_KEY, "config": {"BLOCK_M": "x"}}]}))
    # tile names the kernel does not have: refused when the key is first launched, naming the file
    shipped.load_file(_write(tmp_path / "d.json", {"attention_fwd": [{"key": ATTN_KEY, "config": {"BLOCK_Q": 64}}]}))
    with pytest.raises(ValueError, match="d.json"):
        _attn(1000)
    with pytest.raises(ValueError, match="d.json"):
        list(tuning.compile_specs())
    shipped.table.clear()
    shipped.load_file(_write(tmp_path / "e.json", {"no_such_kernel": [{"key": {"m": 1}, "config": {"X": 1}}]}))
    with pytest.raises(KeyError, match="no_such_kernel"):
        list(tuning.compile_specs())

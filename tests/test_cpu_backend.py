"""The C++ CPU backend's machinery (llmkern.cpu): the build really uses the vector ISA, the backend switch, and the
fallback to the reference when the build fails. The ops themselves are tested by the kernel test modules, which
run their matrices on the C++ backend too (tests/conftest.py, `cpu_backends`).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import use_cpp_backend
from llmkern import cpu


def test_build_uses_the_vector_isa(monkeypatch):
    """The library reports what the compiler really saw: the ISA torch runs its own kernels with (AVX2: 8 fp32
    lanes, AVX-512: 16) and OpenMP on Linux; a build without those macros would report 'default' and serial."""
    use_cpp_backend(monkeypatch)
    info = cpu.build_info()
    isa = cpu.cpu_isa()
    lanes = {"avx512": 16, "avx2": 8}.get(isa)
    assert info.startswith(isa), info
    if lanes is not None:
        assert f"{lanes} fp32 lanes" in info, info
    if sys.platform.startswith("linux"):
        assert info.endswith("openmp"), info
    assert cpu.plan().library.is_file()


def test_backend_switch(monkeypatch):
    monkeypatch.setenv(cpu.BACKEND_ENV, "reference")
    assert cpu.kernel("rms_norm") is None
    monkeypatch.setenv(cpu.BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match=cpu.BACKEND_ENV):
        cpu.kernel("rms_norm")
    monkeypatch.setenv(cpu.BACKEND_ENV, "auto")
    assert cpu.kernel("no_such_op") is None
    monkeypatch.setenv("LLMKERN_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="LLMKERN_CPU_ISA"):
        cpu.plan()


def test_measure_stream(monkeypatch):
    use_cpp_backend(monkeypatch)
    r = cpu.measure_stream(array_bytes=4 * 2 ** 20, reps=2)
    assert r["read_gbps"] > 0 and r["copy_gbps"] > 0 and r["triad_gbps"] > 0
    assert r["threads"] == torch.get_num_threads() and r["array_bytes"] <= 4 * 2 ** 20


# A fresh process per case: a build is tried once per process, and a loaded library stays loaded.
_FALLBACK = textwrap.dedent("""
    import warnings, torch, llmkern
    from llmkern import cpu, reference
    x, w = torch.randn(3, 64), torch.randn(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu.kernel("rms_norm") is None and cpu.kernel("rope") is None
        y = llmkern.rms_norm(x, w)
    msgs = [str(c.message) for c in caught if "C++ CPU backend" in str(c.message)]
    assert len(msgs) == 1, msgs                      # one warning, however many ops asked
    assert torch.equal(y, reference.rms_norm(x, w))  # the reference served the op
    print(msgs[0])
    import os
    os.environ["LLMKERN_CPU_BACKEND"] = "cpp"        # required: the same failure raises
    try:
        cpu.kernel("rms_norm")
    except cpu.BuildError as e:
        print("raised:", e.cause)
""")


def _run_fallback(tmp_path, cxx: str) -> str:
    env = dict(os.environ, CXX=cxx, LLMKERN_CACHE_DIR=str(tmp_path / "cache"), LLMKERN_CPU_BACKEND="auto")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_no_compiler_falls_back_to_reference(tmp_path):
    out = _run_fallback(tmp_path, "/nonexistent/bin/c++")
    assert "no C++ compiler" in out and "/nonexistent/bin/c++" in out
    assert "raised: no C++ compiler" in out


def test_compile_error_falls_back_to_reference(tmp_path, monkeypatch):
    """A compiler that answers --version but fails every compile: the warning quotes its error and the build log
    holds the full output. The build directory holds the lock file of a killed build (cpp_extension's, which it
    never releases): the build goes ahead (it used to wait forever)."""
    from llmkern import cpu
    fake = tmp_path / "broken-c++"
    fake.write_text('#!/bin/sh\ncase "$*" in *" -c "*) echo "fake.cpp:1:1: error: simulated compiler failure"; '
                    'exit 1;; esac\nexec c++ "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("LLMKERN_CACHE_DIR", str(tmp_path / "cache"))      # as _run_fallback's child sees them
    cpu.plan().directory.mkdir(parents=True)
    (cpu.plan().directory / "lock").touch()
    out = _run_fallback(tmp_path, str(fake))
    assert "error: simulated compiler failure" in out
    log = out.split("build log: ")[1].split(")")[0]
    assert "simulated compiler failure" in open(log).read()
    assert "raised: the build failed" in out


def test_build_ext_command(monkeypatch, capsys):
    """`llmkern build-ext` prints where the library is and how it was compiled (here: already built, cached)."""
    from llmkern import cli
    use_cpp_backend(monkeypatch)
    assert cli.main(["build-ext"]) == 0
    out = capsys.readouterr().out
    assert str(cpu.plan().library) in out and cpu.build_info() in out

"""`train.precision=auto` takes bf16 only where the CPU computes it natively: on a CPU with plain
AVX512 oneDNN emulates bf16, and training was 2.7x slower than in fp32."""

from pathlib import Path

import pytest
import torch

from erde.device import resolve_precision

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.is_file(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_instructions():
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])  # the choices of train.precision
def test_a_named_precision_passes_through(name):
    assert resolve_precision(name, torch.device("cpu")) == name

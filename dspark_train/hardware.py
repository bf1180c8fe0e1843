"""Hardware-aware defaults (docs/lab-notes.md, 2026-11-30): the precision this machine computes fast, and the
machine key a measured cost curve belongs to.

bf16 halves the bytes a one-token decode step reads, so that step (memory bound) is faster in bf16 almost
everywhere. Matmuls over many tokens (training, prefill, verifying a draft) are compute bound, and a CPU without
bf16 units emulates them: on an AVX2-only AMD EPYC a bf16 batched forward is ~6× slower than fp32 and verifying
16 tokens costs 6× a step (fp32: 1.9×), so speculative decoding cannot win there in bf16. `auto` therefore picks
bf16 only where the hardware computes it (CUDA GPUs with bf16; CPUs with AMX or AVX512-BF16) and fp32
otherwise; fp16 only when asked. Every caller (target loading, training mixed precision, calibration, eval)
asks `resolve_dtype` / `resolve_mixed_precision`, which return the choice with its reason, for the run to record.

What was detected is a small frozen dataclass (`Capabilities`), so tests hand in any machine. torch is imported
only inside `detect`.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 flags of CPUs that compute bf16 matmuls in hardware
KEY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # the flags that decide matmul speed
AUTO_DTYPES = ("float32", "bfloat16")  # what auto picks from; float16 only when asked


@dataclass(frozen=True)
class Capabilities:
    """The machine a model runs on, as far as its speed goes."""

    device: str  # "cpu" | "cuda"
    name: str  # CPU model name (/proc/cpuinfo) or GPU name
    flags: tuple[str, ...] = ()  # which of KEY_FLAGS the CPU has (empty on a GPU)
    threads: int = 1  # torch intra-op threads (CPU work)
    cuda_bf16: bool = False  # the GPU computes bf16 natively (compute capability ≥ 8.0)

    @property
    def bf16(self) -> bool:
        """bf16 in hardware: the GPU's own, or AMX / AVX512-BF16 on the CPU."""
        if self.device == "cuda":
            return self.cuda_bf16
        return any(f in self.flags for f in CPU_BF16_FLAGS)

    def describe(self) -> str:
        """One line for logs and reports, e.g. "cpu: AMD EPYC (avx2; no amx_bf16/avx512_bf16), 2 threads"."""
        if self.device == "cuda":
            return f"cuda: {self.name} ({'bf16' if self.cuda_bf16 else 'no bf16'})"
        have = ", ".join(self.flags) or "none of " + "/".join(KEY_FLAGS)
        bf16 = "" if self.bf16 else "; no " + "/".join(CPU_BF16_FLAGS)
        return f"cpu: {self.name} ({have}{bf16}), {self.threads} thread{'s' if self.threads != 1 else ''}"

    @property
    def slug(self) -> str:
        """A short file-name label for results: vendor/family and what computes bf16, e.g. intel-xeon-amx,
        amd-epyc-avx512bf16, amd-epyc-avx2 (the three 2-core kinds seen), or the GPU's name."""
        import re
        words = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*|\d+-core", " ", self.name.lower()).split()
        family = "-".join(w for w in words[:3] if w.isalpha())[:24] or self.device
        if self.device == "cuda":
            return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        isa = "amx" if "amx_bf16" in self.flags else "avx512bf16" if "avx512_bf16" in self.flags else \
            "avx512" if "avx512f" in self.flags else "avx2" if "avx2" in self.flags else "cpu"
        return f"{family}-{isa}"

    def key(self, dtype: str) -> dict:
        """The machine key a cost curve SPS(B) is measured and recorded under: device, model name, the flags that
        matter, thread count (CPU only: a GPU's cost does not depend on it) and the dtype."""
        return {"device": self.device, "name": self.name, "flags": list(self.flags),
                "threads": self.threads if self.device == "cpu" else None, "dtype": dtype}

    def to_dict(self) -> dict:
        return {**asdict(self), "flags": list(self.flags), "bf16": self.bf16}

    @classmethod
    def from_dict(cls, d: dict) -> "Capabilities":
        """Back from `to_dict` (a report or calibration.json record)."""
        return cls(d["device"], d["name"], tuple(d.get("flags") or ()), int(d.get("threads") or 1),
                   bool(d.get("cuda_bf16")))


@lru_cache(maxsize=None)
def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, tuple[str, ...]]:
    """(model name, which KEY_FLAGS are present) from /proc/cpuinfo; elsewhere the platform's processor name
    and no flags (so `auto` stays on fp32)."""
    name, flags = "", set()
    p = Path(path)
    if p.is_file():
        for line in p.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "model name" and not name:
                name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    name = name or platform.processor() or platform.machine() or "unknown cpu"
    return name, tuple(f for f in KEY_FLAGS if f in flags)


def detect(device: Optional[str] = None) -> Capabilities:
    """This machine's capabilities for `device` ("cpu" or "cuda"; default: cuda when available, else cpu)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device).split(":")[0]
    if device == "cuda":
        return Capabilities("cuda", torch.cuda.get_device_name(), threads=torch.get_num_threads(),
                            cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    name, flags = cpu_info()
    return Capabilities("cpu", name, flags, torch.get_num_threads())


@dataclass(frozen=True)
class Choice:
    """A resolved setting: what was asked (`setting`), what was chosen (`value`) and why (`reason`)."""

    setting: str
    value: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.setting} → {self.value} ({self.reason})"


def _why(caps: Capabilities) -> str:
    """Why bf16 is (not) native here, e.g. "cpu: AMD EPYC has no amx_bf16/avx512_bf16"."""
    if caps.device == "cuda":
        return f"cuda: {caps.name} " + ("computes bf16" if caps.bf16 else "has no native bf16")
    if caps.bf16:
        return f"cpu: {caps.name} has " + "/".join(f for f in CPU_BF16_FLAGS if f in caps.flags)
    return f"cpu: {caps.name} has no " + "/".join(CPU_BF16_FLAGS)


def resolve_dtype(setting: str, caps: Optional[Capabilities] = None) -> Choice:
    """`target.dtype` / `calibrate.dtype` / `dspark eval --dtype`: "auto" → bfloat16 where the hardware computes
    bf16, float32 otherwise; an explicit dtype is kept (the reason warns when bf16 would be emulated)."""
    caps = caps or detect()
    if setting != "auto":
        slow = setting == "bfloat16" and not caps.bf16
        return Choice(setting, setting, "asked for" + (f"; {_why(caps)}: bf16 matmuls are emulated (slow; auto "
                                                        "would pick float32)" if slow else ""))
    dtype = "bfloat16" if caps.bf16 else "float32"
    return Choice("auto", dtype, f"{_why(caps)} → {dtype}")


def resolve_mixed_precision(setting: str, caps: Optional[Capabilities] = None) -> Choice:
    """`train.mixed_precision` for accelerate: "auto" → "bf16" where the hardware computes bf16, else "no"."""
    if setting != "auto":
        return Choice(setting, setting, "asked for")
    caps = caps or detect()
    return Choice("auto", "bf16" if caps.bf16 else "no",
                  f"{_why(caps)} → " + ("bf16 autocast" if caps.bf16 else "fp32 training"))


def run_record(device_type: str, target_precision, mixed_precision: str) -> dict:
    """The machine and what `auto` chose on it, with the reasons: printed, written as recipe.yaml's header
    comment and into train_summary.json (the recipe itself keeps `auto`, so it stays portable)."""
    caps = detect(device_type)
    return {"machine": caps.describe(), "target_dtype": target_precision.to_dict(),
            "mixed_precision": resolve_mixed_precision(mixed_precision, caps).to_dict()}


def record_lines(record: dict) -> list[str]:
    """`run_record` as lines: "machine: …", "target_dtype: auto → float32 (why)", "mixed_precision: …"."""
    return [f"machine: {record['machine']}"] + [f"{k}: {v['setting']} → {v['value']} ({v['reason']})"
                                                for k, v in record.items() if isinstance(v, dict)]

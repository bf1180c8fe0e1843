"""`make engine-check`'s speculators half for an EAGLE-3 export: speculators' own Eagle3DraftModel, loaded from
`dspark export --format speculators` of a fresh drafter on SmolLM2-135M, computes our draft logits (every
training-time-test step, at fixed anchors) to 1e-4 in fp32. Needs the engine venv (`make engine-check` builds
.venv-engine; DSPARK_ENGINE_PY names another interpreter with speculators 0.9), so slow and skipped without it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENGINE_PY = Path(os.environ.get("DSPARK_ENGINE_PY", REPO / ".venv-engine" / "bin" / "python"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
@pytest.mark.skipif(not ENGINE_PY.is_file(), reason=f"no engine venv at {ENGINE_PY} (make engine-check builds it)")
def test_speculators_eagle3_class_computes_our_logits(tmp_path):
    def run(python, phase, *args):
        p = subprocess.run([str(python), "-m", "bench.engine_check", phase, "--out", str(tmp_path), *args], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    run(sys.executable, "prepare", "--drafters", "eagle3")
    out = run(ENGINE_PY, "engine")
    line = next(x for x in out.splitlines() if x.startswith("[a] speculators Eagle3DraftModel"))
    assert line.endswith("OK (tolerance 0.0001)") and "engine-check: PASS" in out, out

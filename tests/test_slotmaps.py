"""Per-slot calibration maps (slotmaps.py, sts.fit_maps): every kind is order-preserving, isotonic fixes a
non-sigmoidal miscalibration that STS cannot, the map choice is cross-fitted on held-out texts (never on a fold's
own rows, never on in-sample ECE), and calibration.json carries the maps into the decoder's confidence exactly,
while a format-1 file (STS only) still loads."""
import json

import numpy as np
import pytest

from dspark_train.calibration import sts as S
from dspark_train.policy.calibration import FORMAT_VERSION, Calibration
from dspark_train.layout import ArtifactError
from dspark_train.calibration.metrics import ece
from dspark_train.policy.slotmaps import SlotMap, conditional, read_maps, sigmoid, sts_maps, survival

GRID = [0.25 * i for i in range(1, 41)]


def _fitted(z, y, a, kind):
    return {"sts": lambda: S.fit_sts_slot(z, y, a, GRID, 20, S.BIAS_GRID), "platt": lambda: S.fit_platt(z, y, a),
            "isotonic": lambda: S.fit_isotonic(z, y, a)}[kind]()


def _kinked(n, seed, gamma=2, texts=None):
    """A head whose miscalibration is piecewise, not sigmoidal: the true conditional survival is flat at 0.4 for
    z < 0 and rises linearly to 0.94 at z = 3, with z uniform on (−3, 3) at every slot (a sigmoid in z cannot be
    flat above zero, so no (T, b) or (a, b) pair fits it)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-3, 3, (n, gamma))
    ok = rng.random((n, gamma)) < np.where(z < 0, 0.4, 0.4 + 0.18 * z)
    text = np.arange(n) * (texts or n) // n  # consecutive rows share a text, as in the anchor replay
    return z, np.cumprod(ok, axis=1).astype(bool), np.ones((n, gamma), bool), text


@pytest.mark.parametrize("kind", ["sts", "platt", "isotonic"])
def test_every_map_kind_is_strictly_increasing_in_the_logit(kind):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    m = _fitted(z, (rng.random(4000) < sigmoid(z / 2 - 0.3)).astype(float), np.ones(4000), kind)
    assert m.kind == kind
    grid = np.linspace(-12, 12, 5001)  # well beyond the isotonic end knots (the tails must keep rising)
    c = m(grid)
    assert ((c > 0) & (c < 1)).all() and (np.diff(c) > 0).all(), m.describe()
    # so the calibrated confidence ranks rounds exactly as the raw head does (AUROC, threshold cuts, Algorithm 1)
    assert (np.argsort(m(z), kind="stable") == np.argsort(z, kind="stable")).all()
    assert np.isnan(m(np.array([np.nan]))).all()  # past the drafted depth stays unobserved


def test_a_map_that_is_not_order_preserving_is_refused():
    for bad in ({"kind": "platt", "slope": -1.0, "offset": 0.0}, {"kind": "sts", "temperature": 0.0},
                {"kind": "isotonic", "z": [0.0, 1.0], "c": [0.6, 0.4]}, {"kind": "isotonic", "z": [1.0, 0.0],
                                                                         "c": [0.4, 0.6]},
                {"kind": "isotonic", "z": [0.0, 1.0], "c": [0.5, 1.0]}, {"kind": "spline"}):
        with pytest.raises(ValueError):
            SlotMap.from_json(bad)
    with pytest.raises(ArtifactError, match=r"maps\[1\] \(slot 2\)"):
        Calibration.from_json(_calibration([{"kind": "sts", "temperature": 1.0, "offset": 0.0},
                                            {"kind": "platt", "slope": 0.0, "offset": 0.0}])).slot_maps()


def test_isotonic_fixes_a_non_sigmoidal_miscalibration_that_sts_cannot():
    z, y, obs, text = _kinked(20000, 1, texts=200)
    fit = S.fit_maps(z, y, obs, GRID, 20, S.BIAS_GRID, "auto", 0.015, S.text_folds(text, len(z)))
    assert [m.kind for m in fit.maps] == ["isotonic", "isotonic"], fit.crossfit
    xf = fit.crossfit
    assert xf["sts"][0] > 0.05 and xf["platt"][0] > 0.05 and xf["isotonic"][0] < xf["sts"][0] / 3, xf
    assert xf["isotonic"][1] < min(xf["sts"][1], xf["platt"][1]), xf
    # on fresh rows from the same head: the chosen maps calibrate a_k = c_1·c_2 below the threshold, STS does not
    z2, y2, obs2, _ = _kinked(50000, 2)
    after = S.position_metrics(z2, y2, obs2, fit.maps)
    sts = S.position_metrics(z2, y2, obs2, sts_maps(*S.fit_sts(z, y, obs, GRID, 20, S.BIAS_GRID)))["ece"]
    assert max(after["ece"]) < 0.015 < min(sts), (after["ece"], sts)
    assert after["auroc"][0] == S.position_metrics(z2, y2, obs2)["auroc"][0]  # order kept: same AUROC


def test_sts_stays_where_its_cross_fitted_ece_is_below_the_threshold_and_map_sts_is_the_papers():
    z, y, obs, text = _kinked(6000, 1, texts=60)
    folds = S.text_folds(text, len(z))
    assert [m.kind for m in S.fit_maps(z, y, obs, GRID, 20, S.BIAS_GRID, "auto", 0.5, folds).maps] == ["sts"] * 2
    paper = S.fit_maps(z, y, obs, GRID, 20, S.BIAS_GRID, "sts", folds=folds)
    assert paper.maps == sts_maps(paper.temperatures, paper.biases)
    assert paper.crossfit["isotonic"] == [None, None]  # nothing else is even tried
    forced = S.fit_maps(z, y, obs, GRID, 20, S.BIAS_GRID, "platt", folds=folds)
    assert [m.kind for m in forced.maps] == ["platt"] * 2
    with pytest.raises(ValueError, match="folds"):
        S.fit_maps(z, y, obs, GRID, method="auto")


def test_cross_fit_never_scores_a_fold_with_a_map_fitted_on_its_own_rows():
    z, y, _, text = _kinked(3000, 3, gamma=1, texts=30)
    folds = S.text_folds(text, len(z))
    assert all(len(set(folds[text == t])) == 1 for t in range(30))  # a text never straddles the folds
    assert 0.4 < folds.mean() < 0.6
    seen = []

    def spy(zz, yy, aa):
        seen.append(zz.copy())
        return SlotMap("sts")

    S._crossfit(spy, z[:, 0], y[:, 0], np.ones(len(z)), folds, 20)
    assert len(seen) == 2
    for f, rows in zip((0, 1), seen):  # fold f is scored with the map fitted on exactly the other fold's rows
        np.testing.assert_array_equal(rows, z[folds != f, 0])
    # older statistics without text ids: the first and second half of the rows
    np.testing.assert_array_equal(S.text_folds(None, 5), [0, 0, 0, 1, 1])


def test_map_choice_is_cross_fitted_not_in_sample():
    """A head that STS fits exactly (σ(z/2 − 0.3)), on few rows: isotonic has the lowest in-sample ECE (it
    follows the noise), but scored on the other half of the texts STS is better, and `auto` keeps STS."""
    rng = np.random.default_rng(5)
    n = 1200
    z, text = rng.normal(0, 2, n), rng.integers(0, 24, n)
    y = rng.random(n) < sigmoid(z / 2 - 0.3)
    a = np.ones(n)
    in_sample = {kind: ece(_fitted(z, y, a, kind)(z), y) for kind in ("sts", "platt", "isotonic")}
    assert min(in_sample, key=in_sample.get) == "isotonic", in_sample
    fit = S.fit_maps(z[:, None], y[:, None], np.ones((n, 1), bool), GRID, 20, S.BIAS_GRID, "auto", 0.0,
                     S.text_folds(text, n))
    assert fit.maps[0].kind == "sts" and fit.crossfit["sts"][0] < fit.crossfit["isotonic"][0], fit.crossfit


def _calibration(maps, version=FORMAT_VERSION, biases=(0.5, -0.25, 0.0)):
    g = 3
    cal = {"format_version": version, "block_size": g, "temperatures": [2.0] * g, "biases": list(biases),
           **{f"{m}_{s}": [0.1] * g for m in ("ece", "auroc", "brier") for s in ("before", "after")},
           "adaptive": {"depth_threshold": 0.3, "width_threshold": None, "max_width": 2, "node_budget": 6, "beam": 1}}
    return {**cal, "maps": maps} if maps is not None else cal


def test_decoder_confidence_with_maps_equals_the_schemas_after_a_json_round_trip(tmp_path):
    from dspark_train.decoding import TreePolicy

    maps = [SlotMap("isotonic", z=(-1.0, 0.5, 2.0), c=(0.2, 0.6, 0.9)), SlotMap("platt", slope=0.7, offset=-0.4),
            SlotMap("sts", temperature=1.5, offset=0.2)]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(_calibration([m.to_json() for m in maps])))
    cal = Calibration.from_json(path)
    assert cal.format_version == FORMAT_VERSION == 2 and cal.slot_maps() == maps
    pol = TreePolicy.from_calibration(path, depth=3)
    assert pol.maps == maps
    logits = np.array([[-30.0, -3.0, -1.0, -0.2, 0.0, 0.5, 1.7, 2.0, 4.0, 30.0]] * 3).T
    table = conditional(logits, cal.slot_maps())
    for k in range(3):
        assert [pol.confidence(k, float(x)) for x in logits[:, k]] == table[:, k].tolist()
    assert pol.confidence(1, 0.3) == float(sigmoid(0.7 * 0.3 - 0.4))
    assert pol.confidence(0, 0.5) == pytest.approx(0.6) and pol.confidence(5, 0.0) == 0.5  # beyond γ: raw σ
    np.testing.assert_allclose(survival(logits, maps), np.cumprod(table, axis=1))


def test_a_format_1_calibration_json_without_maps_loads_as_sts_everywhere(tmp_path):
    from dspark_train.decoding import TreePolicy

    old = _calibration(None, version=1)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(old))
    cal = Calibration.from_json(path)
    assert cal.format_version == 1 and cal.maps == [] and cal.slot_maps() == sts_maps([2.0] * 3, [0.5, -0.25, 0.0])
    pol = TreePolicy.from_calibration(path, depth=3)
    assert pol.confidence(0, 1.0) == pytest.approx(1 / (1 + np.exp(-(1.0 / 2.0 + 0.5))))
    assert read_maps({"temperatures": [1.5]}) == [SlotMap("sts", temperature=1.5)]  # hand-written, no offsets
    with pytest.raises(ValueError, match="format_version"):
        Calibration.from_json({**old, "format_version": FORMAT_VERSION + 1})

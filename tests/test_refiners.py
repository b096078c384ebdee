"""The refiner registry: one registration declares a refiner for refine, config, tuning and make-pseudo."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import wsss.refiners as refiners
from wsss import config
from wsss.config import CrfConfig, GrabCutConfig, PseudoConfig
from wsss.errors import ConfigError
from wsss.pseudo import plain_threshold_config
from wsss.refiners import (
    REGISTRY,
    Refiner,
    RefinerRegistry,
    RefinerSpec,
    UnknownRefinerError,
    refine,
    refine_many,
)
from wsss.tuning import search_refiners, suggest_pseudo


def test_config_names_equal_the_registry() -> None:
    """config.REFINERS (cv2-free, for the params loader and tune.refiners) is the registry, in order."""
    assert config.REFINERS == REGISTRY.names()


def test_config_imports_without_cv2_or_torch() -> None:
    code = "import sys, wsss.config; assert 'cv2' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("name", "enabled", "runs"), [
    ("crf", True, "crf"), ("crf", False, "none"), ("grabcut+crf", True, "grabcut+crf"),
    ("grabcut+crf", False, "grabcut"), ("grabcut", False, "grabcut"), ("none", False, "none"),
])
def test_effective_refiner_without_the_crf(name: str, enabled: bool, runs: str) -> None:
    cfg = PseudoConfig(refiner=name, crf=CrfConfig(enabled=enabled))
    assert REGISTRY.effective(cfg).name == runs == Refiner(cfg).kind
    assert not REGISTRY.effective(cfg).uses_crf or enabled


def test_unknown_refiner() -> None:
    with pytest.raises(UnknownRefinerError, match="valid: crf, grabcut, grabcut"):
        REGISTRY.get("watershed")
    assert isinstance(UnknownRefinerError("x"), ConfigError)


def test_registry_checks_its_entries() -> None:
    spec = REGISTRY.get("crf")
    with pytest.raises(ValueError, match="twice"):
        RefinerRegistry([spec, spec])
    with pytest.raises(ValueError, match="without_crf"):
        RefinerRegistry([spec])  # its fallback 'none' is not registered


def _run_inverted(image: np.ndarray, prob: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    return (prob < cfg.threshold).astype(np.uint8)


def _suggest_inverted(trial: refiners.Suggest, base: PseudoConfig) -> dict:
    return {"threshold": trial.suggest_float("threshold", 0.1, 0.2)}


class _Trial:
    """Returns each range's low end and records the names asked for."""

    def __init__(self, refiner: str) -> None:
        self.refiner, self.asked = refiner, []

    def suggest_categorical(self, name: str, choices: list) -> object:
        self.asked.append(name)
        return self.refiner if name == "refiner" else choices[0]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        self.asked.append(name)
        return low

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.asked.append(name)
        return low


def test_a_new_refiner_is_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered refiner runs (serially and through refine_many), is tuned with its own space and gets the
    right "before refinement" threshold, with no other code changed."""
    specs = [REGISTRY.get(n) for n in REGISTRY.names()]
    extra = RefinerSpec("inverted", _run_inverted, uses_crf=False, decided_by="threshold",
                        suggest=_suggest_inverted, pooled=False)
    monkeypatch.setattr(refiners, "REGISTRY", RefinerRegistry([*specs, extra]))
    import wsss.tuning

    monkeypatch.setattr(wsss.tuning, "REGISTRY", refiners.REGISTRY)
    prob = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    image = np.zeros((8, 8, 3), np.uint8)
    cfg = dataclasses.replace(PseudoConfig(), refiner="inverted", threshold=0.5)  # bypasses the loader
    np.testing.assert_array_equal(refine(image, prob, cfg), (prob < 0.5).astype(np.uint8))
    assert [m.sum() for m in refine_many([(image, prob)] * 3, cfg, workers=1)] == [32] * 3
    trial = _Trial("inverted")
    tuned = suggest_pseudo(trial, PseudoConfig(), ["inverted"])
    assert tuned.refiner == "inverted" and tuned.threshold == 0.1 and trial.asked == ["refiner", "threshold"]
    assert plain_threshold_config(cfg).threshold == 0.5


@pytest.mark.parametrize(("refiner", "asked"), [
    ("none", ["refiner", "threshold"]),
    ("crf", ["refiner", "threshold", "crf.unary", "crf.scale", "crf.iterations", "crf.gaussian_sxy",
             "crf.gaussian_compat", "crf.bilateral_sxy", "crf.bilateral_srgb", "crf.bilateral_compat"]),
    ("grabcut", ["refiner", "grabcut.pfg_threshold", "grabcut.iterations", "grabcut.fg_gap", "grabcut.bg_ratio",
                 "grabcut.border"]),
    ("grabcut+crf", ["refiner", "crf.unary", "threshold", "crf.scale", "crf.gt_prob", "crf.iterations",
                     "crf.gaussian_sxy", "crf.gaussian_compat", "crf.bilateral_sxy", "crf.bilateral_srgb",
                     "crf.bilateral_compat", "grabcut.pfg_threshold", "grabcut.iterations", "grabcut.fg_gap",
                     "grabcut.bg_ratio", "grabcut.border"]),
])
def test_search_space_order(refiner: str, asked: list[str]) -> None:
    """The order of the suggest calls fixes which trials a seed gives: it must never change silently."""
    trial = _Trial(refiner)
    suggest_pseudo(trial, PseudoConfig(), config.REFINERS)
    assert trial.asked == asked


def test_search_drops_crf_refiners_when_the_crf_is_off() -> None:
    base = PseudoConfig(crf=CrfConfig(enabled=False))
    assert search_refiners(base, config.REFINERS) == ("grabcut", "none")
    with pytest.raises(ConfigError, match="no refiner left"):
        search_refiners(base, ["crf", "grabcut+crf"])


def test_before_threshold_follows_the_deciding_threshold() -> None:
    g = GrabCutConfig(pfg_threshold=0.2, fg_threshold=0.7, bg_threshold=0.05)
    for name in REGISTRY.names():
        spec = REGISTRY.get(name)
        plain = plain_threshold_config(PseudoConfig(refiner=name, threshold=0.6, grabcut=g))
        assert plain.threshold == (0.2 if spec.decided_by == "pfg_threshold" else 0.6)

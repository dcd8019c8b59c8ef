"""The oracles CI installs are there, and a missing one cannot hide as a skip under CI."""
import pytest

from .util import oracle

# every peer implementation the suite compares against (installed by `.ci/run`: the `test` extra and
# stable-diffusion-sdkit); ftfy comes with open_clip_torch, omegaconf is what ldm reads its configs with
ORACLES = ("diffusers", "ldm.modules.diffusionmodules.openaimodel", "ldm.util", "open_clip", "omegaconf",
           "ftfy", "transformers")


@pytest.mark.parametrize("name", ORACLES)
def test_oracle_imports(name):
    assert oracle(name).__name__ == name


def test_a_missing_oracle_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_oracle"):
        oracle("no_such_oracle")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no_such_oracle"):
        oracle("no_such_oracle")

"""Configuration shared by every test below tests/: the markers and their checking.

Plain helpers shared by several modules (bit comparisons, the IDX data set writer, quiet Trainer
settings) are in tests/helpers.py, imported as ``from helpers import ...``; fixtures used by one
module stay in that module.

Markers:

- ``slow``: takes many seconds; the exhaustive sweeps over all 2^32 float32 bit patterns.
  Leave them out with ``pytest -m "not slow"``.
- ``cuda``: needs a CUDA GPU (and the CUDA build); also skipped where there is none.
  ``pytest -m cuda`` runs just those.

An unknown marker (a typo such as ``@pytest.mark.slwo``) is an error, as under ``--strict-markers``.
"""

import pytest

MARKERS = {
    "cuda": "needs a CUDA GPU and the CUDA build of the extension (skipped without one)",
    "slow": "long-running: the exhaustive sweeps over all 2^32 float32 bit patterns (deselect with -m 'not slow')",
}


def pytest_configure(config: pytest.Config) -> None:
    registered = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, description in MARKERS.items():
        if name not in registered:  # the ini file may declare them too; list each once in `pytest --markers`
            config.addinivalue_line("markers", f"{name}: {description}")
    # --strict-markers behaviour whatever the ini file says: pytest.mark.<unknown> warns at import,
    # and the warning is an error, so the module fails to collect.
    config.addinivalue_line("filterwarnings", "error::pytest.PytestUnknownMarkWarning")


@pytest.fixture(autouse=True)
def _recipe_registry_restored():
    """Recipes a test registers are gone after it, so that no test depends on another's order."""
    from lightning_lowp import recipes

    saved = dict(recipes._RECIPES)
    yield
    recipes._RECIPES.clear()
    recipes._RECIPES.update(saved)

"""The docs site and the packaging metadata: readable code blocks, formatted signatures, pictures on the
home page, the executed notebook, and an install that prints no deprecation warning.

All of it is read from the files (no site build, no pip): the Makefile's strict `mkdocs build` checks the
rest.
"""

import re
import shutil
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def mkdocs_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def plugin(config: dict, name: str) -> dict | None:
    """The options of a plugin in mkdocs.yml (``{}`` when it has none), or None when it is not listed."""
    for entry in config["plugins"]:
        if entry == name:
            return {}
        if isinstance(entry, dict) and name in entry:
            return entry[name] or {}
    return None


def docs_extra() -> dict[str, Requirement]:
    requirements = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["docs"]]
    return {r.name: r for r in requirements}


# 1. Wide code blocks scroll, visibly.

def test_the_stylesheet_for_wide_code_blocks_is_registered_and_exists():
    config = mkdocs_config()
    assert "stylesheets/extra.css" in config.get("extra_css", [])
    css = (DOCS / "stylesheets" / "extra.css").read_text()
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    rules = {selector.strip(): body for selector, body in re.findall(r"([^{}]+)\{([^}]*)\}", css)}
    code = rules.get(".md-typeset pre > code", "")
    assert "scrollbar-width: auto" in code, "the scrollbar of a code block must always show"
    assert "local" in code and "scroll" in code, "no shadow on the edge that has more text"
    assert re.search(r"max-width:\s*\d+rem", rules.get(".md-grid", "")), "the page grid is not widened"


# 2. mkdocstrings formats the separate signatures: it needs ruff or black.

def test_the_docs_extra_has_a_signature_formatter():
    config = mkdocs_config()
    options = plugin(config, "mkdocstrings")["handlers"]["python"]["options"]
    assert options["separate_signature"] is True
    assert {"ruff", "black"} & set(docs_extra()), "mkdocstrings cannot format signatures without ruff or black"


def test_a_formatter_is_installed_where_the_docs_are_built():
    pytest.importorskip("mkdocstrings_handlers.python")
    import importlib.util

    assert importlib.util.find_spec("ruff") or importlib.util.find_spec("black")


# 3. The home page shows the exits on a network and the accuracy against compute.

def images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)", markdown) + re.findall(r"<img[^>]+src=\"([^\"]+)\"", markdown)


def test_the_home_page_shows_the_diagram_and_the_plot_and_both_exist():
    shown = images((DOCS / "index.md").read_text())
    assert "img/exits.svg" in shown
    assert "img/accuracy-vs-macs.png" in shown
    for name in shown:
        assert (DOCS / name).is_file(), f"docs/index.md shows {name}, which does not exist"


def test_the_diagram_is_an_svg_with_the_exits_and_the_plot_a_png():
    root = ET.parse(DOCS / "img" / "exits.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
    for label in ("layer1", "layer2", "exit 0 head", "exit 1 head", "final", "32% of the MACs", "55% of the MACs"):
        assert label in text, f"the diagram has no {label!r}"
    assert "<dc:date>" not in (DOCS / "img" / "exits.svg").read_text(), "a date in the SVG changes it every run"
    assert (DOCS / "img" / "accuracy-vs-macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# 4. The quick-start notebook is executed into the site; git keeps it stripped (tests/test_notebook.py).

def test_the_notebook_is_rendered_executed_by_mkdocs_jupyter():
    config = mkdocs_config()
    options = plugin(config, "mkdocs-jupyter")
    assert options is not None, "mkdocs-jupyter is not in mkdocs.yml's plugins"
    assert options.get("execute") is True
    assert options.get("allow_errors") is False, "a failing cell would be rendered instead of failing the build"
    assert "mkdocs-jupyter" in docs_extra()
    nav = yaml.safe_dump(config["nav"])
    assert "notebooks/quickstart.ipynb" in nav
    page = DOCS / "notebooks" / "quickstart.ipynb"
    assert page.resolve() == (ROOT / "examples" / "notebooks" / "quickstart.ipynb").resolve(), (
        "docs/notebooks/quickstart.ipynb must be the example notebook itself, not a copy that drifts")


def test_the_notebook_cache_is_not_committed():
    ignored = (ROOT / ".gitignore").read_text().split()
    cache = plugin(mkdocs_config(), "mkdocs-jupyter").get("cache_dir", ".cache/mkdocs-jupyter")  # its default
    assert any(cache.startswith(entry.rstrip("/")) for entry in ignored), f"{cache} is not in .gitignore"


# 5. Packaging: the license is an SPDX expression, and building the metadata warns nothing.

def test_the_license_is_an_spdx_string_and_setuptools_is_new_enough_for_it():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert not setuptools.specifier.contains("76.9"), "SPDX license expressions need setuptools>=77"
    assert setuptools.specifier.contains("77.0")


def build_metadata(project: Path, pyproject: str, monkeypatch) -> tuple[str, list[warnings.WarningMessage]]:
    """What setuptools' backend writes as METADATA for a project with this pyproject.toml, and its warnings."""
    from setuptools import build_meta

    (project / "pyproject.toml").write_text(pyproject)
    shutil.copy(ROOT / "README.md", project / "README.md")
    (project / "branchify").mkdir()
    (project / "branchify" / "__init__.py").write_text("")
    out = project / "out"
    out.mkdir()
    monkeypatch.chdir(project)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = build_meta.prepare_metadata_for_build_wheel(str(out))
    return (out / info / "METADATA").read_text(), caught


@pytest.fixture
def new_setuptools():
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license expressions")


@pytest.mark.usefixtures("new_setuptools")
def test_building_the_metadata_warns_nothing(tmp_path, monkeypatch):
    metadata, caught = build_metadata(tmp_path, (ROOT / "pyproject.toml").read_text(), monkeypatch)
    assert "License-Expression: Apache-2.0" in metadata
    deprecations = [str(w.message).splitlines()[0] for w in caught if "deprecat" in str(w.message).lower()
                    or "Deprecation" in w.category.__name__]
    assert deprecations == []


@pytest.mark.usefixtures("new_setuptools")
def test_the_old_license_table_would_be_caught(tmp_path, monkeypatch):
    """The check above sees the warning it guards against: the TOML table it replaced warns here."""
    old = (ROOT / "pyproject.toml").read_text().replace('license = "Apache-2.0"', 'license = { text = "Apache-2.0" }')
    assert 'license = { text = "Apache-2.0" }' in old
    _, caught = build_metadata(tmp_path, old, monkeypatch)
    assert any("`project.license` as a TOML table is deprecated" in str(w.message) for w in caught)


def test_every_test_the_models_page_cites_exists():
    """The models page backs each cell of its table with named tests: each must be a test of that file."""
    page = (DOCS / "guide" / "models.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", page)
    assert len(cited) >= 20, "the table's tests are named as `tests/file.py::test_name`"
    missing = [f"{path}::{name}" for path, name in cited
               if not re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE)]
    assert not missing, f"the models page cites tests that do not exist: {missing}"

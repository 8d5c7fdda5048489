"""The documentation site covers the library and the command line, and the README
stays a front page. (CI builds the site with ``mkdocs build --strict``, which fails
on a broken link, anchor or API reference; these checks need no MkDocs.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _documented_modules() -> tuple[set[str], set[str]]:
    """Modules named by ``::: module`` on an API page, and those whose submodules are shown too."""
    named, with_submodules = set(), set()
    for page in (DOCS / "api").glob("*.md"):
        for m in re.finditer(r"^::: (pyroseg[\w.]*)\n((?:    .*\n)*)", page.read_text(), flags=re.M):
            named.add(m.group(1))
            if "show_submodules: true" in m.group(2):
                with_submodules.add(m.group(1))
    return named, with_submodules


def test_every_public_module_has_an_api_page():
    named, with_submodules = _documented_modules()
    missing = []
    for path in sorted((ROOT / "pyroseg").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "pyroseg":
            continue  # the package's docstring is the API overview's table
        covered = module in named or any(module.startswith(p + ".") for p in with_submodules)
        if not covered:
            missing.append(module)
    assert not missing, f"no API page (docs/api/*.md, '::: module') for {missing}"


def test_every_api_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.relative_to(DOCS).as_posix() for p in (DOCS / "api").glob("*.md") if p.relative_to(DOCS).as_posix() not in nav]
    assert not missing, missing


def test_the_command_line_page_is_generated_from_every_command():
    from pyroseg.cli.main import cli

    page = (DOCS / "cli.md").read_text()
    assert ":module: pyroseg.cli.main" in page and ":command: cli" in page and ":list_subcommands: true" in page
    assert {"fit", "evaluate", "sample", "compare", "inspect", "plot", "models"} <= set(cli.commands)


def test_the_worked_example_is_the_tested_file():
    page = (DOCS / "api" / "custom-model.md").read_text()
    assert '--8<-- "examples/my_models.py"' in page  # included as it is, so the docs show what the test runs
    assert (ROOT / "examples" / "my_models.py").is_file()


def test_readme_is_a_front_page_with_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    assert "python -m pytest" in readme  # the command .ci/run runs
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).exists(), link


GENERATED = re.compile(r"<!-- generated: pyroseg compare --render (\S+)(?: --columns (\S+))? -->\n(.*?)<!-- end generated -->",
                       flags=re.S)


def test_generated_tables_are_what_their_results_files_render():
    """Every table marked ``<!-- generated: pyroseg compare --render DIR [--columns a,b] -->`` in the
    README and the docs is exactly what that command prints from ``DIR/comparison.json``: a
    table can always be traced to a results file and regenerated."""
    from pyroseg.compare import render_results

    found = 0
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for m in GENERATED.finditer(page.read_text()):
            found += 1
            cols = m.group(2).split(",") if m.group(2) else None
            assert m.group(3).strip() == render_results(ROOT / m.group(1), cols).strip(), (
                f"{page.relative_to(ROOT)}: the table from {m.group(1)} is stale; regenerate it with "
                f"pyroseg compare --render {m.group(1)}" + (f" --columns {m.group(2)}" if m.group(2) else ""))
    assert found, "no generated table found: the README's results must come from a results file"


def test_the_python_pip_accepts_is_the_one_the_code_needs():
    """requires-python is the version ruff checks the code for (py311: datetime.UTC); before,
    pip would install on 3.10 and fail at the first run."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = re.fullmatch(r">=\s*3\.(\d+)", project["project"]["requires-python"].strip())
    assert minimum, project["project"]["requires-python"]
    assert project["tool"]["ruff"]["target-version"] == f"py3{minimum.group(1)}"


def test_every_package_is_installed_and_the_command_line_as_pyroseg_cli():
    """pyproject's package list names every folder of the library (a forgotten one would be
    missing from an installed pyroseg), and cli/ installs as pyroseg.cli: nothing named
    `cli`, a name another package may take, lands in site-packages."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pyroseg").rglob("__init__.py")}
    assert set(tool["packages"]) == folders | {"pyroseg.cli"}
    assert tool["package-dir"] == {"pyroseg.cli": "cli"}
    assert not any(p == "cli" or p.startswith("cli.") for p in tool["packages"])

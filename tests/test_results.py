"""Numbers come from code: the generated sections of the README and the docs come from the committed results
files, every number a notebook's "What we see" paragraph quotes is printed by a cell above it, and the notebooks
keep the shape a reader relies on (short interpretations, exercises, a checked cell, no machine's paths)."""
import json
import re
from pathlib import Path

import pytest

from progrpo_ref.study import results

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# numbers the prose may quote from the paper itself (PickScore, HPSv2.1, FLOP ratios; see the paper's tables)
PAPER_NUMBERS = {"23.322", "23.722", "24.008", "0.686", "0.400", "0.286", "0.69", "0.40", "1.397", "1.298",
                 "0.386", "0.391", "0.393", "0.373", "0.382", "0.369", "0.59", "0.74", "1.35", "1.70", "0.78"}
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+%?")


def test_generated_sections_come_from_the_results_files():
    gpu = json.loads(results.GPU.read_text()) if results.GPU.exists() else None
    secs = results.sections(json.loads(results.RESULTS.read_text()), json.loads(results.BENCH.read_text()), gpu)
    for page, (text, regenerated) in results.regenerated_pages(secs).items():
        assert regenerated == text, f"{page.name}: run python -m progrpo_ref.study.results (make reproduce does)"
        assert "<!-- results:" in text
    assert results.main(["--check"]) == 0
    assert len(results.README.read_text().splitlines()) <= 200  # the README stays a front page


def test_regenerate_replaces_only_between_markers():
    text = "a\n<!-- results:x -->\nold\n<!-- /results:x -->\nb\n"
    assert results.regenerate(text, {"x": "new 1.23"}) == "a\n<!-- results:x -->\nnew 1.23\n<!-- /results:x -->\nb\n"
    with pytest.raises(ValueError, match="exactly one <!-- results:y -->"):
        results.regenerate(text, {"y": "z"})


def outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append("".join(o["text"]))
        elif "data" in o and "text/plain" in o["data"]:
            parts.append("".join(o["data"]["text/plain"]))
    return "\n".join(parts)


def quoted_but_not_printed(nb: dict) -> list[tuple[str, str]]:
    """(paragraph start, number) for every decimal number of a "What we see" paragraph that no code cell
    above it printed."""
    missing, printed = [], ""
    for cell in nb["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "code":
            printed += "\n" + outputs_text(cell)
        elif text.startswith("**What we see.**"):
            for n in NUMBER.findall(text):
                bare = n.lstrip("+")
                if bare not in printed and bare not in PAPER_NUMBERS and bare.lstrip("-") not in printed:
                    missing.append((text[17:60], n))
    return missing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_what_we_see_quotes_only_numbers_printed_above(path):
    nb = json.loads(path.read_text())
    assert any("".join(c["source"]).startswith("**What we see.**") for c in nb["cells"])
    assert quoted_but_not_printed(nb) == []


def test_the_prose_check_catches_a_typed_number():
    nb = {"cells": [{"cell_type": "markdown", "source": ["**What we see.** 1.25 is not printed yet"]},
                    {"cell_type": "code", "source": ["print(1.25)"], "outputs": [{"output_type": "stream", "text": ["1.25\n"]}]},
                    {"cell_type": "markdown", "source": ["**What we see.** 1.25 and 3.50 and 24.008"]}]}
    assert quoted_but_not_printed(nb) == [("1.25 is not printed yet", "1.25"), ("1.25 and 3.50 and 24.008", "3.50")]


def test_the_readmes_example_runs():
    code = re.search(r"## Using the package in your own trainer\n\n```python\n(.*?)```", results.README.read_text(), re.S).group(1)
    assert "expand_and_prune" in code and "train(" in code
    scope = {}
    exec(code.replace("num_updates=5", "num_updates=1, progress=False"), scope)  # one update instead of five
    assert scope["R"].shape == (2, 12) and scope["history"]["updates"][0]["nfe_per_prompt"] == 324


def markdown_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_notebook_reads_as_a_lesson(path):
    """Each "What we see" interprets in a short paragraph; the notebook ends with exercises, has at least one cell
    nbval compares, and asserts its invariants."""
    nb = json.loads(path.read_text())
    md = markdown_cells(nb)
    seen = [m for m in md if m.startswith("**What we see.**")]
    assert seen and all(len(m.split()) <= 110 for m in seen), [len(m.split()) for m in seen]
    assert any(m.startswith("## Exercises") for m in md[-3:])
    exercises = next(m for m in md if m.startswith("## Exercises"))
    assert exercises.count("*Expect*") >= 2  # each with the direction of the expected answer
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert any(c.startswith("# NBVAL_CHECK_OUTPUT") for c in code)
    assert any("assert " in c for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_output_carries_a_path_of_the_machine(path):
    nb = json.loads(path.read_text())
    text = "\n".join(outputs_text(c) for c in nb["cells"] if c["cell_type"] == "code")
    for marker in (str(REPO), "PosixPath(", "/tmp/", "/home/", "/root/"):
        assert marker not in text, marker

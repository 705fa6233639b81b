"""The layout shows the architecture, and the imports keep to it.

Three layers make the method: ``algorithm/`` (the paper's algorithm), ``machinery/`` (what scales it and keeps it
safe) and ``beyond_paper/`` (what the paper does not have); ``minimal.py`` is the algorithm in one file. The
algorithm imports neither of the others, ``beyond_paper`` imports only the algorithm, the machinery imports both.
The method may import the standard library, torch, tqdm and safetensors (the algorithm torch alone). Beside it sit
``digits/`` (the digits task), ``scenes/`` (the scenes testbed, in progress), ``adapters/`` (real models) and ``study/`` (analysis, plots, experiments, bench);
they import the method, the method never imports them, and nothing imports the study. A built wheel carries every
module and checkpoint.
"""
import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "progrpo_ref"
LAYERS = ("algorithm", "machinery", "beyond_paper")
BESIDE = ("digits", "scenes", "adapters", "study")
# what each part of the method may import: third-party roots, and the package's own parts ("." is the package's
# top-level modules other than __main__)
MAY_IMPORT = {
    "algorithm": ({"torch"}, {"algorithm"}),
    "beyond_paper": ({"torch"}, {"algorithm", "beyond_paper"}),
    "machinery": ({"torch", "tqdm", "safetensors"}, {"algorithm", "beyond_paper", "machinery"}),
    "minimal": ({"torch"}, {"algorithm.noise"}),
    "__init__": ({"torch"}, {"algorithm", "beyond_paper", "machinery"}),
}
FORBIDDEN_LOADED = ("diffusers", "transformers", "sklearn", "matplotlib", "peft", "accelerate", "PIL")


def part_of(path: Path) -> str:
    """Which part of the method a file is: a layer's folder, or the top-level module's name."""
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else path.stem


def method_modules() -> list[Path]:
    """The method's modules: the three layers, minimal.py and __init__.py. ``__main__.py`` is not one: the command
    line sits around the method (it wires the digits tasks to the trainer), like the folders beside it."""
    files = [PKG / "minimal.py", PKG / "__init__.py"]
    return files + sorted(p for layer in LAYERS for p in (PKG / layer).rglob("*.py"))


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = REPO) -> list[str]:
    """Every module a file imports, anywhere in it (also inside functions), as absolute names."""
    tree = ast.parse(path.read_text())
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out += [mod] + [f"{mod}.{a.name}" for a in node.names if a.name != "*"]
    return out


def violations(path: Path, root: Path = REPO) -> list[str]:
    """The imports of a method module that its part may not make."""
    third_party, own = MAY_IMPORT[part_of(path if root == REPO else PKG / path.relative_to(root / "progrpo_ref"))]
    bad = []
    for name in imports(path, root):
        top = name.split(".")[0]
        if top == "progrpo_ref":
            rest = name.split(".")[1:]
            if not rest or not any(".".join(rest[:len(o.split("."))]) == o for o in own):
                bad.append(name)
        elif top not in sys.stdlib_module_names and top not in third_party and top != "__future__":
            bad.append(name)
    return bad


def test_the_checker_sees_imports_inside_functions(tmp_path):
    fake = tmp_path / "progrpo_ref" / "algorithm" / "samplers" / "probe.py"  # as if it were an algorithm module
    fake.parent.mkdir(parents=True)
    fake.write_text("import torch\nfrom ..rollout import Rollout\n\ndef f():\n    from ...digits.model import load_flow_model\n"
                    "    from ...machinery.trainer import train\n    import matplotlib.pyplot\n    import tqdm\n")
    assert violations(fake, tmp_path) == ["progrpo_ref.digits.model", "progrpo_ref.digits.model.load_flow_model",
                                          "progrpo_ref.machinery.trainer", "progrpo_ref.machinery.trainer.train",
                                          "matplotlib.pyplot", "tqdm"]


def test_the_folders_are_the_three_layers():
    assert {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"} == {*LAYERS, *BESIDE}
    assert {p.name for p in PKG.glob("*.py")} == {"__init__.py", "__main__.py", "minimal.py"}
    algorithm = {p.stem for p in (PKG / "algorithm").rglob("*.py")}
    assert {"rollout", "grpo", "ovf", "pro_grpo", "task", "noise", "flow_sde"} <= algorithm
    assert {p.stem for p in (PKG / "machinery").glob("*.py")} >= {"config", "trainer", "run", "checkpoint", "parallel"}
    assert {p.stem for p in (PKG / "beyond_paper").glob("*.py")} >= {"fidelity", "adaptive"}


def test_each_layer_imports_only_what_it_may():
    mods = method_modules()
    seen = {m: imports(m) for m in mods}
    assert sum(len(v) for v in seen.values()) > 60  # the walk really reads the imports
    assert any("progrpo_ref.algorithm.rollout" in v for m, v in seen.items() if part_of(m) == "machinery")
    bad = {module_name(m): violations(m) for m in mods if violations(m)}
    assert not bad, bad


def test_the_checker_tells_the_layers_apart(tmp_path):
    for layer, line, ok in [("beyond_paper", "from ..algorithm.ovf import ovf_select", True),
                            ("beyond_paper", "from ..machinery.config import TrainConfig", False),
                            ("machinery", "from ..beyond_paper.fidelity import audit", True),
                            ("algorithm", "from ..beyond_paper.fidelity import audit", False)]:
        fake = tmp_path / "progrpo_ref" / layer / f"probe_{ok}.py"
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_text(line + "\n")
        assert (violations(fake, tmp_path) == []) == ok, (layer, line)


def test_nothing_imports_the_study():
    around = [p for folder in ("digits", "scenes", "adapters") for p in (PKG / folder).rglob("*.py")]
    files = [*method_modules(), PKG / "__main__.py", *around]
    bad = {module_name(f): [n for n in imports(f) if n.startswith("progrpo_ref.study")] for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_importing_the_method_loads_nothing_around_it():
    names = [module_name(m) for m in method_modules()]
    code = ("import json, sys, importlib\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert "progrpo_ref.machinery.trainer" in loaded and "progrpo_ref.algorithm.samplers.flow_sde" in loaded
    beside = [m for m in loaded if m.split(".")[0] == "progrpo_ref" and len(m.split(".")) > 1 and m.split(".")[1] in BESIDE]
    third = [m for m in loaded if m.split(".")[0] in FORBIDDEN_LOADED]
    assert not beside and not third, (beside, third)


def test_public_names_are_kept():
    import progrpo_ref

    for name in ("SDEStep", "sde_step_with_logprob", "NFECounter", "Rollout", "rollout", "sample", "ovf_select",
                 "select_subset", "group_advantages", "clipped_policy_loss", "gaussian_kl", "step_log_prob",
                 "PruneSchedule", "PRESETS", "expand_and_prune", "record_previews", "grpo_objective", "FlowSDE",
                 "Sampler", "Task", "TrainConfig", "arm_config", "train", "DDIM", "FlowCPS", "ARMS", "group_std"):
        assert hasattr(progrpo_ref, name) and name in progrpo_ref.__all__, name


def test_a_built_wheel_holds_every_module_and_checkpoint(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "notebooks", "figures", "build", "*.egg-info",
                                                             "__pycache__", ".ipynb_checkpoints", "tests"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("progrpo_ref-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(REPO)) for p in PKG.rglob("*") if p.suffix in (".py", ".safetensors") and "__pycache__" not in p.parts}
    assert len(want) > 25 and any(w.endswith(".safetensors") for w in want)
    assert want <= names, sorted(want - names)

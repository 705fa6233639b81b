"""The layout shows the architecture: the method imports nothing around it, nothing imports the study,
and a built wheel carries every module and checkpoint.

The method is every module at the top of the package plus ``samplers/``; beside it sit ``digits/``
(the digits task), ``adapters/`` (real models) and ``study/`` (analysis, plots, experiments, bench).
The method may import the standard library, torch, tqdm, safetensors and itself.
"""
import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "progrpo_ref"
BESIDE = ("digits", "adapters", "study")
ALLOWED_THIRD_PARTY = ("torch", "tqdm", "safetensors")
FORBIDDEN_LOADED = ("diffusers", "transformers", "sklearn", "matplotlib", "peft", "accelerate", "PIL")


def method_modules() -> list[Path]:
    """The method's modules. ``__main__.py`` is not one: the command line sits around the method (it
    wires the digits tasks to the trainer), like the folders beside it."""
    return sorted([p for p in PKG.glob("*.py") if p.name != "__main__.py"], key=str) + sorted((PKG / "samplers").glob("*.py"))


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
    bad = []
    for name in imports(path, root):
        root = name.split(".")[0]
        if root == "progrpo_ref":
            sub = name.split(".")[1] if "." in name else ""
            if sub in BESIDE:
                bad.append(name)
        elif root not in sys.stdlib_module_names and root not in ALLOWED_THIRD_PARTY and root != "__future__":
            bad.append(name)
    return bad


def test_the_checker_sees_imports_inside_functions(tmp_path):
    fake = tmp_path / "progrpo_ref" / "samplers" / "probe.py"  # as if it were a method module
    fake.parent.mkdir(parents=True)
    fake.write_text("import torch\n\ndef f():\n    from ..digits.model import load_flow_model\n    import matplotlib.pyplot\n")
    assert violations(fake, tmp_path) == ["progrpo_ref.digits.model", "progrpo_ref.digits.model.load_flow_model", "matplotlib.pyplot"]


def test_the_method_imports_only_torch_tqdm_safetensors_and_itself():
    mods = method_modules()
    names = {m.name for m in mods}
    assert {"rollout.py", "grpo.py", "ovf.py", "pro_grpo.py", "trainer.py", "task.py", "noise.py", "flow_sde.py"} <= names
    seen = {m.name: imports(m) for m in mods}
    assert sum(len(v) for v in seen.values()) > 40  # the walk really reads the imports
    bad = {module_name(m): violations(m) for m in mods if violations(m)}
    assert not bad, bad


def test_nothing_imports_the_study():
    files = [*method_modules(), PKG / "__main__.py", *(PKG / "digits").rglob("*.py"), *(PKG / "adapters").rglob("*.py")]
    bad = {module_name(f): [n for n in imports(f) if n.startswith("progrpo_ref.study")] for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_importing_the_method_loads_nothing_around_it():
    names = [module_name(m) for m in method_modules()]
    code = ("import json, sys, importlib\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert "progrpo_ref.trainer" in loaded and "progrpo_ref.samplers.flow_sde" in loaded
    beside = [m for m in loaded if m.split(".")[0] == "progrpo_ref" and len(m.split(".")) > 1 and m.split(".")[1] in BESIDE]
    third = [m for m in loaded if m.split(".")[0] in FORBIDDEN_LOADED]
    assert not beside and not third, (beside, third)


def test_public_names_are_kept():
    import progrpo_ref

    for name in ("SDEStep", "sde_step_with_logprob", "NFECounter", "Rollout", "rollout", "sample", "ovf_select",
                 "select_subset", "group_advantages", "clipped_policy_loss", "gaussian_kl", "step_log_prob",
                 "PruneSchedule", "PRESETS", "expand_and_prune", "record_previews", "grpo_objective", "FlowSDE",
                 "Sampler", "Task", "TrainConfig", "arm_config", "train"):
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

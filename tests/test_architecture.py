"""The structure the developers' guide asks for, checked: layers, imports, sizes."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "vit_jax"

# Each module's layer; a module imports only from its own layer and those below it.
LAYERS = {
    "files": 0, "schema": 0, "host_cpu": 0,
    "attention": 1, "layer_norm": 1, "resample": 1, "precision": 1,
    "kernels": 1.5,  # plug-ins for the maths: a compiler, a cache, FFI; below the models
    "model_configs": 2, "models": 2,
    "idx_files": 3, "mnist_source": 3, "input_pipeline": 3, "image_files": 3, "augment": 3,
    "experiment_config": 4, "parallel": 4, "checkpoints": 4, "metrics": 4, "interrupt": 4,
    "steps": 4, "evaluation": 4, "train": 4, "inference": 4, "export": 4, "auto": 4,
    "analysis": 4, "sweep": 4,
    "checkpoint_digests": 4, "run_log": 4, "init_from": 4, "instruments": 4, "locks": 4,
    "seeds": 4, "loop": 4, "training_images": 4, "train_state": 4, "workdir": 4,
    "distillation": 4,
    "command_line": 5,
    "figures": 5, "visualize": 5, "sweep_report": 5, "sweep_plots": 5, "benchmark": 5, "analyze": 5,
}
# Layer 1 proper: jax, numpy and chex only.
PURE_MATHS = ("attention", "layer_norm", "resample", "precision")
MAX_FUNCTION_LINES, MAX_FILE_LINES = 50, 300


def python_files():
  """The package, the command line, the experiments and the tests."""
  return sorted([*PACKAGE.rglob("*.py"), REPO / "launch.py", *(REPO / "experiments").glob("*.py"),
                 *(REPO / "tests").glob("*.py")])


def module_of(path: Path) -> str:
  """vit_jax/kernels/build.py -> 'kernels', vit_jax/train.py -> 'train'."""
  return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_modules(path: Path) -> set[str]:
  """Every module `path` imports, at the top or inside a function, as dotted names."""
  return imports_in(path.read_text(), package=path.relative_to(REPO).parts[:-1])


def imports_in(source: str, package: tuple[str, ...]) -> set[str]:
  """Absolute dotted names of what `source`, a module of `package`, imports; a relative import
  (`from . import models`, `from .train import x`) resolved against `package`."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = list(package[:len(package) - node.level + 1]) if node.level else []
      module = ".".join(base + ([node.module] if node.module else []))
      names.add(module)
      names.update(f"{module}.{alias.name}" for alias in node.names)
  return names


def test_relative_imports_are_resolved_so_the_layer_checks_see_them():
  source = "from . import models\nfrom .train import run\nfrom ..kernels import build\n"
  assert imports_in(source, ("vit_jax",)) >= {"vit_jax.models", "vit_jax.train.run"}
  assert "vit_jax.kernels.build" in imports_in(source, ("vit_jax", "benchmark"))
  assert "vit_jax.benchmark.models" in imports_in(source, ("vit_jax", "benchmark"))


def test_every_module_has_a_layer():
  modules = {module_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
  assert modules == set(LAYERS)


def test_the_readme_s_layout_names_every_module_at_its_layer():
  shown = {}  # 'vit_jax/train.py      4. ...' -> {'train': 4}; 'kernels/ 1½.' -> 1.5
  for line in (REPO / "README.md").read_text().splitlines():
    words = line.split()
    if len(words) > 1 and words[0].startswith("vit_jax/") and words[1].endswith("."):
      module = words[0].removeprefix("vit_jax/").removesuffix("/").removesuffix(".py")
      shown[module] = float(words[1].removesuffix(".").replace("½", ".5"))
  assert shown == LAYERS


@pytest.mark.parametrize("path", [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                                  or p.parent != PACKAGE], ids=lambda p: p.stem)
def test_no_module_imports_from_a_layer_above_it(path):
  own = LAYERS[module_of(path)]
  faces = {"launch", "experiments", *(p.stem for p in (REPO / "tests").glob("*.py"))}
  for name in imported_modules(path):
    parts = name.split(".")
    assert parts[0] not in faces, f"{path.name} imports {name}, which is above the package"
    if parts[0] == "vit_jax" and len(parts) > 1 and parts[1] in LAYERS:
      assert LAYERS[parts[1]] <= own, f"{path.name} (layer {own}) imports {name}"


@pytest.mark.parametrize("module", PURE_MATHS)
def test_the_maths_imports_jax_numpy_and_chex_only(module):
  allowed = {"jax", "numpy", "chex", "__future__", "functools", "collections"}
  own = {f"vit_jax.{m}" for m in PURE_MATHS}  # and one another
  for name in imported_modules(PACKAGE / f"{module}.py"):
    assert name.split(".")[0] in allowed or name in own or name.rsplit(".", 1)[0] in own, \
        f"{module}.py imports {name}"


def test_input_pipeline_knows_no_model():
  for module in ("idx_files", "mnist_source", "input_pipeline", "image_files", "augment"):
    for name in imported_modules(PACKAGE / f"{module}.py"):
      assert not name.startswith(("vit_jax.models", "vit_jax.model_configs", "flax")), name


def test_reading_a_config_imports_no_kernel_build_machinery():
  code = ("import sys, vit_jax.experiment_config, vit_jax.model_configs\n"
          "print(' '.join(sorted(sys.modules)))")
  loaded = set(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.split())
  assert "vit_jax.kernels" in loaded  # the config's checks use its constants...
  for heavy in ("subprocess", "ctypes", "vit_jax.kernels.build",
                "vit_jax.kernels.fused_attention", "jax"):
    assert heavy not in loaded  # ...and nothing that builds, loads or registers a kernel


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_and_files_stay_short(path):
  source = path.read_text()
  assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path.name} is over {MAX_FILE_LINES} lines"
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      length = node.end_lineno - node.lineno + 1
      assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length} lines"

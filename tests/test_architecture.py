"""The package's structure (DESIGN.md, "Layers"): one owner for each kind of knowledge, data
flowing one way. entry -> stages -> core -> base; a stage never imports another stage; the
offline runtime imports no stage; no import circle; file names spelled by the layout alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# A module's layer is its folder (DESIGN.md, "Layers"); a module in no known folder fails.
ENTRY = {"pipeline.__main__", "pipeline.demo", "pipeline.auto"}
FOLDER_LAYERS = {"base": "base", "stages": "stage", "offline": "offline",
                 "experiments": "core", "training": "core", "inference": "core",
                 "ensembling": "core", "data": "core", "models": "core", "reporting": "core"}
RANK = {"base": 0, "core": 1, "offline": 2, "stage": 2, "entry": 3}
# File names whose one owner is pipeline/experiments/layout.py
LAYOUT_NAMES = {"best.pt", "last.pt", "log.csv", "oof.csv", "oof_tta.csv", "test_probs.csv",
                "summary.csv", "summary.md", "full", "train.manifest.json",
                "predict.manifest.json", "pseudo.manifest.json", "bundle.json", "ensemble.json",
                "dataset_stats.json", "confusion.csv", "confusion.png", "curves.png"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


MODULES = modules()


def layer(name: str) -> str:
    """entry, stage, offline, core or base, from the module's folder; None outside them."""
    if name in ENTRY or name == "pipeline":
        return "entry" if name in ENTRY else "base"
    parts = name.split(".")
    return FOLDER_LAYERS.get(parts[1]) if len(parts) > 2 or parts[1] in FOLDER_LAYERS else None


def imported(tree: ast.AST, name: str) -> set[str]:
    """The pipeline modules a module imports (`from pipeline.x import y` counts y when it is a
    module, else x). Imports under `if TYPE_CHECKING:` are for type checkers alone and make no
    edge at run time."""
    out = set()
    type_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and ast.unparse(node.test) == "TYPE_CHECKING" for sub in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                out.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline.")}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imported(tree, name) for name, tree in MODULES.items()}


def test_every_module_sits_in_a_layer_folder():
    """A new module goes into the folder of its layer: nothing else at the top of pipeline/."""
    assert [m for m in MODULES if layer(m) is None] == []
    stages = {m.split(".")[-1] for m in MODULES if layer(m) == "stage"}
    assert {"check", "folds", "train", "predict", "refit", "ensemble", "pseudo", "runs",
            "bundle", "cache", "audit", "report"} <= stages


def test_no_import_circle():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert circles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_and_stages_stay_apart(module):
    for target in GRAPH[module]:
        assert RANK[layer(target)] <= RANK[layer(module)], f"{module} ({layer(module)}) imports " \
                                                           f"{target} ({layer(target)})"
        if layer(module) in ("stage", "offline"):
            assert layer(target) not in ("stage", "offline"), f"{module} imports {target}"


def test_no_pipeline_import_inside_a_function():
    offenders = []
    for name, tree in MODULES.items():
        if name == "pipeline.__main__":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("pipeline"):
                        offenders.append(f"{name}:{sub.lineno}")
                    if isinstance(sub, ast.Import) and any(a.name.startswith("pipeline")
                                                           for a in sub.names):
                        offenders.append(f"{name}:{sub.lineno}")
    assert offenders == []


def test_functions_are_short_and_the_trainer_small():
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in MODULES.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 50]
    assert long == []
    loop = MODULES["pipeline.training.loop"]
    (trainer,) = [n for n in loop.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 < 200


def test_file_names_are_spelled_by_the_layout_alone():
    offenders = []
    for name, tree in MODULES.items():
        if name == "pipeline.experiments.layout":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES:
                offenders.append(f"{name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.JoinedStr) and node.values and \
                    isinstance(node.values[0], ast.Constant) and \
                    str(node.values[0].value).endswith("fold") and len(node.values) > 1:
                offenders.append(f"{name}:{node.lineno} f'fold{{...}}'")
    assert offenders == []


def test_the_class_index_is_built_in_one_place():
    """{class: index} comprehensions over a class list live in pipeline/base/task.py only."""
    offenders = []
    for name, tree in MODULES.items():
        if name == "pipeline.base.task":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.DictComp) and "enumerate" in ast.unparse(node) and \
                    "class" in ast.unparse(node):
                offenders.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("classes.index"):
                offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


# --------------------------------------------------------------------------------------------
# Bookkeeping has one owner: the stage runner (pipeline/experiments/runner.py)

RUNNER = "pipeline.experiments.runner"
# The lock and the manifest writer are called by the runner alone (and defined in their modules).
RUNNER_ONLY = {"holding": {RUNNER, "pipeline.experiments.locks"},
               "write_manifest": {RUNNER, "pipeline.experiments.manifests"}}
RANK_CHECKS = {"is_main", "barrier", "broadcast_from_main"}
# Rank checks that are per-rank work inside the core, not bookkeeping: module -> why.
CORE_RANK_WORK = {
    "pipeline.training.loop": "rank 0 saves the checkpoint; the ranks agree on 'improved' and "
                              "wait until best.pt is written before reading it",
    "pipeline.training.checkpoints": "rank 0 writes and averages the top-k checkpoints",
    "pipeline.training.fitting": "rank 0 keeps the measured passes; an out-of-memory error "
                                 "under torchrun names its rank",
    "pipeline.training.run": "write_oof: batched inference gathered its shards on rank 0, "
                             "which writes oof.csv and the plots",
    "pipeline.inference.experiment": "predict: the shards were gathered on rank 0, which writes",
    "pipeline.training.tracking": "rank 0 alone logs to MLflow or TensorBoard",
    "pipeline.training.budget": "every rank probes together; rank 0 records the epochs",
    "pipeline.inference.engine": "one progress bar, rank 0's",
    "pipeline.data.imagecache": "rank 0 fills the cache, the others wait and read it",
    "pipeline.experiments.locks": "rank 0 takes the lock for every rank",
    "pipeline.base.distributed": "defines them",
    "pipeline.base.log": "the logger's filter: rank 0 speaks",
    RUNNER: "the runner: rank 0 decides, prepares and writes the manifest",
}


def called_names(tree: ast.AST) -> set[str]:
    """The names of the functions a module calls (`f(...)` and `module.f(...)` both give f)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else
                      func.attr if isinstance(func, ast.Attribute) else "")
    return names


CALLS = {name: called_names(tree) for name, tree in MODULES.items()}


@pytest.mark.parametrize("function", sorted(RUNNER_ONLY))
def test_locks_and_manifests_belong_to_the_runner(function):
    """A stage declares its steps; only the runner takes locks and writes manifests."""
    callers = {m for m, calls in CALLS.items() if function in calls}
    assert callers - RUNNER_ONLY[function] == set()


def test_stages_leave_ranks_and_output_to_the_runner_and_the_logger():
    """Stages and entry neither check ranks nor print: the runner does the first, the
    "pipeline" logger (pipeline/base/log.py, rank 0 only) the second."""
    offenders = {m: sorted(CALLS[m] & (RANK_CHECKS | {"print"})) for m in MODULES
                 if layer(m) in ("stage", "entry") and CALLS[m] & (RANK_CHECKS | {"print"})}
    assert offenders == {}


def test_rank_checks_in_the_core_are_per_rank_work():
    """A rank check in the core is per-rank work listed (with its reason) in CORE_RANK_WORK."""
    found = {m for m, calls in CALLS.items() if calls & RANK_CHECKS and layer(m) != "stage"}
    assert found - set(CORE_RANK_WORK) == set()
    assert set(CORE_RANK_WORK) - found == set(), "a listed module no longer needs its exception"


def test_each_verb_takes_only_its_own_flags(capsys):
    """`check --time-limit 3` is argparse's usage error, not a flag silently ignored."""
    from pipeline.__main__ import build_parser
    with pytest.raises(SystemExit) as stopped:
        build_parser("check").parse_args(["check", "--time-limit", "3"])
    assert stopped.value.code == 2
    assert "unrecognized arguments: --time-limit" in capsys.readouterr().err
    args = build_parser("infer").parse_args(["infer", "--bundle", "b.zip", "--time-limit", "3"])
    assert args.time_limit == 3.0 and not hasattr(args, "force")


def test_functions_of_more_than_four_parameters_take_the_rest_by_keyword():
    """`train_part(config, spec, details, force, what=...)`: a call that reads as it runs. A
    constructor may mirror its library's (torchvision's blocks, nn.Module's); none else."""
    offenders = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.name != "__init__":
                positional = [a for a in node.args.posonlyargs + node.args.args
                              if a.arg not in ("self", "cls")]
                if len(positional) > 4:
                    offenders.append(f"{name}.{node.name}")
    assert offenders == []

"""What this project agrees to load as a model, and how: a pt2 export (``torch.export``), never a pickle, never code.

A model directory (a local MLflow model, a registry version's download, the copy that classification worker
processes read) is untrusted input: its ``MLmodel`` file and its archive are read as data and checked before
anything in them is deserialised.

- ``MLmodel`` (YAML, read with the safe loader): the ``pytorch`` flavour, optionally ``python_function`` with MLflow's
  own ``mlflow.pytorch`` loader; no other flavour, no ``code`` directory, no custom Python model (cloudpickle).
- The network is the one file ``<model_data>/model.pt2`` that the ``pytorch`` flavour names (no search of the
  directory). A ``model.pth`` (MLflow's pickle serialization format) is refused.
- The pt2 archive is read into memory once and checked before ``torch.export.load`` sees those same bytes:
  every record must be plain data (JSON, text, raw tensor bytes) or, for the sample inputs, a ``torch.save`` file
  that torch's restricted ``weights_only`` unpickler accepts. Pickled weights or constants, custom objects,
  compiled AOTInductor code and legacy weight files are refused. The graph (``models/*.json``) may call ATen
  operators and plain arithmetic only; its symbolic shapes must be arithmetic over shape symbols (torch evaluates
  them with ``sympy.sympify``, an ``eval``); it may carry no guard code and no pytree types that import modules.

Anything else raises :class:`ModelRejected` with one line naming the model and why. Neither MLflow's loaders (which
unpickle ``model.pth`` by default) nor ``torch.load`` without ``weights_only`` are ever called on a model.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

EXPORTED_FILE = "model.pt2"
ACCEPTED = "only pt2 exports (torch.export) logged as training logs them are loaded"


class ModelRejected(ValueError):
    """A model this project refuses to load (it could run code when loaded); the message is one line naming the model
    and the reason."""

    def __init__(self, where: str, why: str | None = None):  # (message) alone: unpickled from another process
        super().__init__(_one_line(where if why is None else f"{where}: model refused: {why}; {ACCEPTED}"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- MLmodel ---------------------------------------------------------------------------------------------------------

ALLOWED_FLAVOURS = frozenset({"pytorch", "python_function"})
PYFUNC_LOADER = "mlflow.pytorch"


def read_mlmodel(model_dir: Path | str, where: str | None = None) -> dict[str, Any]:
    """The parsed ``MLmodel`` of ``model_dir`` (safe YAML), after the flavour checks; raises :class:`ModelRejected`."""
    import yaml

    model_dir = Path(model_dir)
    where = where or str(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ModelRejected(where, "it is not an MLflow model (no MLmodel file)" if where != str(model_dir)
                            else "not an MLflow model directory (no MLmodel file)")
    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelRejected(where, f"its MLmodel file cannot be read ({type(exc).__name__})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("flavors"), dict):
        raise ModelRejected(where, "its MLmodel file names no flavours")
    flavours = spec["flavors"]
    others = sorted(str(f) for f in flavours if f not in ALLOWED_FLAVOURS)
    if others:
        raise ModelRejected(where, f"flavour {', '.join(others)} is not accepted (a pickled or code-based model)")
    torch_flavour = flavours.get("pytorch")
    if not isinstance(torch_flavour, dict):
        raise ModelRejected(where, "it has no pytorch flavour")
    pyfunc = flavours.get("python_function")
    if pyfunc is not None:
        if not isinstance(pyfunc, dict):
            raise ModelRejected(where, "its python_function flavour is malformed")
        if pyfunc.get("loader_module") != PYFUNC_LOADER:
            raise ModelRejected(where, f"python_function loader_module {pyfunc.get('loader_module')!r} is not "
                                       f"{PYFUNC_LOADER!r}")
        for key in ("python_model", "cloudpickle_version", "code"):
            if pyfunc.get(key):
                raise ModelRejected(where, f"its python_function flavour carries {key!r} (pickled or code-based)")
    if torch_flavour.get("code"):
        raise ModelRejected(where, "its pytorch flavour carries a code directory")
    return spec


def exported_path(model_dir: Path | str, spec: dict[str, Any], where: str | None = None) -> Path:
    """The pt2 file that the ``pytorch`` flavour of ``spec`` names in ``model_dir``; raises :class:`ModelRejected`
    for a pickle-serialised model or a missing file."""
    model_dir = Path(model_dir)
    where = where or str(model_dir)
    data = spec["flavors"]["pytorch"].get("model_data")
    if not isinstance(data, str) or not data:
        raise ModelRejected(where, "its pytorch flavour names no model_data")
    rel = PurePosixPath(data.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise ModelRejected(where, f"its pytorch model_data {data!r} points outside the model directory")
    data_path = model_dir.joinpath(*rel.parts)
    if data_path.is_file() or (data_path / "model.pth").exists() or (data_path / "pickle_module_info.txt").exists():
        shown = data if data_path.is_file() else f"{data}/model.pth"
        raise ModelRejected(where, f"it is serialised with pickle ({shown})")
    pt2 = data_path / EXPORTED_FILE
    if not pt2.is_file():
        raise ModelRejected(where, f"it has no {data}/{EXPORTED_FILE}")
    return pt2


# --- the pt2 archive -------------------------------------------------------------------------------------------------

_TEXT_RECORDS = frozenset({"archive_format", "archive_version", "byteorder", ".data/version",
                           ".data/serialization_id"})
_WEIGHTS_CONFIG = re.compile(r"data/weights/([A-Za-z0-9_.-]+)_weights_config\.json")
_CONSTANTS_CONFIG = re.compile(r"data/constants/([A-Za-z0-9_.-]+)_constants_config\.json")
_GRAPH = re.compile(r"models/([A-Za-z0-9_.-]+)\.json")
_SAMPLE_INPUTS = re.compile(r"data/sample_inputs/([A-Za-z0-9_.-]+)\.pt")

# Graph node targets: ATen operators (no other namespace: no higher-order ops, no custom or extension operators),
# Python arithmetic on shapes, math functions, torch's symbolic-shape helpers.
_ATEN = re.compile(r"torch\.ops\.aten\.(_?[A-Za-z][A-Za-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)")
_OPERATORS = frozenset({"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pos", "abs", "eq",
                        "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert"})
_OTHER_TARGETS = re.compile(r"_operator\.(?P<op>[a-z_]+)|math\.[a-z][a-z0-9_]*|torch\.sym_[a-z]+")
_DENIED_ATEN = frozenset({"from_file", "save", "_print"})  # file access from a graph

# Symbolic shape expressions: torch parses them with sympy.sympify (an eval). Only arithmetic over shape symbols
# and sympy's and torch's shape functions may appear: no attribute access, no strings but symbol names.
_EXPR_TOKEN = re.compile(r"\s+|'[a-z]+[0-9]+'|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*|"
                         r"==|!=|<=|>=|//|[-+*/%(),=<>]")
_SHAPE_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_EXPR_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "True", "False", "positive", "negative", "integer",
    "nonnegative", "nonpositive", "real", "finite", "zero", "nonzero", "even", "odd", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "oo", "int_oo",
    # torch.utils._sympy.functions, as the deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity"})
_MAX_EXPR = 500
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
                             "torch.fx.immutable_collections.immutable_list",
                             "torch.fx.immutable_collections.immutable_dict"})


def check_pt2(data: bytes, where: str) -> None:
    """Raise :class:`ModelRejected` unless the pt2 archive ``data`` is plain data that ``torch.export.load`` can
    read without unpickling anything outside ``weights_only`` and without evaluating code (see the module doc)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ModelRejected(where, f"its {EXPORTED_FILE} is not a pt2 archive") from None
    with archive:
        names = [i.filename for i in infos]
        if not names:
            raise ModelRejected(where, f"its {EXPORTED_FILE} is empty")
        if len(set(names)) != len(names):
            raise ModelRejected(where, f"its {EXPORTED_FILE} holds a record twice")
        root = names[0].split("/", 1)[0]
        if any(not n.startswith(root + "/") for n in names):
            raise ModelRejected(where, f"its {EXPORTED_FILE} is not one archive")
        records = {n[len(root) + 1:]: n for n in names}
        raw = _raw_tensor_records(archive, records, where)
        for rel, full in records.items():
            if rel in _TEXT_RECORDS or rel in raw or rel.startswith("extra/"):
                continue  # read as text, or as raw tensor bytes (never unpickled)
            if _WEIGHTS_CONFIG.fullmatch(rel) or _CONSTANTS_CONFIG.fullmatch(rel):
                continue  # parsed (and checked) by _raw_tensor_records
            if _GRAPH.fullmatch(rel):
                _check_graph(archive.read(full), rel, where)
            elif _SAMPLE_INPUTS.fullmatch(rel):
                _check_weights_only(archive.read(full), rel, where)
            elif rel.startswith("data/aotinductor/"):
                raise ModelRejected(where, f"its {EXPORTED_FILE} carries compiled code ({rel})")
            else:
                raise ModelRejected(where, f"its {EXPORTED_FILE} holds an unexpected record {rel}")
        if not any(_GRAPH.fullmatch(rel) for rel in records):
            raise ModelRejected(where, f"its {EXPORTED_FILE} holds no exported program")


def _raw_tensor_records(archive: zipfile.ZipFile, records: dict[str, str], where: str) -> set[str]:
    """The weight and constant records that torch reads as raw bytes; raises for any that it would unpickle."""
    raw: set[str] = set()
    for rel, full in records.items():
        kind = ("weights" if _WEIGHTS_CONFIG.fullmatch(rel) else
                "constants" if _CONSTANTS_CONFIG.fullmatch(rel) else None)
        if kind is None:
            continue
        try:
            config = json.loads(archive.read(full))["config"]
            entries = list(config.items())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelRejected(where, f"its {EXPORTED_FILE} record {rel} is malformed") from None
        prefix = "weight_" if kind == "weights" else "tensor_"
        for fqn, entry in entries:
            path_name = entry.get("path_name") if isinstance(entry, dict) else None
            if not isinstance(path_name, str) or not re.fullmatch(rf"{prefix}[0-9]+", path_name):
                raise ModelRejected(where, f"its {kind} entry {fqn!r} is not a plain tensor (a custom object)")
            if entry.get("use_pickle") is not False:
                raise ModelRejected(where, f"its {kind} entry {fqn!r} is pickled")
            raw.add(f"data/{kind}/{path_name}")
    return raw


def _check_weights_only(data: bytes, rel: str, where: str) -> None:
    """Sample inputs: torch reads them with ``weights_only=True`` first and falls back to a full unpickle when that
    fails; accepted only when the restricted unpickler takes them (so torch never falls back)."""
    import torch

    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything the restricted unpickler refuses
        raise ModelRejected(where, f"its {EXPORTED_FILE} record {rel} is not a plain tensor file (pickled)") from None


def _check_graph(data: bytes, rel: str, where: str) -> None:
    try:
        graph = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ModelRejected(where, f"its graph {rel} is not JSON") from None
    if not isinstance(graph, dict):
        raise ModelRejected(where, f"its graph {rel} is malformed")
    if graph.get("guards_code"):
        raise ModelRejected(where, f"its graph {rel} carries guard code")
    ranges = graph.get("range_constraints") or {}
    if not isinstance(ranges, dict) or any(not _SHAPE_SYMBOL.fullmatch(str(k)) for k in ranges):
        raise ModelRejected(where, f"its graph {rel} has malformed range constraints")
    for node in _dicts(graph):
        if "expr_str" in node and not _safe_expression(node["expr_str"]):
            raise ModelRejected(where, f"its graph {rel} has a shape expression that is not arithmetic")
        for target in ([node["target"]] if "target" in node and "inputs" in node else []) + (
                [node["as_operator"]] if "as_operator" in node else []):  # a call, or an operator passed as argument
            if not isinstance(target, str) or not _allowed_target(target):
                raise ModelRejected(where, f"its graph {rel} calls {str(target)[:80]!r}, not an ATen operator")
        for key in ("in_spec", "out_spec"):
            if key in node and not _safe_treespec(node[key]):
                raise ModelRejected(where, f"its graph {rel} has a {key} with types that import modules")
        if node.get("as_custom_obj") is not None or node.get("custom_obj_values"):
            raise ModelRejected(where, f"its graph {rel} uses custom objects")


def _dicts(value: Any) -> Iterator[dict]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _allowed_target(target: str) -> bool:
    if "__" in target:
        return False
    aten = _ATEN.fullmatch(target)
    if aten:
        return aten.group(1) not in _DENIED_ATEN
    other = _OTHER_TARGETS.fullmatch(target)
    return bool(other) and (other.group("op") is None or other.group("op") in _OPERATORS)


def _safe_expression(expr: Any) -> bool:
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR or "**" in expr:
        return False
    pos = 0
    while pos < len(expr):
        token = _EXPR_TOKEN.match(expr, pos)
        if token is None:
            return False
        text = token.group()
        if (text[0].isalpha() or text[0] == "_") and text not in _EXPR_NAMES and not _SHAPE_SYMBOL.fullmatch(text):
            return False
        pos = token.end()
    return True


def _safe_treespec(spec: Any) -> bool:
    if spec is None:
        return True
    if not isinstance(spec, str) or "__enum__" in spec:
        return False
    try:
        parsed = json.loads(spec)
    except ValueError:
        return False
    return all(node.get("type") in _TREESPEC_TYPES for node in _dicts(parsed) if "type" in node)


# --- loading ---------------------------------------------------------------------------------------------------------

def load_checked(model_dir: Path | str, where: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(network, MLmodel)`` of the MLflow model directory ``model_dir``: the pt2 file its ``pytorch`` flavour
    names, checked, then loaded from the very bytes that were checked. Raises :class:`ModelRejected`."""
    import torch

    where = where or str(model_dir)
    spec = read_mlmodel(model_dir, where)
    path = exported_path(model_dir, spec, where)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelRejected(where, f"its {path.name} cannot be read ({exc.strerror or type(exc).__name__})") from None
    check_pt2(data, where)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - a checked archive that torch still cannot read (another torch?)
        raise ModelRejected(where, f"torch cannot load its {EXPORTED_FILE} ({type(exc).__name__}: "
                                   f"{_one_line(exc)[:200]})") from None
    module = program.module()
    module.deeprubin_time_cut = _dynamic_time(program)
    return module, spec


#: Set on a loaded network whose time dimension was exported dynamic (a network with ``grid_days``): serving may
#: give it only the days up to each curve's last detection (:func:`deeprubin.models.served.predict`).
TIME_CUT_ATTRIBUTE = "deeprubin_time_cut"


def _dynamic_time(program) -> bool:
    """Whether the exported program's input ``(N, C, T)`` has a symbolic T."""
    import torch

    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            shape = getattr(node.meta.get("val"), "shape", ())
            return len(shape) == 3 and isinstance(shape[2], torch.SymInt)
    return False

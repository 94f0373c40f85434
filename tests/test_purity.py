"""The pure layers stay pure, and chalicelib has no import cycle.

* Each pure module is imported alone in a fresh interpreter, and none of the I/O stack (chalice, boto3,
  botocore, requests, our store) may have been loaded by it, directly or through anything it imports.
* The import graph of chalicelib (module-level and function-level imports, relative ones resolved) is
  acyclic, and nothing in chalicelib imports the Chalice `app` module.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chalicelib"

PURE_MODULES = [
    "chalicelib.crm.amocrm.webhook",
    "chalicelib.crm.bitrix24.webhook",
    "chalicelib.crm.form",
    "chalicelib.crm.amocrm.translate",
    "chalicelib.crm.bitrix24.translate",
    "chalicelib.normalize",
    "chalicelib.crm.notes",
    "chalicelib.status_mapping",
    "chalicelib.metrika.schemas",
    "chalicelib.metrika.cdp",
    "chalicelib.errors",
    "chalicelib.deadline",
]
FORBIDDEN = ["chalice", "boto3", "botocore", "requests", "chalicelib.store", "chalicelib.store.dynamodb"]

# Run in the child: records, for each forbidden module, the repo frames that were importing it.
_PROBE = """
import importlib, json, sys, traceback
FORBIDDEN = set(json.loads(sys.argv[2]))
ROOT = sys.argv[3]
culprits = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in FORBIDDEN and name not in culprits:
            culprits[name] = [f"{f.filename[len(ROOT) + 1:]}:{f.lineno}" for f in traceback.extract_stack()
                              if f.filename.startswith(ROOT)]
        return None

sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
print(json.dumps({name: culprits.get(name, []) for name in sorted(FORBIDDEN) if name in sys.modules}))
"""


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io_stack(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _PROBE, module, json.dumps(FORBIDDEN), str(ROOT)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr}"
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {}, f"{module} pulls in {sorted(loaded)}; imported from: {json.dumps(loaded, indent=1)}"


# --- the phone library stays off the webhook path ----------------------------------------------------

# Run in the child: the app answers an amoCRM and a Bitrix24 webhook through its routes (chalice's test
# client; the in-memory store and queue in place of DynamoDB and SQS), and the phone library must not
# have been imported, by anything. Then the worker-side normaliser loads it: the watch works.
_WEBHOOK_PROBE = """
import json, sys, traceback
from urllib.parse import urlencode
ROOT = sys.argv[1]
culprits = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "phonenumbers" and not culprits:
            culprits.append([f"{f.filename[len(ROOT) + 1:]}:{f.lineno}" for f in traceback.extract_stack()
                             if f.filename.startswith(ROOT)])
        return None

sys.meta_path.insert(0, Watch())
import app
from chalice.test import Client
from chalicelib.queue import MemoryQueue
from chalicelib.store.memory import MemoryStore
app._STORE, app._QUEUE = MemoryStore(), MemoryQueue()
secret, token = "s" * 24, "b" * 32
app._STORE.put_integration("amo", {"crm": "amocrm", "counter_id": 1, "metrika_token": "y0_x", "timezone": "UTC",
    "connection": {"base_url": "https://shop.amocrm.ru", "access_token": "t", "webhook_secret": secret}})
app._STORE.put_integration("b24", {"crm": "bitrix24", "counter_id": 1, "metrika_token": "y0_x", "timezone": "UTC",
    "connection": {"webhook_url": "https://x.bitrix24.ru/rest/1/abc/", "application_token": token}})
form = {"Content-Type": "application/x-www-form-urlencoded"}
amo = urlencode([("account[id]", "1"), ("account[subdomain]", "shop"), ("leads[add][0][id]", "5"),
                 ("leads[add][0][last_modified]", "1700000000"), ("contacts[add][0][id]", "7"),
                 ("contacts[add][0][last_modified]", "1700000000"),
                 ("contacts[add][0][custom_fields][0][code]", "PHONE"),
                 ("contacts[add][0][custom_fields][0][values][0][value]", "8 029 123-45-67")])
b24 = urlencode([("event", "ONCRMDEALADD"), ("data[FIELDS][ID]", "9"), ("ts", "1700000000"),
                 ("auth[application_token]", token)])
# A mass action: more entities than are recorded inline, so the body is recorded whole (the inbox path).
mass = urlencode([pair for i in range(12) for pair in (
    (f"leads[status][{i}][id]", str(100 + i)), (f"leads[status][{i}][last_modified]", "1700000000"),
    (f"leads[status][{i}][custom_fields][0][code]", "PHONE"),
    (f"leads[status][{i}][custom_fields][0][values][0][value]", "067 123 45 67"))] + [("account[id]", "1")])
with Client(app.app, stage_name="dev") as client:
    answers = [client.http.post(f"/webhooks/amocrm/amo?secret={secret}", headers=form, body=amo.encode()),
               client.http.post("/webhooks/bitrix24/b24", headers=form, body=b24.encode()),
               client.http.post(f"/webhooks/amocrm/amo?secret={secret}", headers=form, body=mass.encode())]
statuses = [(a.status_code, a.json_body) for a in answers]
loaded_by_webhooks = "phonenumbers" in sys.modules
from chalicelib.normalize import normalize_phone
print(json.dumps({"statuses": statuses, "loaded": loaded_by_webhooks, "culprits": culprits,
                  "worker": [normalize_phone("8 029 123-45-67", region="BY"), "phonenumbers" in sys.modules]}))
"""


def test_the_webhook_path_never_imports_the_phone_library():
    """`phonenumbers` (40 ms to import, 5 MB) is for the worker: a webhook's cold start never pays it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "ADMIN_TOKEN": "purity-admin-token"}
    result = subprocess.run([sys.executable, "-c", _WEBHOOK_PROBE, str(ROOT)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["statuses"] == [[200, {"accepted": 2, "queued": 2, "ignored": 0}],
                                 [200, {"accepted": 1, "queued": 1, "ignored": 0}],
                                 [200, {"accepted": 12, "queued": 0, "ignored": 0, "deferred": 12}]]
    assert probe["loaded"] is False, f"the webhook path imported phonenumbers: {probe['culprits']}"
    assert probe["worker"] == ["375291234567", True]  # and the watch sees it when it is imported


# --- the import graph -------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at module level or inside functions and classes, except those only
    type checkers run (`if TYPE_CHECKING:`)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph() -> dict[str, dict[str, int]]:
    """Module → {imported module: first line}. Targets are resolved to the most specific module:
    `from . import x` points at the submodule `x` when there is one, else at the package."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            for target in targets:
                edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in graph:
                continue  # outside chalicelib
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "chalicelib.status_mapping" in graph["chalicelib.crm.amocrm.translate"]  # from ...status_mapping
    assert "chalicelib.crm" in graph["chalicelib.crm.amocrm.translate"]  # from .. import EntityRows
    assert "chalicelib.crm.form" in graph["chalicelib.crm.amocrm.webhook"]  # from ..form import …
    assert "chalicelib.metrika.schemas" in graph["chalicelib.status_mapping"]


def test_chalicelib_has_no_import_cycle():
    graph = import_graph()
    cycles = _cycles(graph)
    described = [" ; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in cycle for b in cycle if b in graph[a])
                 for cycle in cycles]
    assert cycles == [], "import cycles in chalicelib:\n" + "\n".join(described)


def test_nothing_in_chalicelib_imports_the_app():
    graph = import_graph()
    offenders = {module: line for module, edges in graph.items() for target, line in edges.items()
                 if target == "app" or target.startswith("app.")}
    assert offenders == {}, f"chalicelib must not import app.py: {offenders}"

"""The deployment package holds what the Lambda runtime lacks, and only that (issue 14, item 6).

The Python runtime provides boto3 and botocore ("Building Lambda functions with Python", section
"Runtime-included SDK versions", https://docs.aws.amazon.com/lambda/latest/dg/lambda-python.html), so
requirements.txt leaves them out; everything else the deployed code imports must be in requirements.txt
or pulled in by it. Chalice's `automatic_layer` puts the requirements in one layer for the five functions."""
from __future__ import annotations

import ast
import json
import re
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = {"boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3"}  # the SDK and its dependencies
OURS = {"app", "chalicelib", "chalice"}  # chalice: `chalice package` bundles its runtime part (chalice/app.py)


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned() -> set[str]:
    return {_name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))}


def closure(names: set[str]) -> set[str]:
    """The distributions and everything they require (installed metadata; extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [_name(r) for r in (requires(name) or []) if "extra ==" not in r]
    return seen


def deployed_imports() -> set[str]:
    """Top-level modules the deployed code imports (app.py and chalicelib), at any depth of the code."""
    modules = set()
    for path in [ROOT / "app.py", *sorted((ROOT / "chalicelib").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - OURS


def test_requirements_leave_out_the_sdk_the_runtime_provides():
    assert not pinned() & {"boto3", "botocore"}, "boto3 is in the Lambda runtime: pin it in requirements-dev.txt"
    assert "boto3" in {_name(line) for line in (ROOT / "requirements-dev.txt").read_text().splitlines()}


def test_every_module_the_deployed_code_imports_is_packaged_or_in_the_runtime():
    distributions = packages_distributions()
    packaged = closure(pinned())
    imported = deployed_imports()
    assert {"boto3", "botocore", "requests", "marshmallow", "phonenumbers"} <= imported  # the scan sees them
    for module in sorted(imported):
        owners = {_name(d) for d in distributions.get(module, [module])}
        assert owners & (packaged | RUNTIME), f"{module} ({owners}) is neither in requirements.txt nor in the runtime"


def test_one_layer_for_the_five_functions():
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    assert config["automatic_layer"] is True
    assert not any("automatic_layer" in stage for stage in config["stages"].values())  # both stages alike

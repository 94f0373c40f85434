"""CI checks what gets deployed: `chalice package` for each stage succeeds, and cfn-lint finds nothing in
the two generated SAM templates nor in infra/shared.yaml and infra/stage.yaml.

Both stages are packaged in one process, one after the other: the second reuses the deployment zip of
the first. Chalice keys that zip on requirements.txt *and* the app's files, so after any code change
(and always on a fresh machine) it builds it again, downloading the wheels of requirements.txt for the
Lambda platform: most of this test's time. Older zips can never be reused, so this test removes them
rather than let .chalice/deployments (gitignored) grow by one zip per change.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("dev", "prod")
TEMPLATES = (ROOT / "infra" / "shared.yaml", ROOT / "infra" / "stage.yaml")

PACKAGE_BOTH = """
import sys
from chalice.cli import cli
root, out, stages = sys.argv[1], sys.argv[2], sys.argv[3:]
for stage in stages:
    cli.main(args=["--project-dir", root, "package", "--stage", stage, f"{out}/{stage}"], obj={}, standalone_mode=False)
"""
CFN_LINT = "import sys; from cfnlint.runner import main; sys.exit(main())"
# Slow (a package build): left to `make test`, out of `make check`'s edit-test loop.
pytestmark = pytest.mark.stack
DEPLOYMENT_ZIP = re.compile(r"^[0-9a-f]{32}-python3\.\d+(-arm64)?\.zip$")


def _child_env() -> dict[str, str]:
    # A region is all `chalice package` needs (it calls no AWS API); no emulator endpoints, no secrets.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "ADMIN_TOKEN"}
    return {**env, "AWS_DEFAULT_REGION": "eu-central-1"}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package")
    result = subprocess.run([sys.executable, "-c", PACKAGE_BOTH, str(ROOT), str(out), *STAGES], cwd=ROOT,
                            env=_child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    deployments = ROOT / ".chalice" / "deployments"
    zips = sorted((p for p in deployments.iterdir() if DEPLOYMENT_ZIP.match(p.name)), key=lambda p: p.stat().st_mtime)
    for stale in zips[:-1]:
        stale.unlink(missing_ok=True)
    return out


def test_chalice_packages_every_stage_with_the_configured_functions(packaged):
    for stage in STAGES:
        template = json.loads((packaged / stage / "sam.json").read_text())
        functions = {k for k, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
        assert functions == {"APIHandler", "Admin", "OnEventsMessage", "ReconcileAll", "ConfirmUploads"}, stage
        assert (packaged / stage / "deployment.zip").stat().st_size > 0
        env = template["Resources"]["APIHandler"]["Properties"]["Environment"]["Variables"]
        assert env["STAGE"] == stage


def test_cfn_lint_finds_nothing_in_the_generated_and_the_infrastructure_templates(packaged, tmp_path):
    # A canary the linter must fault, so a linter that checks nothing cannot pass this test.
    canary = tmp_path / "canary.yaml"
    canary.write_text(TEMPLATES[1].read_text().replace("MessageRetentionPeriod: 1209600",
                                                       'MessageRetentionPeriod: "two weeks"'))
    files = [str(packaged / stage / "sam.json") for stage in STAGES] + [str(t) for t in TEMPLATES] + [str(canary)]
    result = subprocess.run([sys.executable, "-c", CFN_LINT, "--format", "parseable", "--", *files], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    findings = [line for line in result.stdout.splitlines() if line.strip()]
    assert findings and all(line.startswith(f"{canary}:") for line in findings), result.stdout + result.stderr
    assert any(":E3012:" in line and "two weeks" in line for line in findings), findings

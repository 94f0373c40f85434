"""CI checks what gets deployed: `chalice package` for each stage succeeds, and cfn-lint finds nothing in
the two generated SAM templates nor in infra/shared.yaml and infra/stage.yaml.

Both stages are packaged in one process, one after the other: the second reuses the deployment zip of
the first. Chalice keys that zip on requirements.txt *and* the app's files, so after any code change
(and always on a fresh machine) it builds it again, downloading the wheels of requirements.txt for the
Lambda platform: 6-25 s, most of it waiting on pip. So a run that includes these tests starts the build
with the session (`start_build`, from conftest's `pytest_configure`), in the background, and the test
waits for it only when its turn comes; a run started otherwise builds in the test. Older zips can never
be reused, so the test removes them rather than let .chalice/deployments (gitignored) grow by one per
change.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("dev", "prod")
TEMPLATES = (ROOT / "infra" / "shared.yaml", ROOT / "infra" / "stage.yaml")
BUILD_DIR_ENV = "DEPLOY_ARTIFACTS_BUILD"  # set by start_build; xdist workers inherit it

# Runs in the child: package each stage, then record the exit status. The child holds the build's lock
# (inherited from start_build) until it exits, so a waiting test wakes exactly when it is done.
BUILD = """
import sys, traceback
from pathlib import Path
from chalice.cli import cli
root, out, stages = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
rc = 0
try:
    for stage in stages:
        cli.main(args=["--project-dir", root, "package", "--stage", stage, str(out / stage)], obj={}, standalone_mode=False)
except BaseException:
    traceback.print_exc()
    rc = 1
(out / "rc").write_text(str(rc))
"""
CFN_LINT = "import sys; from cfnlint.runner import main; sys.exit(main())"
# The functions' logical ids in the SAM template, and their names in .chalice/config.json.
FUNCTIONS = {"APIHandler": "api_handler", "Admin": "admin", "OnEventsMessage": "on_events_message",
             "ReconcileAll": "reconcile_all", "ConfirmUploads": "confirm_uploads", "RefreshTokens": "refresh_tokens"}
DEPLOYMENT_ZIP = re.compile(r"^[0-9a-f]{32}-python3\.\d+(-arm64)?\.zip$")

# Slow (a package build): left to `make test`, out of `make check`'s edit-test loop.
pytestmark = pytest.mark.stack


def _child_env() -> dict[str, str]:
    # A region is all `chalice package` needs (it calls no AWS API); no emulator endpoints, no secrets.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("ADMIN_TOKEN", BUILD_DIR_ENV)}
    return {**env, "AWS_DEFAULT_REGION": "eu-central-1"}


def start_build() -> subprocess.Popen:
    """Start packaging both stages into a fresh directory, named in BUILD_DIR_ENV; the caller (the
    session) stops the process and removes the directory at the end (`stop_build`)."""
    out = Path(tempfile.mkdtemp(prefix="deploy-artifacts-"))
    lock = os.open(out / "lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held by the child from here on (the same open file), released at its exit
    try:
        process = subprocess.Popen([sys.executable, "-c", BUILD, str(ROOT), str(out), *STAGES], cwd=ROOT,
                                   env=_child_env(), stdout=(out / "log").open("w"), stderr=subprocess.STDOUT,
                                   pass_fds=(lock,))
    finally:
        os.close(lock)
    os.environ[BUILD_DIR_ENV] = str(out)
    return process


def stop_build(process: subprocess.Popen) -> None:
    if process.poll() is None:  # the session ended first (interrupted, or the test was deselected)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    out = os.environ.pop(BUILD_DIR_ENV, None)
    if out:
        import shutil
        shutil.rmtree(out, ignore_errors=True)


def _finished_build(out: Path) -> tuple[int, str]:
    with open(out / "lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks until the building child has exited
    rc_file = out / "rc"
    return (int(rc_file.read_text()) if rc_file.exists() else -1), (out / "log").read_text()


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    if os.environ.get(BUILD_DIR_ENV):
        out = Path(os.environ[BUILD_DIR_ENV])
        rc, log = _finished_build(out)
    else:
        out = tmp_path_factory.mktemp("package")
        result = subprocess.run([sys.executable, "-c", BUILD, str(ROOT), str(out), *STAGES], cwd=ROOT,
                                env=_child_env(), capture_output=True, text=True, timeout=600)
        rc, log = int((out / "rc").read_text()) if (out / "rc").exists() else result.returncode, result.stdout + result.stderr
    assert rc == 0, log
    deployments = ROOT / ".chalice" / "deployments"
    zips = sorted((p for p in deployments.iterdir() if DEPLOYMENT_ZIP.match(p.name)), key=lambda p: p.stat().st_mtime)
    for stale in zips[:-1]:
        stale.unlink(missing_ok=True)
    return out


def test_chalice_packages_every_stage_with_the_configured_functions(packaged):
    for stage in STAGES:
        template = json.loads((packaged / stage / "sam.json").read_text())
        functions = {k for k, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
        assert functions == set(FUNCTIONS), stage
        # A role per function, holding that function's policy file (tools/policies.py), the authorizer's too.
        roles = {name: template["Resources"][name]["Properties"]["Role"]["Fn::GetAtt"][0] for name in functions}
        assert len(set(roles.values())) == len(functions), roles
        for name, function in FUNCTIONS.items():
            (policy,) = template["Resources"][roles[name]]["Properties"]["Policies"]
            assert policy["PolicyDocument"] == json.loads((ROOT / ".chalice" / f"policy-{stage}-{function}.json").read_text())
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


def runs_these_tests(config) -> bool:
    """Whether a session will (likely) run this module: the whole suite or this file, and `-m` not
    leaving `stack` tests out. Guessed before collection, so the build can start with the session; a
    wrong guess costs a build nobody waits for (stopped at the end) or a build in the test."""
    if "stack" in (config.getoption("markexpr") or "") or config.getoption("keyword"):
        return False
    here, tests = Path(__file__).resolve(), Path(__file__).resolve().parent
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path in (here, tests, tests.parent):
            return True
    return False

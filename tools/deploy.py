"""The steps of `make deploy` around `chalice deploy`: the admin token before it, the URLs after it.

    python -m tools.deploy token --stage prod   # create the admin token in SSM if there is none
    python -m tools.deploy urls --stage prod    # the API's URL and the webhook URLs to paste into the CRMs

`token` never overwrites a token (rotation is `put-parameter --overwrite`, README "Runbook") and never
prints one: it prints the command that reads it back with your own credentials. `urls` reads the URL
`chalice deploy` wrote to `.chalice/deployed/<stage>.json`, which already ends in the API Gateway stage
(`…/api/`): the webhook paths are appended to it as they are, so no `/api` is doubled.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def token_parameter(chalice_config: dict, stage: str) -> str:
    """The SSM parameter the stage's authorizer reads (`ADMIN_TOKEN_PARAMETER` in .chalice/config.json)."""
    env = chalice_config.get("stages", {}).get(stage, {}).get("environment_variables", {})
    if not env.get("ADMIN_TOKEN_PARAMETER"):
        raise ValueError(f"stage {stage!r} has no ADMIN_TOKEN_PARAMETER in .chalice/config.json")
    return str(env["ADMIN_TOKEN_PARAMETER"])


def read_back_command(parameter: str) -> str:
    return (f"aws ssm get-parameter --name {parameter} --with-decryption "
            "--query Parameter.Value --output text")


def ensure_admin_token(ssm: Any, parameter: str) -> bool:
    """Create the SecureString `parameter` with a fresh random token unless it exists; True when created.
    64 hex characters: no character a shell, a URL or a command-line parser reads specially."""
    try:
        ssm.put_parameter(Name=parameter, Type="SecureString", Value=secrets.token_hex(32), Overwrite=False,
                          Description="metrika-crm-bridge admin token (Authorization: Bearer ...)")
        return True
    except ssm.exceptions.ParameterAlreadyExists:
        return False


def rest_api_resource(deployed: Any, wanted: str) -> str:
    """The `wanted` field (`rest_api_id`, `rest_api_url`) of the REST API in a parsed
    `.chalice/deployed/<stage>.json`; ValueError when the file names none (not deployed, or no routes)."""
    for resource in deployed.get("resources", []) if isinstance(deployed, dict) else []:
        if isinstance(resource, dict) and resource.get("resource_type") == "rest_api" and resource.get(wanted):
            return str(resource[wanted])
    raise ValueError(f"no rest_api resource with a {wanted} in the deployed file: run `chalice deploy` first")


def read_deployed(project_dir: Path, stage: str, wanted: str) -> str:
    """`rest_api_resource` of the stage's deployed file; ValueError with a message for a person."""
    deployed_file = project_dir / ".chalice" / "deployed" / f"{stage}.json"
    try:
        return rest_api_resource(json.loads(deployed_file.read_text()), wanted)
    except FileNotFoundError:
        raise ValueError(f"{deployed_file} does not exist: run `chalice deploy --stage {stage}` first") from None
    except ValueError as exc:  # not JSON, or no REST API in it
        raise ValueError(f"{deployed_file}: {exc}") from None


def api_url(deployed: Any) -> str:
    """The REST API's URL in a parsed deployed file, ending in "/"; ValueError when none."""
    url = rest_api_resource(deployed, "rest_api_url")
    return url if url.endswith("/") else url + "/"


def webhook_urls(base: str) -> dict[str, str]:
    """The URLs to give each CRM, for an integration id and (amoCRM) its webhook secret."""
    return {
        "api": base,
        "amocrm_webhook": f"{base}webhooks/amocrm/<integration id>?secret=<webhook_secret>",
        "bitrix24_webhook": f"{base}webhooks/bitrix24/<integration id>",
        "health": f"{base}health",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["token", "urls"])
    parser.add_argument("--stage", default=os.environ.get("STAGE", "dev"))
    parser.add_argument("--project-dir", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    config_file = args.project_dir / ".chalice" / "config.json"
    try:
        parameter = token_parameter(json.loads(config_file.read_text()), args.stage)
    except FileNotFoundError:
        print(f"{config_file} does not exist: run this in the project's directory (or give --project-dir)",
              file=sys.stderr)
        return 2
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "token":
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
        try:  # no region fails when the client is made, no credentials or a refusal on the call
            created = ensure_admin_token(boto3.client("ssm"), parameter)
        except (ClientError, BotoCoreError) as exc:
            print(f"make deploy: the admin token in SSM parameter {parameter} could not be checked or created: {exc}; "
                  "check the AWS credentials and region", file=sys.stderr)
            return 1
        print(f"admin token {'created in' if created else 'kept:'} SSM parameter {parameter}; read it with\n"
              f"  {read_back_command(parameter)}")
        return 0
    try:
        url = read_deployed(args.project_dir, args.stage, "rest_api_url")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    base = url if url.endswith("/") else url + "/"
    for name, url in webhook_urls(base).items():
        print(f"{name:18} {url}")
    print(f"{'admin token':18} $({read_back_command(parameter)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""API Gateway's own answers in the app's JSON shape: a post-deploy step, run after every `chalice deploy`.

    python -m tools.gateway_responses --stage prod

API Gateway answers some requests before the Lambda runs: no bearer token (401), the authorizer's Deny
(403), a path or method the API does not have (403 "Missing Authentication Token"), its own timeouts
and throttling. Its bodies are `{"message": "…"}`; every answer of ours is `{"error", "message"}`
(`chalicelib.errors.ApiError`). Chalice cannot declare Gateway Responses, and each `chalice deploy`
imports the API's definition in "overwrite" mode, which deletes what the definition does not name
("Import an OpenAPI file to update an existing API definition",
https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-import-api-update.html), so
this step sets them again (PutGatewayResponse) and redeploys the stage (CreateDeployment) — only when
something differs. The REST API's id comes from `.chalice/deployed/<stage>.json`, which `chalice
deploy` writes. Response types: "Gateway response types for API Gateway",
https://docs.aws.amazon.com/apigateway/latest/developerguide/supported-gateway-response-types.html;
templates (simple `$context` substitution, no VTL): "Gateway responses in API Gateway",
https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-gatewayResponse-definition.html.

An unknown path or method becomes a 404 `not_found` (API Gateway's own is a 403 "Missing
Authentication Token", which sends people looking for a token problem).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API_GATEWAY_STAGE = "api"  # `api_gateway_stage` in .chalice/config.json (both stages)
JSON = "application/json"
# Every answer names its charset, as the app's own do (the bodies are ASCII, but a client need not guess).
CONTENT_TYPE = {"gatewayresponse.header.Content-Type": "'application/json; charset=utf-8'"}


def _template(error: str, message: str) -> str:
    """A body template: our shape, with API Gateway's request id (the id its access log and our logs
    share). `message` is either quoted text or a `$context` variable that is already a JSON string."""
    return '{"error": "%s", "message": %s, "request_id": "$context.requestId"}' % (error, message)


def _text(message: str) -> str:
    return json.dumps(message, ensure_ascii=True)


# response type → (status code or None to keep API Gateway's, error, message template, extra headers)
RESPONSES: dict[str, tuple[str | None, str, str, dict[str, str]]] = {
    "UNAUTHORIZED": ("401", "unauthorized", _text("an admin bearer token is required (Authorization: Bearer <token>)"),
                     {"gatewayresponse.header.WWW-Authenticate": "'Bearer'"}),
    "ACCESS_DENIED": ("403", "forbidden", _text("the bearer token is not valid for this API"), {}),
    "MISSING_AUTHENTICATION_TOKEN": ("404", "not_found", _text(
        "no such route: check the path (it starts with the stage, /api) and the HTTP method"), {}),
    "AUTHORIZER_FAILURE": ("500", "authorizer_failed", _text("the admin token could not be checked; please retry"), {}),
    "AUTHORIZER_CONFIGURATION_ERROR": ("500", "authorizer_failed", _text(
        "the admin token could not be checked; please retry"), {}),
    "INTEGRATION_TIMEOUT": ("504", "timeout", _text("the request took longer than API Gateway's 29 s; it may "
                                                    "still complete: check before retrying"), {}),
    "THROTTLED": ("429", "throttled", _text("too many requests; retry after a pause"), {}),
    "REQUEST_TOO_LARGE": ("413", "too_large", _text("the request body is larger than API Gateway takes (10 MB)"), {}),
    # Everything else API Gateway answers itself, with its own message and status.
    "DEFAULT_4XX": (None, "request_refused", "$context.error.messageString", {}),
    "DEFAULT_5XX": (None, "gateway_error", "$context.error.messageString", {}),
}


def desired() -> dict[str, dict[str, Any]]:
    """Each response type as PutGatewayResponse takes it (without the API id)."""
    wanted = {}
    for response_type, (status, error, message, headers) in RESPONSES.items():
        response: dict[str, Any] = {"responseType": response_type, "responseTemplates": {JSON: _template(error, message)},
                                    "responseParameters": {**CONTENT_TYPE, **headers}}
        if status is not None:
            response["statusCode"] = status
        wanted[response_type] = response
    return wanted


def rest_api_id(deployed: dict) -> str:
    """The REST API's id in `.chalice/deployed/<stage>.json` (its `rest_api` resource); ValueError when
    the file names none (not deployed, or deployed without routes)."""
    from tools.deploy import rest_api_resource
    return rest_api_resource(deployed, "rest_api_id")


def apply(client: Any, api_id: str, *, stage: str = API_GATEWAY_STAGE) -> dict:
    """Put every response that differs from `desired()`, then redeploy the stage if any did:
    {"changed": [response types], "deployed": bool}. Running it twice changes nothing the second time."""
    from botocore.exceptions import ClientError
    changed = []
    for response_type, wanted in desired().items():
        try:
            current = client.get_gateway_response(restApiId=api_id, responseType=response_type)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NotFoundException":
                raise
            current = {}
        if all(current.get(key) == value for key, value in wanted.items()
               if key != "responseParameters") and (current.get("responseParameters") or {}) == wanted["responseParameters"]:
            continue
        client.put_gateway_response(restApiId=api_id, **wanted)
        changed.append(response_type)
    if changed:
        client.create_deployment(restApiId=api_id, stageName=stage,
                                 description=f"gateway responses in the app's JSON shape: {', '.join(changed)}")
    return {"changed": changed, "deployed": bool(changed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="dev", help="the Chalice stage deployed (dev, prod)")
    parser.add_argument("--project-dir", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    from tools.deploy import read_deployed
    try:
        api_id = read_deployed(args.project_dir, args.stage, "rest_api_id")
    except ValueError as exc:  # no file, not JSON, or no REST API in it
        print(exc, file=sys.stderr)
        return 1
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError
    try:  # no region fails when the client is made, no credentials or a refusal on the first call
        result = apply(boto3.client("apigateway"), api_id)
    except (ClientError, BotoCoreError) as exc:
        print(f"gateway responses of REST API {api_id} not set: {exc}; check the AWS credentials and region "
              f"(the API is the one `chalice deploy --stage {args.stage}` made)", file=sys.stderr)
        return 1
    print(json.dumps({"rest_api_id": api_id, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

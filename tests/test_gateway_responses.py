"""`python -m tools.gateway_responses`: API Gateway's own answers (401, 403, unknown routes, its
timeouts) in the app's JSON shape, set after `chalice deploy` against moto_server's API Gateway."""
from __future__ import annotations

import json

import boto3
import pytest

from tools import gateway_responses
from tools.gateway_responses import RESPONSES, apply, desired, main, rest_api_id


@pytest.fixture
def apigateway(moto_url, service_env):
    return boto3.client("apigateway", endpoint_url=moto_url)


@pytest.fixture
def rest_api(apigateway):
    """A REST API as `chalice deploy` leaves it: a route with a Lambda-like integration, stage `api`."""
    api_id = apigateway.create_rest_api(name="metrika-crm-bridge")["id"]
    root = apigateway.get_resources(restApiId=api_id)["items"][0]["id"]
    apigateway.put_method(restApiId=api_id, resourceId=root, httpMethod="GET", authorizationType="NONE")
    apigateway.put_integration(restApiId=api_id, resourceId=root, httpMethod="GET", type="MOCK")
    apigateway.create_deployment(restApiId=api_id, stageName="api")
    yield api_id
    apigateway.delete_rest_api(restApiId=api_id)


def deployments(apigateway, api_id):
    return len(apigateway.get_deployments(restApiId=api_id)["items"])


def test_every_body_is_our_json_shape():
    for response_type, response in desired().items():
        template = response["responseTemplates"]["application/json"]
        # What API Gateway substitutes: a quoted request id, and either our text or a quoted message.
        filled = template.replace("$context.requestId", "req-1").replace("$context.error.messageString", '"m"')
        body = json.loads(filled)
        assert set(body) == {"error", "message", "request_id"} and body["request_id"] == "req-1", response_type
        assert body["error"].islower() and body["message"], response_type
    assert desired()["UNAUTHORIZED"]["statusCode"] == "401"
    assert desired()["UNAUTHORIZED"]["responseParameters"] == {
        "gatewayresponse.header.WWW-Authenticate": "'Bearer'",
        "gatewayresponse.header.Content-Type": "'application/json; charset=utf-8'"}
    # Every answer names its charset, as the app's own do.
    assert all(r["responseParameters"]["gatewayresponse.header.Content-Type"] == "'application/json; charset=utf-8'"
               for r in desired().values())
    assert desired()["ACCESS_DENIED"]["statusCode"] == "403"
    assert desired()["MISSING_AUTHENTICATION_TOKEN"]["statusCode"] == "404"
    assert "statusCode" not in desired()["DEFAULT_4XX"]  # API Gateway's own status is kept


def test_the_rest_api_id_comes_from_chalices_deployed_file():
    deployed = {"resources": [{"name": "api_handler", "resource_type": "lambda_function", "lambda_arn": "arn:x"},
                              {"name": "rest_api", "resource_type": "rest_api", "rest_api_id": "abc123",
                               "rest_api_url": "https://abc123.execute-api.eu-central-1.amazonaws.com/api/"}],
                "schema_version": "2.0", "backend": "api"}
    assert rest_api_id(deployed) == "abc123"
    for broken in ({}, {"resources": []}, {"resources": [{"resource_type": "rest_api"}]}, [], {"resources": "x"}):
        with pytest.raises(ValueError):
            rest_api_id(broken)


def test_applied_once_then_nothing_to_do_then_restored_after_a_chalice_deploy(apigateway, rest_api):
    before = deployments(apigateway, rest_api)
    first = apply(apigateway, rest_api)
    assert sorted(first["changed"]) == sorted(RESPONSES) and first["deployed"] is True
    assert deployments(apigateway, rest_api) == before + 1
    stored = apigateway.get_gateway_response(restApiId=rest_api, responseType="ACCESS_DENIED")
    assert stored["statusCode"] == "403" and '"error": "forbidden"' in stored["responseTemplates"]["application/json"]
    assert apply(apigateway, rest_api) == {"changed": [], "deployed": False}  # idempotent: no redeploy
    assert deployments(apigateway, rest_api) == before + 1
    # `chalice deploy` imports the API in overwrite mode, which drops what its definition does not name.
    apigateway.delete_gateway_response(restApiId=rest_api, responseType="UNAUTHORIZED")
    apigateway.put_gateway_response(restApiId=rest_api, responseType="DEFAULT_5XX",
                                    responseTemplates={"application/json": '{"message":$context.error.messageString}'})
    assert sorted(apply(apigateway, rest_api)["changed"]) == ["DEFAULT_5XX", "UNAUTHORIZED"]
    assert deployments(apigateway, rest_api) == before + 2


def test_the_command_reads_the_deployed_file(apigateway, rest_api, tmp_path, monkeypatch, moto_url, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL_API_GATEWAY", moto_url)
    assert main(["--stage", "prod", "--project-dir", str(tmp_path)]) == 1
    assert "chalice deploy --stage prod" in capsys.readouterr().err
    deployed = tmp_path / ".chalice" / "deployed"
    deployed.mkdir(parents=True)
    (deployed / "prod.json").write_text("{not json")
    assert main(["--stage", "prod", "--project-dir", str(tmp_path)]) == 1
    (deployed / "prod.json").write_text(json.dumps({"resources": [{"resource_type": "rest_api", "rest_api_id": rest_api}]}))
    assert main(["--stage", "prod", "--project-dir", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rest_api_id"] == rest_api and printed["deployed"] is True
    assert gateway_responses.API_GATEWAY_STAGE == "api"

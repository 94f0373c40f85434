"""`make deploy`'s own steps (tools/deploy.py): the admin token made once and never shown, the URLs as
`chalice deploy` leaves them."""
import json

import boto3
import pytest

from tools import deploy

DEPLOYED = {"schema_version": "2.0", "backend": "api", "resources": [
    {"name": "api_handler_role", "resource_type": "iam_role", "role_arn": "arn:aws:iam::1:role/x"},
    {"name": "rest_api", "resource_type": "rest_api", "rest_api_id": "abc123",
     "rest_api_url": "https://abc123.execute-api.eu-central-1.amazonaws.com/api/"}]}


def test_the_webhook_urls_follow_the_printed_api_url_without_a_second_api():
    urls = deploy.webhook_urls(deploy.api_url(DEPLOYED))
    assert urls["amocrm_webhook"] == ("https://abc123.execute-api.eu-central-1.amazonaws.com/api/webhooks/amocrm/"
                                      "<integration id>?secret=<webhook_secret>")
    assert all(url.count("/api/") == 1 for url in urls.values())
    no_slash = {**DEPLOYED, "resources": [{**DEPLOYED["resources"][1], "rest_api_url": "https://h/api"}]}
    assert deploy.webhook_urls(deploy.api_url(no_slash))["health"] == "https://h/api/health"


@pytest.mark.parametrize("deployed", [{}, {"resources": []}, {"resources": "x"}, [], "text",
                                      {"resources": [{"resource_type": "rest_api", "rest_api_id": "a"}]}])
def test_a_deployed_file_without_an_api_url_is_refused(deployed):
    with pytest.raises(ValueError):
        deploy.api_url(deployed)


def test_urls_command_prints_them_and_the_token_read_back(tmp_path, capsys):
    (tmp_path / ".chalice" / "deployed").mkdir(parents=True)
    (tmp_path / ".chalice" / "config.json").write_text(json.dumps(
        {"stages": {"prod": {"environment_variables": {"ADMIN_TOKEN_PARAMETER": "/metrika-crm-bridge/prod/admin-token"}}}}))
    assert deploy.main(["urls", "--stage", "prod", "--project-dir", str(tmp_path)]) == 1  # not deployed yet
    assert "chalice deploy --stage prod" in capsys.readouterr().err
    (tmp_path / ".chalice" / "deployed" / "prod.json").write_text(json.dumps(DEPLOYED))
    assert deploy.main(["urls", "--stage", "prod", "--project-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "https://abc123.execute-api.eu-central-1.amazonaws.com/api/webhooks/bitrix24/<integration id>" in out
    assert "aws ssm get-parameter --name /metrika-crm-bridge/prod/admin-token --with-decryption" in out
    assert deploy.main(["urls", "--stage", "qa", "--project-dir", str(tmp_path)]) == 2  # a stage not configured


def test_the_repositorys_stages_name_their_token_parameter():
    config = json.loads((deploy.ROOT / ".chalice" / "config.json").read_text())
    assert {stage: deploy.token_parameter(config, stage) for stage in config["stages"]} == {
        "dev": "/metrika-crm-bridge/dev/admin-token", "prod": "/metrika-crm-bridge/prod/admin-token"}


def test_the_token_is_made_once_never_overwritten_never_printed(service_env, moto_url, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", moto_url)
    ssm = boto3.client("ssm")
    name = "/metrika-crm-bridge/dev/admin-token"
    try:
        ssm.delete_parameter(Name=name)
    except ssm.exceptions.ParameterNotFound:
        pass
    assert deploy.main(["token", "--stage", "dev"]) == 0
    token = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    assert token["Type"] == "SecureString" and len(token["Value"]) == 64 and int(token["Value"], 16) >= 0
    assert deploy.main(["token", "--stage", "dev"]) == 0  # again: kept as it is (rotation is explicit)
    again = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    assert (again["Value"], again["Version"]) == (token["Value"], token["Version"])
    out = capsys.readouterr().out
    assert token["Value"] not in out and "created in SSM parameter" in out and "kept:" in out

"""Install the service into the amoCRM sandbox of the local stack (`make run`), as a person clicking
"Install" in amoCRM would, then connect a Metrika counter: the whole OAuth flow over loopback. Or install
the Bitrix24 application into the Bitrix24 sandbox, as a portal's administrator would.

    python -m tools.install amocrm --token <admin token> [--counter 4242] [--metrika-token y0_…] [--api URL]
    python -m tools.install bitrix24 --portal <Bitrix24 sandbox URL> --token <admin token> [--counter 4343]

1. `GET <api>/install/amocrm` redirects to the sandbox's authorization page, which (standing for the
   user's consent) redirects back to `<api>/oauth/amocrm` with a code: followed here, as a browser would.
   The answer says what was installed (`amocrm-<account id>`) and registered (the webhook).
2. With `--counter`: the integration's config is read (`GET /integrations/<id>`), the counter and Metrika
   token added and saved (`PUT`), and the stage's default status mapping applied
   (`POST …/status-mapping/defaults`). From then on a deal changed in the sandbox reaches Metrika.

Bitrix24: the sandbox POSTs ONAPPINSTALL (a token pair and the application_token) to
`<api>/install/bitrix24`, which verifies the refresh token at the sandbox's OAuth server and binds the
deal and contact events as offline events; then step 2 as above. From then on a deal changed in the
sandbox is queued there, the ONOFFLINEEVENT nudge queues a drain and the worker delivers it.

Prints one JSON object (what each step answered); exit 1 when a step fails (its answer is printed).
On a real account step 1 is the user's own browser: open `<api>/install/amocrm` and allow access; on a
real portal, Bitrix24 POSTs the install when the application is installed (README).
"""
from __future__ import annotations

import argparse
import json
import sys

import requests


def install_amocrm(api: str, *, admin_token: str | None, counter: int | None, metrika_token: str,
                   session: requests.Session | None = None) -> dict:
    http = session or requests.Session()
    http.trust_env = False  # loopback only: no proxy from the environment
    answer = http.get(f"{api}/install/amocrm", timeout=30)  # follows amoCRM's redirect back to us
    installed = _json(answer, "install")
    result: dict = {"install": installed}
    return connect(http, api, installed["installed"], result, admin_token=admin_token, counter=counter,
                   metrika_token=metrika_token)


def install_bitrix24(api: str, portal: str, *, admin_token: str | None, counter: int | None, metrika_token: str,
                     session: requests.Session | None = None) -> dict:
    http = session or requests.Session()
    http.trust_env = False
    played = _json(http.post(f"{portal}/_sandbox/app/install", json={"handler": f"{api}/install/bitrix24"}, timeout=30),
                   "ask the sandbox to install the application")
    if played.get("status") != 200:
        print(json.dumps({"failed": "install", "answer": played}, ensure_ascii=False, indent=1))
        raise SystemExit(1)
    result: dict = {"install": played["answer"]}
    return connect(http, api, played["answer"]["integration_id"], result, admin_token=admin_token, counter=counter,
                   metrika_token=metrika_token)


def connect(http: requests.Session, api: str, integration_id: str, result: dict, *, admin_token: str | None,
            counter: int | None, metrika_token: str) -> dict:
    """Step 2: the counter and its token saved into the installed integration, the default mapping applied."""
    if counter is None:
        return result
    if not admin_token:
        raise SystemExit("--token (the admin token make run printed) is needed to connect a counter")
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    integration = f"{api}/integrations/{integration_id}"
    config = _json(http.get(integration, headers=headers, timeout=30), "read the integration")
    config.update(counter_id=counter, metrika_token=metrika_token)
    result["config"] = _json(http.put(integration, headers=headers, data=json.dumps(config), timeout=30), "connect Metrika")
    result["status_mapping"] = _json(http.post(f"{integration}/status-mapping/defaults", headers=headers, timeout=30),
                                     "apply the default status mapping")
    return result


def _json(response: requests.Response, step: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = {"body": response.text[:500]}
    if response.status_code != 200:
        print(json.dumps({"failed": step, "status": response.status_code, "answer": body}, ensure_ascii=False, indent=1))
        raise SystemExit(1)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crm", choices=["amocrm", "bitrix24"])
    parser.add_argument("--portal", help="bitrix24: the Bitrix24 sandbox's URL make run printed")
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="the API make run printed")
    parser.add_argument("--token", help="the admin token make run printed (to connect a counter)")
    parser.add_argument("--counter", type=int, help="a Metrika counter id to connect (the sandbox makes any on first use)")
    parser.add_argument("--metrika-token", default="y0_local", help="the Metrika token (the sandbox takes any)")
    args = parser.parse_args(argv)
    if args.crm == "bitrix24":
        if not args.portal:
            parser.error("bitrix24 needs --portal (the Bitrix24 sandbox's URL make run printed)")
        result = install_bitrix24(args.api.rstrip("/"), args.portal.rstrip("/"), admin_token=args.token,
                                  counter=args.counter, metrika_token=args.metrika_token)
    else:
        result = install_amocrm(args.api.rstrip("/"), admin_token=args.token, counter=args.counter,
                                metrika_token=args.metrika_token)
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

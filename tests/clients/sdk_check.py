"""Drives the official Python SDK (alibabacloud-emr-serverless-spark20230808
2.3.0) against the kyuubi-broker emulator and prints one JSON object.

  sdk_check.py --port N --ak ID --secret S --workspace W --kyuubi-service K
"""
import argparse
import json

from alibabacloud_tea_openapi import utils_models as oa_models
from alibabacloud_emr_serverless_spark20230808.client import Client
from alibabacloud_emr_serverless_spark20230808 import models as m


def client(port, ak, secret):
    cfg = oa_models.Config(access_key_id=ak, access_key_secret=secret, region_id="cn-hangzhou",
                           endpoint=f"127.0.0.1:{port}", protocol="HTTP")
    return Client(cfg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ak", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--kyuubi-service", required=True)
    a = p.parse_args()
    c = client(a.port, a.ak, a.secret)
    ws, kb = a.workspace, a.kyuubi_service
    out = {}
    value = "sdkcheck0123456789abcdefghijklmn"
    created = c.create_kyuubi_token(ws, kb, m.CreateKyuubiTokenRequest(
        name="sdk check token", token=value, region_id="cn-hangzhou",
        auto_expire_configuration=m.CreateKyuubiTokenRequestAutoExpireConfiguration(enable=True, expire_days=7),
        member_arns=[f"acs:emr::{ws}:member/1234567890123456"]))
    tid = created.body.data.token_id
    out["created_token_id"] = tid
    out["create_request_id"] = created.body.request_id
    listed = c.list_kyuubi_token(ws, kb, m.ListKyuubiTokenRequest(region_id="cn-hangzhou"))
    out["listed"] = [(t.token_id, t.name, t.token) for t in listed.body.data.tokens]
    got = c.get_kyuubi_token(ws, kb, tid, m.GetKyuubiTokenRequest(region_id="cn-hangzhou"))
    d = got.body.data
    out["got"] = {"name": d.name, "token": d.token, "expire_days": d.auto_expire_configuration.expire_days,
                  "expire_minus_create_days": (d.expire_time - d.create_time) / 86400000}
    c.update_kyuubi_token(ws, kb, tid, m.UpdateKyuubiTokenRequest(
        name="renamed by sdk", token="sdkcheckupdated0123456789abcdefg", region_id="cn-hangzhou"))
    got2 = c.get_kyuubi_token(ws, kb, tid, m.GetKyuubiTokenRequest(region_id="cn-hangzhou")).body.data
    out["after_update"] = {"name": got2.name, "token": got2.token}
    c.delete_kyuubi_token(ws, kb, tid, m.DeleteKyuubiTokenRequest(region_id="cn-hangzhou"))
    out["after_delete"] = [t.token_id for t in
                           c.list_kyuubi_token(ws, kb, m.ListKyuubiTokenRequest(region_id="cn-hangzhou")).body.data.tokens]
    svc = c.get_kyuubi_service(ws, kb).body.data
    out["service_state"] = svc.state
    # a query value that needs encoding (the SDK sends '+' for space, signs %20)
    wss = c.list_workspaces(m.ListWorkspacesRequest(region_id="cn-hangzhou", name="a b+c*~"))
    out["workspaces"] = [w.workspace_id for w in wss.body.workspaces]
    # a bad token value is refused with the product's error envelope
    try:
        c.create_kyuubi_token(ws, kb, m.CreateKyuubiTokenRequest(name="bad", token="UPPER", region_id="cn-hangzhou"))
        out["bad_token"] = "accepted"
    except Exception as e:
        out["bad_token"] = {"code": getattr(e, "code", None), "status": getattr(e, "status_code", None)}
    # a wrong secret is refused as the gateway would
    try:
        client(a.port, a.ak, a.secret + "x").list_kyuubi_token(ws, kb, m.ListKyuubiTokenRequest(region_id="cn-hangzhou"))
        out["wrong_secret"] = "accepted"
    except Exception as e:
        out["wrong_secret"] = {"code": getattr(e, "code", None), "status": getattr(e, "status_code", None),
                               "request_id": getattr(e, "request_id", None)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Drives a real HiveServer2 client library (PyHive or impyla) for the
kyuubi-broker integration tests and prints one JSON object with the results.

  hs2_client.py --client impyla|pyhive --mode binary|http --port N
                [--user U --password P] [--ssl-ca PEM [--client-cert PEM --client-key PEM]]
                SCENARIO [ARGS]

Scenarios:
  workload TABLE   create/insert/select (NULLs, unicode, decimals, timestamps),
                   show tables, GetTables/GetColumns, drop
  fetch N          select N rows x 2 columns; row count and checksums
  error            a failing statement; the server's message
  cancel           start a long query, cancel it once it runs, check the state,
                   run another
  long             start a long query, print {"event": "running"} once the
                   server runs it, then wait until it ends or fails; how long
                   that took
  query SQL        run one statement; its rows (as strings)
"""
import argparse
import base64
import datetime
import decimal
import json
import sys
import time
import traceback

LONG_QUERY = "select sum(id % 7) from range(0, 400000000000, 1, 2)"


def connect(args):
    if args.client == "impyla":
        from impala.dbapi import connect as impyla_connect

        kw = dict(host="127.0.0.1", port=args.port, auth_mechanism="PLAIN",
                  user=args.user, password=args.password, timeout=args.timeout)
        if args.kerberos_service:
            # the ticket comes from KRB5CCNAME; the service host is "localhost"
            kw = dict(host="localhost", port=args.port, auth_mechanism="GSSAPI",
                      kerberos_service_name=args.kerberos_service, krb_host="localhost",
                      timeout=args.timeout)
        if args.mode == "http":
            kw.update(use_http_transport=True, http_path="cliservice")
        if args.ssl_ca:
            # verified against this CA only; impyla checks the host name too
            kw.update(use_ssl=True, ca_cert=args.ssl_ca)
            kw["host"] = "localhost"
        return impyla_connect(**kw)
    from pyhive import hive

    if args.kerberos_service and args.mode == "binary":
        # PyHive derives the service host from `host`: connect to localhost
        return hive.connect(host="localhost", port=args.port, auth="KERBEROS",
                            kerberos_service_name=args.kerberos_service)
    if args.mode == "http":
        from thrift.transport import THttpClient

        if args.ssl_ca:
            import ssl

            ctx = ssl.create_default_context(cafile=args.ssl_ca)
            if args.client_cert:
                ctx.load_cert_chain(certfile=args.client_cert, keyfile=args.client_key)
            t = THttpClient.THttpClient(f"https://localhost:{args.port}/cliservice",
                                        ssl_context=ctx)
        else:
            t = THttpClient.THttpClient(f"http://127.0.0.1:{args.port}/cliservice")
        token = base64.b64encode(f"{args.user}:{args.password}".encode()).decode()
        t.setCustomHeaders({"Authorization": "Basic " + token})
        if args.timeout:
            t.setTimeout(args.timeout * 1000)
        return hive.connect(thrift_transport=t)
    return hive.connect(host="127.0.0.1", port=args.port, username=args.user,
                        password=args.password, auth="CUSTOM")


def norm(v):
    if v is None:
        return None
    if isinstance(v, datetime.datetime):
        s = v.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    elif isinstance(v, decimal.Decimal):
        s = str(v)
    else:
        s = str(v)
    if s.endswith(".000") and s[:4].isdigit() and len(s) == 23:
        s = s[:-4]
    return s


def workload(conn, args):
    t = args.arg
    cur = conn.cursor()
    out = {}
    cur.execute(f"drop table if exists {t}")
    cur.execute(f"create table {t} (id int, name string, amount decimal(12,3), ts timestamp, note string) using parquet")
    cur.execute(
        f"insert into {t} values "
        "(1, 'ascii', 12.345, timestamp'2024-01-02 03:04:05.678', null), "
        "(2, 'ünïcødé 数据 🚀', -0.001, null, 'x'), "
        "(3, null, null, timestamp'1970-01-01 00:00:00', '')"
    )
    cur.execute(f"select id, name, amount, ts, note from {t} order by id")
    out["rows"] = [[norm(v) for v in r] for r in cur.fetchall()]
    cur.execute("show tables")
    out["show_tables"] = sorted({str(r[1]) for r in cur.fetchall()})
    out["tables"] = get_tables(conn, cur, args, t)
    out["columns"] = get_columns(conn, cur, args, t)
    cur.execute(f"drop table {t}")
    cur.close()
    return out


def get_tables(conn, cur, args, t):
    if args.client == "impyla":
        # GetTables RPC
        cur.get_tables(database_name="default")
        return [r[2] for r in cur.fetchall() if r[2] == t]
    from TCLIService import ttypes

    req = ttypes.TGetTablesReq(sessionHandle=conn._sessionHandle, schemaName="default", tableName=t)
    return [r[2] for r in _metadata(conn, conn.client.GetTables(req))]


def get_columns(conn, cur, args, t):
    if args.client == "impyla":
        # GetColumns RPC
        return [name for name, _type in cur.get_table_schema(t, database_name="default")]
    from TCLIService import ttypes

    req = ttypes.TGetColumnsReq(sessionHandle=conn._sessionHandle, schemaName="default", tableName=t)
    return [r[3] for r in _metadata(conn, conn.client.GetColumns(req))]


def _metadata(conn, resp):
    from pyhive import hive

    hive._check_status(resp)
    cur = conn.cursor()
    cur._operationHandle = resp.operationHandle
    cur._state = cur._STATE_RUNNING
    return cur.fetchall()


def fetch(conn, args):
    n = int(args.arg)
    cur = conn.cursor()
    cur.execute(f"select id, cast(id as string) as s from range({n})")
    rows = sum_id = 0
    h = 0
    while True:
        batch = cur.fetchmany(10000)
        if not batch:
            break
        for i, s in batch:
            rows += 1
            sum_id += int(i)
            for ch in s.encode():
                h = (h * 131 + ch) % 2305843009213693951
    cur.close()
    return {"rows": rows, "sum_id": sum_id, "checksum": h}


def error(conn, args):
    cur = conn.cursor()
    try:
        cur.execute("select nosuchcol from kb_no_such_table")
        return {"raised": False}
    except Exception as e:  # the client's own exception type
        return {"raised": True, "message": str(e)}


def state_name(cur, args):
    if args.client == "impyla":
        return cur.status()
    from TCLIService import ttypes

    return ttypes.TOperationState._VALUES_TO_NAMES[cur.poll().operationState]


PENDING = ("INITIALIZED_STATE", "PENDING_STATE")
EXECUTING = PENDING + ("RUNNING_STATE",)


def submit(cur, args, sql):
    if args.client == "impyla":
        cur.execute_async(sql)
    else:
        cur.execute(sql, async_=True)


def poll_state(cur, args):
    """One GetOperationStatus, not retried (impyla's own wait retries HTTP
    errors, which would hide the first failure behind later ones)."""
    if args.client == "impyla":
        from impala._thrift_gen.TCLIService.ttypes import TGetOperationStatusReq, TOperationState

        op = cur._last_operation
        resp = op._rpc("GetOperationStatus", TGetOperationStatusReq(operationHandle=op.handle), False)
        name = TOperationState._VALUES_TO_NAMES[resp.operationState]
    else:
        from TCLIService import ttypes

        resp = cur.poll()
        name = ttypes.TOperationState._VALUES_TO_NAMES[resp.operationState]
    if name == "ERROR_STATE":
        raise RuntimeError(f"ERROR_STATE: {resp.errorMessage}")
    return name


def wait_while(cur, args, states):
    """Polls until the operation leaves `states`; returns the state it reached."""
    while True:
        state = poll_state(cur, args)
        if state not in states:
            return state
        time.sleep(0.05)


def cancel(conn, args):
    cur = conn.cursor()
    submit(cur, args, LONG_QUERY)
    before = wait_while(cur, args, PENDING)
    t0 = time.time()
    if args.client == "impyla":
        op = cur._last_operation
        cur.cancel_operation(reset_state=False)
        after = op.get_status()
    else:
        cur.cancel()
        after = state_name(cur, args)
    cancel_s = time.time() - t0
    cur2 = conn.cursor()
    cur2.execute("select 7")
    again = cur2.fetchall()[0][0]
    return {"before": before, "after": after, "cancel_seconds": cancel_s, "next_query": again}


def long(conn, args):
    cur = conn.cursor()
    t0 = time.time()
    try:
        submit(cur, args, LONG_QUERY)
        state = wait_while(cur, args, PENDING)
        if state == "RUNNING_STATE":
            print(json.dumps({"event": "running"}), flush=True)
        state = wait_while(cur, args, EXECUTING)
        return {"raised": False, "state": state, "seconds": time.time() - t0}
    except Exception as e:
        return {"raised": True, "message": f"{type(e).__name__}: {e}", "seconds": time.time() - t0}


def query(conn, args):
    cur = conn.cursor()
    cur.execute(args.arg)
    return {"rows": [[None if v is None else str(v) for v in r] for r in cur.fetchall()]}


def metadata(conn, args):
    """The metadata calls a BI tool makes on connect, twice over: schemas,
    the tables of one database, the columns of one table (arg: db.table)."""
    db, t = args.arg.split(".")
    out = []
    for _ in range(2):
        cur = conn.cursor()
        if args.client == "impyla":
            # GetSchemas, GetTables, GetColumns RPCs
            cur.get_databases()
            schemas = sorted(str(r[0]) for r in cur.fetchall())
            cur.get_tables(database_name=db)
            tables = sorted(str(r[2]) for r in cur.fetchall())
            columns = [[str(name), str(kind)] for name, kind in cur.get_table_schema(t, database_name=db)]
        else:
            from TCLIService import ttypes

            h = conn._sessionHandle
            schemas = sorted(str(r[0]) for r in _metadata(conn, conn.client.GetSchemas(
                ttypes.TGetSchemasReq(sessionHandle=h))))
            tables = sorted(str(r[2]) for r in _metadata(conn, conn.client.GetTables(
                ttypes.TGetTablesReq(sessionHandle=h, schemaName=db, tableName="%"))))
            columns = [[str(r[3]), str(r[5])] for r in _metadata(conn, conn.client.GetColumns(
                ttypes.TGetColumnsReq(sessionHandle=h, schemaName=db, tableName=t)))]
        cur.close()
        out.append({"schemas": schemas, "tables": tables, "columns": columns})
    return {"first": out[0], "second": out[1]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--client", choices=["impyla", "pyhive"], required=True)
    p.add_argument("--mode", choices=["binary", "http"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="alice")
    p.add_argument("--password", default="alice-pw")
    p.add_argument("--timeout", type=int, default=0)
    p.add_argument("--kerberos-service", help="impyla: GSSAPI/SPNEGO to <service>/localhost")
    p.add_argument("--ssl-ca", help="TLS to localhost, verified against this PEM CA "
                   "(impyla: use_ssl + ca_cert; PyHive: https, HTTP mode only)")
    p.add_argument("--client-cert", help="PyHive https: present this PEM client certificate")
    p.add_argument("--client-key", help="PyHive https: the client certificate's key")
    p.add_argument("scenario", choices=["workload", "fetch", "error", "cancel", "long", "query", "metadata"])
    p.add_argument("arg", nargs="?")
    args = p.parse_args()
    if args.timeout == 0:
        args.timeout = None
    try:
        conn = connect(args)
        result = globals()[args.scenario](conn, args)
        if args.scenario != "long":
            conn.close()
    except Exception as e:
        result = {"fatal": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    print(json.dumps(result, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    sys.exit(main())

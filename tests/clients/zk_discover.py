"""impyla through ZooKeeper discovery, as a Python BI stack does it.

impyla and PyHive have no `serviceDiscoveryMode=zooKeeper`; a Python
application that finds HiveServer2 or Kyuubi through ZooKeeper lists the
namespace with kazoo, picks a server and connects to it. This does that:
`zk` mode reads the namespace (kazoo 2.11), takes a random child
`serverUri=host:port;version=...;sequence=N`, and runs one query through
impyla; `direct` mode runs the same query against --port, for comparison.

Prints one JSON line: where it connected, the query's value and the times
(seconds from start) to the lookup and to the first result.
"""

import argparse
import json
import random
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["zk", "direct"])
    p.add_argument("--zookeeper", default="127.0.0.1:2181")
    p.add_argument("--namespace", default="kyuubi-broker")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--sql", default="select 'found'")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()

    from impala.dbapi import connect

    runs = []
    for _ in range(args.repeat):
        t0 = time.monotonic()
        if args.mode == "zk":
            from kazoo.client import KazooClient

            zk = KazooClient(hosts=args.zookeeper, read_only=True, timeout=10)
            zk.start(timeout=10)
            try:
                children = zk.get_children("/" + args.namespace)
            finally:
                zk.stop()
                zk.close()
            servers = [c for c in children if c.startswith("serverUri=")]
            if not servers:
                print(json.dumps({"error": "no server registered", "children": children}))
                return 1
            uri = random.choice(servers).split(";")[0][len("serverUri="):]
            host, port = uri.rsplit(":", 1)
            port = int(port)
        else:
            host, port = "127.0.0.1", args.port
        t_lookup = time.monotonic() - t0
        conn = connect(host=host, port=port, auth_mechanism="PLAIN", user="alice",
                       password="any", timeout=30)
        cur = conn.cursor()
        cur.execute(args.sql)
        value = cur.fetchall()[0][0]
        t_first = time.monotonic() - t0
        cur.close()
        conn.close()
        runs.append({"host": host, "port": port, "value": value,
                     "lookup_s": t_lookup, "first_result_s": t_first})
    print(json.dumps({"runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

//! Microbenchmarks of the per-RPC parsing work: the header peek every message
//! gets, the walk that delimits NOSASL messages, and the OpenSession rewrite.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kyuubi_broker::tcli::{rewrite_open_session, OpenSessionEdit};
use kyuubi_broker::wire::thrift::{message_len, peek_header, ttype, MessageType, Writer};

/// A FetchResults reply: `rows` rows of (i64, string) in columnar form.
fn fetch_reply(rows: usize) -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin("FetchResults", MessageType::Reply, 1);
    w.field(ttype::STRUCT, 0);
    w.field(ttype::STRUCT, 1); // status
    w.field(ttype::I32, 1);
    w.i32(0);
    w.stop();
    w.field(ttype::BOOL, 2);
    w.u8(1);
    w.field(ttype::STRUCT, 3); // TRowSet
    w.field(ttype::I64, 1);
    w.buf.extend_from_slice(&0i64.to_be_bytes());
    w.field(ttype::LIST, 2);
    w.u8(ttype::STRUCT);
    w.i32(0);
    w.field(ttype::LIST, 3);
    w.u8(ttype::STRUCT);
    w.i32(2);
    // i64 column
    w.field(ttype::STRUCT, 5);
    w.field(ttype::LIST, 1);
    w.u8(ttype::I64);
    w.i32(rows as i32);
    for i in 0..rows as i64 {
        w.buf.extend_from_slice(&i.to_be_bytes());
    }
    w.field(ttype::STRING, 2);
    w.binary(&[0]);
    w.stop();
    w.stop();
    // string column
    w.field(ttype::STRUCT, 7);
    w.field(ttype::LIST, 1);
    w.u8(ttype::STRING);
    w.i32(rows as i32);
    for i in 0..rows {
        w.string(&format!("user_{i:06}@example.com"));
    }
    w.field(ttype::STRING, 2);
    w.binary(&[0]);
    w.stop();
    w.stop();
    w.stop(); // TRowSet
    w.stop(); // resp
    w.stop(); // result
    w.buf
}

fn open_session() -> Vec<u8> {
    let mut w = Writer::default();
    w.message_begin("OpenSession", MessageType::Call, 1);
    w.field(ttype::STRUCT, 1);
    w.field(ttype::I32, 1);
    w.i32(9);
    w.field(ttype::MAP, 4);
    w.string_map(&[
        ("use:database".into(), "default".into()),
        (
            "set:hiveconf:hive.server2.thrift.resultset.default.fetch.size".into(),
            "1000".into(),
        ),
    ]);
    w.stop();
    w.stop();
    w.buf
}

fn bench(c: &mut Criterion) {
    let reply = fetch_reply(10_000);
    c.bench_function("peek_header", |b| {
        b.iter(|| peek_header(black_box(&reply)).unwrap().seqid)
    });

    let mut g = c.benchmark_group("message_len");
    g.throughput(Throughput::Bytes(reply.len() as u64));
    g.bench_function("fetch_results_10k_rows", |b| {
        b.iter(|| message_len(black_box(&reply)).unwrap())
    });
    g.finish();

    let os = open_session();
    let edit = OpenSessionEdit {
        credentials: Some(("etl".into(), "secret".into())),
        configuration: Some(vec![
            ("use:database".into(), "default".into()),
            ("kyuubi.client.ipAddress".into(), "10.0.0.7".into()),
        ]),
    };
    c.bench_function("open_session_rewrite", |b| {
        b.iter(|| rewrite_open_session(black_box(&os), &edit).unwrap().len())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

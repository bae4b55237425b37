#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kyuubi_broker::fuzzing::http_auth(data));

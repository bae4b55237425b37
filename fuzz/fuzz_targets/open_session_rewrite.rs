#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kyuubi_broker::fuzzing::open_session_rewrite(data));

//! Subcommands other than `serve`, kept out of `main.rs`.

pub mod bench;
pub mod connstr;
pub mod emulate;
pub mod stats;
pub mod token;

//! Subcommands other than `serve`, kept out of `main.rs`.

pub mod connstr;
pub mod emulate;
pub mod token;

//! Byte-level codecs. `sasl` and `thrift` are sans-IO and fed byte slices;
//! `io` drives them over a TCP stream.

pub mod io;
pub mod sasl;
pub mod thrift;

//! Byte-level codecs. `sasl` and `thrift` are sans-IO and fed byte slices;
//! `io` drives them over a [`stream::Stream`], plain or TLS.

pub mod io;
pub mod sasl;
pub mod stream;
pub mod thrift;

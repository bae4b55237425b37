//! Attacks on a live broker, one test per attack (issue 10). Each test
//! asserts the safe behaviour and that a normal client is still served.
//! The attacks are grouped by the part of the broker they aim at.

mod common;

#[path = "hostile/prelogin.rs"]
mod prelogin;

#[path = "hostile/connection.rs"]
mod connection;

#[path = "hostile/logins.rs"]
mod logins;

#[path = "hostile/limits.rs"]
mod limits;

#[path = "hostile/handles.rs"]
mod handles;

#[path = "hostile/sessions.rs"]
mod sessions;

//! A string that must never reach logs, metrics or error texts.

use std::fmt;

use serde::Deserialize;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Holds a password, token or key. `Debug` and `Display` print `****`; the
/// value is reachable only through [`Secret::expose`], which makes every use
/// easy to find. Dropping it overwrites the value, so it does not linger in
/// freed memory (copies made through `expose` are the caller's to mind).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(v: impl Into<String>) -> Self {
        Secret(v.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison, for checking credentials.
    pub fn ct_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl Zeroize for Secret {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s:?} {s}"), "Secret(****) ****");
        assert_eq!(s.expose(), "hunter2-token");
    }

    #[test]
    fn dropping_wipes_the_value() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<Secret>();
        // what Drop runs
        let mut s = Secret::new("hunter2-token");
        s.zeroize();
        assert!(s.is_empty());
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        let s = Secret::new("abc");
        assert!(s.ct_eq("abc"));
        assert!(!s.ct_eq("abd"));
        assert!(!s.ct_eq("ab"));
    }
}

//! Login floods: backoff per user and client address, per-address failure budget, auth work off the async workers.

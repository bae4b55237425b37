//! Before login: oversized and NUL-flooded SASL messages, handshake-phase size caps, malformed PLAIN.

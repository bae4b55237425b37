//! Binary connections after the handshake: NOSASL deadline, trickled bare messages, idle and slow-reader connections.

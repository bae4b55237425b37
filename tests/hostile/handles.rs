//! Handles belong to their owner: another user's session or operation handles, duplicate or malformed handle fields.

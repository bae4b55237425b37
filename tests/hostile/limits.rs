//! Connection caps, deny list, HTTP and admin header/body timeouts.

//! The EMR Serverless Spark management API (product `emr-serverless-spark`,
//! version 2023-08-08, ROA style): request building with the DeleteWorkspace
//! guard ([`request`]), ACS3-HMAC-SHA256 signing ([`sign`]), and the
//! credential chain the official tools use ([`credentials`]).

pub mod client;
pub mod credentials;
pub mod request;
pub mod sign;

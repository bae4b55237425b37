//! A fleet of brokers on ZooKeeper (`[cluster]`).
//!
//! [`discovery`] registers every listener where stock Hive JDBC, Kyuubi's
//! JDBC driver and Knox look for HiveServer2 instances, and takes the
//! registrations away first when the broker drains.

pub mod discovery;

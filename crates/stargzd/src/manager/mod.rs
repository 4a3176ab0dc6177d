//! The FUSE manager: the process that holds layer mounts across daemon restarts.
//!
//! [`protocol`] is what both sides speak, [`launch`] where the manager lives and how
//! it is started, [`client`] the daemon's side and [`server`] the manager's own.

pub mod client;
pub mod launch;
pub mod protocol;
pub mod server;

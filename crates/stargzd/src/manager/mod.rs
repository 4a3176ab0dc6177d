//! Talking to the FUSE manager, the process that holds layer mounts across daemon
//! restarts: [`protocol`] is what both sides speak, [`launch`] where the manager lives
//! and how it is started, [`client`] the daemon's side. The manager's own side is
//! [`crate::fuse_manager`].

pub mod client;
pub mod launch;
pub mod protocol;

//! containerd-stargz-grpc: serves the stargz snapshotter to containerd.
fn main() {}

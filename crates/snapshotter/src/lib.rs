//! containerd remote snapshotter library.
pub mod proto {
    //! Generated containerd API types.
}

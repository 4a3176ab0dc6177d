//! Generates the Snapshots service (server and client) and its messages from the vendored protos.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &["proto/snapshots.proto", "proto/types/mount.proto"],
            &["proto"],
        )?;
    Ok(())
}

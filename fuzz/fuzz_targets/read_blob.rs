//! Reading a whole blob: open it, read every file (each chunk decompressed and checked),
//! and run the full verifier. Corrupt input must end in an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let blob = data.to_vec();
    if let Ok(reader) = estargz::Reader::open(&blob, &Default::default()) {
        for (id, node) in reader.index.nodes() {
            if node.kind == estargz::NodeKind::Reg {
                let _ = reader.read_range(&blob, id, 0, node.size.min(1 << 20));
            }
        }
    }
    let _ = estargz::verify_blob(&blob, None, None);
});

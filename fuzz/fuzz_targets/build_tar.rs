//! Building from an arbitrary tar: either a typed error, or a blob that our own
//! verifier accepts against that same tar.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = estargz::BuildOptions {
        chunk_size: 512,
        threads: 1,
        ..Default::default()
    };
    let mut blob = Vec::new();
    if let Ok(out) = estargz::build(Cursor::new(data), &mut blob, &opts) {
        if let Err(e) = estargz::verify_blob(&blob, Some(&out.toc_digest), None) {
            panic!("a blob we built does not verify: {e}");
        }
    }
});

//! Footer detection, TOC decompression, JSON parsing and index building on arbitrary
//! bytes: the first byte picks whether the input is a whole blob or bare TOC JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let blob = rest.to_vec();
        let _ = estargz::Reader::open(
            &blob,
            &estargz::OpenOptions {
                tail_size: 4096,
                ..Default::default()
            },
        );
    } else if let Ok(toc) = estargz::Toc::from_json(rest) {
        if let Ok(index) = estargz::Index::build(&toc, 1 << 40) {
            for (_, node) in index.nodes() {
                let _ = node.chunks_for(0, node.size);
            }
        }
        let _ = toc.to_json();
    }
});

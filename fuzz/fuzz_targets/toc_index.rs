//! The TOC resolver on arbitrary JSON: parsing with the entry budget, building the
//! index (implicit directories, duplicates, hardlink chains and loops, chunk
//! coverage and compressed ranges) under a small memory budget, then walking it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(toc) = estargz::Toc::from_json_limited(data, 4096) else {
        return;
    };
    let Ok(index) = estargz::Index::build_with_budget(&toc, 1 << 40, 64 << 20) else {
        return;
    };
    for (id, node) in index.nodes() {
        let _ = node.chunks_for(0, node.size);
        let _ = node.chunks_for(node.size / 2, u64::MAX);
        for c in &node.chunks {
            assert!(c.blob_offset < c.blob_end, "empty fetch range");
            assert!(
                c.blob_end - c.blob_offset
                    <= estargz::max_compressed_len(c.inner_offset + c.size),
                "fetch range larger than the chunk can need"
            );
            assert!(c.size <= estargz::MAX_CHUNK_SIZE);
        }
        for (name, &child) in &node.children {
            assert!(!name.is_empty() && !name.contains('/'));
            assert!(index.get(child).is_some());
        }
        let _ = id;
    }
    for (path, id) in index.paths() {
        assert_eq!(index.lookup(path), Some(id));
        assert!(!path.split('/').any(|c| c == ".."));
    }
});

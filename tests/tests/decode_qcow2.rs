//! qcow2 images of every shape `qemu-img` and `qemu-io` make decode, in one pass, to the disk
//! `qemu-img compare` finds identical: from a file (random access) and from a stream.

// Fixture helpers outside #[test] fns: a failed step must stop the test loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use dvcr_formats::Options;
use dvcr_tests::{
    Feed, Scratch, Wrapper, assert_same_as_qemu, decode_to_raw, decodes_like_qemu, mixed_raw,
    qemu_img, qemu_io, write,
};

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `qemu-img create` with options, then scattered writes, zero writes and a write that ends
/// at the very end of the disk.
fn written(s: &Scratch, name: &str, size_mib: u64, options: &[&str]) -> PathBuf {
    let p = s.path(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    for o in options {
        args.extend(["-o", o]);
    }
    args.push(path(&p));
    let size = format!("{size_mib}M");
    args.push(&size);
    qemu_img(&args);
    let last = format!("write -P 0x77 {}M 1M", size_mib - 1);
    qemu_io(
        "qcow2",
        &p,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x11 5M 64k",
            "write -z 7M 1M",
            "write -P 0x5a 20M 512",
            "write -P 0x3c 3M 4k",
            "write -P 0x2d 2M 1536",
            &last,
        ],
    );
    p
}

/// `qemu-img convert` of a mixed raw file (noise, a compressible run, zeros).
fn converted(s: &Scratch, name: &str, options: &[&str], compress: bool) -> PathBuf {
    let raw = mixed_raw(s, &format!("{name}.src"), 48 << 20);
    let p = s.path(name);
    let mut args = vec!["convert", "-q", "-O", "qcow2"];
    if compress {
        args.push("-c");
    }
    for o in options {
        args.extend(["-o", o]);
    }
    args.push(path(&raw));
    args.push(path(&p));
    qemu_img(&args);
    p
}

macro_rules! qcow2_case {
    ($name:ident, |$s:ident| $make:expr) => {
        #[test]
        fn $name() {
            let $s = Scratch::new();
            let image: PathBuf = $make;
            let decoded = decodes_like_qemu(&$s, &image, "qcow2");
            assert_eq!(decoded.info.format, dvcr_formats::Format::Qcow2);
        }
    };
}

qcow2_case!(a_qcow2_v3_with_scattered_writes_decodes_like_qemu, |s| {
    written(&s, "a.qcow2", 64, &[])
});
qcow2_case!(a_qcow2_v2_decodes_like_qemu, |s| written(
    &s,
    "a.qcow2",
    64,
    &["compat=0.10"]
));
qcow2_case!(a_qcow2_with_512_byte_clusters_decodes_like_qemu, |s| {
    written(&s, "a.qcow2", 24, &["cluster_size=512"])
});
qcow2_case!(a_qcow2_with_4k_clusters_decodes_like_qemu, |s| written(
    &s,
    "a.qcow2",
    64,
    &["cluster_size=4096"]
));
qcow2_case!(a_qcow2_with_2m_clusters_decodes_like_qemu, |s| written(
    &s,
    "a.qcow2",
    64,
    &["cluster_size=2M"]
));
qcow2_case!(
    a_qcow2_with_extended_l2_and_partial_subclusters_decodes_like_qemu,
    |s| written(&s, "a.qcow2", 64, &["extended_l2=on", "cluster_size=128k"])
);
qcow2_case!(a_qcow2_with_metadata_preallocation_decodes_like_qemu, |s| {
    written(&s, "a.qcow2", 32, &["preallocation=metadata"])
});
qcow2_case!(a_qcow2_with_falloc_preallocation_decodes_like_qemu, |s| {
    written(&s, "a.qcow2", 32, &["preallocation=falloc"])
});
qcow2_case!(a_qcow2_with_full_preallocation_decodes_like_qemu, |s| {
    written(&s, "a.qcow2", 32, &["preallocation=full"])
});
qcow2_case!(
    a_qcow2_with_lazy_refcounts_and_wide_refcounts_decodes_like_qemu,
    |s| written(
        &s,
        "a.qcow2",
        64,
        &["lazy_refcounts=on", "refcount_bits=64"]
    )
);
qcow2_case!(a_converted_qcow2_decodes_like_qemu, |s| converted(
    &s,
    "c.qcow2",
    &[],
    false
));
qcow2_case!(a_deflate_compressed_qcow2_decodes_like_qemu, |s| {
    converted(&s, "c.qcow2", &[], true)
});
qcow2_case!(a_zstd_compressed_qcow2_decodes_like_qemu, |s| converted(
    &s,
    "c.qcow2",
    &["compression_type=zstd"],
    true
));
qcow2_case!(a_compressed_qcow2_with_4k_clusters_decodes_like_qemu, |s| {
    converted(&s, "c.qcow2", &["cluster_size=4096"], true)
});
qcow2_case!(a_compressed_qcow2_with_2m_clusters_decodes_like_qemu, |s| {
    converted(&s, "c.qcow2", &["cluster_size=2M"], true)
});
qcow2_case!(
    a_qcow2_whose_odd_virtual_size_ends_inside_a_cluster_decodes_like_qemu,
    |s| {
        let p = s.path("odd.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path(&p), "10000000"]);
        qemu_io(
            "qcow2",
            &p,
            &["write -P 0x42 9999360 640", "write -P 1 0 4k"],
        );
        p
    }
);
qcow2_case!(
    a_qcow2_written_after_a_snapshot_with_copied_l2_tables_decodes_like_qemu,
    |s| {
        let p = written(&s, "snap.qcow2", 32, &[]);
        qemu_img(&["snapshot", "-c", "one", path(&p)]);
        qemu_io("qcow2", &p, &["write -P 0xcd 64k 64k", "write -z 5M 64k"]);
        qemu_img(&["snapshot", "-c", "two", path(&p)]);
        qemu_io("qcow2", &p, &["write -P 0xee 20M 4k"]);
        p
    }
);
qcow2_case!(
    a_qcow2_whose_l1_table_moved_after_the_data_on_resize_decodes_like_qemu,
    |s| {
        let p = written(&s, "resized.qcow2", 32, &["cluster_size=4096"]);
        qemu_img(&["resize", "-q", path(&p), "80M"]);
        qemu_io("qcow2", &p, &["write -P 0x99 70M 8k"]);
        p
    }
);

#[test]
fn a_compressed_qcow2_in_every_wrapper_decodes_like_qemu() {
    let s = Scratch::new();
    let image = converted(&s, "c.qcow2", &[], true);
    for w in Wrapper::ALL {
        let wrapped = write(&s, &format!("c.qcow2.{}", w.name()), &w.compress(&image));
        let (decoded, raw) = decode_to_raw(&s, &wrapped, Feed::Stream, &Options::default())
            .unwrap_or_else(|e| panic!("{}: {e}", w.name()));
        assert_eq!(decoded.compression.len(), 1);
        assert_same_as_qemu(&image, "qcow2", &raw);
    }
}

#[test]
fn l2_tables_that_come_after_their_data_spill_to_scratch_from_a_stream_and_not_from_a_file() {
    let s = Scratch::new();
    let p = written(&s, "snap.qcow2", 32, &[]);
    // More data than one read chunk before the snapshot, so that its copied L2 table comes
    // whole chunks after the data it maps.
    qemu_io("qcow2", &p, &["write -P 0x5e 8M 9M"]);
    qemu_img(&["snapshot", "-c", "one", path(&p)]);
    qemu_io("qcow2", &p, &["write -P 0xcd 64k 64k"]);
    let small = Options {
        pending_memory: 64 << 10,
        ..Options::default()
    };
    let (from_stream, raw) = decode_to_raw(&s, &p, Feed::Stream, &small).expect("stream decode");
    assert_same_as_qemu(&p, "qcow2", &raw);
    assert!(
        from_stream.scratch_bytes > 0,
        "the copied L2 table maps 10 MiB of earlier data: {from_stream:?}"
    );
    let (from_file, raw) = decode_to_raw(&s, &p, Feed::File, &small).expect("file decode");
    assert_same_as_qemu(&p, "qcow2", &raw);
    assert_eq!(from_file.scratch_bytes, 0, "random access needs no scratch");
}

#[test]
fn a_compressed_qcow2_decodes_with_one_thread_and_with_many() {
    let s = Scratch::new();
    let image = converted(&s, "c.qcow2", &[], true);
    for threads in [1, 4] {
        let opts = Options {
            threads,
            ..Options::default()
        };
        let (_, raw) = decode_to_raw(&s, &image, Feed::Stream, &opts).expect("decode");
        assert_same_as_qemu(&image, "qcow2", &raw);
    }
}

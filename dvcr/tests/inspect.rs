//! `dvcr inspect` against `qemu-img info`: every image shape the platform accepts, made by the
//! real tools, each bare and inside every compression wrapper, read from a file and from
//! standard input; and every unsafe shape refused with a clear message and exit code 1.

// Fixture helpers outside #[test] fns: a failed step must stop the test loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dvcr_tests::{Scratch, Wrapper, noise, patch, qemu_img, qemu_info, qemu_io, run, write};

const DVCR: &str = env!("CARGO_BIN_EXE_dvcr");

/// How an image reaches `dvcr inspect`.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// The path on the command line.
    File,
    /// `-`, with the file redirected to standard input (read as the file itself).
    Redirect,
    /// `-`, with the bytes coming through a pipe (read once as a stream).
    Stdin,
}

fn inspect_json(image: &Path, via: Via) -> (bool, serde_json::Value, String) {
    let mut cmd = Command::new(DVCR);
    cmd.args(["inspect", "--json"]);
    match via {
        Via::File => {
            cmd.arg(image);
        }
        Via::Redirect => {
            cmd.arg("-").stdin(Stdio::from(
                fs::File::open(image).expect("opening the image"),
            ));
        }
        Via::Stdin => {
            cmd.arg("-").stdin(Stdio::piped());
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running dvcr");
    let feeder = child.stdin.take().map(|mut pipe| {
        let image = image.to_owned();
        std::thread::spawn(move || {
            let mut file = fs::File::open(image).expect("opening the image");
            // dvcr may stop reading early (a refused image): a broken pipe is fine.
            let _ = std::io::copy(&mut file, &mut pipe);
        })
    });
    let out = child.wait_with_output().expect("running dvcr");
    if let Some(feeder) = feeder {
        feeder.join().expect("feeding the pipe");
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "dvcr panicked: {stderr}");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("dvcr inspect --json printed no JSON ({e}): {stderr}"));
    (out.status.success(), json, stderr)
}

/// Checks one image bare and in every wrapper, from a file and from standard input, against
/// what qemu-img says of the bare image.
fn agrees_with_qemu(
    scratch: &Scratch,
    image: &Path,
    qemu_format: Option<&str>,
    expect_format: &str,
) {
    let (qemu_name, qemu_size) = qemu_info(image, qemu_format);
    if expect_format != "iso" {
        assert_eq!(
            qemu_name,
            expect_format,
            "qemu-img names {} differently",
            image.display()
        );
    }
    let image_len = fs::metadata(image).expect("image metadata").len();
    let mut inputs: Vec<(Option<&str>, PathBuf)> = vec![(None, image.to_path_buf())];
    for w in Wrapper::ALL {
        let bytes = w.compress(image);
        inputs.push((
            Some(w.name()),
            write(scratch, &format!("image.{}", w.name()), &bytes),
        ));
    }
    for (wrapper, path) in &inputs {
        for via in [Via::File, Via::Redirect, Via::Stdin] {
            let (ok, json, stderr) = inspect_json(path, via);
            let case = format!("{} wrapped in {wrapper:?} via {via:?}", image.display());
            assert!(ok, "{case}: dvcr refused it: {stderr}");
            assert_eq!(json["format"], expect_format, "{case}: {json}");
            assert_eq!(
                json["virtual-size"].as_u64(),
                Some(qemu_size),
                "{case}: {json}"
            );
            assert_eq!(
                json["cdrom"].as_bool(),
                Some(expect_format == "iso"),
                "{case}: {json}"
            );
            assert_eq!(json["compression"].as_str(), *wrapper, "{case}: {json}");
            assert_eq!(
                json["image-size"].as_u64(),
                Some(image_len),
                "{case}: {json}"
            );
        }
    }
}

/// A qcow2 (or other) image of `size` with a few MiB of data written by qemu-io at spread
/// offsets, so that wrappers and decoders see real content.
fn image_with_data(
    scratch: &Scratch,
    name: &str,
    format: &str,
    size: &str,
    options: &[&str],
) -> PathBuf {
    let path = scratch.path(name);
    let mut args = vec!["create", "-q", "-f", format];
    for o in options {
        args.extend(["-o", o]);
    }
    let shown = path.to_str().expect("utf-8 path").to_owned();
    args.push(&shown);
    args.push(size);
    qemu_img(&args);
    qemu_io(
        format,
        &path,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x11 5M 64k",
            "write -z 7M 1M",
            "write -P 0x5a 20M 512",
        ],
    );
    path
}

/// A raw file with incompressible and zero parts, converted to `format` with qemu-img.
fn converted(
    scratch: &Scratch,
    name: &str,
    format: &str,
    options: &[&str],
    compress: bool,
) -> PathBuf {
    let raw = scratch.path(&format!("{name}.src.raw"));
    let mut data = noise(3 << 20, 7);
    data.resize(24 << 20, 0);
    data.extend(std::iter::repeat_n(0x42u8, 1 << 20));
    data.resize(32 << 20, 0);
    fs::write(&raw, &data).expect("writing the raw source");
    let out = scratch.path(name);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-O", format]);
    if compress {
        cmd.arg("-c");
    }
    for o in options {
        cmd.args(["-o", o]);
    }
    run(cmd.arg(&raw).arg(&out));
    out
}

macro_rules! shape {
    ($name:ident, |$s:ident| $make:expr, $qemu_format:expr, $expect:expr) => {
        #[test]
        fn $name() {
            let $s = Scratch::new();
            let image: PathBuf = $make;
            agrees_with_qemu(&$s, &image, $qemu_format, $expect);
        }
    };
}

shape!(
    qcow2_v3_default_clusters_agree_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "64M", &[]),
    None,
    "qcow2"
);
shape!(
    qcow2_v2_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "64M", &["compat=0.10"]),
    None,
    "qcow2"
);
shape!(
    qcow2_with_512_byte_clusters_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "40M", &["cluster_size=512"]),
    None,
    "qcow2"
);
shape!(
    qcow2_with_4k_clusters_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "64M", &["cluster_size=4096"]),
    None,
    "qcow2"
);
shape!(
    qcow2_with_2m_clusters_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "64M", &["cluster_size=2M"]),
    None,
    "qcow2"
);
shape!(
    qcow2_with_extended_l2_agrees_with_qemu,
    |s| image_with_data(
        &s,
        "a.qcow2",
        "qcow2",
        "64M",
        &["extended_l2=on", "cluster_size=128k"]
    ),
    None,
    "qcow2"
);
shape!(
    qcow2_with_odd_virtual_size_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "100000000", &[]),
    None,
    "qcow2"
);
shape!(
    qcow2_preallocated_metadata_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "32M", &["preallocation=metadata"]),
    None,
    "qcow2"
);
shape!(
    qcow2_preallocated_falloc_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "32M", &["preallocation=falloc"]),
    None,
    "qcow2"
);
shape!(
    qcow2_preallocated_full_agrees_with_qemu,
    |s| image_with_data(&s, "a.qcow2", "qcow2", "32M", &["preallocation=full"]),
    None,
    "qcow2"
);
shape!(
    qcow2_with_lazy_refcounts_and_64_bit_refcounts_agrees_with_qemu,
    |s| image_with_data(
        &s,
        "a.qcow2",
        "qcow2",
        "64M",
        &["lazy_refcounts=on", "refcount_bits=64"]
    ),
    None,
    "qcow2"
);
shape!(
    qcow2_compressed_with_deflate_agrees_with_qemu,
    |s| converted(&s, "c.qcow2", "qcow2", &[], true),
    None,
    "qcow2"
);
shape!(
    qcow2_compressed_with_zstd_agrees_with_qemu,
    |s| converted(&s, "c.qcow2", "qcow2", &["compression_type=zstd"], true),
    None,
    "qcow2"
);
shape!(
    qcow2_after_resize_and_snapshot_agrees_with_qemu,
    |s| {
        let p = image_with_data(&s, "a.qcow2", "qcow2", "32M", &[]);
        qemu_img(&["snapshot", "-c", "snap1", p.to_str().expect("utf-8")]);
        qemu_io("qcow2", &p, &["write -P 0xcd 0 64k"]);
        qemu_img(&["resize", "-q", p.to_str().expect("utf-8"), "80M"]);
        p
    },
    None,
    "qcow2"
);
shape!(
    vmdk_monolithic_sparse_agrees_with_qemu,
    |s| converted(&s, "a.vmdk", "vmdk", &["subformat=monolithicSparse"], false),
    None,
    "vmdk"
);
shape!(
    vmdk_stream_optimized_agrees_with_qemu,
    |s| converted(&s, "a.vmdk", "vmdk", &["subformat=streamOptimized"], false),
    None,
    "vmdk"
);
shape!(
    vdi_dynamic_agrees_with_qemu,
    |s| converted(&s, "a.vdi", "vdi", &[], false),
    None,
    "vdi"
);
shape!(
    vdi_static_agrees_with_qemu,
    |s| converted(&s, "a.vdi", "vdi", &["static=on"], false),
    None,
    "vdi"
);
shape!(
    vhd_dynamic_agrees_with_qemu,
    |s| converted(&s, "a.vhd", "vpc", &[], false),
    None,
    "vpc"
);
shape!(
    vhd_fixed_agrees_with_qemu_told_it_is_vpc,
    |s| converted(&s, "a.vhd", "vpc", &["subformat=fixed"], false),
    Some("vpc"),
    "vpc"
);
shape!(
    vhdx_dynamic_agrees_with_qemu,
    |s| converted(&s, "a.vhdx", "vhdx", &[], false),
    None,
    "vhdx"
);
shape!(
    vhdx_fixed_agrees_with_qemu,
    |s| converted(&s, "a.vhdx", "vhdx", &["subformat=fixed"], false),
    None,
    "vhdx"
);
shape!(
    raw_of_odd_length_agrees_with_qemu,
    |s| write(&s, "a.raw", &noise(3_000_001, 3)),
    None,
    "raw"
);

fn iso(scratch: &Scratch, udf: bool) -> PathBuf {
    let content = scratch.path("iso-content");
    fs::create_dir_all(&content).expect("iso content dir");
    fs::write(content.join("meta-data"), "instance-id: test\n").expect("file");
    fs::write(content.join("blob.bin"), noise(300_000, 9)).expect("file");
    let out = scratch.path("a.iso");
    let mut cmd = Command::new("genisoimage");
    cmd.args(["-quiet", "-V", "cidata", "-J", "-r"]);
    if udf {
        cmd.arg("-udf");
    }
    run(cmd.arg("-o").arg(&out).arg(&content));
    out
}
shape!(
    iso9660_is_iso_with_qemus_raw_size,
    |s| iso(&s, false),
    None,
    "iso"
);
shape!(
    iso_with_udf_bridge_is_iso_with_qemus_raw_size,
    |s| iso(&s, true),
    None,
    "iso"
);

#[test]
fn nested_and_multi_member_wrappers_are_all_unwrapped() {
    let s = Scratch::new();
    let image = converted(&s, "c.qcow2", "qcow2", &[], true);
    let (_, size) = qemu_info(&image, None);
    for w in Wrapper::ALL {
        let two = write(
            &s,
            &format!("two.{}", w.name()),
            &w.compress_in_two(&image, &s),
        );
        let (ok, json, err) = inspect_json(&two, Via::Stdin);
        assert!(ok, "two {} members: {err}", w.name());
        assert_eq!(
            json["virtual-size"].as_u64(),
            Some(size),
            "two {} members: {json}",
            w.name()
        );
        assert_eq!(
            json["image-size"].as_u64(),
            fs::metadata(&image).ok().map(|m| m.len())
        );
    }
    // gzip inside xz.
    let gz = write(&s, "c.qcow2.gz", &Wrapper::Gzip.compress(&image));
    let xz = write(&s, "c.qcow2.gz.xz", &Wrapper::Xz.compress(&gz));
    let (ok, json, err) = inspect_json(&xz, Via::File);
    assert!(ok, "{err}");
    assert_eq!(
        json["compression-layers"],
        serde_json::json!(["xz", "gzip"])
    );
    assert_eq!(json["format"], "qcow2");
    // A zstd skippable frame in front of the data frame.
    let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    skippable.extend(Wrapper::Zstd.compress(&image));
    let zst = write(&s, "skip.zst", &skippable);
    let (ok, json, err) = inspect_json(&zst, Via::Stdin);
    assert!(ok, "{err}");
    assert_eq!(json["virtual-size"].as_u64(), Some(size));
}

/// Runs `dvcr inspect --json` on an image that must be refused; returns the message.
fn refused(image: &Path, via: Via) -> String {
    let (ok, json, stderr) = inspect_json(image, via);
    assert!(!ok, "{} was accepted: {json}", image.display());
    assert!(
        stderr.starts_with("error: "),
        "the refusal goes to stderr: {stderr}"
    );
    json["error"].as_str().expect("an error message").to_owned()
}

fn assert_refused(image: &Path, words: &[&str]) {
    for via in [Via::File, Via::Redirect, Via::Stdin] {
        let message = refused(image, via);
        for w in words {
            assert!(
                message.contains(w),
                "{via:?}: the message should mention {w:?}: {message}"
            );
        }
    }
}

fn plain_qcow2(s: &Scratch) -> PathBuf {
    let p = s.path("p.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().expect("utf-8"),
        "64M",
    ]);
    p
}

#[test]
fn a_qcow2_with_a_backing_file_is_refused_naming_the_file() {
    let s = Scratch::new();
    let base = plain_qcow2(&s);
    let top = s.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        base.to_str().expect("utf-8"),
        top.to_str().expect("utf-8"),
    ]);
    assert_refused(&top, &["backing file", "p.qcow2", "qemu-img convert"]);
}

#[test]
fn a_luks_encrypted_qcow2_is_refused() {
    let s = Scratch::new();
    let p = s.path("luks.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ])
        .arg(&p)
        .arg("16M"));
    assert_refused(&p, &["LUKS", "decrypt"]);
}

#[test]
fn an_aes_encrypted_qcow2_is_refused() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    patch(&p, 32, &1u32.to_be_bytes());
    assert_refused(&p, &["AES", "decrypt"]);
}

#[test]
fn a_qcow2_with_an_external_data_file_is_refused() {
    let s = Scratch::new();
    let p = s.path("ext.qcow2");
    let data = s.path("ext.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        p.to_str().expect("utf-8"),
        "16M",
    ]);
    assert_refused(&p, &["external data file", "ext.data"]);
}

#[test]
fn a_qcow2_marked_corrupt_is_refused_with_the_repair_command() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    patch(&p, 72, &2u64.to_be_bytes());
    assert_refused(&p, &["corrupt", "qemu-img check -r all"]);
}

#[test]
fn a_qcow2_with_unknown_incompatible_features_is_refused_naming_the_bits() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    patch(&p, 72, &(1u64 << 40).to_be_bytes());
    assert_refused(&p, &["incompatible features", "bit 40"]);
}

#[test]
fn a_truncated_qcow2_header_is_refused_as_truncated() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    let head = fs::read(&p).expect("read")[..50].to_vec();
    let cut = write(&s, "cut.qcow2", &head);
    assert_refused(&cut, &["truncated"]);
}

#[test]
fn a_qcow2_whose_l1_table_lies_outside_the_file_is_refused() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    assert_refused(&p, &["L1 table", "beyond the end"]);
}

#[test]
fn a_qcow2_of_absurd_size_is_refused() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    patch(&p, 24, &(1u64 << 62).to_be_bytes());
    assert_refused(&p, &["virtual size", "limit"]);
}

#[test]
fn a_qcow2_with_an_absurd_l1_table_is_refused() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    patch(&p, 36, &u32::MAX.to_be_bytes());
    assert_refused(&p, &["L1 table", "entries"]);
}

#[test]
fn multi_file_vmdk_descriptors_are_refused_naming_their_extents() {
    let s = Scratch::new();
    for subformat in ["monolithicFlat", "twoGbMaxExtentSparse"] {
        let p = s.path(&format!("{subformat}.vmdk"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            p.to_str().expect("utf-8"),
            "64M",
        ]);
        assert_refused(&p, &["descriptor", subformat]);
    }
}

#[test]
fn a_vhdx_with_a_log_to_replay_is_refused() {
    let s = Scratch::new();
    let p = s.path("log.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        p.to_str().expect("utf-8"),
        "64M",
    ]);
    let bytes = fs::read(&p).expect("read");
    // Give both headers a log GUID and a correct checksum, so the log must be replayed.
    for at in [64 << 10, 128 << 10] {
        let mut header = bytes[at..at + 4096].to_vec();
        header[48..64].copy_from_slice(&[0x11; 16]);
        header[4..8].fill(0);
        let sum = crc32c::crc32c(&header);
        header[4..8].copy_from_slice(&sum.to_le_bytes());
        patch(&p, at as u64, &header);
    }
    assert_refused(&p, &["log"]);
}

#[test]
fn a_damaged_gzip_stream_is_refused_naming_the_wrapper() {
    let s = Scratch::new();
    let image = converted(&s, "c.qcow2", "qcow2", &[], true);
    let mut gz = Wrapper::Gzip.compress(&image);
    let cut = gz.len() / 2;
    gz.truncate(cut);
    let p = write(&s, "cut.qcow2.gz", &gz);
    assert_refused(&p, &["gzip"]);
}

#[test]
fn human_output_names_format_size_compression_and_cdrom() {
    let s = Scratch::new();
    let p = plain_qcow2(&s);
    let out = run(Command::new(DVCR).arg("inspect").arg(&p));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "format:           qcow2",
        "virtual size:     64 MiB (67108864 bytes)",
        "compression:      none",
        "cdrom:            false",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn a_missing_file_is_an_error_naming_the_path_not_a_panic() {
    let (ok, json, stderr) = inspect_json(Path::new("/nonexistent/disk.qcow2"), Via::File);
    assert!(!ok);
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|m| m.contains("/nonexistent/disk.qcow2")),
        "{json} {stderr}"
    );
}

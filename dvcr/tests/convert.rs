//! `dvcr convert` end to end: the real binary, images made by qemu-img, sources from a file,
//! standard input and HTTP, raw and qcow2 targets, block devices, sizes and refusals.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use dvcr_tests::{Loop, Scratch, assert_same_as_qemu, mixed_raw, qemu_img, qemu_info, serve_file};

const DVCR: &str = env!("CARGO_BIN_EXE_dvcr");

fn convert(args: &[&str], stdin: Option<&Path>) -> (Output, serde_json::Value) {
    let mut cmd = Command::new(DVCR);
    cmd.arg("convert").arg("--json").args(args);
    if let Some(p) = stdin {
        cmd.stdin(Stdio::from(fs::File::open(p).expect("stdin file")));
    }
    let out = cmd.output().expect("running dvcr convert");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "dvcr panicked: {stderr}");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {stderr}"));
    (out, json)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn compressed_qcow2(scratch: &Scratch) -> std::path::PathBuf {
    let raw = mixed_raw(scratch, "src.raw", 40 << 20);
    let image = scratch.path("c.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&raw), s(&image)]);
    image
}

#[test]
fn converting_a_file_prints_a_json_summary_and_writes_the_same_disk_as_qemu() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&[s(&image), s(&out)], None);
    assert!(o.status.success(), "{json}");
    assert_same_as_qemu(&image, "qcow2", &out);
    assert_eq!(json["format"], "qcow2");
    assert_eq!(json["virtual-size"].as_u64(), Some(40 << 20));
    assert_eq!(json["disk-size"].as_u64(), Some(40 << 20));
    assert_eq!(
        json["bytes-read"].as_u64(),
        Some(fs::metadata(&image).unwrap().len())
    );
    assert!(json["bytes-written"].as_u64().unwrap() > 0);
    assert_eq!(json["scratch-bytes"].as_u64(), Some(0));
    assert!(json["seconds"].as_f64().is_some());
}

#[test]
fn converting_standard_input_gives_the_same_disk_as_the_file() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&["-", s(&out)], Some(&image));
    assert!(o.status.success(), "{json}");
    assert_same_as_qemu(&image, "qcow2", &out);
}

#[test]
fn converting_an_http_url_streams_the_body_into_the_disk() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let gz = scratch.path("c.qcow2.gz");
    fs::write(&gz, dvcr_tests::Wrapper::Gzip.compress(&image)).unwrap();
    let (url, _) = serve_file(&gz, true);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&[&url, s(&out)], None);
    assert!(o.status.success(), "{json}");
    assert_eq!(json["compression"], "gzip");
    assert_same_as_qemu(&image, "qcow2", &out);
}

#[test]
fn a_qcow2_target_is_clean_and_identical_to_the_source() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let out = scratch.path("disk.qcow2");
    let (o, json) = convert(&["--target-format", "qcow2", s(&image), s(&out)], None);
    assert!(o.status.success(), "{json}");
    assert_eq!(json["target-format"], "qcow2");
    qemu_img(&["check", "-q", "-f", "qcow2", s(&out)]);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        s(&image),
        s(&out),
    ]);
}

#[test]
fn a_larger_requested_size_grows_the_disk_with_zeros() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&["--size", "64M", s(&image), s(&out)], None);
    assert!(o.status.success(), "{json}");
    assert_eq!(json["disk-size"].as_u64(), Some(64 << 20));
    assert_eq!(fs::metadata(&out).unwrap().len(), 64 << 20);
    // qemu-img compare treats the extra tail of the larger image as zeros it checks.
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&image),
        s(&out),
    ]);
    let q = scratch.path("disk.qcow2");
    let (o, json) = convert(
        &[
            "--target-format",
            "qcow2",
            "--size",
            "64M",
            s(&image),
            s(&q),
        ],
        None,
    );
    assert!(o.status.success(), "{json}");
    assert_eq!(qemu_info(&q, Some("qcow2")).1, 64 << 20);
}

#[test]
fn a_smaller_requested_size_is_refused_and_leaves_no_file() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&["--size", "1M", s(&image), s(&out)], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json["kind"], "out-of-bounds");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("at least 41943040"),
        "{json}"
    );
    assert!(
        !out.exists(),
        "a refused conversion must not leave a disk behind"
    );
}

#[test]
fn a_truncated_image_fails_and_keeps_the_previous_target_untouched() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let bytes = fs::read(&image).unwrap();
    let cut = scratch.path("cut.qcow2");
    fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = scratch.path("disk.raw");
    fs::write(&out, b"previous disk").unwrap();
    let (o, json) = convert(&[s(&cut), s(&out)], None);
    assert_eq!(o.status.code(), Some(1), "{json}");
    assert_eq!(json["kind"], "truncated", "{json}");
    assert_eq!(fs::read(&out).unwrap(), b"previous disk");
    let leftovers = fs::read_dir(scratch.path(""))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().contains("partial"))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(leftovers, 0, "no partial file may remain");
}

#[test]
fn an_unsafe_image_is_refused_with_the_inspect_message() {
    let scratch = Scratch::new();
    let base = scratch.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    let child = scratch.path("child.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&child),
    ]);
    let (o, json) = convert(&[s(&child), s(&scratch.path("x.raw"))], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json["kind"], "unsupported");
    assert!(json["error"].as_str().unwrap().contains("backing file"));
}

#[test]
fn a_block_device_with_old_data_is_zeroed_where_the_image_has_none() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let backing = scratch.path("device.img");
    fs::write(&backing, vec![0xeeu8; 48 << 20]).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    let (o, json) = convert(&[s(&image), &dev.device], None);
    assert!(o.status.success(), "{json}");
    assert!(json["bytes-zeroed"].as_u64().unwrap() > 0, "{json}");
    drop(dev);
    // The device is larger than the disk: compare the disk's part.
    let disk = fs::read(&backing).unwrap();
    let expected = scratch.path("expected.raw");
    qemu_img(&["convert", "-q", "-O", "raw", s(&image), s(&expected)]);
    let expected = fs::read(&expected).unwrap();
    assert!(
        disk[..expected.len()] == expected[..],
        "device contents differ"
    );
    assert!(disk[expected.len()..].iter().all(|&b| b == 0xee));
}

#[test]
fn a_block_device_said_to_read_zero_is_not_zeroed() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let backing = scratch.path("device.img");
    fs::write(&backing, vec![0u8; 48 << 20]).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    let (o, json) = convert(&["--target-is-zero", s(&image), &dev.device], None);
    assert!(o.status.success(), "{json}");
    assert_eq!(json["bytes-zeroed"].as_u64(), Some(0));
}

#[test]
fn a_block_device_smaller_than_the_image_is_refused() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    let backing = scratch.path("device.img");
    fs::write(&backing, vec![0u8; 8 << 20]).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    let (o, json) = convert(&[s(&image), &dev.device], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json["kind"], "out-of-bounds", "{json}");
}

/// A qcow2 whose copied L2 table (written after an internal snapshot) comes many MiB after
/// the data it maps: a single pass must keep that data or read it again.
fn late_l2_qcow2(scratch: &Scratch) -> std::path::PathBuf {
    let image = scratch.path("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "32M"]);
    dvcr_tests::qemu_io("qcow2", &image, &["write -P 0x5e 0 20M"]);
    qemu_img(&["snapshot", "-c", "one", s(&image)]);
    dvcr_tests::qemu_io("qcow2", &image, &["write -P 0xcd 64k 64k"]);
    image
}

#[test]
fn an_http_source_that_answers_ranges_is_read_again_instead_of_spilled_to_scratch() {
    let scratch = Scratch::new();
    let image = late_l2_qcow2(&scratch);
    let (url, requests) = serve_file(&image, true);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&["--pending-memory", "64K", &url, s(&out)], None);
    assert!(o.status.success(), "{json}");
    assert_same_as_qemu(&image, "qcow2", &out);
    assert_eq!(json["scratch-bytes"].as_u64(), Some(0), "{json}");
    assert!(
        requests.load(std::sync::atomic::Ordering::Relaxed) > 1,
        "the data behind the late L2 table is fetched with range requests"
    );
}

#[test]
fn an_http_source_without_ranges_spills_to_scratch_and_still_converts() {
    let scratch = Scratch::new();
    let image = late_l2_qcow2(&scratch);
    let (url, requests) = serve_file(&image, false);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&["--pending-memory", "64K", &url, s(&out)], None);
    assert!(o.status.success(), "{json}");
    assert_same_as_qemu(&image, "qcow2", &out);
    assert!(json["scratch-bytes"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(requests.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn a_file_redirected_to_standard_input_is_read_again_instead_of_spilled_to_scratch() {
    let scratch = Scratch::new();
    let image = late_l2_qcow2(&scratch);
    let out = scratch.path("disk.raw");
    let (o, json) = convert(&["--pending-memory", "64K", "-", s(&out)], Some(&image));
    assert!(o.status.success(), "{json}");
    assert_same_as_qemu(&image, "qcow2", &out);
    assert_eq!(json["scratch-bytes"].as_u64(), Some(0), "{json}");
    assert_eq!(
        json["bytes-read"].as_u64(),
        Some(fs::metadata(&image).unwrap().len())
    );
}

#[test]
fn an_image_piped_to_standard_input_spills_to_scratch_and_still_converts() {
    let scratch = Scratch::new();
    let image = late_l2_qcow2(&scratch);
    let out = scratch.path("disk.raw");
    let mut cat = Command::new("cat")
        .arg(&image)
        .stdout(Stdio::piped())
        .spawn()
        .expect("cat");
    let pipe = cat.stdout.take().expect("cat's stdout");
    let o = Command::new(DVCR)
        .args(["convert", "--json", "--pending-memory", "64K", "-", s(&out)])
        .stdin(Stdio::from(pipe))
        .output()
        .expect("running dvcr convert");
    assert!(cat.wait().expect("cat").success());
    let json: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&o.stderr)));
    assert!(o.status.success(), "{json}");
    assert_same_as_qemu(&image, "qcow2", &out);
    assert!(json["scratch-bytes"].as_u64().unwrap() > 0, "{json}");
}

#[test]
fn standard_input_already_partly_read_is_converted_from_where_it_stands() {
    let scratch = Scratch::new();
    let image = compressed_qcow2(&scratch);
    // 4 KiB of something else, then the image: a script reads the first part itself.
    let joined = scratch.path("joined.bin");
    let mut bytes = vec![0x4a_u8; 4096];
    bytes.extend(fs::read(&image).unwrap());
    fs::write(&joined, bytes).unwrap();
    let out = scratch.path("disk.raw");
    let o = Command::new("sh")
        .args([
            "-c",
            r#"dd bs=4096 count=1 of=/dev/null status=none && exec "$0" convert --json - "$1""#,
            DVCR,
            s(&out),
        ])
        .stdin(Stdio::from(fs::File::open(&joined).unwrap()))
        .output()
        .expect("running dvcr convert after dd");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON summary");
    assert_eq!(json["format"], "qcow2", "{json}");
    assert_eq!(
        json["bytes-read"].as_u64(),
        Some(fs::metadata(&image).unwrap().len())
    );
    assert_same_as_qemu(&image, "qcow2", &out);
}

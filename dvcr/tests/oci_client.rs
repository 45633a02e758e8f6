//! The importer's registry client (`dvcr_importer::oci`) against real registries: the real
//! `dvcr serve` (plain, and with htpasswd plus its Bearer token service), Debian's
//! `docker-registry` (distribution 2.8) with htpasswd Basic auth, images pushed by the real
//! `skopeo` from a `docker-archive:` tarball and an `oci:` layout, and a tiny hand-written
//! registry for what a real one will not do on request (break a download off half way,
//! serve a schema 1 manifest).
//!
//! Layer tars are written here with a small ustar writer (so a 64 MiB layer can be
//! streamed without holding it, and whiteout names are exact) or by GNU tar for the images
//! skopeo copies; gzip and zstd layers are compressed by the real `gzip` and `zstd`.
//! Tools come from `.ci/install-tools`; a missing one fails the test that needs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{
    DOCKER_CONFIG, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_LAYER_GZIP, OCI_MANIFEST, Registry, run,
    sha256,
};
use dvcr_importer::oci::{
    BlobWriter, Client, OciError, OciErrorKind, Platform, Reference, RegistryOptions,
};
use dvcr_tests::Scratch;
use serde_json::json;
use sha2::{Digest, Sha256};

const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

// ---- Building layers and images ----

/// A ustar header for `path` (`kind` b'0' file, b'5' directory).
fn tar_header(path: &str, size: u64, kind: u8) -> [u8; 512] {
    assert!(path.len() < 100, "short names only: {path}");
    let mut h = [0u8; 512];
    h[..path.len()].copy_from_slice(path.as_bytes());
    let octal = |field: &mut [u8], value: u64| {
        let text = format!("{value:0width$o}\0", width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    };
    octal(&mut h[100..108], if kind == b'5' { 0o755 } else { 0o644 });
    octal(&mut h[108..116], 107);
    octal(&mut h[116..124], 107);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// One member of a test layer.
enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
}

/// A tar holding `items`, ended by two zero blocks.
fn tar(items: &[Item<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Dir(path) => out.extend_from_slice(&tar_header(path, 0, b'5')),
            Item::File(path, data) => {
                out.extend_from_slice(&tar_header(path, data.len() as u64, b'0'));
                out.extend_from_slice(data);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A layer with `disk/` and `disk/<name>` holding `data`.
fn disk_layer(name: &str, data: &[u8]) -> Vec<u8> {
    tar(&[
        Item::Dir("disk/"),
        Item::File(&format!("disk/{name}"), data),
    ])
}

/// A client for plain-HTTP test registries (HTTPS is tried first, then HTTP).
fn client() -> Client {
    client_with(RegistryOptions {
        insecure: true,
        ..RegistryOptions::default()
    })
}

fn client_with(options: RegistryOptions) -> Client {
    Client::new(options).unwrap_or_else(|e| panic!("creating the client: {e}"))
}

fn reference(addr: &str, repo_tag: &str) -> Reference {
    Reference::parse(&format!("docker://{addr}/{repo_tag}")).unwrap()
}

/// Pushes an image (a config and `layers`, bottom first) with the client; returns the
/// manifest bytes and digest.
fn push_image(client: &Client, to: &Reference, layers: &[(&str, &[u8])]) -> (Vec<u8>, String) {
    let mut descriptors = Vec::new();
    for (media_type, blob) in layers {
        let digest = client.push_blob_bytes(to, blob).unwrap();
        assert_eq!(digest, sha256(blob));
        descriptors.push(json!({"mediaType": media_type, "digest": digest, "size": blob.len()}));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": {"source-image-format": "raw"}},
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap();
    let config_digest = client.push_blob_bytes(to, &config).unwrap();
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let digest = client.put_manifest(to, OCI_MANIFEST, &manifest).unwrap();
    assert_eq!(digest, sha256(&manifest));
    (manifest, digest)
}

/// Opens the disk of `r` and reads all of it.
fn pull_disk(client: &Client, r: &Reference) -> (String, u64, Vec<u8>) {
    let mut disk = client
        .open_disk(r)
        .unwrap_or_else(|e| panic!("open_disk {r}: {e}"));
    let mut data = Vec::new();
    disk.read_to_end(&mut data)
        .unwrap_or_else(|e| panic!("reading the disk of {r}: {e}"));
    (disk.file_name().to_owned(), disk.size(), data)
}

fn kind_of_io(e: &std::io::Error) -> Option<OciErrorKind> {
    OciError::from_io(e).map(|e| e.kind())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Feeds `bytes` to an upload and to the running digest.
fn feed(w: &mut BlobWriter, h: &mut Sha256, len: &mut u64, bytes: &[u8]) {
    w.write_all(bytes).unwrap();
    h.update(bytes);
    *len += bytes.len() as u64;
}

// ---- Push and pull against dvcr serve ----

#[test]
fn a_64_mib_layer_streamed_into_dvcr_with_a_tag_reads_back_identical_through_open_disk() {
    let reg = Registry::start();
    let client = client();
    let r = reference(&reg.addr, "vi/ns/streamed:v1");
    const MIB: usize = 1 << 20;
    const SIZE: u64 = 64 << 20;

    let mut upload = client.upload_blob(&r).unwrap();
    let (mut layer_hash, mut layer_len) = (Sha256::new(), 0u64);
    let mut disk_hash = Sha256::new();
    feed(
        &mut upload,
        &mut layer_hash,
        &mut layer_len,
        &tar_header("disk/", 0, b'5'),
    );
    feed(
        &mut upload,
        &mut layer_hash,
        &mut layer_len,
        &tar_header("disk/disk.qcow2", SIZE, b'0'),
    );
    for i in 0..(SIZE as usize / MIB) {
        let chunk = dvcr_tests::noise(MIB, i as u64 + 1);
        disk_hash.update(&chunk);
        feed(&mut upload, &mut layer_hash, &mut layer_len, &chunk);
    }
    feed(&mut upload, &mut layer_hash, &mut layer_len, &[0u8; 1024]);
    assert_eq!(upload.written(), layer_len);
    let layer_digest = format!("sha256:{}", hex::encode(layer_hash.finalize()));
    upload.finish(&layer_digest).unwrap();
    assert_eq!(
        client.blob_exists(&r, &layer_digest).unwrap(),
        Some(layer_len),
        "the registry has the streamed blob at its full size"
    );

    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = client.push_blob_bytes(&r, config).unwrap();
    let manifest = common::image_manifest(
        (OCI_CONFIG, &config_digest, config.len()),
        &[(OCI_LAYER, &layer_digest, layer_len as usize)],
    );
    let manifest_digest = client.put_manifest(&r, OCI_MANIFEST, &manifest).unwrap();
    assert_eq!(manifest_digest, sha256(&manifest));

    let (media_type, bytes, digest) = client.get_manifest(&r).unwrap();
    assert_eq!(
        (media_type.as_str(), digest.as_str()),
        (OCI_MANIFEST, manifest_digest.as_str())
    );
    assert!(bytes == manifest, "the manifest comes back byte-exact");

    let mut disk = client.open_disk(&r).unwrap();
    assert_eq!(disk.size(), SIZE);
    assert_eq!(disk.file_name(), "disk.qcow2");
    assert_eq!(disk.manifest_digest(), manifest_digest);
    assert_eq!(disk.layer_digest(), layer_digest);
    let mut got = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 3 * MIB / 2];
    loop {
        let n = disk.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        total += n as u64;
    }
    assert_eq!(total, SIZE);
    assert_eq!(
        got.finalize(),
        disk_hash.finalize(),
        "the disk bytes are identical"
    );
    // After the end, the end again.
    assert_eq!(disk.read(&mut buf).unwrap(), 0);
}

#[test]
fn finishing_an_upload_with_the_wrong_digest_is_a_digest_error_and_an_abort_leaves_no_blob() {
    let reg = Registry::start();
    let client = client();
    let r = reference(&reg.addr, "vi/ns/wrong:v1");
    let data = common::noise(3 << 20, 7);

    let mut upload = client.upload_blob(&r).unwrap();
    upload.write_all(&data).unwrap();
    let wrong = sha256(b"something else");
    let e = upload.finish(&wrong).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Digest, "{e}");
    assert_eq!(client.blob_exists(&r, &wrong).unwrap(), None);

    let mut upload = client.upload_blob(&r).unwrap();
    upload.write_all(&data).unwrap();
    upload.abort();
    assert_eq!(client.blob_exists(&r, &sha256(&data)).unwrap(), None);

    // Nothing written at all: an empty blob.
    let upload = client.upload_blob(&r).unwrap();
    upload.finish(&sha256(b"")).unwrap();
    assert_eq!(client.blob_exists(&r, &sha256(b"")).unwrap(), Some(0));
}

#[test]
fn dvcr_names_a_streamed_blob_by_the_bytes_it_received_so_the_client_need_not_hash_it() {
    let reg = Registry::start();
    let client = client();
    let r = reference(&reg.addr, "vi/ns/named:v1");
    let data = common::noise((5 << 20) + 333, 9);

    let mut upload = client.upload_blob(&r).unwrap();
    assert!(
        upload.registry_names_blob(),
        "dvcr answers with Dvcr-Upload-Digest"
    );
    for piece in data.chunks(300_001) {
        upload.write_all(piece).unwrap();
    }
    let digest = upload.finish_named().unwrap();
    assert_eq!(
        digest,
        sha256(&data),
        "the name is the hash of the bytes sent"
    );
    assert_eq!(
        client.blob_exists(&r, &digest).unwrap(),
        Some(data.len() as u64)
    );

    // Nothing sent: the empty blob, named without a request body.
    let upload = client.upload_blob(&r).unwrap();
    assert_eq!(upload.finish_named().unwrap(), sha256(b""));
    assert_eq!(client.blob_exists(&r, &sha256(b"")).unwrap(), Some(0));
}

// ---- Images made by other tools ----

fn skopeo(args: &[&str]) {
    run(Command::new("skopeo")
        .args(["--insecure-policy", "--command-timeout", "120s"])
        .args(args));
}

/// `disk/<name>` holding `data` in a layer tar written by GNU tar.
fn gnu_tar_layer(scratch: &Scratch, name: &str, data: &[u8]) -> PathBuf {
    let src = scratch.path("layer-src");
    std::fs::create_dir_all(src.join("disk")).unwrap();
    std::fs::write(src.join("disk").join(name), data).unwrap();
    let layer = scratch.path("layer.tar");
    run(Command::new("tar")
        .args([
            "--format=gnu",
            "--owner=107",
            "--group=107",
            "--numeric-owner",
        ])
        .args(["--mtime=2024-01-01 00:00:00Z", "--sort=name", "-C", s(&src)])
        .args(["-cf", s(&layer), "disk"]));
    layer
}

fn image_config(diff_id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Labels": {"source-image-format": "raw"}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap()
}

#[test]
fn an_image_skopeo_copied_from_a_docker_archive_gives_its_disk_to_open_disk() {
    let reg = Registry::start();
    let scratch = Scratch::new();
    let data = common::noise(5 << 20, 11);
    let layer = gnu_tar_layer(&scratch, "disk.img", &data);
    // The layout `docker save` writes.
    let save = scratch.path("save");
    let diff_id = common::sha256_file(&layer);
    let id = diff_id.trim_start_matches("sha256:").to_owned();
    std::fs::create_dir_all(save.join(&id)).unwrap();
    std::fs::copy(&layer, save.join(&id).join("layer.tar")).unwrap();
    std::fs::write(save.join(&id).join("VERSION"), "1.0").unwrap();
    std::fs::write(save.join(&id).join("json"), format!(r#"{{"id":"{id}"}}"#)).unwrap();
    let config = image_config(&diff_id);
    let config_name = format!("{}.json", sha256(&config).trim_start_matches("sha256:"));
    std::fs::write(save.join(&config_name), &config).unwrap();
    let manifest = json!([{
        "Config": config_name, "RepoTags": ["disks/archive:v1"],
        "Layers": [format!("{id}/layer.tar")]
    }]);
    std::fs::write(save.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(
        save.join("repositories"),
        json!({"disks/archive": {"v1": id}}).to_string(),
    )
    .unwrap();
    let archive = scratch.path("image.tar");
    run(Command::new("tar")
        .args(["-C", s(&save), "-cf", s(&archive)])
        .args([id.as_str(), &config_name, "manifest.json", "repositories"]));

    let dest = format!("docker://{}/cvi/archive:v1", reg.addr);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("docker-archive:{}", s(&archive)),
        &dest,
    ]);
    let client = client();
    let r = Reference::parse(&dest).unwrap();
    let (name, size, got) = pull_disk(&client, &r);
    assert_eq!(name, "disk.img");
    assert_eq!(size, data.len() as u64);
    assert!(
        got == data,
        "the disk comes out of the docker-archive image unchanged"
    );
}

#[test]
fn an_image_skopeo_copied_from_an_oci_layout_with_a_gzip_layer_gives_its_disk() {
    let reg = Registry::start();
    let scratch = Scratch::new();
    let data = common::noise(4 << 20, 12);
    let layer = gnu_tar_layer(&scratch, "disk.qcow2", &data);
    let gz = Command::new("gzip")
        .args(["-n", "-c", s(&layer)])
        .output()
        .expect("gzip");
    assert!(gz.status.success());
    let gz = gz.stdout;

    let layout = scratch.path("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put_blob = |bytes: &[u8]| {
        let d = sha256(bytes);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
        d
    };
    let layer_digest = put_blob(&gz);
    let config = image_config(&common::sha256_file(&layer));
    let config_digest = put_blob(&config);
    let manifest = common::image_manifest(
        (OCI_CONFIG, &config_digest, config.len()),
        &[(OCI_LAYER_GZIP, &layer_digest, gz.len())],
    );
    let manifest_digest = put_blob(&manifest);
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}
    }]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();

    let dest = format!("docker://{}/vi/ns/layout:v1", reg.addr);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", s(&layout)),
        &dest,
    ]);
    let client = client();
    let r = Reference::parse(&dest).unwrap();
    let (media_type, _, _) = client.get_manifest(&r).unwrap();
    assert_eq!(media_type, OCI_MANIFEST);
    let disk = client.open_disk(&r).unwrap();
    assert_eq!(
        disk.layer_digest(),
        layer_digest,
        "the gzip layer is the one read"
    );
    drop(disk);
    let (name, size, got) = pull_disk(&client, &r);
    assert_eq!((name.as_str(), size), ("disk.qcow2", data.len() as u64));
    assert!(got == data);
}

#[test]
fn a_zstd_layer_is_decompressed_and_one_with_a_generic_media_type_is_recognised_by_its_magic() {
    let reg = Registry::start();
    let scratch = Scratch::new();
    let data = common::noise(2 << 20, 13);
    let plain = scratch.path("layer.tar");
    std::fs::write(&plain, disk_layer("disk.raw", &data)).unwrap();
    let zst = Command::new("zstd")
        .args(["-q", "-c", "-3", s(&plain)])
        .output()
        .expect("zstd");
    assert!(zst.status.success());
    let zst = zst.stdout;
    assert_eq!(&zst[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    let client = client();
    for (tag, media_type) in [
        ("zstd", OCI_LAYER_ZSTD),
        ("generic", "application/octet-stream"),
    ] {
        let r = reference(&reg.addr, &format!("vi/ns/zstd:{tag}"));
        push_image(&client, &r, &[(media_type, &zst)]);
        let (name, size, got) = pull_disk(&client, &r);
        assert_eq!(
            (name.as_str(), size),
            ("disk.raw", data.len() as u64),
            "{tag}"
        );
        assert!(
            got == data,
            "{tag}: the disk comes out of the zstd layer unchanged"
        );
    }
}

// ---- Layers and whiteouts ----

#[test]
fn an_upper_layer_that_whites_out_the_lower_disk_and_adds_its_own_gives_the_upper_disk() {
    let reg = Registry::start();
    let client = client();
    let old = common::noise(300_000, 21);
    let new = common::noise(200_000, 22);
    let lower = disk_layer("old.img", &old);
    let upper = tar(&[
        Item::Dir("disk/"),
        Item::File("disk/.wh.old.img", b""),
        Item::File("disk/new.img", &new),
    ]);
    let r = reference(&reg.addr, "vi/ns/whiteout:v1");
    push_image(&client, &r, &[(OCI_LAYER, &lower), (OCI_LAYER, &upper)]);
    let (name, _, got) = pull_disk(&client, &r);
    assert_eq!(name, "new.img");
    assert!(got == new);
}

#[test]
fn a_whiteout_in_the_top_layer_uncovers_the_disk_two_layers_down() {
    let reg = Registry::start();
    let client = client();
    let bottom = common::noise(100_000, 23);
    let hidden = common::noise(120_000, 24);
    let layers = [
        disk_layer("bottom.img", &bottom),
        tar(&[
            Item::Dir("./disk/"),
            Item::File("./disk/hidden.img", &hidden),
        ]),
        tar(&[Item::Dir("disk/"), Item::File("disk/.wh.hidden.img", b"")]),
    ];
    let r = reference(&reg.addr, "vi/ns/uncover:v1");
    push_image(
        &client,
        &r,
        &[
            (OCI_LAYER, &layers[0]),
            (OCI_LAYER, &layers[1]),
            (OCI_LAYER, &layers[2]),
        ],
    );
    let (name, _, got) = pull_disk(&client, &r);
    assert_eq!(name, "bottom.img");
    assert!(got == bottom);
}

#[test]
fn an_opaque_whiteout_of_disk_leaves_no_disk_and_the_error_says_how_to_push_one() {
    let reg = Registry::start();
    let client = client();
    let lower = disk_layer("disk.img", &common::noise(50_000, 25));
    let upper = tar(&[Item::Dir("disk/"), Item::File("disk/.wh..wh..opq", b"")]);
    let r = reference(&reg.addr, "vi/ns/opaque:v1");
    push_image(&client, &r, &[(OCI_LAYER, &lower), (OCI_LAYER, &upper)]);
    let e = client.open_disk(&r).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Invalid, "{e}");
    let text = e.to_string();
    assert!(text.contains("no regular file under disk/"), "{text}");
    assert!(
        text.contains("push the disk image as /disk/<file>"),
        "{text}"
    );
    assert!(text.contains("vi/ns/opaque:v1"), "{text}");

    // An image without any disk says the same.
    let r = reference(&reg.addr, "vi/ns/nodisk:v1");
    let other = tar(&[Item::Dir("etc/"), Item::File("etc/motd", b"hello")]);
    push_image(&client, &r, &[(OCI_LAYER, &other)]);
    let e = client.open_disk(&r).unwrap_err();
    assert!(
        e.to_string()
            .contains("push the disk image as /disk/<file>"),
        "{e}"
    );
}

#[test]
fn two_regular_files_under_disk_in_one_layer_fail_the_read_before_the_end() {
    let reg = Registry::start();
    let client = client();
    let layer = tar(&[
        Item::Dir("disk/"),
        Item::File("disk/a.img", &common::noise(70_000, 26)),
        Item::File("disk/b.img", &common::noise(70_000, 27)),
    ]);
    let r = reference(&reg.addr, "vi/ns/two:v1");
    push_image(&client, &r, &[(OCI_LAYER, &layer)]);
    let mut disk = client.open_disk(&r).unwrap();
    assert_eq!(disk.file_name(), "a.img");
    let mut sink = Vec::new();
    let e = disk.read_to_end(&mut sink).unwrap_err();
    assert_eq!(kind_of_io(&e), Some(OciErrorKind::Invalid), "{e}");
    assert!(e.to_string().contains("more than one regular file"), "{e}");
}

#[test]
fn a_tampered_layer_fails_the_read_with_a_digest_error_never_a_clean_end() {
    let reg = Registry::start();
    let client = client();
    let data = common::noise(4 << 20, 31);
    let layer = disk_layer("disk.img", &data);
    let r = reference(&reg.addr, "vi/ns/tampered:v1");
    push_image(&client, &r, &[(OCI_LAYER, &layer)]);
    let layer_digest = sha256(&layer);
    // Flip one byte in the middle of the disk, in the registry's own storage.
    let file = reg.blob_file(&layer_digest);
    let mut stored = std::fs::read(&file).unwrap();
    assert_eq!(stored.len(), layer.len(), "{} is the blob", file.display());
    stored[2 << 20] ^= 0x55;
    dvcr_tests::patch(&file, 2 << 20, &stored[(2 << 20)..(2 << 20) + 1]);

    let mut disk = client.open_disk(&r).unwrap();
    let mut sink = Vec::new();
    let e = disk.read_to_end(&mut sink).unwrap_err();
    assert_eq!(kind_of_io(&e), Some(OciErrorKind::Digest), "{e}");
    assert!(e.to_string().contains(&layer_digest), "{e}");
    // And it stays an error.
    assert!(disk.read(&mut [0u8; 16]).is_err());

    // A tampered layer above the disk's: found while passing through it, before any byte.
    let good = disk_layer("disk.img", &common::noise(10_000, 32));
    let r = reference(&reg.addr, "vi/ns/tampered-etc:v1");
    let etc = tar(&[
        Item::Dir("etc/"),
        Item::File("etc/motd", &common::noise(100_000, 33)),
    ]);
    push_image(&client, &r, &[(OCI_LAYER, &good), (OCI_LAYER, &etc)]);
    let etc_file = reg.blob_file(&sha256(&etc));
    let mut bytes = std::fs::read(&etc_file).unwrap();
    bytes[5000] ^= 1;
    dvcr_tests::patch(&etc_file, 5000, &bytes[5000..5001]);
    let e = client.open_disk(&r).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Digest, "{e}");
}

// ---- Registries with authentication ----

/// A free loopback port (bound, then released for the server to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An htpasswd file (bcrypt, by the real `htpasswd`).
fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let out = run(Command::new("htpasswd").args(["-nbB", "-C", "5", user, password]));
    let path = dir.join("htpasswd");
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// A docker `config.json` with `user:password` for `key`.
fn auth_config(dir: &Path, key: &str, user: &str, password: &str) -> PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join(format!("config-{user}-{}.json", password.len()));
    std::fs::write(&path, json!({"auths": {key: {"auth": auth}}}).to_string()).unwrap();
    path
}

/// A `dvcr serve` on a chosen address (the token realm must name it), killed when dropped.
struct Serve(Child);

impl Serve {
    fn start(root: &Path, listen: &str, extra: &[&str]) -> Serve {
        let mut cmd = Command::new(common::DVCR);
        cmd.args(["serve", "--listen", listen, "--root"])
            .arg(root)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DVCR_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("starting dvcr serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(60));
        let serve = Serve(child);
        let line = line.expect("dvcr serve printed no `listening on` line");
        assert!(line.starts_with("listening on "), "{line}");
        serve
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dvcr_with_bearer_tokens_lets_config_json_credentials_push_and_pull_and_refuses_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let realm = format!("http://{listen}/auth/token");
    let key = dir.path().join("token.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let passwords = htpasswd(dir.path(), "importer", "s3cret");
    let _server = Serve::start(
        &dir.path().join("root"),
        &listen,
        &[
            "--htpasswd",
            s(&passwords),
            "--token-realm",
            &realm,
            "--token-key",
            s(&key),
        ],
    );
    let r = reference(&listen, "vi/ns/private:v1");
    let data = common::noise(1 << 20, 41);
    let layer = disk_layer("disk.img", &data);

    let good = auth_config(dir.path(), &listen, "importer", "s3cret");
    let authorised = client_with(RegistryOptions {
        auth_config: Some(good),
        insecure: true,
        ..RegistryOptions::default()
    });
    push_image(&authorised, &r, &[(OCI_LAYER, &layer)]);
    let (_, _, got) = pull_disk(&authorised, &r);
    assert!(
        got == data,
        "pulled with a token obtained with the config.json credentials"
    );

    let e = client().open_disk(&r).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("anonymous"), "{e}");

    let bad = auth_config(
        dir.path(),
        &format!("https://{listen}"),
        "importer",
        "wrong",
    );
    let refused = client_with(RegistryOptions {
        auth_config: Some(bad),
        insecure: true,
        ..RegistryOptions::default()
    });
    let e = refused.open_disk(&r).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Unauthorized, "{e}");
    assert!(
        !e.to_string().contains("wrong"),
        "no secret in messages: {e}"
    );
}

/// Debian's `docker-registry` (distribution) with htpasswd auth, killed when dropped.
struct Distribution {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Distribution {
    fn start(dir: &Path, passwords: &Path) -> Distribution {
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: dvcr-test\n    path: {}\n",
                s(&dir.join("data")),
                s(passwords)
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("registry.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting docker-registry (Debian package docker-registry)");
        let registry = Distribution { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&registry.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen; its log:\n{}",
                std::fs::read_to_string(&registry.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn docker_registry_with_htpasswd_takes_a_streamed_push_from_the_client_and_serves_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = htpasswd(dir.path(), "alice", "pw");
    let registry = Distribution::start(dir.path(), &passwords);
    let config = auth_config(
        dir.path(),
        &format!("http://{}/v1/", registry.addr),
        "alice",
        "pw",
    );
    let alice = client_with(RegistryOptions {
        auth_config: Some(config),
        insecure: true,
        ..RegistryOptions::default()
    });
    let r = reference(&registry.addr, "vi/ns/peer:v2");
    let data = common::noise(6 << 20, 51);
    let layer = disk_layer("disk.qcow2", &data);

    // Distribution does not name blobs: a writer that counted on it fails, nothing stored.
    let mut upload = alice.upload_blob(&r).unwrap();
    assert!(!upload.registry_names_blob());
    upload.write_all(&layer).unwrap();
    let e = upload.finish_named().unwrap_err();
    assert!(e.to_string().contains("Dvcr-Upload-Digest"), "{e}");
    assert_eq!(alice.blob_exists(&r, &sha256(&layer)).unwrap(), None);

    let mut upload = alice.upload_blob(&r).unwrap();
    for piece in layer.chunks(777_777) {
        upload.write_all(piece).unwrap();
    }
    let layer_digest = sha256(&layer);
    upload.finish(&layer_digest).unwrap();
    assert_eq!(
        alice.blob_exists(&r, &layer_digest).unwrap(),
        Some(layer.len() as u64)
    );
    let config_blob = image_config(&sha256(&layer));
    let config_digest = alice.push_blob_bytes(&r, &config_blob).unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": config_blob.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    alice
        .put_manifest(
            &r,
            "application/vnd.docker.distribution.manifest.v2+json",
            &manifest,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nregistry log:\n{}",
                std::fs::read_to_string(&registry.log).unwrap_or_default()
            )
        });
    let (name, size, got) = pull_disk(&alice, &r);
    assert_eq!((name.as_str(), size), ("disk.qcow2", data.len() as u64));
    assert!(got == data);

    let e = client().open_disk(&r).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Unauthorized, "{e}");
}

/// A private CA and a server certificate for 127.0.0.1 it signed, made by the real
/// openssl: (CA certificate, server certificate, server key).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-days", "2", "-subj", "/CN=dvcr test CA"])
        .args(["-keyout", s(&p("ca.key")), "-out", s(&p("ca.crt"))]));
    run(Command::new("openssl")
        .arg("req")
        .args(ec)
        .args(["-subj", "/CN=127.0.0.1"])
        .args(["-keyout", s(&p("server.key")), "-out", s(&p("server.csr"))]));
    std::fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .args(["-in", s(&p("server.csr")), "-CA", s(&p("ca.crt"))])
        .args(["-CAkey", s(&p("ca.key")), "-extfile", s(&p("server.ext"))])
        .args(["-out", s(&p("server.crt"))]));
    (p("ca.crt"), p("server.crt"), p("server.key"))
}

#[test]
fn over_tls_a_ca_directory_makes_a_private_certificate_trusted_and_without_it_the_error_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let _server = Serve::start(
        &dir.path().join("root"),
        &listen,
        &["--tls-cert", s(&cert), "--tls-key", s(&key)],
    );
    // A mounted secret: the certificate, its key and a note; only the certificate counts.
    let ca_dir = dir.path().join("certs");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::copy(&ca, ca_dir.join("ca.crt")).unwrap();
    std::fs::copy(&key, ca_dir.join("tls.key")).unwrap();
    std::fs::write(ca_dir.join("README"), "not a certificate").unwrap();

    let r = reference(&listen, "vi/ns/tls:v1");
    let data = common::noise(3 << 20, 91);
    let layer = disk_layer("disk.img", &data);
    let trusted = client_with(RegistryOptions {
        ca_dir: Some(ca_dir),
        ..RegistryOptions::default()
    });
    let mut upload = trusted.upload_blob(&r).unwrap();
    upload.write_all(&layer).unwrap();
    upload.finish(&sha256(&layer)).unwrap();
    push_image(&trusted, &r, &[(OCI_LAYER, &layer)]);
    let (_, _, got) = pull_disk(&trusted, &r);
    assert!(
        got == data,
        "pulled over TLS with the CA from the directory"
    );

    let strict = client_with(RegistryOptions::default());
    let e = strict.open_disk(&r).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Invalid, "{e}");
    let text = e.to_string();
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("certificate directory"), "{text}");

    let (_, _, got) = pull_disk(&client(), &r);
    assert!(got == data, "insecure accepts any certificate");
}

// ---- Mounts and indexes ----

#[test]
fn a_cross_repository_mount_on_dvcr_links_the_blobs_and_the_image_reads_in_the_new_repository() {
    let reg = Registry::start();
    let client = client();
    let data = common::noise(2 << 20, 61);
    let layer = disk_layer("disk.img", &data);
    let from = reference(&reg.addr, "vi/ns/source:v1");
    let (manifest, _) = push_image(&client, &from, &[(OCI_LAYER, &layer)]);
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let to = reference(&reg.addr, "vd/ns/copy:v1");
    for digest in [
        parsed["config"]["digest"].as_str().unwrap(),
        parsed["layers"][0]["digest"].as_str().unwrap(),
    ] {
        assert_eq!(client.blob_exists(&to, digest).unwrap(), None);
        assert!(
            client.mount_blob(&to, &from.repository, digest).unwrap(),
            "dvcr mounts {digest}"
        );
        assert!(client.blob_exists(&to, digest).unwrap().is_some());
    }
    client.put_manifest(&to, OCI_MANIFEST, &manifest).unwrap();
    let (_, _, got) = pull_disk(&client, &to);
    assert!(got == data);

    // A blob the source repository does not have: no mount, and no session left open.
    let unknown = common::unknown_digest();
    assert!(!client.mount_blob(&to, &from.repository, &unknown).unwrap());
    assert_eq!(client.blob_exists(&to, &unknown).unwrap(), None);
}

#[test]
fn an_oci_index_with_arm64_and_amd64_entries_resolves_to_the_amd64_image() {
    let reg = Registry::start();
    let client = client();
    let amd = common::noise(150_000, 71);
    let arm = common::noise(160_000, 72);
    let repo = reference(&reg.addr, "cvi/multi:v1");
    let mut entries = Vec::new();
    for (arch, variant, data) in [("arm64", Some("v8"), &arm), ("amd64", None, &amd)] {
        let layer = disk_layer(&format!("{arch}.img"), data);
        let mut single = repo.clone();
        single.tag = Some(format!("build-{arch}"));
        let (manifest, digest) = push_image(&client, &single, &[(OCI_LAYER, &layer)]);
        let mut platform = json!({"architecture": arch, "os": "linux"});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        entries.push(json!({
            "mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len(), "platform": platform
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries
    }))
    .unwrap();
    client.put_manifest(&repo, OCI_INDEX, &index).unwrap();

    let (media_type, _, index_digest) = client.get_manifest(&repo).unwrap();
    assert_eq!(media_type, OCI_INDEX);
    let (name, _, got) = pull_disk(&client, &repo);
    assert_eq!(name, "amd64.img");
    assert!(got == amd, "linux/amd64 is the default platform");

    let arm_client = client_with(RegistryOptions {
        insecure: true,
        platform: Platform::parse("linux/arm64").unwrap(),
        ..RegistryOptions::default()
    });
    let by_digest = Reference::parse(&format!("{}/cvi/multi@{index_digest}", reg.addr)).unwrap();
    let (name, _, got) = pull_disk(&arm_client, &by_digest);
    assert_eq!(name, "arm64.img");
    assert!(got == arm);

    let s390 = client_with(RegistryOptions {
        insecure: true,
        platform: Platform::parse("linux/s390x").unwrap(),
        ..RegistryOptions::default()
    });
    let e = s390.open_disk(&repo).unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Invalid);
    assert!(
        e.to_string().contains("linux/amd64"),
        "lists what there is: {e}"
    );
}

// ---- A hand-written registry for failures on demand ----

/// What the stub serves at a path: content type and body.
type Routes = HashMap<String, (String, Vec<u8>)>;

/// A registry stub on a loopback port: one request per connection; the blob at
/// `break_path` is cut off half way the first time it is asked for.
struct Stub {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Stub {
    fn start(routes: Routes, break_path: Option<String>) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let routes = Arc::new(routes);
        let broken = Arc::new(AtomicBool::new(break_path.is_none()));
        let (log, stopping) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (routes, log, broken, break_path) = (
                    routes.clone(),
                    log.clone(),
                    broken.clone(),
                    break_path.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve_one(conn, &routes, &log, &broken, break_path.as_deref());
                });
            }
        });
        Stub {
            addr,
            requests,
            stop,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn serve_one(
    mut conn: TcpStream,
    routes: &Routes,
    log: &Mutex<Vec<String>>,
    broken: &AtomicBool,
    break_path: Option<&str>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        // A TLS hello (the client tries HTTPS first) is not a request: hang up at once.
        if head.len() == 1 && !head[0].is_ascii_uppercase() {
            return Ok(());
        }
        if conn.read(&mut byte)? == 0 || head.len() > 65536 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.lines();
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !path.starts_with('/') {
        return Ok(()); // a TLS hello or other noise: hang up
    }
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.trim().to_owned());
    log.lock().unwrap().push(match &range {
        Some(r) => format!("{method} {path} range={r}"),
        None => format!("{method} {path}"),
    });
    let (status, content_type, body) = if path == "/v2/" {
        ("200 OK", "application/json".to_owned(), b"{}".to_vec())
    } else if let Some((ct, body)) = routes.get(path) {
        ("200 OK", ct.clone(), body.clone())
    } else {
        (
            "404 Not Found",
            "application/json".to_owned(),
            br#"{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}"#.to_vec(),
        )
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|_| status.starts_with("200"));
    let mut out = Vec::new();
    let sent: &[u8] = match start {
        Some(n) => {
            write!(
                out,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{}\r\n",
                body.len() - 1,
                body.len()
            )?;
            &body[n..]
        }
        None => {
            write!(out, "HTTP/1.1 {status}\r\n")?;
            &body
        }
    };
    write!(
        out,
        "Content-Type: {content_type}\r\nContent-Length: {}\r\nDocker-Distribution-API-Version: registry/2.0\r\nConnection: close\r\n\r\n",
        sent.len()
    )?;
    conn.write_all(&out)?;
    if method == "HEAD" {
        return Ok(());
    }
    if Some(path) == break_path && !broken.swap(true, Ordering::SeqCst) {
        conn.write_all(&sent[..sent.len() / 2])?;
        conn.flush()?;
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    conn.write_all(sent)?;
    conn.flush()
}

#[test]
fn a_blob_download_that_breaks_off_resumes_with_a_range_request() {
    let data = common::noise(3 << 20, 81);
    let layer = disk_layer("disk.img", &data);
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let (layer_digest, config_digest) = (sha256(&layer), sha256(&config));
    let manifest = common::image_manifest(
        (OCI_CONFIG, &config_digest, config.len()),
        &[(OCI_LAYER, &layer_digest, layer.len())],
    );
    let layer_path = format!("/v2/stub/img/blobs/{layer_digest}");
    let mut routes = Routes::new();
    routes.insert(
        "/v2/stub/img/manifests/v1".into(),
        (OCI_MANIFEST.into(), manifest),
    );
    routes.insert(
        layer_path.clone(),
        ("application/octet-stream".into(), layer.clone()),
    );
    let stub = Stub::start(routes, Some(layer_path.clone()));
    let client = client();
    let (_, _, got) = pull_disk(&client, &reference(&stub.addr, "stub/img:v1"));
    assert!(got == data, "the resumed download gives the same disk");
    let requests = stub.requests();
    let resumed = format!("GET {layer_path} range=bytes={}-", layer.len() / 2);
    assert!(
        requests.iter().any(|r| r == &resumed),
        "expected {resumed:?} among {requests:#?}"
    );
}

#[test]
fn a_schema1_manifest_is_refused_with_advice() {
    let mut routes = Routes::new();
    routes.insert(
        "/v2/stub/old/manifests/v1".into(),
        (
            "application/vnd.docker.distribution.manifest.v1+prettyjws".into(),
            br#"{"schemaVersion":1,"name":"stub/old","tag":"v1","fsLayers":[],"history":[]}"#
                .to_vec(),
        ),
    );
    let stub = Stub::start(routes, None);
    let e = client()
        .open_disk(&reference(&stub.addr, "stub/old:v1"))
        .unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("schema 1"), "{e}");
    let e = client()
        .open_disk(&reference(&stub.addr, "stub/missing:v1"))
        .unwrap_err();
    assert_eq!(e.kind(), OciErrorKind::NotFound, "{e}");
}

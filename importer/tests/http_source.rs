//! The HTTP(S) source against real servers: small misbehaving HTTP/1.1 servers written
//! here (std `TcpListener` threads that drop, stall, redirect and check credentials), and
//! nginx for a large file, range requests and TLS with a private CA made by `openssl`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dvcr_formats::View;
use dvcr_importer::source::{self, HttpOptions, HttpRanges, SourceError};
use dvcr_tests::{Scratch, noise, run};

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 server whose answers each test writes by hand.

/// One request as the test server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `a` of `Range: bytes=a-`.
    fn range_start(&self) -> Option<usize> {
        let spec = self.header("range")?.strip_prefix("bytes=")?;
        spec.strip_suffix('-')?.parse().ok()
    }
}

/// A loopback server: every connection carries one request, answered by the test's
/// handler, then closed. The server lives as long as the test process.
struct Server {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn start(handler: impl Fn(&Seen, &mut TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let log = Arc::clone(&log);
                let handler = Arc::clone(&handler);
                std::thread::spawn(move || {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                    let Some(request) = read_request(&stream) else {
                        return;
                    };
                    log.lock().unwrap().push(request.clone());
                    handler(&request, &mut stream);
                    let _ = stream.flush();
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        Self { base, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn read_request(stream: &TcpStream) -> Option<Seen> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split(' ').nth(1)?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Some(Seen { path, headers })
}

/// Writes a response head; `extra` lines end with `\r\n`.
fn head(stream: &mut TcpStream, status: &str, extra: &str) {
    let text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n{extra}\r\n");
    let _ = stream.write_all(text.as_bytes());
}

/// Reads `body` to its end or first error: the bytes that arrived, and the error.
fn read_all(body: &mut impl Read) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match body.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Asserts two large byte strings are equal without printing them.
fn assert_same_bytes(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    assert_eq!(first, None, "the bytes first differ at this offset");
}

// ---------------------------------------------------------------------------------------
// Bodies, breaks and resumes.

#[test]
fn a_body_without_content_length_reads_completely() {
    let data = Arc::new(noise(3 * MIB + 123, 1));
    let served = Arc::clone(&data);
    let server = Server::start(move |_, stream| {
        head(stream, "200 OK", "Transfer-Encoding: chunked\r\n");
        let mut at = 0;
        let mut size = 1;
        while at < served.len() {
            let piece = &served[at..(at + size).min(served.len())];
            let _ = write!(stream, "{:x}\r\n", piece.len());
            let _ = stream.write_all(piece);
            let _ = stream.write_all(b"\r\n");
            at += piece.len();
            size = size * 3 % 100_003 + 1;
        }
        let _ = stream.write_all(b"0\r\n\r\n");
    });

    let mut body = source::open_http(&server.url("/chunked.img")).unwrap();
    assert_eq!(body.length, None);
    let (got, error) = read_all(&mut body);
    assert!(error.is_none(), "{error:?}");
    assert_same_bytes(&got, &data);
    assert_eq!(body.resumes(), 0);
}

/// Serves `data` with ranges; every answer stops at the next of `cuts` after where it
/// starts and closes the connection there.
fn dropping_server(data: Arc<Vec<u8>>, cuts: Vec<usize>, ranges: bool) -> Server {
    Server::start(move |request, stream| {
        let len = data.len();
        let start = if ranges {
            request.range_start().unwrap_or(0)
        } else {
            0
        };
        let stop = cuts.iter().copied().find(|&c| c > start).unwrap_or(len);
        if start == 0 {
            let accept = if ranges {
                "Accept-Ranges: bytes\r\n"
            } else {
                ""
            };
            head(
                stream,
                "200 OK",
                &format!("Content-Length: {len}\r\n{accept}ETag: \"v1\"\r\n"),
            );
        } else {
            head(
                stream,
                "206 Partial Content",
                &format!(
                    "Content-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\nAccept-Ranges: bytes\r\nETag: \"v1\"\r\n",
                    len - start,
                    len - 1
                ),
            );
        }
        let _ = stream.write_all(&data[start..stop]);
    })
}

#[test]
fn a_dropped_connection_resumes_with_a_range_request() {
    let data = Arc::new(noise(4 * MIB, 2));
    let cuts = vec![1_000_003, 2_500_000];
    let server = dropping_server(Arc::clone(&data), cuts.clone(), true);

    let mut body = source::open_http(&server.url("/disk.img")).unwrap();
    assert_eq!(body.length, Some(data.len() as u64));
    let (got, error) = read_all(&mut body);
    assert!(error.is_none(), "{error:?}");
    assert_same_bytes(&got, &data);
    assert!(body.resumes() >= 1);
    assert_eq!(body.resumes(), 2, "one resume per dropped connection");

    let seen = server.seen();
    let starts: Vec<Option<usize>> = seen.iter().map(Seen::range_start).collect();
    assert_eq!(starts, vec![None, Some(cuts[0]), Some(cuts[1])]);
    for resumed in &seen[1..] {
        assert_eq!(
            resumed.header("if-range"),
            Some("\"v1\""),
            "a resume asks for the same copy of the file"
        );
    }
}

#[test]
fn a_dropped_connection_without_range_support_fails_naming_the_bytes_received() {
    let data = Arc::new(noise(2 * MIB, 3));
    let server = dropping_server(Arc::clone(&data), vec![MIB], false);
    let url = server.url("/no-ranges.img");

    let mut body = source::open_http(&url).unwrap();
    assert_eq!(body.ranges_at, None);
    let (got, error) = read_all(&mut body);
    assert_eq!(got.len(), MIB, "exactly the bytes sent before the drop");
    assert_same_bytes(&got, &data[..MIB]);
    let error = error.expect("a short body must be an error, not a clean end");
    let cause = SourceError::find_in(&error).expect("a source error inside the I/O error");
    assert!(
        matches!(cause, SourceError::Broken { received, .. } if *received == MIB as u64),
        "{cause:?}"
    );
    assert!(cause.is_transient());
    let message = error.to_string();
    assert!(message.contains(&url), "{message}");
    assert!(
        message.contains(&format!("after {MIB} bytes of")),
        "{message}"
    );
    assert!(message.contains("HTTP 200"), "{message}");
    assert_eq!(
        server.seen().len(),
        2,
        "one range request is tried; a 200 answer to it ends the attempts"
    );
    assert_eq!(body.resumes(), 0);
    // The error stays: a later read does not turn into a clean end.
    let mut buf = [0u8; 16];
    assert!(body.read(&mut buf).is_err());
}

#[test]
fn a_stalled_server_fails_with_a_transient_idle_timeout_within_seconds() {
    let server = Server::start(|_, stream| {
        head(stream, "200 OK", &format!("Content-Length: {MIB}\r\n"));
        let _ = stream.write_all(&[7u8; 1000]);
        let _ = stream.flush();
        std::thread::sleep(Duration::from_secs(30));
    });
    let opts = HttpOptions {
        idle_timeout: Duration::from_secs(1),
        resume_attempts: 0,
        ..HttpOptions::default()
    };

    let started = Instant::now();
    let mut body = source::open_http_with(&server.url("/stall.img"), &opts).unwrap();
    let (got, error) = read_all(&mut body);
    let elapsed = started.elapsed();
    assert_eq!(got.len(), 1000);
    let error = error.expect("a stall is an error");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    let cause = SourceError::find_in(&error).expect("a source error inside the I/O error");
    assert!(
        matches!(cause, SourceError::IdleTimeout { .. }),
        "{cause:?}"
    );
    assert!(cause.is_transient());
    assert!(error.to_string().contains("no data"), "{error}");
    assert!(
        elapsed < Duration::from_secs(15),
        "the idle timeout of 1 s took {elapsed:?}"
    );
}

#[test]
fn a_stalled_download_resumes_when_the_server_takes_ranges() {
    let data = Arc::new(noise(MIB + 5, 4));
    let served = Arc::clone(&data);
    let server = Server::start(move |request, stream| {
        let len = served.len();
        match request.range_start() {
            None => {
                head(
                    stream,
                    "200 OK",
                    &format!("Content-Length: {len}\r\nAccept-Ranges: bytes\r\n"),
                );
                let _ = stream.write_all(&served[..1000]);
                let _ = stream.flush();
                std::thread::sleep(Duration::from_secs(30));
            }
            Some(start) => {
                head(
                    stream,
                    "206 Partial Content",
                    &format!(
                        "Content-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\n",
                        len - start,
                        len - 1
                    ),
                );
                let _ = stream.write_all(&served[start..]);
            }
        }
    });
    let opts = HttpOptions {
        idle_timeout: Duration::from_secs(1),
        ..HttpOptions::default()
    };

    let mut body = source::open_http_with(&server.url("/stall-then-resume.img"), &opts).unwrap();
    let (got, error) = read_all(&mut body);
    assert!(error.is_none(), "{error:?}");
    assert_same_bytes(&got, &data);
    assert_eq!(body.resumes(), 1);
    assert_eq!(server.seen()[1].range_start(), Some(1000));
}

// ---------------------------------------------------------------------------------------
// Statuses, redirects and credentials.

#[test]
fn a_missing_file_is_a_permanent_error_naming_the_url_and_the_status() {
    let server = Server::start(|_, stream| {
        head(stream, "404 Not Found", "Content-Length: 9\r\n");
        let _ = stream.write_all(b"not found");
    });
    let url = server.url("/missing.img");

    let error = source::open_http(&url).expect_err("a 404 is an error");
    assert!(
        matches!(error, SourceError::HttpStatus { status: 404, .. }),
        "{error:?}"
    );
    assert!(!error.is_transient());
    let message = error.to_string();
    assert!(message.contains(&url), "{message}");
    assert!(message.contains("404"), "{message}");
}

#[test]
fn a_redirect_loop_stops_after_ten_redirects_with_a_permanent_error() {
    let server = Server::start(|request, stream| {
        let n: u32 = request
            .path
            .rsplit('/')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        head(
            stream,
            "302 Found",
            &format!("Location: /loop/{}\r\nContent-Length: 0\r\n", n + 1),
        );
    });
    let url = server.url("/loop/0");

    let error = source::open_http(&url).expect_err("a loop is an error");
    assert!(
        matches!(error, SourceError::TooManyRedirects { max: 10, .. }),
        "{error:?}"
    );
    assert!(!error.is_transient());
    let message = error.to_string();
    assert!(message.contains("too many redirects (10)"), "{message}");
    assert!(message.contains(&url), "{message}");
    assert_eq!(
        server.seen().len(),
        11,
        "the first request and ten redirects followed, no more"
    );
}

#[test]
fn basic_auth_is_sent_again_after_a_redirect_to_another_host() {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("importer:s3cret")
    );
    let wanted = expected.clone();
    let target = Server::start(move |request, stream| {
        if request.header("authorization") == Some(wanted.as_str()) {
            head(stream, "200 OK", "Content-Length: 11\r\n");
            let _ = stream.write_all(b"hello image");
        } else {
            head(stream, "401 Unauthorized", "Content-Length: 0\r\n");
        }
    });
    let final_url = target.url("/final.img");
    let first = Server::start(move |_, stream| {
        head(
            stream,
            "302 Found",
            &format!("Location: {final_url}\r\nContent-Length: 0\r\n"),
        );
    });
    let opts = HttpOptions {
        basic_auth: Some(("importer".into(), "s3cret".into())),
        ..HttpOptions::default()
    };

    let mut body = source::open_http_with(&first.url("/start.img"), &opts).unwrap();
    let (got, error) = read_all(&mut body);
    assert!(error.is_none(), "{error:?}");
    assert_eq!(got, b"hello image");
    assert_eq!(
        first.seen()[0].header("authorization"),
        Some(expected.as_str())
    );
    assert_eq!(
        target.seen()[0].header("authorization"),
        Some(expected.as_str()),
        "the second hop (another host:port) gets the credentials too"
    );
}

// ---------------------------------------------------------------------------------------
// nginx: a large file, range reads, TLS with a private CA.

/// nginx in the foreground, as one process, with everything under a scratch directory.
/// Killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx serving `root`; `listen_extra` goes after the port (`ssl`), and
    /// `server_extra` into the server block.
    fn start(dir: &Path, root: &Path, listen_extra: &str, server_extra: &str) -> Self {
        let mut last_log = String::new();
        // A free port can be taken between finding it and nginx binding it: try again.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let d = dir.display();
            let conf = format!(
                "master_process off;\n\
                 worker_processes 1;\n\
                 pid {d}/nginx.pid;\n\
                 error_log {d}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n\
                   access_log {d}/access.log;\n\
                   client_body_temp_path {d}/client_body;\n\
                   proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fastcgi;\n\
                   uwsgi_temp_path {d}/uwsgi;\n\
                   scgi_temp_path {d}/scgi;\n\
                   default_type application/octet-stream;\n\
                   server {{\n\
                     listen 127.0.0.1:{port} {listen_extra};\n\
                     root {root};\n\
                     {server_extra}\n\
                   }}\n\
                 }}\n",
                root = root.display()
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let mut child = Command::new("nginx")
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect(
                    "cannot run nginx; install it (apt-get install nginx, or .ci/install-tools)",
                );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        child,
                        port,
                        dir: dir.to_owned(),
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        }
        panic!("nginx did not start; its error log:\n{last_log}");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
            eprintln!("nginx error log:\n{log}");
        }
    }
}

#[test]
fn nginx_serves_a_64_mib_file_byte_exact_and_ranges_read_at_offsets_match() {
    let scratch = Scratch::new();
    let www = scratch.path("www");
    std::fs::create_dir(&www).unwrap();
    let data = noise(64 * MIB, 5);
    std::fs::write(www.join("disk.img"), &data).unwrap();
    let nginx = Nginx::start(&scratch.path(""), &www, "", "");
    let url = format!("http://127.0.0.1:{}/disk.img", nginx.port);

    let mut body = source::open_http(&url).unwrap();
    assert_eq!(body.length, Some(data.len() as u64));
    assert_eq!(body.ranges_at.as_deref(), Some(url.as_str()));
    let (got, error) = read_all(&mut body);
    assert!(error.is_none(), "{error:?}");
    assert_same_bytes(&got, &data);
    drop(got);

    let ranges = HttpRanges::new(&url, data.len() as u64).unwrap();
    assert_eq!(View::len(&ranges), data.len() as u64);
    let len = data.len();
    for (offset, want) in [
        (0, 4096),
        (12_345, 100_000),
        (33 * MIB + 1, 65_536),
        (len - 777, 777),
    ] {
        let bytes = View::read(&ranges, offset as u64, want, "a test read").unwrap();
        assert_same_bytes(&bytes, &data[offset..offset + want]);
    }
    let past_end = View::read(&ranges, len as u64 - 10, 20, "a read past the end");
    assert!(past_end.is_err());
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, made by `openssl`.
struct Pki {
    ca_dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(scratch: &Scratch) -> Pki {
    let dir = scratch.path("pki");
    std::fs::create_dir(&dir).unwrap();
    let ca_key = dir.join("ca.key");
    let ca_dir = scratch.path("cas");
    std::fs::create_dir(&ca_dir).unwrap();
    let ca_cert = ca_dir.join("private-ca.crt");
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-subj", "/CN=dvcr test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca_cert));
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    run(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let cert = dir.join("server.crt");
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca_cert)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    // Other files in the directory that are not certificates are passed over.
    std::fs::write(ca_dir.join("README"), "certificates for the test server\n").unwrap();
    Pki { ca_dir, cert, key }
}

/// nginx over TLS with a certificate from a private CA, serving `data` as `/disk.img`.
fn tls_site(scratch: &Scratch, data: &[u8], server_extra: &str) -> (Nginx, Pki) {
    let pki = make_pki(scratch);
    let www = scratch.path("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("disk.img"), data).unwrap();
    let logs = scratch.path("nginx");
    std::fs::create_dir(&logs).unwrap();
    let tls = format!(
        "ssl_certificate {};\nssl_certificate_key {};\n{server_extra}",
        pki.cert.display(),
        pki.key.display()
    );
    (Nginx::start(&logs, &www, "ssl", &tls), pki)
}

#[test]
fn a_private_ca_from_a_directory_is_trusted_and_without_it_the_certificate_is_refused() {
    let scratch = Scratch::new();
    let data = noise(3 * MIB + 17, 6);
    let (nginx, pki) = tls_site(&scratch, &data, "");
    let url = format!("https://127.0.0.1:{}/disk.img", nginx.port);

    let trusting = HttpOptions {
        ca_dir: Some(pki.ca_dir.clone()),
        ..HttpOptions::default()
    };
    let mut body = source::open_http_with(&url, &trusting).unwrap();
    let (got, error) = read_all(&mut body);
    assert!(error.is_none(), "{error:?}");
    assert_same_bytes(&got, &data);

    let error = source::open_http(&url).expect_err("a certificate from an unknown CA is refused");
    assert!(matches!(error, SourceError::Tls { .. }), "{error:?}");
    assert!(!error.is_transient());
    let message = error.to_string();
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("CA certificate directory"), "{message}");

    let insecure = HttpOptions {
        insecure_tls: true,
        ..HttpOptions::default()
    };
    let mut body = source::open_http_with(&url, &insecure).unwrap();
    let (got, error) = read_all(&mut body);
    assert!(error.is_none(), "{error:?}");
    assert_same_bytes(&got, &data);
}

#[test]
fn a_redirect_from_https_to_plain_http_is_refused() {
    let plain = Server::start(|_, stream| {
        head(stream, "200 OK", "Content-Length: 2\r\n");
        let _ = stream.write_all(b"no");
    });
    let scratch = Scratch::new();
    let (nginx, pki) = tls_site(
        &scratch,
        b"unused",
        &format!(
            "location = /down.img {{ return 302 {}; }}",
            plain.url("/x.img")
        ),
    );
    let opts = HttpOptions {
        ca_dir: Some(pki.ca_dir.clone()),
        basic_auth: Some(("importer".into(), "s3cret".into())),
        ..HttpOptions::default()
    };
    let url = format!("https://127.0.0.1:{}/down.img", nginx.port);

    let error = source::open_http_with(&url, &opts).expect_err("a downgrade is refused");
    assert!(matches!(error, SourceError::Redirect { .. }), "{error:?}");
    assert!(!error.is_transient());
    assert!(error.to_string().contains("plain http"), "{error}");
    assert!(
        plain.seen().is_empty(),
        "nothing (and no credentials) went to the plain-http server"
    );
}

#[test]
fn a_bad_file_in_the_ca_directory_is_a_permanent_error_naming_it() {
    let scratch = Scratch::new();
    for (name, text) in [
        (
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!! not base64 !!!\n-----END CERTIFICATE-----\n",
        ),
        // Valid PEM around bytes that are no certificate.
        (
            "junk.crt",
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        ),
        ("empty.crt", "just some text\n"),
    ] {
        let dir = scratch.path(name.replace('.', "-").as_str());
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
        let opts = HttpOptions {
            ca_dir: Some(dir.clone()),
            ..HttpOptions::default()
        };
        // Refused before any connection is made.
        let error = source::open_http_with("https://127.0.0.1:9/disk.img", &opts)
            .expect_err("a bad CA file is an error");
        assert!(
            matches!(&error, SourceError::CaCertificates { path, .. } if path.ends_with(name)),
            "{error:?}"
        );
        assert!(!error.is_transient());
        assert!(error.to_string().contains(name), "{error}");
    }
}

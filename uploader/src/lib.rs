//! `dvcr-uploader`: the `curl -T` upload endpoints (signed, expiring, resumable URLs) that
//! feed the importer pipeline.
//!
//! One server receives one image and streams it through [`dvcr_importer::run`] into DVCR
//! (or a disk), with the importer's format detection, checksum checks and artifact
//! layout. [`router`] holds the routes so `dvcr serve` can mount them too.
//!
//! # URLs
//!
//! An upload URL is `<base>/upload/<token>`; the token (see [`token`]) is signed with the
//! server's key and names the destination (`vi/ns/name:uid`) and an expiry. It is checked
//! before a byte of the body is read: no or a garbled token → 401, a token signed with
//! another key → 403, an expired one → 403 "the upload URL expired at ...". The
//! in-cluster URL carries the same token. `dvcr-uploader url --dest vi/ns/name:uid --ttl 1h`
//! prints both.
//!
//! # Protocol
//!
//! - `GET /upload` → 200 once the server is ready; `GET /healthz` → 200.
//! - `PUT`, `POST` or `PATCH /upload/<token>` with the image as the body (fixed length or
//!   chunked), or as the first file part of a `multipart/form-data` body. The answer comes
//!   when the image is stored: 200 with the status JSON, or the error (422 for an image
//!   that is damaged, unsafe or does not match `--checksum`; 413 beyond `--max-size`; 400
//!   for a body that is not what was declared). A request while another one is sending
//!   bytes → 503; after the image is stored → 409.
//! - Resuming: every received byte goes to the pipeline, which keeps its place while the
//!   server runs. `HEAD /upload/<token>` answers `Upload-Offset: N` (and
//!   `Upload-Length` once known). The rest is sent with `Content-Range: bytes N-*/*` or
//!   `bytes N-M/TOTAL`; another start than `N` → 416 with `Upload-Offset`. The upload is
//!   complete when the byte at `TOTAL - 1` arrived (TOTAL from the Content-Range, or from
//!   the Content-Length of a request without one) or, with no total, when a body ends
//!   cleanly. A request that ends before the total (`bytes 0-99/1000`) is answered 204
//!   with the new `Upload-Offset`, so big files can be sent in pieces.
//! - `GET /upload/<token>/status` (and `GET /status` in the cluster) →
//!   `{"phase": "WaitForUserUpload"|"Provisioning"|"Ready"|"Failed", "progress": percent,
//!   "stored": bytes, "unpacked": bytes, "received": bytes, "format": ..., "cdrom": bool,
//!   "error": ...}`.
//!
//! The pipeline reads the received bytes from a bounded queue in memory (waiting for more
//! until the upload is complete): it streams while bytes arrive, writes no copy of them
//! anywhere but the destination, and nothing is ever sent twice. On the
//! way into DVCR (which stores images as they are) the pipeline also decodes images with
//! tables without keeping the result, so a truncated or damaged image fails with 422
//! instead of being published.
//!
//! # With curl
//!
//! ```text
//! curl -T disk.qcow2 "$URL"                        # upload (prints the status JSON)
//! curl --progress-bar -T disk.qcow2 "$URL" | cat   # with a progress bar
//! curl -F file=@disk.qcow2 "$URL"                  # as a form
//! curl "$URL/status"                               # where it is
//!
//! # After a broken connection, ask how much arrived:
//! N=$(curl -sI "$URL" | tr -d '\r' | awk -F': ' 'tolower($1)=="upload-offset"{print $2}')
//! # then send the rest; curl skips N bytes and sends
//! # Content-Range: bytes N-(SIZE-1)/SIZE with Content-Length SIZE-N:
//! curl -C "$N" -T disk.qcow2 "$URL"
//! # or stream the rest with an open-ended range (chunked; its clean end completes it):
//! tail -c +$((N + 1)) disk.qcow2 | curl -T - -H "Content-Range: bytes $N-*/*" "$URL"
//! ```
//!
//! `curl --range N- -T FILE` does *not* skip bytes when uploading (it sends the whole file
//! with whatever Content-Range was given), so it must not be used to resume.

pub mod multipart;
pub mod server;
pub mod spool;
pub mod token;

pub use server::{Config, Phase, Status, Target, Uploader, router};
pub use token::{Claims, Signer, TokenError};

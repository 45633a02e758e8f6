//! Blob reads (GET/HEAD with single byte ranges) and deletes.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};

use super::{ApiResult, CONTENT_DIGEST, Shared, respond};
use crate::registry::error::{ApiError, Code};
use crate::registry::names::Digest;
use crate::registry::storage::{Blob, file_body};

/// A byte range resolved against a blob size.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// No usable `Range` header: the whole blob.
    Whole,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// The range cannot be satisfied.
    Unsatisfiable,
}

/// Resolves a `Range` header: one range `bytes=N-M`, `N-` or `-N`. Malformed headers and
/// multiple ranges are ignored (the whole blob is sent), as HTTP allows.
fn parse_range(value: Option<&str>, size: u64) -> RangeRequest {
    let Some(value) = value else {
        return RangeRequest::Whole;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeRequest::Whole,
        // -N: the last N bytes.
        (true, false) => match num(b) {
            None => RangeRequest::Whole,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
        },
        // N-: from N to the end.
        (false, true) => match num(a) {
            None => RangeRequest::Whole,
            Some(start) if start >= size => RangeRequest::Unsatisfiable,
            Some(start) => RangeRequest::Part {
                start,
                end: size - 1,
            },
        },
        (false, false) => match (num(a), num(b)) {
            (Some(start), Some(end)) if start <= end => {
                if start >= size {
                    RangeRequest::Unsatisfiable
                } else {
                    RangeRequest::Part {
                        start,
                        end: end.min(size - 1),
                    }
                }
            }
            _ => RangeRequest::Whole,
        },
    }
}

fn parse_digest(digest: &str) -> Result<Digest, ApiError> {
    Digest::parse(digest).map_err(|e| ApiError::new(Code::DigestInvalid, e.to_string()))
}

/// `GET`/`HEAD /v2/<name>/blobs/<digest>`.
pub async fn get(
    state: &Shared,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> ApiResult {
    let digest = parse_digest(digest)?;
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (file, size) = if head {
        (None, state.storage.blob_size(name, &digest).await?)
    } else {
        let (f, s) = state.storage.open_blob(name, &digest).await?;
        (Some(f), s)
    };
    let mut hdrs = vec![
        (CONTENT_DIGEST, digest.to_string()),
        (header::ACCEPT_RANGES, "bytes".to_owned()),
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::ETAG, format!("\"{digest}\"")),
        (header::CACHE_CONTROL, "max-age=31536000".to_owned()),
    ];
    let (status, start, len) = match parse_range(range_header, size) {
        RangeRequest::Whole => (StatusCode::OK, 0, size),
        RangeRequest::Part { start, end } => {
            hdrs.push((header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            return Err(
                ApiError::new(Code::RangeInvalid, format!("the blob has {size} bytes"))
                    .with_header(header::CONTENT_RANGE, &format!("bytes */{size}")),
            );
        }
    };
    let body = match file {
        None => Body::empty(),
        Some(Blob::S3(blob)) => {
            if let Some(url) = blob.redirect().await? {
                // The client fetches the bytes (and its range) from the bucket itself.
                return Ok(respond(
                    StatusCode::TEMPORARY_REDIRECT,
                    &[
                        (header::LOCATION, url),
                        (CONTENT_DIGEST, digest.to_string()),
                        (header::CONTENT_LENGTH, "0".to_owned()),
                    ],
                    Body::empty(),
                ));
            }
            Body::from_stream(blob.stream(start, len).await?)
        }
        Some(Blob::File(file)) => Body::from_stream(file_body(file, start, len)),
    };
    hdrs.push((header::CONTENT_LENGTH, len.to_string()));
    Ok(respond(status, &hdrs, body))
}

/// `DELETE /v2/<name>/blobs/<digest>`: unlinks the blob from the repository.
pub async fn delete(state: &Shared, name: &str, digest: &str) -> ApiResult {
    let digest = parse_digest(digest)?;
    state.storage.delete_blob(name, &digest).await?;
    Ok(respond(
        StatusCode::ACCEPTED,
        &[(header::CONTENT_LENGTH, "0".to_owned())],
        Body::empty(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_of_every_form_resolve_against_the_size() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Whole);
        assert_eq!(
            parse_range(Some("bytes=0-4"), 10),
            Part { start: 0, end: 4 }
        );
        assert_eq!(parse_range(Some("bytes=5-"), 10), Part { start: 5, end: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10), Part { start: 7, end: 9 });
        assert_eq!(
            parse_range(Some("bytes=-30"), 10),
            Part { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=8-100"), 10),
            Part { start: 8, end: 9 }
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Whole);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Whole);
        assert_eq!(parse_range(Some("items=0-1"), 10), Whole);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Whole);
    }
}

//! Blob uploads: start (POST, with monolithic `?digest=` and cross-repository `?mount=`),
//! streamed and ranged chunks (PATCH), completion (PUT `?digest=`), status (GET) and cancel
//! (DELETE). The body goes to the session's writer thread frame by frame, never buffered.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, StatusCode, header};
use uuid::Uuid;

use super::{
    ApiResult, BodyError, CONTENT_DIGEST, Shared, UPLOAD_DIGEST, UPLOAD_UUID, next_chunk,
    query_value, respond,
};
use crate::registry::auth::{Access, Action};
use crate::registry::error::{ApiError, Code};
use crate::registry::names::{self, Digest};
use crate::registry::storage::{Commit, Session, Storage};

fn location(name: &str, id: Uuid) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// The `Range` header value for `offset` received bytes (`0-0` when empty, as clients expect).
fn range_value(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

fn session_headers(name: &str, session: &Session) -> Vec<(HeaderName, String)> {
    let mut headers = vec![
        (header::LOCATION, location(name, session.id)),
        (header::RANGE, range_value(session.offset)),
        (UPLOAD_UUID, session.id.to_string()),
        (header::CONTENT_LENGTH, "0".to_owned()),
    ];
    if let Some(digest) = session.received_digest() {
        headers.push((UPLOAD_DIGEST, digest.to_string()));
    }
    headers
}

fn parse_digest(value: Option<&str>) -> Result<Digest, ApiError> {
    let value = value.ok_or_else(|| {
        ApiError::new(Code::DigestInvalid, "the digest query parameter is missing")
    })?;
    Digest::parse(value).map_err(|e| ApiError::new(Code::DigestInvalid, e.to_string()))
}

/// `Content-Range: <start>-<end>` of a chunk (a `bytes ` or `bytes=` prefix is tolerated).
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let v = value.trim();
    let v = v
        .strip_prefix("bytes")
        .map(|r| r.trim_start_matches([' ', '=']))
        .unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if a > b { None } else { Some((a, b)) }
}

/// A 416 that tells the client where the session stands.
fn range_error(name: &str, session: &Session, detail: String) -> ApiError {
    let mut e = ApiError::new(Code::BlobUploadInvalid, detail)
        .with_status(StatusCode::RANGE_NOT_SATISFIABLE);
    for (k, v) in session_headers(name, session) {
        if k != header::CONTENT_LENGTH {
            e = e.with_header(k, &v);
        }
    }
    e
}

/// Appends a request body to the session. With `Content-Range`, the chunk must start at the
/// current offset and have exactly the announced length, else nothing of it is kept (416).
/// Without it, everything received is kept, even when the body breaks off, so the client can
/// resume from the offset `GET` reports.
async fn append(
    state: &Shared,
    name: &str,
    session: &mut Session,
    req: Request,
) -> Result<(), ApiError> {
    let headers = req.headers();
    let range = match headers.get(header::CONTENT_RANGE) {
        None => None,
        Some(v) => {
            let parsed = v.to_str().ok().and_then(parse_content_range);
            match parsed {
                Some(r) => Some(r),
                None => {
                    return Err(range_error(
                        name,
                        session,
                        "malformed Content-Range: expected <start>-<end>".into(),
                    ));
                }
            }
        }
    };
    let declared_len: Option<u64> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if let Some((start, end)) = range {
        if start != session.offset {
            let detail = format!(
                "the chunk starts at {start} but the upload has {} bytes",
                session.offset
            );
            return Err(range_error(name, session, detail));
        }
        if declared_len.is_some_and(|l| l != end - start + 1) {
            return Err(ApiError::new(
                Code::SizeInvalid,
                "Content-Length does not match Content-Range",
            ));
        }
    }
    let checkpoint = range.map(|_| session.checkpoint());
    let limit = range.map(|(start, end)| end - start + 1);
    let storage: &Storage = &state.storage;
    let idle = state.limits.idle_timeout;

    let mut body: Body = req.into_body();
    let mut writer = None;
    let mut received: u64 = 0;
    let mut failure: Option<BodyError> = None;
    loop {
        match next_chunk(&mut body, idle).await {
            Ok(None) => break,
            Ok(Some(chunk)) => {
                received += chunk.len() as u64;
                if limit.is_some_and(|l| received > l) {
                    failure = Some(BodyError::TooLarge);
                    break;
                }
                let w = writer.get_or_insert_with(|| storage.writer(session, limit));
                if w.write(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let io_result = match writer {
        Some(w) => w.finish(session).await,
        None => Ok(()),
    };
    let short = limit.is_some_and(|l| received != l);
    if let Some(checkpoint) = checkpoint
        && (failure.is_some() || io_result.is_err() || short)
    {
        storage.rollback(session, checkpoint).await?;
    }
    io_result?;
    match failure {
        None if short => Err(ApiError::new(
            Code::SizeInvalid,
            "the chunk is shorter than its Content-Range",
        )),
        None => Ok(()),
        Some(BodyError::TooLarge) => Err(ApiError::new(
            Code::SizeInvalid,
            "the chunk is longer than its Content-Range",
        )),
        Some(BodyError::Idle) => Err(ApiError::new(
            Code::BlobUploadInvalid,
            format!(
                "no data for {} s: the upload stays open, resume from its Range",
                idle.as_secs()
            ),
        )
        .with_status(StatusCode::REQUEST_TIMEOUT)),
        Some(BodyError::Broken(e)) => Err(ApiError::new(
            Code::BlobUploadInvalid,
            format!("the request body broke off: {e}"),
        )),
    }
}

/// Appends the body, then verifies and commits the blob: 201 with its location and digest.
async fn finish(
    state: &Shared,
    name: &str,
    session: &mut Session,
    digest: &Digest,
    req: Request,
) -> ApiResult {
    let checkpoint = session.checkpoint();
    append(state, name, session, req).await?;
    let committed = state.storage.commit(session, digest).await;
    if committed.is_err() && state.storage.can_roll_back(session) {
        // The client may retry the PUT with the same body: it must not count twice.
        state.storage.rollback(session, checkpoint).await?;
    }
    match committed? {
        Commit::Done(size) => {
            tracing::info!(repository = name, %digest, size, "blob committed");
            Ok(respond(
                StatusCode::CREATED,
                &[
                    (header::LOCATION, format!("/v2/{name}/blobs/{digest}")),
                    (CONTENT_DIGEST, digest.to_string()),
                    (header::CONTENT_LENGTH, "0".to_owned()),
                ],
                Body::empty(),
            ))
        }
        Commit::Mismatch(actual) => Err(ApiError::new(
            Code::DigestInvalid,
            format!("the uploaded bytes have digest {actual}, not {digest}; nothing was stored"),
        )),
    }
}

/// `POST /v2/<name>/blobs/uploads/`: a new session (202), a monolithic upload with
/// `?digest=` (201), or a mount with `?mount=&from=` (201, or 202 with a session).
pub async fn start(
    state: &Shared,
    name: &str,
    query: &[(String, String)],
    req: Request,
) -> ApiResult {
    if let (Some(mount), Some(from)) = (query_value(query, "mount"), query_value(query, "from")) {
        let digest =
            Digest::parse(mount).map_err(|e| ApiError::new(Code::DigestInvalid, e.to_string()))?;
        // A bad or unreadable source just means no mount: the client gets a session.
        let readable = names::validate_name(from).is_ok()
            && state
                .auth
                .authorize(
                    req.headers(),
                    &Access {
                        repository: Some(from.to_owned()),
                        actions: vec![Action::Pull],
                    },
                )
                .is_ok();
        if readable && state.storage.mount_blob(from, name, &digest).await? {
            return Ok(respond(
                StatusCode::CREATED,
                &[
                    (header::LOCATION, format!("/v2/{name}/blobs/{digest}")),
                    (CONTENT_DIGEST, digest.to_string()),
                    (header::CONTENT_LENGTH, "0".to_owned()),
                ],
                Body::empty(),
            ));
        }
    }
    let digest = match query_value(query, "digest") {
        Some(d) => Some(parse_digest(Some(d))?),
        None => None,
    };
    let id = state.storage.start_upload(name).await?;
    let mut session = state.storage.lock_session(&id.to_string(), name).await?;
    match digest {
        Some(digest) => {
            let result = finish(state, name, &mut session, &digest, req).await;
            if result.is_err() && !session.is_closed() {
                let _ = state.storage.cancel(&mut session).await;
            }
            result
        }
        None => Ok(respond(
            StatusCode::ACCEPTED,
            &session_headers(name, &session),
            Body::empty(),
        )),
    }
}

async fn lock(
    state: &Shared,
    name: &str,
    id: &str,
) -> Result<tokio::sync::OwnedMutexGuard<Session>, ApiError> {
    Ok(state.storage.lock_session(id, name).await?)
}

/// `GET /v2/<name>/blobs/uploads/<id>`: 204 with the `Range` received.
pub async fn status(state: &Shared, name: &str, id: &str) -> ApiResult {
    let session = lock(state, name, id).await?;
    Ok(respond(
        StatusCode::NO_CONTENT,
        &session_headers(name, &session),
        Body::empty(),
    ))
}

/// `PATCH /v2/<name>/blobs/uploads/<id>`: a streamed or ranged chunk; 202 with the `Range`.
pub async fn patch(state: &Shared, name: &str, id: &str, req: Request) -> ApiResult {
    let mut session = lock(state, name, id).await?;
    append(state, name, &mut session, req).await?;
    Ok(respond(
        StatusCode::ACCEPTED,
        &session_headers(name, &session),
        Body::empty(),
    ))
}

/// `PUT /v2/<name>/blobs/uploads/<id>?digest=`: the last chunk (optional) and completion.
pub async fn put(
    state: &Shared,
    name: &str,
    id: &str,
    query: &[(String, String)],
    req: Request,
) -> ApiResult {
    let digest = parse_digest(query_value(query, "digest"))?;
    let mut session = lock(state, name, id).await?;
    finish(state, name, &mut session, &digest, req).await
}

/// `DELETE /v2/<name>/blobs/uploads/<id>`: cancels the upload; 204.
pub async fn cancel(state: &Shared, name: &str, id: &str) -> ApiResult {
    let mut session = lock(state, name, id).await?;
    state.storage.cancel(&mut session).await?;
    Ok(respond(
        StatusCode::NO_CONTENT,
        &[(header::CONTENT_LENGTH, "0".to_owned())],
        Body::empty(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_are_read_with_or_without_a_unit() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes=5-5"), Some((5, 5)));
        assert_eq!(parse_content_range("9-3"), None);
        assert_eq!(parse_content_range("x"), None);
    }

    #[test]
    fn the_range_header_reports_the_last_byte_received() {
        assert_eq!(range_value(0), "0-0");
        assert_eq!(range_value(10), "0-9");
    }
}

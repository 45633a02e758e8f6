//! The distribution spec's error codes and their JSON bodies:
//! `{"errors":[{"code":"...","message":"...","detail":...}]}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error code of the distribution spec (plus the few extra ones every registry uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// blob unknown to registry
    BlobUnknown,
    /// blob upload invalid
    BlobUploadInvalid,
    /// blob upload unknown to registry
    BlobUploadUnknown,
    /// provided digest did not match uploaded content
    DigestInvalid,
    /// manifest references a manifest or blob unknown to registry
    ManifestBlobUnknown,
    /// manifest invalid
    ManifestInvalid,
    /// manifest unknown to registry
    ManifestUnknown,
    /// invalid repository name
    NameInvalid,
    /// repository name not known to registry
    NameUnknown,
    /// provided length did not match content length
    SizeInvalid,
    /// authentication required
    #[allow(dead_code)] // sent by the authorizer
    Unauthorized,
    /// requested access to the resource is denied
    #[allow(dead_code)] // sent by the authorizer
    Denied,
    /// the operation is unsupported
    Unsupported,
    /// too many requests
    TooManyRequests,
    /// range not satisfiable (416 on blob reads; not a spec code, the spec names none)
    RangeInvalid,
    /// the `n` query parameter is not a number
    PaginationNumberInvalid,
    /// an internal error (storage failure)
    Internal,
}

impl Code {
    /// The code string of the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::RangeInvalid => "RANGE_INVALID",
            Code::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Code::Internal => "UNKNOWN",
        }
    }

    /// The status this code is usually sent with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::BlobUnknown
            | Code::BlobUploadUnknown
            | Code::ManifestUnknown
            | Code::NameUnknown => StatusCode::NOT_FOUND,
            Code::BlobUploadInvalid
            | Code::DigestInvalid
            | Code::ManifestBlobUnknown
            | Code::ManifestInvalid
            | Code::NameInvalid
            | Code::SizeInvalid
            | Code::PaginationNumberInvalid => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Denied => StatusCode::FORBIDDEN,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The spec's message for this code.
    pub fn message(self) -> &'static str {
        match self {
            Code::BlobUnknown => "blob unknown to registry",
            Code::BlobUploadInvalid => "blob upload invalid",
            Code::BlobUploadUnknown => "blob upload unknown to registry",
            Code::DigestInvalid => "provided digest did not match uploaded content",
            Code::ManifestBlobUnknown => {
                "manifest references a manifest or blob unknown to registry"
            }
            Code::ManifestInvalid => "manifest invalid",
            Code::ManifestUnknown => "manifest unknown to registry",
            Code::NameInvalid => "invalid repository name",
            Code::NameUnknown => "repository name not known to registry",
            Code::SizeInvalid => "provided length did not match content length",
            Code::Unauthorized => "authentication required",
            Code::Denied => "requested access to the resource is denied",
            Code::Unsupported => "the operation is unsupported",
            Code::TooManyRequests => "too many requests",
            Code::RangeInvalid => "requested range not satisfiable",
            Code::PaginationNumberInvalid => "invalid number of results requested",
            Code::Internal => "internal error",
        }
    }
}

/// An API error: a code, a status, a detail for the user, and extra headers (e.g. `Range`
/// and `Location` on a 416 for an upload chunk).
#[derive(Debug)]
pub struct ApiError {
    /// The code.
    pub code: Code,
    /// The HTTP status (usually `code.status()`).
    pub status: StatusCode,
    /// What went wrong, in words a user can act on.
    pub detail: String,
    /// Extra response headers.
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with the code's usual status.
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status(),
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// The same error with another status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The same error with an extra header (skipped if the value is not a valid header).
    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }

    /// An internal error; the detail is logged, the client sees a generic message.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "storage failure");
        Self::new(Code::Internal, "storage failure, see the registry log")
    }
}

impl From<crate::registry::storage::StorageError> for ApiError {
    fn from(e: crate::registry::storage::StorageError) -> Self {
        use crate::registry::storage::StorageError as E;
        match e {
            E::BlobUnknown(d) => ApiError::new(
                Code::BlobUnknown,
                format!("blob {d} is not in this repository"),
            ),
            E::ManifestUnknown(r) => ApiError::new(
                Code::ManifestUnknown,
                format!("manifest {r} is not in this repository"),
            ),
            E::NameUnknown(n) => {
                ApiError::new(Code::NameUnknown, format!("repository {n} does not exist"))
            }
            E::UploadUnknown(u) => ApiError::new(
                Code::BlobUploadUnknown,
                format!("upload {u} does not exist or expired"),
            ),
            E::TooManyUploads(n) => ApiError::new(
                Code::TooManyRequests,
                format!("{n} uploads are already open: finish or cancel some, or retry later"),
            ),
            E::Io(e) => ApiError::internal(e),
            E::UploadBusy(m) => ApiError::new(Code::BlobUploadInvalid, m)
                .with_status(axum::http::StatusCode::CONFLICT),
            E::TooLarge(m) => ApiError::new(Code::SizeInvalid, m)
                .with_status(axum::http::StatusCode::PAYLOAD_TOO_LARGE),
            E::Busy(m) => ApiError::new(Code::TooManyRequests, m)
                .with_status(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                .with_header(axum::http::header::RETRY_AFTER, "30"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "errors": [{
                "code": self.code.as_str(),
                "message": self.code.message(),
                "detail": self.detail,
            }]
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}
